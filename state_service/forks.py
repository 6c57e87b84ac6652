"""Forking a session: a new session from a prefix of another one's log.

The source and the new session are two sessions, so on Redis Cluster they sit
in two hash slots and no single script can read one and create the other. A
fork is therefore three kinds of steps, each atomic on its own slot:

1. ``fork_check`` on the new session: a replay of the request_id answers
   here, an existing session is refused here, before anything is copied.
2. ``fork_read`` chunks of the source (log indexes from 0, never past
   ``up_to_seq`` items, so the cost follows what is copied, not the log's
   length), each with the source's incarnation and pop count. The log only
   changes at its tail (appends, pops) or as a whole (delete, expiry), so while
   those two stay the same the prefix is unchanged: a concurrent append never
   tears the copy, a concurrent pop or delete is refused (FORK_SOURCE_CHANGED)
   rather than copied half.
3. ``fork_stage`` the chunks into a staging list in the new session's slot
   (with a TTL, so a fork that dies half-way leaves nothing for long), then
   ``fork_install``: one script there that re-checks the request_id and
   existence, renames the staging list to the log and writes the head, the
   request_id record and the TTL. Before it the new session does not exist;
   after it, it exists whole.

Entries are copied byte for byte (seq, create time, metadata). With
encryption on, an entry is bound to its session (encryption.py), so it is
opened with the source's binding and sealed again with the new session's.

The new session inherits the source's settings (retention, context strategy,
shares) with a fresh TTL; not its summary (a view of the source, recomputed in
the background) nor its request ids.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

from state_service import log, metrics
from state_service.compression.engine import Compression
from state_service.encryption import KeyRing
from state_service.errors import (
    ForkSourceChanged,
    InvalidField,
    SessionAlreadyExists,
    SessionNotFound,
)
from state_service.sessions import SessionInfo, now_ms, session_info
from state_service.storage.redis import (
    ForkChunk,
    ForkInstall,
    ForkRecord,
    ForkTarget,
    RedisStorage,
)
from state_service.tokens import TokenCounter

# Most entries per read and staging step (a read step is also cut at
# REDIS_READ_STEP_BYTES): each Redis step stays short (a script
# blocks its node while it runs) whatever the size of the fork.
CHUNK_ITEMS = 256
# How long a staging list outlives the fork attempt that wrote it, at most.
STAGING_TTL_SECONDS = 600


@dataclass(frozen=True, slots=True)
class ForkResult:
    session: SessionInfo
    copied: int
    up_to_seq: int
    replayed: bool


class SessionForks:
    def __init__(
        self,
        storage: RedisStorage,
        *,
        token_counter: TokenCounter,
        max_items: int,
        keys: KeyRing | None = None,
        compression: Compression | None = None,
    ) -> None:
        self._storage = storage
        self._tokens = token_counter
        self._max_items = max_items
        self._keys = keys
        self._compression = compression

    async def fork(
        self,
        tenant: str,
        source_id: str,
        new_id: str,
        *,
        up_to_seq: int,
        request_id: str,
    ) -> ForkResult:
        """Creates `new_id` from the items of `source_id` with seq <= up_to_seq
        (0: all it has now)."""
        found, record = await self._storage.fork_check(tenant, new_id, request_id)
        if found is ForkTarget.REPLAY:
            assert record is not None
            return await self._replayed(tenant, new_id, record)
        if found is ForkTarget.EXISTS:
            raise SessionAlreadyExists(new_id)
        staging = self._storage.fork_staging_key(tenant, new_id, uuid.uuid4().hex)
        try:
            return await self._copy(tenant, source_id, new_id, staging, up_to_seq, request_id)
        except BaseException:
            # Best effort (the TTL covers a failure here): a refused fork
            # leaves nothing behind.
            with contextlib.suppress(Exception):
                await self._storage.fork_discard(staging)
            raise

    async def _copy(
        self,
        tenant: str,
        source_id: str,
        new_id: str,
        staging: str,
        up_to_seq: int,
        request_id: str,
    ) -> ForkResult:
        first: ForkChunk | None = None
        upto = up_to_seq
        copied = tokens = 0
        index = 0
        while True:
            # The prefix has at most `upto` entries (seqs start at 1 and only
            # grow), so no chunk reads past it.
            stop = index + CHUNK_ITEMS - 1
            if upto > 0:
                stop = min(stop, upto - 1)
            chunk = await self._storage.fork_read(tenant, source_id, index, stop)
            if chunk is None:
                if first is None:
                    raise SessionNotFound(source_id)
                raise ForkSourceChanged(source_id)
            if first is None:
                first = chunk
                if upto > chunk.last_seq:
                    raise InvalidField(
                        "up_to_seq",
                        f"is {upto}, above the source's last seq {chunk.last_seq}",
                    )
                upto = upto or chunk.last_seq
            elif (chunk.incarnation, chunk.trunc) != (first.incarnation, first.trunc):
                raise ForkSourceChanged(source_id)
            entries = chunk.entries
            kept = [raw for raw in entries if _seq(raw) <= upto]
            if copied + len(kept) > self._max_items:
                raise InvalidField(
                    "up_to_seq",
                    f"copies more than {self._max_items} items, the most one fork copies "
                    "(STATE_SERVICE_MAX_FORK_ITEMS); fork an earlier seq",
                )
            if kept:
                converted, chunk_tokens = self._convert(tenant, source_id, new_id, kept)
                staged = await self._storage.fork_stage(staging, converted, STAGING_TTL_SECONDS)
                copied += len(kept)
                tokens += chunk_tokens
                if staged != copied:
                    raise ForkSourceChanged(source_id)  # the staging list expired: start over
            index += len(entries)
            if len(kept) < len(entries) or index >= min(upto, chunk.item_count) or not entries:
                break
        assert first is not None
        installed = await self._storage.fork_install(
            tenant,
            new_id,
            staging,
            request_id=request_id,
            copied=copied,
            up_to_seq=upto,
            tokens=tokens,
            now_ms=now_ms(),
            new_incarnation=uuid.uuid4().hex[:16],
            ttl_setting=first.ttl_setting,
            strategy=first.strategy,
            shares=first.shares,
        )
        if installed.outcome is ForkInstall.REPLAY:
            # A concurrent retry of this request finished first.
            assert installed.record is not None
            return await self._replayed(tenant, new_id, installed.record)
        if installed.outcome is ForkInstall.EXISTS:
            raise SessionAlreadyExists(new_id)
        if installed.outcome is ForkInstall.STALE:
            raise ForkSourceChanged(source_id)
        assert installed.head is not None
        assert installed.record is not None
        metrics.FORKS.inc()
        metrics.FORK_ITEMS_COPIED.inc(copied)
        compression = self._compression
        if copied and compression is not None and compression.compressor is not None:
            compression.compressor.notify(tenant, new_id)
        info = session_info(new_id, installed.head, self._storage.default_ttl_seconds)
        return ForkResult(info, copied, upto, replayed=False)

    def _convert(
        self, tenant: str, source_id: str, new_id: str, raws: list[bytes]
    ) -> tuple[list[bytes], int]:
        """The entries as the new session stores them, and their tokens."""
        keys = self._keys
        converted = []
        tokens = 0
        for raw in raws:
            seq, _, payload = raw.partition(b":")
            if keys is not None:
                payload = keys.open(tenant, source_id, payload)
            tokens += self._tokens.count(log.decode_payload(int(seq), payload).json)
            if keys is not None:
                converted.append(seq + b":" + keys.seal(tenant, new_id, payload))
            else:
                converted.append(raw)
        return converted, tokens

    async def _replayed(self, tenant: str, new_id: str, record: ForkRecord) -> ForkResult:
        metrics.IDEMPOTENT_REPLAYS.labels("fork").inc()
        (head,) = await self._storage.heads(tenant, [new_id])
        if head is None:
            raise SessionNotFound(new_id)  # made by this request, then deleted or expired
        info = session_info(new_id, head, self._storage.default_ttl_seconds)
        return ForkResult(info, record.copied, record.up_to_seq, replayed=True)


def _seq(raw: bytes) -> int:
    return int(raw[: raw.index(b":")])
