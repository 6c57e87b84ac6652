"""grpc.health.v1 with readiness that follows dependencies.

Service names: "" and each API service report readiness (NOT_SERVING while a
dependency is down or the process drains); "liveness" stays SERVING until the
process stops, so a Redis outage never gets pods restarted.

A replica turns NOT_SERVING only after `failure_threshold` probes in a row
fail (as a Kubernetes probe's failureThreshold): one probe that times out
because the machine is busy is not an outage, and NOT_SERVING has costs
(the state service empties its caches, which are only safe to keep while
Redis stays reachable). A replica that has never been ready reports its
first failure at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

logger = logging.getLogger("statecar.health")

LIVENESS_SERVICE = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    def __init__(
        self,
        services: Sequence[str],
        check: Callable[[], Awaitable[None]],
        *,
        interval: float,
        on_change: Callable[[bool], None] | None = None,
        failure_threshold: int = 3,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._services = ["", *services]
        self._check = check
        self._interval = interval
        self._on_change = on_change
        self._failure_threshold = max(1, failure_threshold)
        self._failures = 0
        self._ready: bool | None = None
        self._draining = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    @property
    def ready(self) -> bool:
        return bool(self._ready) and not self._draining

    async def _set(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        logger.log(
            logging.INFO if ready else logging.WARNING,
            "readiness: %s",
            "SERVING" if ready else "NOT_SERVING (a dependency is unreachable)",
        )
        if self._on_change is not None:
            self._on_change(ready)
        if not self._draining:
            for service in self._services:
                await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def probe_once(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
            # cancellation that arrives as the check completes, and the probe
            # loop then never ends (a test teardown hung on it).
            async with asyncio.timeout(max(self._interval * 2, 0.5)):
                await self._check()
            ok = True
        except Exception:
            ok = False
        self._failures = 0 if ok else self._failures + 1
        if ok or self._ready is None or self._failures >= self._failure_threshold:
            await self._set(ok)
        return ok

    async def start(self) -> None:
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        await self.probe_once()
        self._task = asyncio.create_task(self._loop(), name="readiness")

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval)
            await self.probe_once()

    async def drain(self) -> None:
        """NOT_SERVING for good: the process is shutting down."""
        self._draining = True
        for service in self._services:
            await self.servicer.set(service, NOT_SERVING)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a check whose client library swallows the cancellation
            # still ends the loop through the flag, at the latest one probe later.
            await asyncio.wait({self._task}, timeout=max(self._interval * 3, 1.0))
        await self.servicer.enter_graceful_shutdown()
