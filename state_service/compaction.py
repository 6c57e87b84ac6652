"""Compacted views: history replaced for the model, never in the log.

OpenAI's compaction (the SDK's OpenAIResponsesCompactionSession) replaces a
session's history, or its newest part, with a shorter list of items. statecar
never rewrites its log (design principle: compression builds a view), so a
compaction is stored *beside* the log as a view: a list of items that stands
in for the log up to a seq, followed by whatever the log gains after it.
ListItems and GetContext keep reading the log; GetCompactedView (and so the
openai-agents session adapter's get_items) reads the view.

A view is written in one atomic step (``view_commit``) conditional on the etag
the compaction was computed from, so a compaction that raced with an append
is refused rather than dropping the append. It lives in the session's
summary hash (storage/scripts.lua, ``view_read``), so it has the session's
TTL and is deleted with it. A pop of an item the view covers makes it
stale, and reads fall back to the log: nothing is ever lost, only the
compaction.

Stored items are log payloads (log.encode, sealed like log entries when
encryption is on), each prefixed by its length (u32, big-endian), in one
blob: kept items of the previous view are carried over as they are stored.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from state_service import log, metrics
from state_service.encryption import KeyRing
from state_service.errors import EtagMismatch, InvalidField, SessionNotFound
from state_service.log import Item, NewItem
from state_service.sessions import now_ms
from state_service.storage.redis import RedisStorage, StoredView, ViewRead

_LENGTH = struct.Struct(">I")
# A view read whose log keeps changing under its steps (pops, deletes) gives
# up after this many tries: the caller hears the etag changed.
VIEW_READ_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class ViewResult:
    compacted: bool
    items: list[Item]
    total: int
    up_to_seq: int
    etag: str


@dataclass(frozen=True, slots=True)
class CompactOutcome:
    etag: str
    count: int
    up_to_seq: int
    replayed: bool


def pack(payloads: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(p)) + p for p in payloads)


def unpack(blob: bytes) -> list[bytes]:
    payloads = []
    at = 0
    while at < len(blob):
        (length,) = _LENGTH.unpack_from(blob, at)
        at += _LENGTH.size
        payloads.append(blob[at : at + length])
        at += length
    return payloads


class CompactedViews:
    def __init__(self, storage: RedisStorage, *, keys: KeyRing | None = None) -> None:
        self._storage = storage
        self._keys = keys

    def _open(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        return payload if self._keys is None else self._keys.open(tenant, session_id, payload)

    def _seal(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        return payload if self._keys is None else self._keys.seal(tenant, session_id, payload)

    def _payloads(self, view: StoredView) -> list[bytes]:
        """The view's items as stored: kept payloads, then the log's after it."""
        return unpack(view.blob) + [entry.partition(b":")[2] for entry in view.entries]

    async def _view_read(self, tenant: str, session_id: str) -> ViewRead:
        """The view with the whole log after it, read in bounded steps (one
        script step holds only the first; see RedisStorage.read). The log only
        changes at its tail, so while the incarnation and pop count stay those
        of the first step, the entries below its item count are unchanged and
        the steps make one snapshot; otherwise the read starts over."""
        for _ in range(VIEW_READ_ATTEMPTS):
            read = await self._storage.view_read(tenant, session_id)
            head, view = read.head, read.view
            if head is None or view is None:
                return read
            index = view.covered_items + len(view.entries)
            while index < head.item_count:
                ranged = await self._storage.read(
                    tenant, session_id, index_range=(index, head.item_count - 1)
                )
                now = ranged.head
                if now is None or (now.incarnation, now.trunc) != (head.incarnation, head.trunc):
                    break
                if not ranged.entries:
                    break
                view.entries.extend(ranged.entries)
                index += len(ranged.entries)
            else:
                return read
        raise EtagMismatch(head.etag if head is not None else "0")

    async def read(self, tenant: str, session_id: str, *, max_items: int) -> ViewResult:
        read = await self._view_read(tenant, session_id)
        if read.head is None:
            return ViewResult(False, [], 0, 0, "0")
        view = read.view
        if view is None:
            return ViewResult(False, [], 0, 0, read.head.etag)
        stored = unpack(view.blob)
        total = len(stored) + len(view.entries)
        skip = max(0, total - max_items) if max_items else 0
        items = [
            log.decode_payload(0, self._open(tenant, session_id, payload))
            for payload in stored[skip:]
        ]
        for entry in view.entries[max(0, skip - len(stored)) :]:
            seq, _, payload = entry.partition(b":")
            items.append(log.decode_payload(int(seq), self._open(tenant, session_id, payload)))
        return ViewResult(True, items, total, view.up_to_seq, read.head.etag)

    async def compact(
        self,
        tenant: str,
        session_id: str,
        items: Sequence[NewItem],
        *,
        etag: str,
        keep_items: int,
        request_id: str,
    ) -> CompactOutcome:
        read = await self._view_read(tenant, session_id)
        head = read.head
        if head is None:
            raise SessionNotFound(session_id)
        if head.etag != etag:
            # A replay must still answer: the commit step checks request_id first.
            committed = await self._commit(tenant, session_id, [], etag, 0, 0, request_id)
            return committed
        if read.view is not None:
            current = self._payloads(read.view)
        elif keep_items:
            # No view yet: the view is the log, of which only the kept prefix is
            # read, in bounded steps (RedisStorage.read), each at the same etag.
            current = []
            while len(current) < keep_items:
                ranged = await self._storage.read(
                    tenant, session_id, index_range=(len(current), keep_items - 1)
                )
                if ranged.head is None or ranged.head.etag != etag:
                    raise EtagMismatch(ranged.head.etag if ranged.head else "0")
                if not ranged.entries:
                    break
                current.extend(entry.partition(b":")[2] for entry in ranged.entries)
        else:
            current = []
        total = len(current) if read.view is not None else head.item_count
        if keep_items > total:
            raise InvalidField("keep_items", f"is {keep_items}; the view has {total} items")
        now = now_ms()
        payloads = current[:keep_items] + [
            self._seal(tenant, session_id, log.encode(item, now)) for item in items
        ]
        return await self._commit(
            tenant,
            session_id,
            payloads,
            etag,
            head.last_seq,
            head.item_count,
            request_id,
        )

    async def _commit(
        self,
        tenant: str,
        session_id: str,
        payloads: list[bytes],
        etag: str,
        up_to_seq: int,
        covered_items: int,
        request_id: str,
    ) -> CompactOutcome:
        try:
            committed = await self._storage.view_commit(
                tenant,
                session_id,
                request_id=request_id,
                expected_etag=etag,
                now_ms=now_ms(),
                up_to_seq=up_to_seq,
                covered_items=covered_items,
                blob=pack(payloads),
                count=len(payloads),
            )
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("compact").inc()
            raise
        if committed is None:
            raise SessionNotFound(session_id)
        if committed.replayed:
            metrics.IDEMPOTENT_REPLAYS.labels("compact").inc()
        else:
            metrics.COMPACTIONS.inc()
        return CompactOutcome(
            committed.etag, committed.count, committed.up_to_seq, committed.replayed
        )
