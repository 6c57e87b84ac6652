"""CPU-heavy work off the event loop, and each tenant's share of it.

Why: retrieval indexing, extractive summarizing, decoding and token counting of
large items and query tokenization cost time proportional to bytes. On the
event loop they stalled every call of the replica (health checks included) and
ran past deadlines that could not fire while the loop was busy: a default
GetContext on 600 x 100 KB items kept a replica deaf for two minutes.

- **One worker thread.** Pure-Python work gains nothing from more threads (the
  GIL), and one thread serializes every use of the retrieval memories, which
  are not thread-safe. The loop keeps answering meanwhile: the interpreter
  hands it the GIL every few milliseconds (``sys.getswitchinterval``).
- **Abandoned at the deadline.** A caller whose deadline passes stops waiting:
  a job not started yet is dropped from the queue, a running one finishes in
  the thread (its inputs are capped in bytes, so that is bounded) and its
  result is discarded. The caller hears DEADLINE_EXCEEDED (``abandoned()``
  tells the deadline handler it was this, not Redis).
- **A share per tenant.** A request takes one of its tenant's
  ``per_tenant`` slots the first time it needs heavy work (a cached, small
  GetContext never does) and keeps it until it ends. A request that finds
  none free waits at most ``wait_seconds`` (a burst of one tenant's turns
  passes), then is refused (``TenantBusy``: RESOURCE_EXHAUSTED with a retry
  delay) rather than queued for long, so one tenant's load cannot fill the
  queue in front of another tenant's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from state_service import metrics
from state_service.errors import TenantBusy

T = TypeVar("T")

# Work on fewer bytes than this stays on the loop: handing it to the thread
# costs more than doing it (tens of microseconds).
OFFLOAD_MIN_BYTES = 64 * 1024

_ABANDONED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "statecar_heavy_work_abandoned", default=False
)


class Offload(Protocol):
    """Runs `fn` off the event loop and returns its result."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


def abandoned() -> bool:
    """Whether the current request stopped waiting for heavy work (its deadline)."""
    return _ABANDONED.get()


async def inline(fn: Callable[[], T]) -> T:
    """An Offload that runs `fn` right here (tests, and work known to be small)."""
    return fn()


@dataclass
class _TenantSlots:
    free: asyncio.Semaphore
    users: int = 0  # requests holding or waiting for a slot


class HeavyWork:
    def __init__(
        self, *, per_tenant: int, retry_after_seconds: float, wait_seconds: float = 0.2
    ) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="statecar-heavy")
        self.per_tenant = per_tenant
        self.retry_after_seconds = retry_after_seconds
        self.wait_seconds = wait_seconds
        # Only tenants with a request holding or waiting for a slot.
        self._tenants: dict[str, _TenantSlots] = {}
        self._queued = metrics.HEAVY_WORK_QUEUED
        self._queued.set(0)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in the worker thread; cancelling the caller abandons it."""
        future = self._pool.submit(fn)
        self._queued.inc()
        future.add_done_callback(lambda _: self._queued.dec())
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # dropped if not started; else it finishes unheard
            _ABANDONED.set(True)
            raise

    @contextlib.asynccontextmanager
    async def share(self, tenant: str) -> AsyncIterator[Share]:
        """The request's share of heavy work: taken on first use, returned at exit."""
        share = Share(self, tenant)
        try:
            yield share
        finally:
            share.release()

    async def take(self, tenant: str) -> None:
        slots = self._tenants.get(tenant)
        if slots is None:
            slots = self._tenants[tenant] = _TenantSlots(asyncio.Semaphore(self.per_tenant))
        slots.users += 1
        try:
            async with asyncio.timeout(self.wait_seconds):
                await slots.free.acquire()
        except TimeoutError:
            self._leave(tenant, slots)
            metrics.TENANT_BUSY.inc()
            raise TenantBusy(self.retry_after_seconds) from None
        except BaseException:
            self._leave(tenant, slots)
            raise
        metrics.HEAVY_REQUESTS.inc()

    def give_back(self, tenant: str) -> None:
        slots = self._tenants[tenant]
        slots.free.release()
        self._leave(tenant, slots)
        metrics.HEAVY_REQUESTS.dec()

    def _leave(self, tenant: str, slots: _TenantSlots) -> None:
        slots.users -= 1
        if slots.users == 0:
            del self._tenants[tenant]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Share:
    """One request's claim on its tenant's heavy-work slots."""

    def __init__(self, work: HeavyWork, tenant: str) -> None:
        self._work = work
        self._tenant = tenant
        self._held = False

    async def take(self) -> None:
        """Takes one of the tenant's slots (once); TenantBusy if none frees up in time."""
        if not self._held:
            await self._work.take(self._tenant)
            self._held = True

    async def run(self, fn: Callable[[], T]) -> T:
        await self.take()
        return await self._work.run(fn)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._work.give_back(self._tenant)
