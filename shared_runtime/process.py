"""What both services' processes share: the gRPC server and its options,
health + reflection + TLS binding, the address to print, and the SIGTERM
drain around `serve`."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from shared_runtime.health import Readiness
from shared_runtime.tls import ReloadingServerCredentials


class StartupError(RuntimeError):
    """A start-up failure the user can fix: one line that names the cause and
    the setting that changes it (the message is safe to log)."""


def setting_hint(settings: object, field: str) -> str:
    """How a user changes `field`: its CLI flag and its environment variable."""
    config: dict[str, object] = getattr(settings, "model_config", {})
    prefix = str(config.get("env_prefix", ""))
    return f"--{field.replace('_', '-')} or {prefix}{field.upper()}"


class ServerSettings(Protocol):
    """The settings every statecar gRPC server has."""

    listen: str
    max_connection_age_seconds: float
    drain_seconds: float
    keepalive_seconds: float
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_client_ca_file: Path | None


def server_options(settings: ServerSettings, max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Clients behind a Kubernetes Service balance per connection; closing
        # old connections lets them find new pods.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(settings.drain_seconds, 1) * 1000)),
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def create_server(
    settings: ServerSettings,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    max_message_bytes: int,
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=interceptors, options=server_options(settings, max_message_bytes)
    )


def add_health_reflection_and_bind(
    server: grpc.aio.Server, settings: ServerSettings, readiness: Readiness, service_name: str
) -> int:
    """Health and reflection beside the API service; binds settings.listen
    (TLS when a certificate is configured) and returns the port."""
    readiness.add_to_server(server)
    _add_reflection(server, [service_name, "grpc.health.v1.Health"])
    try:
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = ReloadingServerCredentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
            port = server.add_secure_port(settings.listen, tls.credentials)
        else:
            port = server.add_insecure_port(settings.listen)
    except RuntimeError:  # grpcio's "Failed to bind to address"
        port = 0
    if port == 0:
        raise StartupError(
            f"cannot listen on {settings.listen}: the port is in use or the address is not "
            f"on this machine; choose another with {setting_hint(settings, 'listen')}"
        )
    return port


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Server reflection as grpc.reflection.v1 (what current grpcurl, Postman
    and grpc-js clients ask for first) and v1alpha (older clients).
    grpcio-reflection implements only v1alpha; v1 is the same protocol under
    another package name, field for field, so the v1alpha servicer answers it
    with the v1alpha messages' (identical) wire encoding."""
    names = [*services, REFLECTION_V1, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    servicer = ReflectionServicer(names)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


def reachable_address(listen: str, port: int) -> str:
    """Where a local client reaches a server bound to `listen` on `port`."""
    if listen.startswith("unix:"):
        return listen  # a socket path: grpcio reports port 1 for it
    host = listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Service(Protocol):
    @property
    def address(self) -> str: ...

    async def stop(self, grace: float | None = None) -> None: ...

    async def wait_for_termination(self) -> None: ...


async def serve_until_terminated(start: Callable[[], Awaitable[Service]], name: str) -> None:
    """Runs a service until SIGTERM/SIGINT, then drains it (see its stop).

    The handlers go in before start-up: health reports SERVING from inside
    `start`, and a SIGTERM that came between that and a later handler
    installation killed the process without draining its in-flight calls."""
    loop = asyncio.get_running_loop()
    terminate = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, terminate.set)
    try:
        app = await start()
        if not terminate.is_set():
            # What start-up built (modules, descriptors, settings) lives as long
            # as the process: moved out of the collector's sight, so full
            # collections scan only what requests allocate (seen in the p99).
            gc.collect()
            gc.freeze()
            print(f"{name} ready on {app.address}", flush=True)
        terminated = asyncio.ensure_future(app.wait_for_termination())
        signalled = asyncio.ensure_future(terminate.wait())
        await asyncio.wait({terminated, signalled}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if terminate.is_set():
            await app.stop()
        await terminated
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
