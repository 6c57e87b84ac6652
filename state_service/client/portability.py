"""Export and import of sessions as JSON Lines (`statecar export` / `import`).

The format, one JSON object per line (docs/data-portability.md)::

    {"type":"session","session_id":"s1","settings":{...},"create_time":...,"item_count":2,"last_seq":2}
    {"type":"item","session_id":"s1","seq":1,"create_time":"2026-11-30T20:01:45.123Z",
     "original_time":null,"speaker":"","metadata":{},"json":"{\\"role\\":\\"user\\",...}"}

A session's header comes first, then its items oldest first. `json` is the
item's text character for character; times are RFC 3339 UTC with
milliseconds, exactly what the service keeps. No etags: they mean nothing in
another store.

Why client-side paging over ListSessions/ListItems rather than a streaming
RPC: every call stays a bounded, ordinary read (page size, the service's read
steps), tenant scoping and auth are the existing ones, retries are gRPC's,
and memory is one page on each side, whatever the export's size. The price is
that an export is not one snapshot: a session written to while it is being
exported is exported as its pages were read.

Importing keeps seqs (ImportItems) and is idempotent: items the target
session already has (seq at or below its last_seq) are compared with it page
by page and skipped when identical; a difference stops the import
(ImportConflict) with nothing of that session's conflicting items written.
Every ImportItems carries a request_id derived from its content, so a retried
call replays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from state_service.client._client import StateClient
from state_service.client.errors import EtagMismatchError, SessionNotFoundError
from state_service.client.types import ItemRecord, SessionInfo, TierShares

DEFAULT_PAGE_SIZE = 200
DEFAULT_CHUNK_ITEMS = 100
DEFAULT_CHUNK_BYTES = 1024 * 1024


class ImportConflict(Exception):
    """The target session has different items at the seqs being imported."""


class FormatError(ValueError):
    """A line that is not a record of this format (its line number in the message)."""


@dataclass(frozen=True, slots=True)
class SessionHeader:
    """A session's line: its id and settings (None: the service default)."""

    session_id: str
    ttl_seconds: int | None = None
    persist: bool = False
    context_strategy: str | None = None
    tier_shares: TierShares | None = None
    create_ms: int = 0
    item_count: int | None = None
    last_seq: int | None = None


@dataclass(frozen=True, slots=True)
class ExportedItem:
    session_id: str
    item: ItemRecord


Record = SessionHeader | ExportedItem


# -- the line format ------------------------------------------------------------


def time_text(ms: int) -> str | None:
    if not ms:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def ms_of(value: datetime) -> int:
    """A datetime (naive = UTC) in whole milliseconds, without float rounding."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def time_ms(text: Any, where: str) -> int:
    if text is None:
        return 0
    if not isinstance(text, str):
        raise FormatError(f"{where}: a time must be an RFC 3339 string")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FormatError(f"{where}: {text!r} is not an RFC 3339 time") from None
    return ms_of(value)


def render(record: Record) -> str:
    """A record as one line (no newline)."""
    if isinstance(record, SessionHeader):
        shares = record.tier_shares
        data: dict[str, Any] = {
            "type": "session",
            "session_id": record.session_id,
            "settings": {
                "ttl_seconds": record.ttl_seconds,
                "persist": record.persist,
                "context_strategy": record.context_strategy,
                "tier_shares": (
                    None
                    if shares is None
                    else {
                        "recent": shares.recent,
                        "summary": shares.summary,
                        "retrieval": shares.retrieval,
                    }
                ),
            },
            "create_time": time_text(record.create_ms),
            "item_count": record.item_count,
            "last_seq": record.last_seq,
        }
    else:
        item = record.item
        data = {
            "type": "item",
            "session_id": record.session_id,
            "seq": item.seq,
            "create_time": time_text(item.create_ms),
            "original_time": time_text(item.original_ms),
            "speaker": item.speaker,
            "metadata": dict(item.metadata),
            "json": item.json,
        }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _int(value: Any, where: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: must be an integer")
    return value


def parse(line: str, number: int = 0) -> Record:
    """One line as a record; FormatError says what is wrong and where."""
    where = f"line {number}"
    try:
        data = json.loads(line)
    except ValueError:
        raise FormatError(f"{where}: not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("session_id"), str):
        raise FormatError(f"{where}: expected an object with a session_id")
    kind = data.get("type")
    if kind == "session":
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise FormatError(f"{where}: settings must be an object")
        shares = settings.get("tier_shares")
        strategy = settings.get("context_strategy")
        if strategy is not None and not isinstance(strategy, str):
            raise FormatError(f"{where}: settings.context_strategy must be a string")
        if shares is not None and not isinstance(shares, dict):
            raise FormatError(f"{where}: settings.tier_shares must be an object")
        return SessionHeader(
            session_id=data["session_id"],
            ttl_seconds=_int(settings.get("ttl_seconds"), where, optional=True),
            persist=bool(settings.get("persist", False)),
            context_strategy=strategy,
            tier_shares=(
                None
                if shares is None
                else TierShares(
                    float(shares.get("recent", 0)),
                    float(shares.get("summary", 0)),
                    float(shares.get("retrieval", 0)),
                )
            ),
            create_ms=time_ms(data.get("create_time"), where),
            item_count=_int(data.get("item_count"), where, optional=True),
            last_seq=_int(data.get("last_seq"), where, optional=True),
        )
    if kind == "item":
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FormatError(f"{where}: metadata must map strings to strings")
        if not isinstance(data.get("json"), str):
            raise FormatError(f"{where}: json must be the item's JSON text")
        speaker = data.get("speaker") or ""
        if not isinstance(speaker, str):
            raise FormatError(f"{where}: speaker must be a string")
        seq = _int(data.get("seq"), where)
        assert seq is not None
        return ExportedItem(
            data["session_id"],
            ItemRecord(
                seq=seq,
                json=data["json"],
                metadata=metadata,
                create_ms=time_ms(data.get("create_time"), where),
                original_ms=time_ms(data.get("original_time"), where),
                speaker=speaker,
            ),
        )
    raise FormatError(f"{where}: type must be 'session' or 'item'")


async def parse_lines(lines: AsyncIterable[str]) -> AsyncIterator[Record]:
    number = 0
    async for line in lines:
        number += 1
        if line.strip():
            yield parse(line, number)


# -- export ---------------------------------------------------------------------------


@dataclass
class ExportStats:
    """What an export did: sessions and items written, ListItems pages read
    and the most items one page held (what memory is bounded by)."""

    sessions: int = 0
    items: int = 0
    pages: int = 0
    largest_page: int = 0


def header_of(info: SessionInfo) -> SessionHeader:
    return SessionHeader(
        session_id=info.session_id,
        ttl_seconds=int(info.ttl.total_seconds()) if info.ttl is not None else None,
        persist=info.persist,
        context_strategy=info.context_strategy,
        tier_shares=info.tier_shares,
        create_ms=ms_of(info.create_time),
        item_count=info.item_count,
        last_seq=info.last_seq,
    )


async def export_sessions(
    client: StateClient,
    write: Callable[[str], object],
    *,
    session_ids: list[str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> ExportStats:
    """Writes the caller's sessions (all, in id order, or `session_ids`) as
    lines through `write` (each ends with a newline), a page at a time."""
    stats = ExportStats()

    async def one(info: SessionInfo) -> None:
        write(render(header_of(info)) + "\n")
        stats.sessions += 1
        token = ""
        while True:
            items, token = await client.list_item_records(
                info.session_id, page_size=page_size, page_token=token
            )
            stats.pages += 1
            stats.largest_page = max(stats.largest_page, len(items))
            for item in items:
                write(render(ExportedItem(info.session_id, item)) + "\n")
            stats.items += len(items)
            if not token:
                return

    if session_ids is not None:
        for session_id in session_ids:
            await one(await client.get_session(session_id))
        return stats
    token = ""
    while True:
        page = await client.list_sessions(page_size=page_size, page_token=token)
        for info in page.sessions:
            await one(info)
        token = page.next_page_token
        if not token:
            return stats


# -- import ---------------------------------------------------------------------------


@dataclass
class ImportStats:
    """What an import did: sessions seen, created, items written and items
    skipped because the target already had them (identical)."""

    sessions: int = 0
    created: int = 0
    imported: int = 0
    skipped: int = 0
    calls: int = 0
    conflicts: list[str] = field(default_factory=list)


def _same(stored: ItemRecord, wanted: ItemRecord) -> bool:
    return (
        stored.seq == wanted.seq
        and stored.json == wanted.json
        and dict(stored.metadata) == dict(wanted.metadata)
        and stored.original_ms == wanted.original_ms
        and stored.speaker == wanted.speaker
        and (not wanted.create_ms or stored.create_ms == wanted.create_ms)
    )


def request_id_of(session_id: str, items: list[ItemRecord]) -> str:
    """A request id from the content: a retried (or repeated) call replays."""
    digest = hashlib.sha256(session_id.encode())
    for item in items:
        digest.update(
            json.dumps(
                [
                    item.seq,
                    item.json,
                    sorted(item.metadata.items()),
                    item.create_ms,
                    item.original_ms,
                    item.speaker,
                ],
                ensure_ascii=False,
            ).encode()
        )
    return "import-" + digest.hexdigest()[:48]


class _TargetItems:
    """The target session's items up to `last_seq`, read a page at a time,
    to compare an import against what is already there."""

    def __init__(self, client: StateClient, session_id: str, last_seq: int, page_size: int):
        self._client = client
        self._session_id = session_id
        self.last_seq = last_seq
        self._page_size = page_size
        self._page: list[ItemRecord] = []
        self._at = 0
        self._token = ""
        self._done = last_seq == 0

    async def find(self, seq: int) -> ItemRecord | None:
        """The stored item with `seq` (seqs asked in increasing order)."""
        while True:
            while self._at < len(self._page):
                item = self._page[self._at]
                if item.seq > seq:
                    return None
                self._at += 1
                if item.seq == seq:
                    return item
            if self._done:
                return None
            self._page, self._token = await self._client.list_item_records(
                self._session_id, page_size=self._page_size, page_token=self._token
            )
            self._at = 0
            self._done = not self._token


class _SessionImport:
    def __init__(
        self,
        client: StateClient,
        header: SessionHeader,
        stats: ImportStats,
        chunk_items: int,
        chunk_bytes: int,
        page_size: int,
    ) -> None:
        self.client = client
        self.header = header
        self.stats = stats
        self.chunk_items = chunk_items
        self.chunk_bytes = chunk_bytes
        self.page_size = page_size
        self.pending: list[ItemRecord] = []
        self.pending_bytes = 0
        self.previous_seq = 0
        self.target: _TargetItems | None = None

    async def start(self) -> None:
        header = self.header
        try:
            info = await self.client.get_session(header.session_id)
        except SessionNotFoundError:
            try:
                info = await self.client.update_session(
                    header.session_id,
                    ttl=timedelta(seconds=header.ttl_seconds) if header.ttl_seconds else None,
                    persist=header.persist,
                    context_strategy=header.context_strategy or "default",
                    tier_shares=header.tier_shares,
                    etag="0",
                    allow_missing=True,
                )
                self.stats.created += 1
            except EtagMismatchError:  # created meanwhile: import into it as it is
                info = await self.client.get_session(header.session_id)
        self.target = _TargetItems(self.client, header.session_id, info.last_seq, self.page_size)

    async def add(self, item: ItemRecord) -> None:
        if item.seq <= self.previous_seq:
            raise FormatError(
                f"session {self.header.session_id!r}: seq {item.seq} is not above "
                f"the previous item's ({self.previous_seq})"
            )
        self.previous_seq = item.seq
        assert self.target is not None
        if item.seq <= self.target.last_seq:
            stored = await self.target.find(item.seq)
            if stored is None or not _same(stored, item):
                raise ImportConflict(
                    f"session {self.header.session_id!r} already has "
                    f"{'a different item' if stored else 'no item'} at seq {item.seq} "
                    f"(its items go up to seq {self.target.last_seq}); nothing more of it "
                    "was imported. Erase or rename the target session, or leave it out."
                )
            self.stats.skipped += 1
            return
        size = len(item.json) + sum(len(k) + len(v) for k, v in item.metadata.items())
        if self.pending and (
            len(self.pending) >= self.chunk_items or self.pending_bytes + size > self.chunk_bytes
        ):
            await self.flush()
        self.pending.append(item)
        self.pending_bytes += size

    async def flush(self) -> None:
        if not self.pending:
            return
        session_id = self.header.session_id
        await self.client.import_items(
            session_id, self.pending, request_id=request_id_of(session_id, self.pending)
        )
        self.stats.calls += 1
        self.stats.imported += len(self.pending)
        self.pending = []
        self.pending_bytes = 0


async def import_records(
    client: StateClient,
    records: AsyncIterable[Record],
    *,
    chunk_items: int = DEFAULT_CHUNK_ITEMS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> ImportStats:
    """Imports records (a header, then that session's items, per session)
    into the caller's tenant; holds at most one chunk and one page of the
    target in memory."""
    stats = ImportStats()
    current: _SessionImport | None = None
    async for record in records:
        if isinstance(record, SessionHeader):
            if current is not None:
                await current.flush()
            current = _SessionImport(client, record, stats, chunk_items, chunk_bytes, page_size)
            await current.start()
            stats.sessions += 1
            continue
        if current is None or record.session_id != current.header.session_id:
            raise FormatError(
                f"an item of session {record.session_id!r} does not follow that session's header"
            )
        await current.add(record.item)
    if current is not None:
        await current.flush()
    return stats
