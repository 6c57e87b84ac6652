"""Erasing everything the service keeps about a session or a whole tenant.

What "everything" is, per place:

- Redis, per session (one slot, one DEL): meta, log, request ids (idempotency
  records), summary and compacted view, paused runs; then its index entry.
  A fork into the session still in flight keeps a staging list (random name,
  at most forks.STAGING_TTL_SECONDS); a tenant erase finds those too.
- Redis, per tenant: every key with the tenant's hash tag, found with SCAN
  (sessions, fork staging lists, paused runs, workflows
  ``<prefix>:wf:{tenant:id}``), then the session index. SCAN is bounded per
  step, so Redis is never blocked; the call as a whole grows with the
  tenant's keys (an administrative operation, repeated if interrupted).
- This replica's memory: cached log tails (cache.py) and retrieval memories
  (compression/memory.py) are dropped. Other replicas check their cached
  tails and memories against the session's head in Redis on every read, so
  an erased session is never served from them; their copies leave their
  memory when evicted or at the cache TTL.
- The durable tier (PostgreSQL) when one is configured: any object with the
  two methods of DurableTier. The erase holds the archiver's lock while it
  runs: an archive pass reads Redis and then writes PostgreSQL, so one in
  flight could otherwise copy an erased session back after its rows were
  deleted (and a rehydration between the two stores could bring it back
  into Redis). Erasing therefore waits for a running pass to end.

What erasure cannot reach (docs/data-portability.md): Redis persistence files
until they are rewritten, replicas that are disconnected, backups, and
writes in flight when the erase runs (a turn appending after it re-creates
the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from state_service import metrics
from state_service.compression.engine import Compression
from state_service.errors import DurableTierUnavailable
from state_service.reader import LogReader
from state_service.storage.redis import RedisStorage

# Keys per SCAN step and per DEL of a tenant erase.
SCAN_BATCH = 500

# The archiver's replica-wide lock (state_service/archiver.py).
ARCHIVE_LOCK = "archive"
# How long an erase waits for a running archive pass (at most ~10 s) to end;
# a lock left by a dead archiver expires within 30 s, so past this the erase
# answers UNAVAILABLE and a retry succeeds.
ARCHIVE_LOCK_WAIT_SECONDS = 35.0
# Held long enough for an erase of a large tenant; given back when it ends.
_ERASE_LOCK_SECONDS = 120.0


class DurableTier(Protocol):
    """The durable (PostgreSQL) tier's erasure, as erasure needs it: each
    deletes every row of its scope and returns how many."""

    async def erase_session(self, tenant: str, session_id: str) -> int: ...

    async def erase_tenant(self, tenant: str) -> int: ...


@dataclass(frozen=True, slots=True)
class SessionErased:
    existed: bool
    deleted_keys: int
    durable_rows: int


@dataclass(frozen=True, slots=True)
class TenantErased:
    sessions: int
    deleted_keys: int
    durable_rows: int


class Erasure:
    def __init__(
        self,
        storage: RedisStorage,
        reader: LogReader,
        *,
        compression: Compression | None = None,
        durable: DurableTier | None = None,
    ) -> None:
        self._storage = storage
        self._reader = reader
        self._compression = compression
        self.durable = durable

    def _forget_locally(self, tenant: str, session_id: str) -> None:
        self._reader.forget(tenant, session_id)
        if self._compression is not None:
            self._compression.memories.drop(tenant, session_id)

    @contextlib.asynccontextmanager
    async def _no_archive_pass(self) -> AsyncIterator[None]:
        """Holds the archiver's lock (when there is a durable tier), so no
        archive pass runs while both stores are erased."""
        if self.durable is None:
            yield
            return
        token = uuid.uuid4().hex
        give_up = time.monotonic() + ARCHIVE_LOCK_WAIT_SECONDS
        while not await self._storage.try_lock(ARCHIVE_LOCK, token, _ERASE_LOCK_SECONDS):
            if time.monotonic() > give_up:
                raise DurableTierUnavailable(
                    "an archive pass still holds the durable tier's lock; retry the erase"
                )
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self._storage.unlock(ARCHIVE_LOCK, token)

    async def erase_session(self, tenant: str, session_id: str) -> SessionErased:
        async with self._no_archive_pass():
            return await self._erase_session(tenant, session_id)

    async def erase_tenant(self, tenant: str) -> TenantErased:
        async with self._no_archive_pass():
            return await self._erase_tenant(tenant)

    async def _erase_session(self, tenant: str, session_id: str) -> SessionErased:
        # The durable tier first: a rehydration between the two steps would
        # otherwise bring the session back into Redis.
        rows = await self.durable.erase_session(tenant, session_id) if self.durable else 0
        self._forget_locally(tenant, session_id)
        existed, deleted = await self._storage.erase_session_keys(tenant, session_id)
        # Again after Redis: a read racing the erase may have cached the tail.
        self._forget_locally(tenant, session_id)
        metrics.ERASURES.labels("session").inc()
        metrics.ERASED_KEYS.labels("session").inc(deleted)
        if existed:
            metrics.SESSIONS_DELETED.inc()
        return SessionErased(existed, deleted, rows)

    async def _erase_tenant(self, tenant: str) -> TenantErased:
        rows = await self.durable.erase_tenant(tenant) if self.durable else 0
        sessions: set[str] = set()
        deleted = 0
        async for keys in self._storage.tenant_keys(tenant, SCAN_BATCH):
            for key in keys:
                session_id = self._storage.session_of_key(tenant, key)
                if session_id is not None:
                    sessions.add(session_id)
            deleted += await self._storage.delete_keys(keys)
        deleted += await self._storage.delete_index(tenant)
        for session_id in sessions:
            self._forget_locally(tenant, session_id)
        for session_id in self._reader.cached_sessions(tenant):
            self._reader.forget(tenant, session_id)
        if self._compression is not None:
            for session_id in self._compression.memories.sessions_of(tenant):
                self._compression.memories.drop(tenant, session_id)
        metrics.ERASURES.labels("tenant").inc()
        metrics.ERASED_KEYS.labels("tenant").inc(deleted)
        metrics.SESSIONS_DELETED.inc(len(sessions))
        return TenantErased(len(sessions), deleted, rows)
