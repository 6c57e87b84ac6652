"""ServerChain (the fused interceptor chain) behaves as the interceptors it
fuses, passed one by one to grpc.aio.server: the same statuses and
ErrorInfo details, tenants, grpc_server_* samples and log lines, for unary
RPCs (the fused path) and streaming ones (the nested fallback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from shared_runtime.auth import AuthInterceptor, TokenFile, bearer_authenticator, current_tenant
from shared_runtime.errors import InvalidArgument
from shared_runtime.grpc_metrics import GrpcMetrics, ServerMetricsInterceptor
from shared_runtime.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from shared_runtime.server_chain import ServerChain

SERVICE = "test.Chain"
DOMAIN = "chain.test"


def _deserialize(raw: bytes) -> bytes:
    if raw.startswith(b"\xff"):
        raise ValueError("not a message")
    return raw


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"invalid":
        raise InvalidArgument("field", "is wrong")
    if request == b"crash":
        raise RuntimeError("secret internals")
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"hang":
        await asyncio.sleep(30)
    return f"{current_tenant()}:".encode() + request


async def _stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    if request == b"invalid":
        raise InvalidArgument("field", "is wrong")
    for _ in range(2):
        yield current_tenant().encode()


HANDLERS: dict[str, Any] = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary, request_deserializer=_deserialize),
    "Stream": grpc.unary_stream_rpc_method_handler(_stream, request_deserializer=_deserialize),
}


def _layers(registry: CollectorRegistry, tokens: Path) -> tuple[Any, Any, Any, Any]:
    return (
        ServerMetricsInterceptor(GrpcMetrics("server", registry=registry)),
        LoggingInterceptor(),
        ExceptionToStatusInterceptor(DOMAIN),
        AuthInterceptor(bearer_authenticator(TokenFile(tokens)), frozenset({"agent"})),
    )


CALLS: list[tuple[str, bytes, list[tuple[str, str]], float | None]] = [
    # (method, request, metadata, timeout)
    ("Unary", b"hello", [("authorization", "Bearer acme-token")], None),
    ("Unary", b"hello", [("authorization", "Bearer acme-token")], 10.0),
    ("Unary", b"hello", [], None),
    ("Unary", b"hello", [("authorization", "Bearer wrong")], None),
    ("Unary", b"hello", [("authorization", "Bearer acme-token"), ("statecar-tenant", "x")], None),
    ("Unary", b"hello", [("authorization", "Bearer agent-token"), ("statecar-tenant", "x")], None),
    ("Unary", b"invalid", [("authorization", "Bearer acme-token")], None),
    ("Unary", b"crash", [("authorization", "Bearer acme-token")], None),
    ("Unary", b"missing", [("authorization", "Bearer acme-token")], None),
    ("Unary", b"\xff\x00", [("authorization", "Bearer acme-token")], None),
    ("Unary", b"hang", [("authorization", "Bearer acme-token")], 0.3),
    ("Stream", b"go", [("authorization", "Bearer acme-token")], None),
    ("Stream", b"go", [], None),
    ("Stream", b"invalid", [("authorization", "Bearer acme-token")], None),
    ("Stream", b"\xff\x00", [("authorization", "Bearer acme-token")], None),
]


CANCELED = (
    ("grpc_code", "Canceled"),
    ("grpc_method", "Unary"),
    ("grpc_service", SERVICE),
    ("grpc_type", "unary"),
)


async def _outcomes(
    interceptors: list[grpc.aio.ServerInterceptor],
    caplog: pytest.LogCaptureFixture,
    registry: CollectorRegistry,
) -> list[tuple[Any, ...]]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes: list[tuple[Any, ...]] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
            channel: Any = opened  # untyped methods: the stubs type requests as Never
            for method, request, metadata, timeout in CALLS:
                caplog.clear()
                path = f"/{SERVICE}/{method}"
                try:
                    if method == "Unary":
                        call = channel.unary_unary(path)(
                            request, metadata=metadata, timeout=timeout
                        )
                        result: Any = await call
                    else:
                        stream = channel.unary_stream(path)(
                            request, metadata=metadata, timeout=timeout
                        )
                        result = [response async for response in stream]
                    outcome: tuple[Any, ...] = ("ok", result)
                except grpc.aio.AioRpcError as error:
                    details = dict(error.trailing_metadata() or ())
                    outcome = (
                        error.code(),
                        error.details(),
                        details.get("grpc-status-details-bin"),
                    )
                # The server logs after the status is sent: give it a moment.
                await asyncio.sleep(0.05)
                lines = [
                    (record.levelno, record.getMessage().split(" in ")[0])
                    for record in caplog.records
                    if record.name == "statecar.rpc"
                ]
                outcomes.append((method, request, outcome, lines))
            # A caller that gives up on a call with a deadline: Canceled.
            caplog.clear()
            hanging = channel.unary_unary(f"/{SERVICE}/Unary")(
                b"hang", metadata=[("authorization", "Bearer acme-token")], timeout=10.0
            )
            await asyncio.sleep(0.2)
            hanging.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hanging
            # The server notices the cancellation a little later (bounded wait).
            for _ in range(200):
                if _samples(registry).get(("grpc_server_handled_total", CANCELED)):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)
            lines = [
                (record.levelno, record.getMessage().split(" in ")[0])
                for record in caplog.records
                if record.name == "statecar.rpc"
            ]
            outcomes.append(("Unary", b"hang", "cancelled", lines))
    finally:
        await server.stop(0)
    return outcomes


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_created")) or sample.name.endswith("_bucket"):
                continue  # times differ between runs; counts do not
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_the_fused_chain_behaves_as_the_interceptors_one_by_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("acme:acme-token\nagent:agent-token\n")
    caplog.set_level(logging.DEBUG, logger="statecar.rpc")
    nested_registry, fused_registry = CollectorRegistry(), CollectorRegistry()
    nested = await _outcomes(list(_layers(nested_registry, tokens)), caplog, nested_registry)
    fused = await _outcomes([ServerChain(*_layers(fused_registry, tokens))], caplog, fused_registry)
    assert fused == nested
    assert _samples(fused_registry) == _samples(nested_registry)
    # The cases did what they were meant to (not just the same thing twice).
    codes = [outcome[2][0] for outcome in nested[:-1]]
    assert codes == [
        "ok",
        "ok",
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        "ok",
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        "ok",
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
    assert nested[-1][2] == "cancelled"
    assert nested[0][2] == ("ok", b"acme:hello")
    assert nested[5][2] == ("ok", b"x:hello")
    assert "secret" not in str(nested[7][2][1])
    assert nested[7][3] and nested[7][3][0][0] == logging.ERROR  # logged, not sent
    assert _samples(fused_registry)[
        (
            "grpc_server_handled_total",
            (
                ("grpc_code", "Unavailable"),
                ("grpc_method", "Unary"),
                ("grpc_service", SERVICE),
                ("grpc_type", "unary"),
            ),
        )
    ] == pytest.approx(1.0)
    assert _samples(fused_registry)[("grpc_server_handled_total", CANCELED)] == pytest.approx(1.0)


async def test_the_fused_chain_without_auth_leaves_the_default_tenant(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    chain = ServerChain(
        ServerMetricsInterceptor(GrpcMetrics("server", registry=registry)),
        LoggingInterceptor(),
        ExceptionToStatusInterceptor(DOMAIN),
    )
    server = grpc.aio.server(interceptors=[chain])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
            channel: Any = opened
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"hi") == b"default:hi"
    finally:
        await server.stop(0)
