"""The archiver: copies sessions with new writes to the durable tier.

Runs on every replica; one at a time archives (a short Redis lock, like the
index sweep), the others only re-count the backlog so that each replica
refuses writes once it is full (storage/tiered.py). A pass takes the oldest
marked sessions a batch at a time and archives each (a PostgreSQL
transaction per session, then ``archive_done`` in Redis); it goes on while
full batches come back, for at most ``pass_seconds``, so a backlog built up
while PostgreSQL was down drains at the rate PostgreSQL takes it. A pass that
cannot reach PostgreSQL stops and the next one retries: nothing is lost, the
sessions stay marked (and so in Redis) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid

from state_service import metrics
from state_service.erasure import ARCHIVE_LOCK as LOCK_NAME
from state_service.errors import StoreError
from state_service.storage.tiered import TieredStorage

logger = logging.getLogger("statecar.state.archiver")

_STOP_SECONDS = 5.0


def _raise_if_cancelled() -> None:
    """Re-raises a cancellation that a library reported as an error (asyncpg
    as a lost connection, asyncio.timeout as a timeout): the loop must end
    when it is stopped, not retry."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Archiver:
    def __init__(
        self,
        storage: TieredStorage,
        *,
        interval_seconds: float,
        batch: int,
        pass_seconds: float = 10.0,
    ) -> None:
        self._storage = storage
        self._interval = interval_seconds
        self._batch = batch
        self._pass_seconds = pass_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="statecar-archiver")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a pass cancelled mid-transaction rolls back over the
            # network, and a shutdown must not wait on PostgreSQL.
            await asyncio.wait({task}, timeout=_STOP_SECONDS)

    async def _run(self) -> None:
        failing = False
        while True:
            # Jitter, so replicas started together do not all try at once.
            await asyncio.sleep(self._interval * random.uniform(0.5, 1.0))
            try:
                await self.pass_once()
                if failing:
                    logger.info("archiving to the durable tier works again")
                failing = False
            except StoreError:
                _raise_if_cancelled()
                if not failing:
                    logger.warning(
                        "archiving to the durable tier failed (PostgreSQL or Redis "
                        "unreachable); the sessions stay in Redis and are retried"
                    )
                failing = True
            except Exception:
                _raise_if_cancelled()
                # A bug here must not end the loop: the backlog would only grow.
                logger.exception("an archive pass failed; it tries again later")

    async def pass_once(self) -> int:
        """One pass if no other replica is archiving; the sessions made clean."""
        if not await self._storage.refresh_backlog():
            return 0
        token = uuid.uuid4().hex
        lock_seconds = max(30.0, self._pass_seconds * 3)
        if not await self._storage.try_lock(LOCK_NAME, token, lock_seconds):
            return 0
        clean = 0
        deadline = time.monotonic() + self._pass_seconds
        try:
            while time.monotonic() < deadline:
                page = await self._storage.dirty_page(self._batch)
                pending = 0
                for tenant, session_id in page:
                    try:
                        done = await self._storage.archive_session(tenant, session_id)
                    except StoreError:
                        metrics.ARCHIVE_PASSES.labels("failed").inc()
                        raise
                    metrics.ARCHIVE_PASSES.labels("clean" if done else "pending").inc()
                    clean += done
                    pending += not done
                # A short page is the end of the backlog; a page of sessions
                # all written again meanwhile waits for the next pass.
                if len(page) < self._batch or pending == len(page):
                    break
        finally:
            await self._storage.unlock(LOCK_NAME, token)
            with contextlib.suppress(StoreError):
                await self._storage.refresh_backlog()
        return clean
