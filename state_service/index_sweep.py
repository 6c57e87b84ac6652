"""The background sweep that removes expired sessions from the tenant indexes.

Sessions expire by TTL in Redis, but their entries in ``statecar:idx:{tenant}``
have no TTL (a sorted set holds many sessions with different ones). ListSessions
prunes the entries it meets, but nothing else lists: the agent service never
does, so without this sweep the indexes grew by ~100 bytes per session forever.

Bounded and polite: one replica at a time (a short Redis lock; a replica that
dies while sweeping holds it only until it expires), tenants found with SCAN
and entries read a page at a time (`batch`), a pause between batches, and the
same prune step as ListSessions (listing.prune_gone), which is safe against a
concurrent first write re-creating a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid

from state_service import metrics
from state_service.errors import StoreError
from state_service.listing import prune_gone
from state_service.storage.redis import RedisStorage

logger = logging.getLogger("statecar.state.index_sweep")

LOCK_NAME = "index-sweep"


class IndexSweeper:
    def __init__(
        self,
        storage: RedisStorage,
        *,
        interval_seconds: float,
        batch: int,
        pause_seconds: float,
    ) -> None:
        self._storage = storage
        self._interval = interval_seconds
        self._batch = batch
        self._pause = pause_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="statecar-index-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            # Jitter, so replicas started together do not all try at once.
            await asyncio.sleep(self._interval * random.uniform(0.5, 1.0))
            try:
                await self.sweep_once()
            except StoreError:
                metrics.INDEX_SWEEPS.labels("failed").inc()
                logger.info("the index sweep could not reach Redis; it tries again later")
            except Exception:
                # A bug here must not end the loop: the indexes would grow again.
                metrics.INDEX_SWEEPS.labels("failed").inc()
                logger.exception("the index sweep failed; it tries again later")

    async def sweep_once(self) -> int:
        """One sweep if no other replica is sweeping; returns the entries removed."""
        token = uuid.uuid4().hex
        # The lock outlives a normal sweep; a longer one may overlap another
        # replica's next sweep, which is harmless (pruning is idempotent).
        if not await self._storage.try_lock(LOCK_NAME, token, max(30.0, self._interval)):
            metrics.INDEX_SWEEPS.labels("skipped").inc()
            return 0
        removed = 0
        try:
            async for tenants in self._storage.index_tenants(self._batch):
                for tenant in tenants:
                    removed += await self._sweep_tenant(tenant)
        finally:
            await self._storage.unlock(LOCK_NAME, token)
        metrics.INDEX_SWEEPS.labels("done").inc()
        return removed

    async def _sweep_tenant(self, tenant: str) -> int:
        removed = 0
        after = ""
        while True:
            ids = await self._storage.index_page(tenant, after, self._batch)
            if not ids:
                return removed
            heads = await prune_gone(self._storage, tenant, ids)
            removed += sum(1 for head in heads if head is None)
            after = ids[-1]
            await asyncio.sleep(self._pause)
