"""Redis in front of the PostgreSQL durable tier (STATE_SERVICE_POSTGRES_URL).

Redis stays the authority for hot sessions; every request is served from it
exactly as without the tier. What the tier adds, with the protocol that makes
it lose no acknowledged write:

- **Mark in the write's own step.** With the tier on, every session script's
  ``apply_ttl`` (durable.lua's ``durable_common``) adds the session to the
  archive backlog ``<prefix>:archive:dirty`` and removes its TTL, inside the
  same atomic step as the write: an acknowledged write is always marked, and
  a marked session never expires.
- **Archive, then give the TTL back.** The archiver (archiver.py, one replica
  at a time) copies each marked session's head, summary, new log entries and
  request records to PostgreSQL in one transaction, then ``archive_done``
  gives the session its TTL back and unmarks it *only if* its version is
  still the one copied; a write that came meanwhile keeps it marked. So a
  session leaves Redis (TTL, or eviction under a ``volatile-*`` policy) only
  when PostgreSQL holds all of it.
- **Bounded backlog.** Writes are refused (``ArchiveBacklogFull``) while more
  than ``max_backlog`` sessions are marked (PostgreSQL down or slow), as last
  counted (every archive interval); the backlog drains when PostgreSQL is back.
- **Rehydration.** A session missing from Redis is looked up in PostgreSQL
  and loaded back before the request runs (once per replica at a time): its
  log entries and request records are staged in pages (one read step each,
  so no step grows with the session), then ``rehydrate_install`` makes them
  the session in one step, with the same incarnation, seqs, counters and
  settings (its pop count goes up by one, so caches re-read it). Its
  version jumps by ``REHYDRATE_VERSION_GAP``: writes
  acknowledged after the last archive are lost only if Redis itself lost
  them (a flush, a failover without the AOF), and a client may still hold
  an etag from one of them; the gap makes sure such an etag never names the
  rehydrated session's state (it is refused, the client re-reads).
- **Creates look first.** A write that may create a session runs first with
  no new incarnation (the scripts then answer "missing" instead of
  creating); only if PostgreSQL has no live copy is it run again to create.
  So a cold session is never replaced by a new empty one.

Single Redis node only (durable_common writes a key no script declares).
Workflows and paused runs are not archived (they have their own TTL and no
history).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from state_service import metrics
from state_service.errors import ArchiveBacklogFull, DurableTierUnavailable, EtagMismatch
from state_service.storage.postgres import ArchivedSession, PostgresTier, SessionArchive
from state_service.storage.redis import (
    ABSENT_ETAG,
    READ_STEP_ITEMS,
    AppendOutcome,
    ForkChunk,
    ForkInstalled,
    ForkRecord,
    ForkTarget,
    PopOutcome,
    ReadResult,
    RedisStorage,
    SessionAbsent,
    SessionHead,
    ViewCommit,
    ViewRead,
)

# How far a rehydrated session's version jumps (see the module docstring):
# more writes than this to one session between two archive passes, all lost
# by Redis, could make an old etag match again. Versions stay far below 2**53
# (Lua numbers are doubles) for 2**29 rehydrations.
REHYDRATE_VERSION_GAP = 1 << 24
# A staged rehydration that died half-way leaves its staging keys this long.
STAGING_TTL_SECONDS = 600


@dataclass(frozen=True, slots=True)
class TierOptions:
    max_backlog: int = 10_000


def _split_sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = "preamble"
    for line in text.splitlines():
        if line.startswith("--- "):
            current = line[4:].strip()
            continue
        sections.setdefault(current, []).append(line)
    sections.pop("preamble", None)
    return {name: "\n".join(body) for name, body in sections.items()}


def _pairs(flat: Sequence[Any]) -> dict[str, bytes]:
    return {flat[i].decode(): bytes(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _loaded_head(row: ArchivedSession) -> SessionHead:
    """The head an archived session gets when loaded (see ``_load``); no TTL
    runs while it is not in Redis."""
    meta = row.meta

    def number(name: str) -> int:
        return int(meta.get(name) or 0)

    return SessionHead(
        incarnation=row.incarnation,
        version=row.version + REHYDRATE_VERSION_GAP,
        last_seq=number("last"),
        item_count=number("n"),
        trunc=row.trunc + 1,
        ttl_setting=number("ttl"),
        create_ms=number("ctime"),
        update_ms=number("mtime") or number("ctime"),
        pttl_ms=-1,
        strategy=number("strat"),
        shares=meta.get("shares", b"").decode(),
        log_tokens=int(meta["tok"]) if "tok" in meta else -1,
    )


def _record_version(response: bytes, incarnation: str) -> int | None:
    """The version of the etag a request record starts with, if it is of
    `incarnation` (every record's response begins with the etag it made)."""
    etag = response.split(b" ", 1)[0].decode(errors="replace")
    inc, _, version = etag.partition(".")
    if inc != incarnation or not version.isdigit():
        return None
    return int(version)


class _SessionChanged(Exception):
    """The log lost entries (a pop, a delete) while an archive pass read it."""


class TieredStorage(RedisStorage):
    """RedisStorage with the durable tier: misses look in PostgreSQL, writes
    are marked for the archiver in their own step."""

    tier: PostgresTier
    options: TierOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tier = kwargs.pop("tier")
        options = kwargs.pop("tier_options", TierOptions())
        super().__init__(*args, **kwargs)
        if self.is_cluster:
            raise ValueError("the durable tier needs a single Redis node, not a cluster")
        self.tier = tier
        self.options = options
        self.backlog = 0
        self._loading: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._install_scripts()

    def _install_scripts(self) -> None:
        storage = resources.files("state_service.storage")
        base = _split_sections(storage.joinpath("scripts.lua").read_text())
        extra = _split_sections(storage.joinpath("durable.lua").read_text())
        durable_common = (
            extra.pop("durable_common")
            .replace("__PREFIX_LENGTH__", str(len(self._prefix)))
            .replace("__DIRTY_KEY__", json.dumps(self.dirty_key))
        )
        common = base.pop("common") + "\n" + durable_common
        self._scripts = {
            name: (body, hashlib.sha1(body.encode()).hexdigest())
            for name, body in (
                (name, common + "\n" + text) for name, text in {**base, **extra}.items()
            )
        }

    @property
    def dirty_key(self) -> str:
        return f"{self._prefix}:archive:dirty"

    # -- the backlog ------------------------------------------------------------

    def _check_backlog(self) -> None:
        if self.backlog >= self.options.max_backlog:
            metrics.ARCHIVE_REFUSALS.inc()
            raise ArchiveBacklogFull(self.backlog, self.options.max_backlog)

    async def refresh_backlog(self) -> int:
        self.backlog = int(await self._call("archive_backlog", self._redis.zcard(self.dirty_key)))
        metrics.ARCHIVE_BACKLOG.set(self.backlog)
        return self.backlog

    async def dirty_page(self, count: int) -> list[tuple[str, str]]:
        """Up to `count` (tenant, session id) of the backlog, oldest first."""
        members = await self._call(
            "archive_page", self._redis.zrange(self.dirty_key, 0, max(0, count - 1))
        )
        found = []
        for member in members:
            tenant, _, session_id = member.decode().partition(":")
            found.append((tenant, session_id))
        return found

    # -- archiving --------------------------------------------------------------

    async def archive_session(self, tenant: str, session_id: str) -> bool:
        """Copies what PostgreSQL lacks of a marked session; True if the
        session is clean after (unmarked, TTL back), False if it changed
        meanwhile (still marked: the next pass copies the rest)."""
        keys = self.keys(tenant, session_id)
        member = f"{tenant}:{session_id}"
        done_keys = [*keys.as_list(), self.dirty_key]
        reply = await self._script("archive_read", keys.as_list(), [])
        meta, summary = _pairs(reply[0]), _pairs(reply[1])
        queued, queued_records = int(reply[2]), _pairs(reply[3])
        if "inc" not in meta:
            # Deleted (DeleteSession tombstones the copy itself) or lost by
            # Redis: nothing here to copy.
            args: list[str | int] = ["", "", self.default_ttl_seconds, member, queued]
            return bool(await self._script("archive_done", done_keys, args))
        incarnation = meta["inc"].decode()
        version = int(meta.get("ver", b"0"))
        item_count = int(meta.get("n", b"0"))
        trunc = int(meta.get("trunc", b"0"))
        row = await self.tier.session(tenant, session_id)
        fresh = row is None or row.incarnation != incarnation or row.deleted
        if fresh or row is None:
            first = 0
        elif row.trunc != trunc:
            # Pops since the last pass: entries at or above the shortest the
            # log can have been meanwhile may have changed.
            first = max(0, row.item_count - (trunc - row.trunc))
        else:
            first = row.item_count
        first = min(first, item_count)

        async def entries() -> AsyncIterator[list[bytes]]:
            """The entries PostgreSQL lacks, a read step at a time (so a pass
            holds at most one step's bytes, whatever the session's size),
            each checked against the head read above."""
            index = first
            while index < item_count:
                step = await RedisStorage.read(
                    self,
                    tenant,
                    session_id,
                    index_range=(index, item_count - 1),
                    operation="archive",
                )
                head = step.head
                if (
                    head is None
                    or head.incarnation != incarnation
                    or head.trunc != trunc
                    or not step.entries
                ):
                    raise _SessionChanged
                yield step.entries
                index += len(step.entries)

        if fresh:
            # A first copy takes every record (also those made before the
            # tier was on, which were never queued).
            requests = await self._all_requests(keys.requests, incarnation, version)
        else:
            requests = [
                (name, response)
                for name, response in queued_records.items()
                if _record_version(response, incarnation) is not None
            ]
        archive = SessionArchive(
            incarnation=incarnation,
            version=version,
            item_count=item_count,
            trunc=trunc,
            meta=meta,
            summary=summary,
            first_index=first,
            requests=requests,
            fresh=fresh,
        )
        try:
            await self.tier.write(tenant, session_id, archive, entries())
        except _SessionChanged:
            return False  # popped or deleted under us (nothing written): next pass
        done: list[str | int] = [
            incarnation,
            str(version),
            self.default_ttl_seconds,
            member,
            queued,
        ]
        return bool(await self._script("archive_done", done_keys, done))

    async def _all_requests(
        self, key: str, incarnation: str, version: int
    ) -> list[tuple[str, bytes]]:
        """Every request record of the session up to `version` (later ones
        belong to writes this pass did not copy), read with HSCAN in bounded
        steps: only for a session's first copy; later passes take the records
        its writes queued (durable.lua)."""
        found: list[tuple[str, bytes]] = []
        cursor = 0
        while True:
            cursor, page = await self._call(
                "archive_requests", self._redis.hscan(key, cursor, count=READ_STEP_ITEMS)
            )
            for field, response in page.items():
                made = _record_version(bytes(response), incarnation)
                if made is not None and made <= version:
                    found.append((field.decode(), bytes(response)))
            if cursor == 0:
                return found

    # -- rehydration ------------------------------------------------------------

    async def rehydrate(self, tenant: str, session_id: str) -> bool:
        """Loads the session back from PostgreSQL if it is archived and not in
        Redis; True if it is in Redis after. One load per session at a time
        on this replica (the others wait for it). The load runs in its own
        task: a caller whose deadline passes stops waiting, the load goes on,
        and its retry finds the session in Redis."""
        key = (tenant, session_id)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(
                self._timed_load(tenant, session_id), name="statecar-rehydrate"
            )
            self._loading[key] = task

            def finished(done: asyncio.Task[bool]) -> None:
                self._loading.pop(key, None)
                if not done.cancelled():
                    done.exception()  # retrieved here: callers may all have left

            task.add_done_callback(finished)
        return await asyncio.shield(task)

    async def _timed_load(self, tenant: str, session_id: str) -> bool:
        started = time.perf_counter()
        try:
            loaded = await self._load(tenant, session_id)
        except DurableTierUnavailable:
            metrics.REHYDRATIONS.labels("failed").inc()
            raise
        metrics.REHYDRATIONS.labels("loaded" if loaded else "absent").inc()
        if loaded:
            metrics.REHYDRATION_SECONDS.observe(time.perf_counter() - started)
        return loaded

    async def _load(self, tenant: str, session_id: str) -> bool:
        row = await self.tier.session(tenant, session_id)
        if row is None or row.deleted:
            return False
        attempt = uuid.uuid4().hex
        staged_log = self.fork_staging_key(tenant, session_id, attempt)
        staged_requests = f"{self._prefix}:{{{tenant}:{session_id}}}:h:{attempt}"
        installed = False
        try:
            staged = await self._stage_log(tenant, session_id, staged_log)
            records = await self._stage_requests(tenant, session_id, staged_requests)
            # The pages are separate queries: an archive pass that was still
            # writing (Redis lost the session under it) may have changed the
            # rows meanwhile. Then this copy is not one state: start again.
            again = await self.tier.session(tenant, session_id)
            if (
                again is None
                or (again.incarnation, again.version) != (row.incarnation, row.version)
                or staged != row.item_count
            ):
                raise DurableTierUnavailable(
                    "the archived session changed while it was loaded; retry"
                )
            meta = dict(row.meta)
            meta["ver"] = str(row.version + REHYDRATE_VERSION_GAP).encode()
            # As after a pop: a replica's cached tail of this session may hold
            # writes Redis lost; a new pop count makes every cache re-read.
            meta["trunc"] = str(row.trunc + 1).encode()
            args: list[bytes | str | int] = [
                staged,
                records,
                self.default_ttl_seconds,
                session_id,
                len(meta),
            ]
            for name, value in meta.items():
                args.extend((name, value))
            for name, value in row.summary.items():
                args.extend((name, value))
            keys = [*self.keys(tenant, session_id).as_list(), staged_log, staged_requests]
            outcome = await self._script(
                "rehydrate_install",
                keys,
                args,
                write=True,
                index_add=(self.index_key(tenant), session_id),
            )
            installed = True
            if outcome == b"stale":
                raise DurableTierUnavailable(
                    "the archived session changed while it was loaded; retry"
                )
            return True
        finally:
            if not installed:
                await self._call(
                    "rehydrate_discard", self._redis.delete(staged_log, staged_requests)
                )

    async def _stage_log(self, tenant: str, session_id: str, staging: str) -> int:
        """Copies the archived log into a staging list, a read step at a time."""
        after, staged = -1, 0
        while True:
            page = await self.tier.items(tenant, session_id, after, READ_STEP_ITEMS)
            if not page:
                return staged
            chunk: list[bytes] = []
            size = 0
            for _, entry in page:
                if chunk and size + len(entry) > self.read_step_bytes:
                    staged = await self.fork_stage(staging, chunk, STAGING_TTL_SECONDS)
                    chunk, size = [], 0
                chunk.append(entry)
                size += len(entry)
            staged = await self.fork_stage(staging, chunk, STAGING_TTL_SECONDS)
            after = page[-1][0]

    async def _stage_requests(self, tenant: str, session_id: str, staging: str) -> int:
        after, staged = "", 0
        while True:
            page = await self.tier.requests(tenant, session_id, after, READ_STEP_ITEMS)
            if not page:
                return staged
            args: list[bytes | str | int] = [STAGING_TTL_SECONDS]
            for name, response in page:
                args.extend((name, response))
            staged = int(await self._script("stage_hash", [staging], args, write=True))
            after = page[-1][0]

    async def archived_page(
        self, tenant: str, after: str, count: int
    ) -> list[tuple[str, SessionHead]]:
        """Archived sessions (in Redis or not) in id order after `after`, with
        the heads they have when loaded (for ListSessions, which does not load
        them)."""
        rows = await self.tier.session_page(tenant, after, count)
        return [(session_id, _loaded_head(row)) for session_id, row in rows]

    # -- reads: a miss looks in the durable tier --------------------------------

    async def read(self, tenant: str, session_id: str, **kwargs: Any) -> ReadResult:
        result = await super().read(tenant, session_id, **kwargs)
        if result.head is None and await self.rehydrate(tenant, session_id):
            result = await super().read(tenant, session_id, **kwargs)
        return result

    async def head(self, tenant: str, session_id: str) -> SessionHead | None:
        found = await super().head(tenant, session_id)
        if found is None and await self.rehydrate(tenant, session_id):
            found = await super().head(tenant, session_id)
        return found

    async def view_read(self, tenant: str, session_id: str) -> ViewRead:
        result = await super().view_read(tenant, session_id)
        if result.head is None and await self.rehydrate(tenant, session_id):
            result = await super().view_read(tenant, session_id)
        return result

    async def fork_read(
        self, tenant: str, session_id: str, start: int, stop: int
    ) -> ForkChunk | None:
        chunk = await super().fork_read(tenant, session_id, start, stop)
        if chunk is None and await self.rehydrate(tenant, session_id):
            chunk = await super().fork_read(tenant, session_id, start, stop)
        return chunk

    async def fork_check(
        self, tenant: str, session_id: str, request_id: str
    ) -> tuple[ForkTarget, ForkRecord | None]:
        found = await super().fork_check(tenant, session_id, request_id)
        if found[0] is ForkTarget.ABSENT and await self.rehydrate(tenant, session_id):
            found = await super().fork_check(tenant, session_id, request_id)
        return found

    # -- writes: refused over the backlog; a miss looks first ------------------

    async def _looking_first(
        self,
        tenant: str,
        session_id: str,
        attempt: Callable[[str], Awaitable[AppendOutcome]],
        new_incarnation: str,
        *,
        writes: bool,
    ) -> AppendOutcome:
        """Runs an append-like write with no new incarnation (the script
        answers "missing" rather than create the session); on a miss loads the
        session from PostgreSQL, if it has one, and runs it again allowed to
        create. An empty write (an etag check) that finds nothing still looks."""
        try:
            outcome = await attempt("")
            if writes or outcome.etag != ABSENT_ETAG:
                return outcome
        except SessionAbsent:
            pass
        except EtagMismatch as mismatch:
            if mismatch.current_etag != ABSENT_ETAG:
                raise
        await self.rehydrate(tenant, session_id)
        return await attempt(new_incarnation)

    async def append(
        self,
        tenant: str,
        session_id: str,
        payloads: Sequence[bytes],
        *,
        request_id: str,
        expected_etag: str,
        new_incarnation: str,
        now_ms: int,
        tokens: int = 0,
    ) -> AppendOutcome:
        self._check_backlog()

        async def attempt(incarnation: str) -> AppendOutcome:
            return await super(TieredStorage, self).append(
                tenant,
                session_id,
                payloads,
                request_id=request_id,
                expected_etag=expected_etag,
                new_incarnation=incarnation,
                now_ms=now_ms,
                tokens=tokens,
            )

        return await self._looking_first(
            tenant, session_id, attempt, new_incarnation, writes=bool(payloads)
        )

    async def import_entries(
        self,
        tenant: str,
        session_id: str,
        entries: Sequence[bytes],
        *,
        first_seq: int,
        last_seq: int,
        request_id: str,
        expected_etag: str,
        new_incarnation: str,
        now_ms: int,
        tokens: int,
    ) -> AppendOutcome:
        """As ``append``: an import into a session only PostgreSQL holds
        continues that session (its seqs), never a new one over it."""
        self._check_backlog()

        async def attempt(incarnation: str) -> AppendOutcome:
            return await super(TieredStorage, self).import_entries(
                tenant,
                session_id,
                entries,
                first_seq=first_seq,
                last_seq=last_seq,
                request_id=request_id,
                expected_etag=expected_etag,
                new_incarnation=incarnation,
                now_ms=now_ms,
                tokens=tokens,
            )

        return await self._looking_first(
            tenant, session_id, attempt, new_incarnation, writes=bool(entries)
        )

    async def pop(
        self, tenant: str, session_id: str, *, request_id: str, expected_etag: str, now_ms: int
    ) -> PopOutcome:
        self._check_backlog()
        try:
            outcome = await super().pop(
                tenant,
                session_id,
                request_id=request_id,
                expected_etag=expected_etag,
                now_ms=now_ms,
            )
            if outcome.etag != ABSENT_ETAG:
                return outcome
        except EtagMismatch as mismatch:
            if mismatch.current_etag != ABSENT_ETAG:
                raise
        if not await self.rehydrate(tenant, session_id):
            return PopOutcome(ABSENT_ETAG, None, replayed=False)
        return await super().pop(
            tenant, session_id, request_id=request_id, expected_etag=expected_etag, now_ms=now_ms
        )

    async def update(
        self,
        tenant: str,
        session_id: str,
        *,
        ttl_setting: int | None,
        expected_etag: str,
        allow_missing: bool,
        new_incarnation: str,
        now_ms: int,
        strategy: int | None = None,
        shares: str | None = None,
    ) -> SessionHead | None:
        self._check_backlog()

        async def attempt(incarnation: str) -> SessionHead | None:
            return await super(TieredStorage, self).update(
                tenant,
                session_id,
                ttl_setting=ttl_setting,
                expected_etag=expected_etag,
                allow_missing=allow_missing,
                new_incarnation=incarnation,
                now_ms=now_ms,
                strategy=strategy,
                shares=shares,
            )

        try:
            head = await attempt("")
            if head is not None:
                return head
        except EtagMismatch as mismatch:
            if mismatch.current_etag != ABSENT_ETAG:
                raise
        await self.rehydrate(tenant, session_id)
        return await attempt(new_incarnation)

    async def view_commit(self, tenant: str, session_id: str, **kwargs: Any) -> ViewCommit | None:
        self._check_backlog()
        try:
            committed = await super().view_commit(tenant, session_id, **kwargs)
            if committed is not None:
                return committed
        except EtagMismatch as mismatch:
            if mismatch.current_etag != ABSENT_ETAG:
                raise
        if not await self.rehydrate(tenant, session_id):
            return None
        return await super().view_commit(tenant, session_id, **kwargs)

    async def fork_install(
        self, tenant: str, session_id: str, *args: Any, **kwargs: Any
    ) -> ForkInstalled:
        self._check_backlog()
        return await super().fork_install(tenant, session_id, *args, **kwargs)

    async def delete(self, tenant: str, session_id: str, *, expected_etag: str) -> bool:
        """Deletes the session from Redis (loading it first if only archived,
        so the etag is checked against it), then from PostgreSQL, leaving a
        tombstone there so an archive pass in flight cannot bring it back.
        If PostgreSQL cannot be reached after the Redis delete, the caller
        hears UNAVAILABLE and the archived copy stays (the session comes back
        on its next read, as if the delete had not happened); retrying
        completes it."""
        head = await self.head(tenant, session_id)
        if head is None:
            if expected_etag not in ("", ABSENT_ETAG):
                raise EtagMismatch(ABSENT_ETAG)
            return False
        existed = await super().delete(tenant, session_id, expected_etag=expected_etag)
        await self.tier.delete_session(tenant, session_id, head.incarnation)
        # Another replica may have loaded the archived copy back between the
        # two deletes; the tombstone stops any further load, so remove that one.
        loaded = await super().head(tenant, session_id)
        if loaded is not None and loaded.incarnation == head.incarnation:
            await super().delete(tenant, session_id, expected_etag=loaded.etag)
        return existed

    async def close(self) -> None:
        loads = list(self._loading.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        try:
            await self.tier.close()
        finally:
            await super().close()
