"""/metrics over HTTP on its own port, separate from gRPC, and stoppable.

prometheus_client serves from a daemon thread; scrapes read the registry
there while the event loop updates it (prometheus_client is thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from shared_runtime.process import StartupError, setting_hint

logger = logging.getLogger("statecar.metrics")


@dataclass
class MetricsEndpoint:
    host: str
    port: int
    _server: Any
    _thread: Any

    @classmethod
    def start(
        cls, host: str, port: int, registry: CollectorRegistry = REGISTRY, *, hint: str = ""
    ) -> MetricsEndpoint:
        """Serves /metrics on host:port; a port that cannot be bound is a
        StartupError naming it and, with `hint`, the setting that changes it."""
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            advice = f"; choose another with {hint}" if hint else ""
            raise StartupError(
                f"cannot serve /metrics on {host}:{port}: {error.strerror}{advice}"
            ) from None
        endpoint = cls(host, server.server_port, server, thread)
        logger.info("metrics on http://%s/metrics", endpoint.address)
        return endpoint

    @classmethod
    def configured(cls, settings: Any, undo: contextlib.AsyncExitStack) -> MetricsEndpoint | None:
        """The endpoint a service's settings ask for (metrics_host, metrics_port;
        port 0: none), closed by `undo` if the start fails later."""
        if not settings.metrics_port:
            return None
        endpoint = cls.start(
            settings.metrics_host,
            settings.metrics_port,
            hint=setting_hint(settings, "metrics_port"),
        )
        undo.push_async_callback(endpoint.close)
        return endpoint

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = "::1" if host == "::" else host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
