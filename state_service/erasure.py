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
  two methods of DurableTier.

What erasure cannot reach (docs/data-portability.md): Redis persistence files
until they are rewritten, replicas that are disconnected, backups, and
writes in flight when the erase runs (a turn appending after it re-creates
the session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from state_service import metrics
from state_service.compression.engine import Compression
from state_service.reader import LogReader
from state_service.storage.redis import RedisStorage

# Keys per SCAN step and per DEL of a tenant erase.
SCAN_BATCH = 500


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

    async def erase_session(self, tenant: str, session_id: str) -> SessionErased:
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

    async def erase_tenant(self, tenant: str) -> TenantErased:
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
