"""CPU-heavy work off the event loop, and each tenant's share of it.

Why: retrieval indexing, extractive summarizing, decoding and token counting of
large items and query tokenization cost time proportional to bytes. On the
event loop they stalled every call of the replica (health checks included) and
ran past deadlines that could not fire while the loop was busy: a default
GetContext on 600 x 100 KB items kept a replica deaf for two minutes.

- **One worker thread, tenants served in turn.** Pure-Python work gains
  nothing from more threads (the GIL), and one thread serializes every use of
  the retrieval memories, which are not thread-safe. The loop keeps answering
  meanwhile: the interpreter hands it the GIL every few milliseconds
  (``sys.getswitchinterval``). Jobs queue per tenant (background work in a
  lane of its own) and the thread takes one job from each waiting lane in
  turn, so another tenant's job waits for at most one job of a busy tenant,
  not for its whole queue (a FIFO made a small call miss its 1 s deadline).
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
import collections
import contextlib
import contextvars
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from state_service import metrics
from state_service.errors import TenantBusy

T = TypeVar("T")

# Work on fewer bytes than this stays on the loop: handing it to the thread
# costs more than doing it (tens of microseconds).
OFFLOAD_MIN_BYTES = 64 * 1024

_ABANDONED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "statecar_heavy_work_abandoned", default=False
)
# The lane (tenant) the current request's jobs queue in; "" = background.
_LANE: contextvars.ContextVar[str] = contextvars.ContextVar("statecar_heavy_lane", default="")


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


class _FairQueue:
    """Jobs in lanes; one worker thread takes a job from each lane in turn."""

    def __init__(self) -> None:
        self._lanes: collections.OrderedDict[
            str, collections.deque[tuple[Callable[[], Any], Future[Any]]]
        ] = collections.OrderedDict()
        self._ready = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, lane: str, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("heavy work is shut down")
            self._lanes.setdefault(lane, collections.deque()).append((fn, future))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="statecar-heavy", daemon=True
                )
                self._thread.start()
            self._ready.notify()
        return future

    def _next(self) -> tuple[Callable[[], Any], Future[Any]] | None:
        with self._ready:
            while not self._lanes and not self._closed:
                self._ready.wait()
            if not self._lanes:
                return None
            lane, jobs = self._lanes.popitem(last=False)
            job = jobs.popleft()
            if jobs:
                self._lanes[lane] = jobs  # to the back of the turn
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue  # abandoned before it started
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            for jobs in self._lanes.values():
                for _, future in jobs:
                    future.cancel()
            self._lanes.clear()
            self._ready.notify_all()


class HeavyWork:
    def __init__(
        self, *, per_tenant: int, retry_after_seconds: float, wait_seconds: float = 0.2
    ) -> None:
        self._queue = _FairQueue()
        self.per_tenant = per_tenant
        self.retry_after_seconds = retry_after_seconds
        self.wait_seconds = wait_seconds
        # Only tenants with a request holding or waiting for a slot.
        self._tenants: dict[str, _TenantSlots] = {}
        self._queued = metrics.HEAVY_WORK_QUEUED
        self._queued.set(0)

    @classmethod
    def unlimited(cls) -> HeavyWork:
        """Heavy work without tenant limits (tests, tools)."""
        return cls(per_tenant=1 << 30, retry_after_seconds=1.0)

    @contextlib.contextmanager
    def lane(self, tenant: str) -> Iterator[None]:
        """Queues the current request's jobs in its tenant's lane, without
        taking a slot (writes: refusing them would lose a turn)."""
        token = _LANE.set(tenant)
        try:
            yield
        finally:
            _LANE.reset(token)

    async def write_work(self, tenant: str, size: int, fn: Callable[[], T]) -> T:
        """A write's encoding work (`size` bytes of items): inline when small,
        else in the worker thread in the tenant's lane without taking a slot
        (refusing a write would lose a turn; its bytes are bounded per request)."""
        if size < OFFLOAD_MIN_BYTES:
            return fn()
        with self.lane(tenant):
            return await self.run(fn)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in the worker thread, in the current request's tenant lane;
        cancelling the caller abandons it."""
        future = self._queue.submit(_LANE.get(), fn)
        self._queued.inc()
        future.add_done_callback(lambda _: self._queued.dec())
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # dropped if not started; else it finishes unheard
            _ABANDONED.set(True)
            raise

    def share(self, tenant: str) -> Share:
        """The request's share of heavy work (``async with``): taken on first
        use, returned at exit; its jobs queue in the tenant's lane meanwhile."""
        return Share(self, tenant)

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
        self._queue.close()


class Share:
    """One request's claim on its tenant's heavy-work slots.

    Its own async context manager rather than an asynccontextmanager
    generator wrapping ``lane()``: every GetContext enters one, and the
    generators cost 3 µs per request against under 1 µs for this."""

    def __init__(self, work: HeavyWork, tenant: str) -> None:
        self._work = work
        self._tenant = tenant
        self._held = False
        self._lane: contextvars.Token[str] | None = None

    async def __aenter__(self) -> Share:
        self._lane = _LANE.set(self._tenant)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._lane is not None:
                _LANE.reset(self._lane)
                self._lane = None
        finally:
            self.release()

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
