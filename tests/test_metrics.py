"""Metrics: the gRPC interceptors (server and client, every RPC kind), the
state service's application metrics, /metrics over HTTP and promtool's lint."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared_runtime import build_info
from shared_runtime.grpc_metrics import (
    GrpcMetrics,
    ServerMetricsInterceptor,
    client_interceptors,
    go_code,
)
from state_service.client import EtagMismatchError, SessionNotFoundError, StateClient
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.conftest import StateServerFactory
from tests.helpers import NOT_SERVING, SERVING, has_series, metric, scrape, wait_health
from tests.patience import patience
from tests.prometheus import promtool

STATE = "statecar.state.v1.StateService"


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """A bounded wait for something that happens after the caller's RPC ends."""
    deadline = time.monotonic() + patience(timeout)
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


# -- the interceptors on a test service with all four RPC kinds ---------------


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"crash":
        raise RuntimeError("an exception no interceptor maps")
    return request


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    return b"".join([request async for request in requests])


async def _client_stream_reader(
    requests: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> bytes:
    parts = []
    while (message := await context.read()) is not grpc.aio.EOF:
        parts.append(message)
    return b"".join(parts)


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield request


async def _server_stream_writer(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    for _ in range(int(request)):
        await context.write(request)


async def _endless(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    while True:
        yield request
        await asyncio.sleep(0.01)


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


ECHO_HANDLERS: dict[str, Any] = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
    "ClientStreamReader": grpc.stream_unary_rpc_method_handler(_client_stream_reader),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
    "ServerStreamWriter": grpc.unary_stream_rpc_method_handler(_server_stream_writer),
    "Endless": grpc.unary_stream_rpc_method_handler(_endless),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
}


class Sampler:
    def __init__(self, registry: CollectorRegistry, side: str) -> None:
        self._registry = registry
        self._side = side

    def __call__(self, what: str, kind: str, method: str, code: str | None = None) -> float:
        labels = {"grpc_type": kind, "grpc_service": "test.Echo", "grpc_method": method}
        if code is not None:
            labels["grpc_code"] = code
        value = self._registry.get_sample_value(f"grpc_{self._side}_{what}", labels)
        return 0.0 if value is None else value


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Any, Sampler, Sampler]]:
    server_registry, client_registry = CollectorRegistry(), CollectorRegistry()
    server = grpc.aio.server(
        interceptors=[ServerMetricsInterceptor(GrpcMetrics("server", registry=server_registry))]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Echo", ECHO_HANDLERS)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    interceptors = client_interceptors(GrpcMetrics("client", registry=client_registry))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
        yield channel, Sampler(server_registry, "server"), Sampler(client_registry, "client")
    await server.stop(0)


async def test_unary_calls_by_code_on_both_sides(
    echo: tuple[Any, Sampler, Sampler],
) -> None:
    channel, server, client = echo
    unary = channel.unary_unary("/test.Echo/Unary")
    for _ in range(3):
        assert await unary(b"hi") == b"hi"
    for request, code in ((b"missing", grpc.StatusCode.NOT_FOUND),) * 2 + (
        (b"crash", grpc.StatusCode.UNKNOWN),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary(request)
        assert raised.value.code() == code

    for side in (server, client):
        assert side("started_total", "unary", "Unary") == 6
        assert side("handled_total", "unary", "Unary", "OK") == 3
        assert side("handled_total", "unary", "Unary", "NotFound") == 2
        assert side("handled_total", "unary", "Unary", "Unknown") == 1
        assert side("handling_seconds_count", "unary", "Unary") == 6
    assert server("msg_received_total", "unary", "Unary") == 6
    assert server("msg_sent_total", "unary", "Unary") == 3  # failures send no message
    assert client("msg_sent_total", "unary", "Unary") == 6
    assert client("msg_received_total", "unary", "Unary") == 3


async def test_streaming_calls_count_every_message(
    echo: tuple[Any, Sampler, Sampler],
) -> None:
    channel, server, client = echo
    assert await channel.stream_unary("/test.Echo/ClientStream")(iter([b"a", b"b", b"c"])) == b"abc"
    assert await channel.stream_unary("/test.Echo/ClientStreamReader")(iter([b"x", b"y"])) == b"xy"
    assert [r async for r in channel.unary_stream("/test.Echo/ServerStream")(b"3")] == [b"3"] * 3
    written = [r async for r in channel.unary_stream("/test.Echo/ServerStreamWriter")(b"2")]
    assert written == [b"2"] * 2

    async def four() -> AsyncIterator[bytes]:
        for n in range(4):
            yield str(n).encode()

    assert len([r async for r in channel.stream_stream("/test.Echo/Bidi")(four())]) == 4

    expected = {  # method: (kind, sent by the client, sent by the server)
        "ClientStream": ("client_stream", 3, 1),
        "ClientStreamReader": ("client_stream", 2, 1),
        "ServerStream": ("server_stream", 1, 3),
        "ServerStreamWriter": ("server_stream", 1, 2),
        "Bidi": ("bidi_stream", 4, 4),
    }
    for method, (kind, requests, responses) in expected.items():
        for side in (server, client):
            assert side("started_total", kind, method) == 1, (method, side)
            assert side("handled_total", kind, method, "OK") == 1, (method, side)
            assert side("handling_seconds_count", kind, method) == 1, (method, side)
        assert server("msg_received_total", kind, method) == requests, method
        assert client("msg_sent_total", kind, method) == requests, method
        assert server("msg_sent_total", kind, method) == responses, method
        assert client("msg_received_total", kind, method) == responses, method


async def test_a_cancelled_stream_is_counted_as_canceled(
    echo: tuple[Any, Sampler, Sampler],
) -> None:
    channel, server, client = echo
    call = channel.unary_stream("/test.Echo/Endless")(b"x")
    async for _ in call:
        break
    call.cancel()
    for side in (server, client):
        await eventually(
            lambda side=side: side("handled_total", "server_stream", "Endless", "Canceled") == 1,  # type: ignore[misc]
            "Canceled recorded",
        )
        assert side("handled_total", "server_stream", "Endless", "OK") == 0


async def test_a_stream_grpc_stops_taking_is_counted_as_canceled() -> None:
    """grpc closes a stream's response generator (GeneratorExit at its
    `yield`) when the caller cancels while a response is being written: that
    is a cancelled call, not an Unknown one (a flake of the test above under
    load, made deterministic here)."""

    class Context:
        def code(self) -> None:
            return None

    registry = CollectorRegistry()
    interceptor = ServerMetricsInterceptor(GrpcMetrics("server", registry=registry))
    handler = interceptor._wrap(  # the wrapper grpc would be handed
        grpc.unary_stream_rpc_method_handler(_endless), "/test.Echo/Endless"
    )
    assert handler is not None and handler.unary_stream is not None
    responses: Any = handler.unary_stream(b"x", cast(Any, Context()))
    assert await responses.__anext__() == b"x"
    await responses.aclose()
    server = Sampler(registry, "server")
    assert server("handled_total", "server_stream", "Endless", "Canceled") == 1
    assert server("handled_total", "server_stream", "Endless", "Unknown") == 0


def test_go_code_spelling() -> None:
    assert go_code(grpc.StatusCode.OK) == "OK"
    assert go_code(grpc.StatusCode.CANCELLED) == "Canceled"
    assert go_code(grpc.StatusCode.NOT_FOUND) == "NotFound"
    assert go_code(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"
    assert go_code(grpc.StatusCode.UNAUTHENTICATED) == "Unauthenticated"


def test_interceptors_refuse_the_wrong_side() -> None:
    with pytest.raises(ValueError, match="server-side"):
        ServerMetricsInterceptor(GrpcMetrics("client", registry=CollectorRegistry()))
    with pytest.raises(ValueError, match="client-side"):
        client_interceptors(GrpcMetrics("server", registry=CollectorRegistry()))


# -- the state service ----------------------------------------------------------


def state(what: str, method: str, code: str | None = None, side: str = "server") -> float:
    labels = {"grpc_type": "unary", "grpc_service": STATE, "grpc_method": method}
    if code is not None:
        labels["grpc_code"] = code
    return metric(f"grpc_{side}_{what}", **labels)


async def test_state_service_grpc_metrics_by_code_and_client_side(
    state_server_factory: StateServerFactory,
) -> None:
    server = await state_server_factory()
    before = {
        code: state("handled_total", "GetSession", code)
        for code in ("OK", "NotFound", "InvalidArgument")
    }
    client_before = state("handled_total", "GetSession", "NotFound", side="client")
    async with StateClient(
        server.address, timeout=5.0, interceptors=client_interceptors()
    ) as client:
        await client.append_items("known", [{"role": "user", "content": "hi"}])
        for _ in range(3):
            await client.get_session("known")
        for _ in range(2):
            with pytest.raises(SessionNotFoundError):
                await client.get_session("unknown")
        with pytest.raises(Exception, match="session_id"):
            await client.get_session("bad id!")
    # The server counts a call after its status is on the way to the client,
    # so the last one may land a moment after the client has it.
    expected = {"OK": 3, "NotFound": 2, "InvalidArgument": 1}
    await eventually(
        lambda: all(
            state("handled_total", "GetSession", code) - before[code] == n
            for code, n in expected.items()
        ),
        "every GetSession counted by its code",
    )
    assert state("handled_total", "GetSession", "NotFound", side="client") - client_before == 2
    # Every StateService method x code exists from the start, at zero if unused.
    assert has_series(
        "grpc_server_handled_total", grpc_method="DeleteWorkflow", grpc_code="DataLoss"
    )


async def test_health_watch_streams_and_is_measured(
    state_server_factory: StateServerFactory,
) -> None:
    """grpc.health.v1 Watch writes with context.write(); through the
    interceptor chain it streams (it used to answer INTERNAL) and is counted."""
    server = await state_server_factory()
    labels = {"grpc_type": "server_stream", "grpc_service": "grpc.health.v1.Health",
              "grpc_method": "Watch"}  # fmt: skip
    sent_before = metric("grpc_server_msg_sent_total", **labels)
    canceled_before = metric("grpc_server_handled_total", **labels, grpc_code="Canceled")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await call.read()
        assert first.status == SERVING
        call.cancel()
    assert metric("grpc_server_msg_sent_total", **labels) - sent_before == 1
    await eventually(
        lambda: (
            metric("grpc_server_handled_total", **labels, grpc_code="Canceled") - canceled_before
            == 1
        ),
        "Watch recorded as Canceled",
    )


async def test_reflection_bidi_stream_is_measured(state_server: Any) -> None:
    labels = {"grpc_type": "bidi_stream",
              "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
              "grpc_method": "ServerReflectionInfo"}  # fmt: skip
    before = {
        name: metric(f"grpc_server_{name}", **labels)
        for name in ("msg_received_total", "msg_sent_total")
    }
    ok_before = metric("grpc_server_handled_total", **labels, grpc_code="OK")

    async def requests() -> AsyncIterator[Any]:
        for _ in range(2):
            yield reflection_pb2.ServerReflectionRequest(list_services="")

    async with grpc.aio.insecure_channel(state_server.address) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(cast(Any, channel))
        answers = [answer async for answer in stub.ServerReflectionInfo(requests())]
    assert len(answers) == 2
    assert metric("grpc_server_msg_received_total", **labels) - before["msg_received_total"] == 2
    assert metric("grpc_server_msg_sent_total", **labels) - before["msg_sent_total"] == 2
    assert metric("grpc_server_handled_total", **labels, grpc_code="OK") - ok_before == 1


class Deltas:
    """Application metrics relative to when it was made, by short name."""

    SERIES: dict[str, tuple[str, dict[str, str]]] = {
        "hit": ("statecar_state_cache_lookups_total", {"cache": "session_tail", "result": "hit"}),
        "partial": (
            "statecar_state_cache_lookups_total",
            {"cache": "session_tail", "result": "partial"},
        ),
        "miss": ("statecar_state_cache_lookups_total", {"cache": "session_tail", "result": "miss"}),
        "invalidated_changed": (
            "statecar_state_cache_invalidations_total",
            {"cache": "session_tail", "reason": "changed"},
        ),
        "invalidated_deleted": (
            "statecar_state_cache_invalidations_total",
            {"cache": "session_tail", "reason": "deleted"},
        ),
        "appends": ("statecar_state_appends_total", {}),
        "items_appended": ("statecar_state_items_appended_total", {}),
        "etag_conflicts": ("statecar_state_etag_conflicts_total", {"operation": "append"}),
        "replays": ("statecar_state_idempotent_replays_total", {"operation": "append"}),
        "deleted": ("statecar_state_sessions_deleted_total", {}),
        "contexts": ("statecar_state_context_tokens_count", {}),
        "redis_reads": ("statecar_state_redis_command_seconds_count", {"operation": "read"}),
        "redis_appends": ("statecar_state_redis_command_seconds_count", {"operation": "append"}),
    }

    def __init__(self) -> None:
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        return {key: metric(name, **labels) for key, (name, labels) in self.SERIES.items()}

    def __call__(self) -> dict[str, float]:
        now = self._now()
        return {key: now[key] - self._start[key] for key in now if now[key] != self._start[key]}


async def test_state_application_metrics(client: StateClient) -> None:
    user = [{"role": "user", "content": "hello"}]
    await client.append_items("warm-up", user)  # loads the Lua scripts
    await client.get_context("warm-up")
    await client.pop_item("warm-up")
    deltas = Deltas()
    first = await client.append_items("m", user * 2, request_id="r1")
    await client.append_items("m", user * 2, request_id="r1")  # replayed
    await client.get_context("m")  # miss: nothing cached yet
    await client.get_context("m")  # hit
    await client.append_items("m", user)
    await client.get_context("m")  # partial: only the new item fetched
    with pytest.raises(EtagMismatchError):
        await client.append_items("m", user, etag=first.etag)
    await client.pop_item("m")
    await client.get_context("m")  # the pop made the cached tail stale: a miss
    await client.delete_session("m")  # drops the cached tail
    assert deltas() == {
        "hit": 1,
        "partial": 1,
        "miss": 2,
        "invalidated_changed": 1,
        "invalidated_deleted": 1,
        "appends": 2,
        "items_appended": 3,
        "etag_conflicts": 1,
        "replays": 1,
        "deleted": 1,
        "contexts": 4,
        "redis_reads": 4,
        "redis_appends": 4,
    }


async def test_cache_size_and_evictions(state_server_factory: StateServerFactory) -> None:
    server = await state_server_factory(cache_max_sessions=2, cache_ttl_seconds=0.2)
    size = "session_tail"
    evicted = metric("statecar_state_cache_evictions_total", cache=size, reason="size")
    expired = metric("statecar_state_cache_evictions_total", cache=size, reason="expired")
    async with StateClient(server.address, timeout=5.0) as client:
        for session in ("a", "b", "c"):
            await client.append_items(session, [{"role": "user", "content": session}])
            await client.get_context(session)
        assert (
            metric("statecar_state_cache_evictions_total", cache=size, reason="size") - evicted == 1
        )
        assert metric("statecar_state_cache_sessions", cache=size) == 2
        await asyncio.sleep(0.3)  # past the cache TTL: the next insert expires both
        await client.get_context("a")
    assert (
        metric("statecar_state_cache_evictions_total", cache=size, reason="expired") - expired == 2
    )
    assert metric("statecar_state_cache_sessions", cache=size) == 1


@pytest.mark.fault
async def test_redis_up_and_serving_gauges_follow_redis(
    redis_server: EmbeddedRedis, state_server_factory: StateServerFactory
) -> None:
    server = await state_server_factory()
    flushed = metric(
        "statecar_state_cache_invalidations_total", cache="session_tail", reason="redis_unreachable"
    )
    async with StateClient(server.address, timeout=5.0) as client:
        await client.append_items("g", [{"role": "user", "content": "x"}])
        await client.get_context("g")  # one cached session
    assert metric("statecar_state_redis_up") == 1
    assert metric("statecar_state_serving") == 1
    redis_server.stop()
    await wait_health(server.address, NOT_SERVING)
    assert metric("statecar_state_redis_up") == 0
    assert metric("statecar_state_serving") == 0
    assert (
        metric(
            "statecar_state_cache_invalidations_total",
            cache="session_tail",
            reason="redis_unreachable",
        )
        - flushed
        == 1
    )
    redis_server.start()
    await wait_health(server.address, SERVING)
    assert metric("statecar_state_redis_up") == 1
    assert metric("statecar_state_serving") == 1
    await server.stop(grace=0.5)
    assert metric("statecar_state_serving") == 0  # draining


# -- /metrics over HTTP -----------------------------------------------------------


async def test_metrics_endpoint_is_promtool_clean_and_carries_no_ids(
    state_server_factory: StateServerFactory,
) -> None:
    port = free_port()
    server = await state_server_factory(metrics_port=port)
    assert server.metrics_port == port
    session_id = "session-7f3a9c-private"
    async with StateClient(server.address, timeout=5.0) as client:
        await client.append_items(
            session_id, [{"role": "user", "content": "x"}], request_id="rq-55"
        )
        await client.get_context(session_id)
        await client.get_context(session_id)
        with pytest.raises(SessionNotFoundError):
            await client.get_session("another-private-id")
    text = await scrape(port)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in (
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
        "grpc_server_msg_received",
        "grpc_server_msg_sent",
        "statecar_state_cache_lookups",
        "statecar_state_redis_command_seconds",
        "statecar_state_build_info",
        "statecar_state_redis_up",
        "statecar_state_serving",
    ):
        assert name in families, name
    for secret in (session_id, "rq-55", "another-private-id", "default"):
        assert secret not in text, secret

    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


async def test_metrics_port_zero_disables_and_stop_closes_the_endpoint(
    state_server_factory: StateServerFactory,
) -> None:
    off = await state_server_factory()  # the fixtures' settings: metrics_port=0
    assert off.metrics_port is None
    port = free_port()
    on = await state_server_factory(metrics_port=port)
    assert "grpc_server_started_total" in await scrape(port)
    await on.stop(grace=0.5)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await scrape(port)


def test_build_info_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    build_info.git_sha.cache_clear()
    try:
        monkeypatch.setenv(build_info.GIT_SHA_ENV, "0123abcd" * 5)
        assert build_info.git_sha() == "0123abcd" * 5
        build_info.git_sha.cache_clear()
        monkeypatch.setenv(build_info.GIT_SHA_ENV, "not a sha; rm -rf")
        assert build_info.git_sha() == "unknown"
        build_info.git_sha.cache_clear()
        monkeypatch.delenv(build_info.GIT_SHA_ENV)
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert build_info.git_sha() == (head or "unknown")
    finally:
        build_info.git_sha.cache_clear()
    registry = CollectorRegistry()
    build_info.register_build_info("statecar_test", registry=registry)
    samples = [s for f in registry.collect() for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("statecar_test_build_info", 1.0)]
    assert samples[0].labels["version"] == build_info.version() != "unknown"
