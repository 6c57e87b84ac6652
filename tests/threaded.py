"""A service on its own event loop thread, for synchronous callers such as
hypothesis tests (which cannot be coroutines)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from agent_service.server import AgentServer
from state_service.server import StateServer
from tests.conftest import agent_settings, state_settings


class _Server(Protocol):
    @property
    def address(self) -> str: ...

    async def stop(self, grace: float | None = None) -> None: ...


S = TypeVar("S", bound=_Server)


class ThreadedServer(Generic[S]):
    def __init__(self, start: Callable[[], Awaitable[S]]) -> None:
        self._start = start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: S | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def __enter__(self) -> ThreadedServer[S]:
        self._thread.start()

        async def start() -> S:
            return await self._start()

        started: Future[S] = asyncio.run_coroutine_threadsafe(start(), self._loop)
        self.server = started.result(timeout=30)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=0.5), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def threaded_state_server(redis_url: str, **overrides: Any) -> ThreadedServer[StateServer]:
    settings = state_settings(redis_url, **overrides)
    return ThreadedServer(lambda: StateServer.start(settings))


def threaded_agent_server(state_target: str, **overrides: Any) -> ThreadedServer[AgentServer]:
    settings = agent_settings(state_target, **overrides)
    return ThreadedServer(lambda: AgentServer.start(settings))
