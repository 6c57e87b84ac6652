"""A state server on its own event loop thread, for synchronous callers such as
hypothesis tests (which cannot be coroutines)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from state_service.server import StateServer
from tests.conftest import state_settings


class ThreadedStateServer:
    def __init__(self, redis_url: str, **overrides: Any) -> None:
        self._settings = state_settings(redis_url, **overrides)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: StateServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def __enter__(self) -> ThreadedStateServer:
        self._thread.start()
        started: Future[StateServer] = asyncio.run_coroutine_threadsafe(
            StateServer.start(self._settings), self._loop
        )
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
