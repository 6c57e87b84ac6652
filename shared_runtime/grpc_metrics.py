"""gRPC metrics with the names dashboards know (the go-grpc-prometheus family),
for servers and for clients, each from one grpc.aio interceptor.

Server (``ServerMetricsInterceptor``, first in a grpc.aio server's chain)::

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}   histogram
    grpc_server_msg_received_total{grpc_type,grpc_service,grpc_method}
    grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}

Client (``client_interceptors()``, passed to ``grpc.aio.*_channel(...,
interceptors=...)`` or ``StateClient(..., interceptors=...)``): the same
five with the ``grpc_client_`` prefix, one observation per call (gRPC's own
retries of a call happen below interceptors and are not counted again).

Label values follow go-grpc-prometheus, so existing dashboards work unchanged:
grpc_type is unary, client_stream, server_stream or bidi_stream; grpc_code is
the Go spelling of the status (OK, Canceled, NotFound, Unavailable, ...).
All four RPC kinds are measured, streaming ones included; for a stream,
handling_seconds is the stream's whole life.

Both services import this module (agent_service depends on state_service).
Metrics go to prometheus_client's default registry unless a
``GrpcMetrics(side, registry=...)`` is passed to the interceptor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Literal, cast

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from shared_runtime.handlers import (
    BIDI_STREAM,
    CLIENT_STREAM,
    SERVER_STREAM,
    UNARY,
    Context,
    Handler,
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    grpc_type,
    responses,
    status_code,
)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip

# Codes that mean "the server (or what it depends on) failed", as opposed to
# a caller's mistake (InvalidArgument, NotFound, Aborted, ...). Error-ratio
# recording rules and alerts count only these (monitoring/rules/).
SERVER_FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

Side = Literal["server", "client"]


def go_code(code: grpc.StatusCode) -> str:
    """NOT_FOUND -> NotFound; OK stays OK; CANCELLED -> Canceled (Go's spelling)."""
    if code == grpc.StatusCode.OK:
        return "OK"
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


_LABELS = ["grpc_type", "grpc_service", "grpc_method"]


class RpcLabels:
    """One method's metric children, resolved once (labels() lookups are not free)."""

    __slots__ = ("_family", "_handled", "handling", "msg_received", "msg_sent", "started", "values")

    def __init__(self, metrics: GrpcMetrics, values: tuple[str, str, str]) -> None:
        self.values = values
        self._family = metrics.handled
        self.started = metrics.started.labels(*values)
        self.msg_received = metrics.msg_received.labels(*values)
        self.msg_sent = metrics.msg_sent.labels(*values)
        self.handling = metrics.handling.labels(*values)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled_counter(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._family.labels(*self.values, go_code(code))
        return child

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        self.handled_counter(code).inc()
        self.handling.observe(seconds)


class GrpcMetrics:
    """The five go-grpc-prometheus families of one side (server or client)."""

    def __init__(self, side: Side, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.side = side
        peer = "the server" if side == "server" else "the client"
        prefix = f"grpc_{side}"
        self.started = Counter(
            f"{prefix}_started_total", f"RPCs started on {peer}.", _LABELS, registry=registry
        )
        self.handled = Counter(
            f"{prefix}_handled_total",
            f"RPCs completed on {peer}, regardless of success or failure.",
            [*_LABELS, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            f"{prefix}_handling_seconds",
            f"Time from the start of an RPC to its status, on {peer}.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            f"{prefix}_msg_received_total",
            f"RPC stream messages received by {peer}.",
            _LABELS,
            registry=registry,
        )
        self.msg_sent = Counter(
            f"{prefix}_msg_sent_total",
            f"RPC stream messages sent by {peer}.",
            _LABELS,
            registry=registry,
        )
        self._labels: dict[tuple[str, str], RpcLabels] = {}

    def labels(self, full_method: str, kind: str) -> RpcLabels:
        key = (full_method, kind)
        labels = self._labels.get(key)
        if labels is None:
            service, method = split_method(full_method)
            labels = self._labels[key] = RpcLabels(self, (kind, service, method))
        return labels

    def initialize(self, service: ServiceDescriptor) -> None:
        """Creates every series of the service's methods at zero, all codes
        included (go-grpc-prometheus' InitializeMetrics), so rate() and ratios
        see a call from the first scrape on and dashboards show all methods."""
        for method in service.methods:
            labels = self.labels(f"/{service.full_name}/{method.name}", method_kind(method))
            for code in grpc.StatusCode:
                labels.handled_counter(code)


def method_kind(method: Any) -> str:
    """grpc_type of a protobuf MethodDescriptor."""
    if method.client_streaming:
        return BIDI_STREAM if method.server_streaming else CLIENT_STREAM
    return SERVER_STREAM if method.server_streaming else UNARY


@functools.cache
def server_metrics() -> GrpcMetrics:
    """The process's grpc_server_* families (default registry)."""
    return GrpcMetrics("server")


@functools.cache
def client_metrics() -> GrpcMetrics:
    """The process's grpc_client_* families (default registry)."""
    return GrpcMetrics("client")


# -- server ---------------------------------------------------------------------


class _CountingContext:
    """A servicer context that counts the messages a handler writes and reads
    itself (context.write / context.read), for handlers written that way."""

    __slots__ = ("_context", "_labels")

    def __init__(self, context: Context, labels: RpcLabels) -> None:
        self._context = context
        self._labels = labels

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._labels.msg_sent.inc()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._labels.msg_received.inc()
        return message


async def _count_requests(requests: AsyncIterable[Any], counter: Any) -> AsyncIterator[Any]:
    async for request in requests:
        counter.inc()
        yield request


def failure_code(context: Context, error: BaseException) -> grpc.StatusCode:
    """The grpc_code of an RPC its handler left by raising `error`."""
    # GeneratorExit: grpc stopped taking a stream's responses, which it does
    # only when the call ended early (the caller cancelled while a response
    # was being written; seen under load as a cancelled stream counted Unknown).
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if context.code() is None:
        # An exception no interceptor turned into a status: grpc answers UNKNOWN.
        return grpc.StatusCode.UNKNOWN
    return status_code(context)


class ServerMetricsInterceptor(WrappingInterceptor):
    """grpc_server_* metrics for every RPC kind. Put it first in the chain so
    it sees the final status and the whole handling time."""

    def __init__(self, metrics: GrpcMetrics | None = None) -> None:
        super().__init__()
        self._metrics = metrics or server_metrics()
        if self._metrics.side != "server":
            raise ValueError("ServerMetricsInterceptor needs server-side metrics")

    @property
    def metrics(self) -> GrpcMetrics:
        return self._metrics

    def _wrap(self, handler: Handler | None, method: str) -> Handler | None:
        if handler is None:
            return None
        kind = grpc_type(handler)
        labels = self._metrics.labels(method, kind)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if kind == UNARY:
            behavior = cast(UnaryBehavior, handler.unary_unary)
            return grpc.unary_unary_rpc_method_handler(
                self._measure_single(behavior, labels, streamed_requests=False), **options
            )
        if kind == CLIENT_STREAM:
            behavior = cast(UnaryBehavior, handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(
                self._measure_single(behavior, labels, streamed_requests=True), **options
            )
        if kind == SERVER_STREAM:
            stream = cast(StreamBehavior, handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                self._measure_stream(stream, labels, streamed_requests=False), **options
            )
        stream = cast(StreamBehavior, handler.stream_stream)
        return grpc.stream_stream_rpc_method_handler(
            self._measure_stream(stream, labels, streamed_requests=True), **options
        )

    @staticmethod
    def _measure_single(
        behavior: UnaryBehavior, labels: RpcLabels, *, streamed_requests: bool
    ) -> UnaryBehavior:
        async def wrapped(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            labels.started.inc()
            if streamed_requests:
                request = _count_requests(request, labels.msg_received)
                context = cast(Context, _CountingContext(context, labels))
            else:
                labels.msg_received.inc()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = status_code(context)
                if code == grpc.StatusCode.OK:
                    labels.msg_sent.inc()
                return response
            except BaseException as error:
                code = failure_code(context, error)
                raise
            finally:
                labels.finish(code, time.perf_counter() - started)

        return wrapped

    @staticmethod
    def _measure_stream(
        behavior: StreamBehavior, labels: RpcLabels, *, streamed_requests: bool
    ) -> StreamBehavior:
        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            labels.started.inc()
            if streamed_requests:
                request = _count_requests(request, labels.msg_received)
            else:
                labels.msg_received.inc()
            counting = cast(Context, _CountingContext(context, labels))
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in responses(behavior(request, counting)):
                    labels.msg_sent.inc()
                    yield response
                code = status_code(context)
            except BaseException as error:
                code = failure_code(context, error)
                raise
            finally:
                labels.finish(code, time.perf_counter() - started)

        return wrapped


# -- client ---------------------------------------------------------------------


class _CallOutcome:
    """Records one client call's status exactly once, whichever comes first:
    the end of its response stream, or the call's done callback."""

    __slots__ = ("_labels", "_recorded", "_started")

    def __init__(self, labels: RpcLabels) -> None:
        self._labels = labels
        self._started = time.perf_counter()
        self._recorded = False

    def record(self, code: grpc.StatusCode) -> None:
        if not self._recorded:
            self._recorded = True
            self._labels.finish(code, time.perf_counter() - self._started)


def _count_sent(requests: Any, counter: Any) -> Any:
    if hasattr(requests, "__aiter__"):
        return _count_requests(requests, counter)

    def counted(items: Iterable[Any]) -> Iterable[Any]:
        for item in items:
            counter.inc()
            yield item

    return counted(requests)


class _ClientMetrics:
    """What the four client interceptors share: metrics and pending tasks."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        if metrics.side != "client":
            raise ValueError("client interceptors need client-side metrics")
        self.metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()

    def labels(self, details: grpc.aio.ClientCallDetails, kind: str) -> RpcLabels:
        method = details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        return self.metrics.labels(name, kind)

    async def single(self, labels: RpcLabels, call_started: Awaitable[Any]) -> Any:
        """Waits for a single-response call to finish, so a caller that has
        the result also finds it counted."""
        outcome = _CallOutcome(labels)
        code = grpc.StatusCode.UNKNOWN
        try:
            call = await call_started
            try:
                await call
            except grpc.aio.AioRpcError as error:
                # The caller gets the same error when it awaits the call.
                code = error.code()
                return call
            code = grpc.StatusCode.OK
            labels.msg_received.inc()
            return call
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            outcome.record(code)

    def streamed(self, labels: RpcLabels, call: Any) -> AsyncIterator[Any]:
        outcome = _CallOutcome(labels)

        def done(finished: Any) -> None:
            # A stream the caller stopped reading (or cancelled) ends here.
            task = asyncio.ensure_future(self._record_status(finished, outcome))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)
        return self._count_responses(call, labels, outcome)

    @staticmethod
    async def _record_status(call: Any, outcome: _CallOutcome) -> None:
        try:
            code = await call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
        outcome.record(code)

    @staticmethod
    async def _count_responses(
        call: Any, labels: RpcLabels, outcome: _CallOutcome
    ) -> AsyncIterator[Any]:
        try:
            async for response in call:
                labels.msg_received.inc()
                yield response
        except grpc.aio.AioRpcError as error:
            outcome.record(error.code())
            raise
        outcome.record(grpc.StatusCode.OK)


Continue = Callable[[grpc.aio.ClientCallDetails, Any], Any]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, shared: _ClientMetrics) -> None:
        self._shared = shared

    async def intercept_unary_unary(
        self, continuation: Continue, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        labels = self._shared.labels(client_call_details, UNARY)
        labels.started.inc()
        labels.msg_sent.inc()
        return await self._shared.single(labels, continuation(client_call_details, request))


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, shared: _ClientMetrics) -> None:
        self._shared = shared

    async def intercept_stream_unary(
        self,
        continuation: Continue,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        labels = self._shared.labels(client_call_details, CLIENT_STREAM)
        labels.started.inc()
        requests = _count_sent(request_iterator, labels.msg_sent)
        return await self._shared.single(labels, continuation(client_call_details, requests))


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, shared: _ClientMetrics) -> None:
        self._shared = shared

    async def intercept_unary_stream(
        self, continuation: Continue, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        labels = self._shared.labels(client_call_details, SERVER_STREAM)
        labels.started.inc()
        labels.msg_sent.inc()
        call = await continuation(client_call_details, request)
        return self._shared.streamed(labels, call)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, shared: _ClientMetrics) -> None:
        self._shared = shared

    async def intercept_stream_stream(
        self,
        continuation: Continue,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        labels = self._shared.labels(client_call_details, BIDI_STREAM)
        labels.started.inc()
        requests = _count_sent(request_iterator, labels.msg_sent)
        call = await continuation(client_call_details, requests)
        return self._shared.streamed(labels, call)


def client_interceptors(metrics: GrpcMetrics | None = None) -> list[grpc.aio.ClientInterceptor]:
    """grpc_client_* metrics for every call made through a grpc.aio channel:
    pass all of them, e.g. ``StateClient(target, interceptors=client_interceptors())``
    or ``grpc.aio.insecure_channel(target, interceptors=client_interceptors())``.

    Four objects, one per RPC kind, because grpc.aio files an interceptor
    object under the first kind it implements only (an ``elif`` chain in
    grpc/aio/_channel.py), so one object implementing all four would
    silently measure unary-unary calls alone.
    """
    shared = _ClientMetrics(metrics or client_metrics())
    return [_UnaryUnary(shared), _UnaryStream(shared), _StreamUnary(shared), _StreamStream(shared)]
