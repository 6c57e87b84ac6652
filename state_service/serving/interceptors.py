"""Server interceptors, outermost first: metrics -> logging -> exception-to-status.

Each wraps the handler's behaviour once, for unary and server-streaming RPCs
alike, so no servicer method carries cross-cutting code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc.aio import ServicerContext

from state_service.serving import grpc_metrics
from state_service.serving.errors import (
    InvalidArgument,
    ServiceError,
    Unavailable,
    internal_status,
)

logger = logging.getLogger("statecar.rpc")

UnaryBehavior = Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, ServicerContext[Any, Any]], AsyncIterator[Any]]
Wrapper = Callable[[UnaryBehavior, str], UnaryBehavior]
StreamWrapper = Callable[[StreamBehavior, str], StreamBehavior]
Deserializer = Callable[[bytes], Any]
DeserializerWrapper = Callable[[Deserializer], Deserializer] | None

# Part of a caller's deadline kept back so a slow backend is reported as
# UNAVAILABLE (retryable, with a clear message) before the caller gives up.
DEADLINE_MARGIN_SECONDS = 0.05


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]


def wrap_handler(
    handler: Handler | None,
    method: str,
    unary: Wrapper,
    stream: StreamWrapper,
    deserializer: DeserializerWrapper = None,
) -> Handler | None:
    if handler is None:
        return None
    request_deserializer = handler.request_deserializer
    if deserializer is not None and request_deserializer is not None:
        request_deserializer = deserializer(request_deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(UnaryBehavior, handler.unary_unary), method),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(cast(StreamBehavior, handler.unary_stream), method),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler  # client/bidi streaming: statecar has none


def _code_name(context: ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return grpc.StatusCode.OK


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's behaviour once and reuses the wrapped handler, so
    the per-RPC cost of an interceptor is its wrapper, not new handler objects."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler | None] = {}

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        raise NotImplementedError

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        raise NotImplementedError

    def _applies_to(self, method: str) -> bool:
        return True

    _deserializer: DeserializerWrapper = None

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if self._applies_to(method):
            handler = wrap_handler(handler, method, self._unary, self._stream, self._deserializer)
        if handler is not None:
            # Handlers are per method and never change for a running server;
            # unknown methods are not remembered (their names are caller-chosen).
            self._wrapped[method] = handler
        return handler


class MetricsInterceptor(WrappingInterceptor):
    """grpc_server_* metrics with go-grpc-prometheus names and label values."""

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        labels = grpc_metrics.ServerLabels.of(method, "unary")

        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            grpc_metrics.server_started(labels)
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = _code_name(context)
                if code == grpc.StatusCode.OK:
                    grpc_metrics.server_msg_sent(labels)
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _code_name(context)
                raise
            finally:
                grpc_metrics.server_handled(labels, code, time.perf_counter() - started)

        return wrapped

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        labels = grpc_metrics.ServerLabels.of(method, "server_stream")

        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            grpc_metrics.server_started(labels)
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in behavior(request, context):
                    grpc_metrics.server_msg_sent(labels)
                    yield response
                code = _code_name(context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _code_name(context)
                raise
            finally:
                grpc_metrics.server_handled(labels, code, time.perf_counter() - started)

        return wrapped


class LoggingInterceptor(WrappingInterceptor):
    """One line per failed RPC (server faults at WARNING), never message content."""

    @staticmethod
    def _log(method: str, context: ServicerContext[Any, Any], started: float) -> None:
        code = _code_name(context)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if code in grpc_metrics.SERVER_FAULT_CODES:
            logger.warning("%s -> %s in %.1f ms", method, code.name, elapsed_ms)
        elif code != grpc.StatusCode.OK:
            logger.info("%s -> %s in %.1f ms", method, code.name, elapsed_ms)
        else:
            logger.debug("%s -> OK in %.1f ms", method, elapsed_ms)

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                self._log(method, context, started)

        return wrapped

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self._log(method, context, started)

        return wrapped


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes are not the method's message (bad
    UTF-8 in a string field, corrupt wire format), so the caller hears
    INVALID_ARGUMENT instead of gRPC's own UNKNOWN."""

    error: str


def _tolerant(deserialize: Deserializer) -> Deserializer:
    def tolerant(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as error:
            return UndecodableRequest(str(error))

    return tolerant


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument("request", f"is not a valid protobuf message: {request.error}")


class ExceptionToStatusInterceptor(WrappingInterceptor):
    """ServiceError -> its status with an ErrorInfo detail; anything unexpected
    -> INTERNAL with a fixed message (logged here, never sent). Also bounds the
    handler by the caller's deadline so backends that hang answer UNAVAILABLE,
    and refuses undecodable requests with INVALID_ARGUMENT."""

    _deserializer = staticmethod(_tolerant)

    def __init__(
        self, domain: str, deadline_error: Callable[[], ServiceError] | None = None
    ) -> None:
        super().__init__()
        self._domain = domain
        self._deadline_error = deadline_error or _deadline_error

    async def _abort(
        self, context: ServicerContext[Any, Any], error: BaseException, method: str
    ) -> None:
        if isinstance(error, ServiceError):
            await context.abort_with_status(error.to_status(self._domain))
        logger.error("%s failed unexpectedly", method, exc_info=error)
        await context.abort_with_status(internal_status())

    @staticmethod
    def _budget(context: ServicerContext[Any, Any]) -> float | None:
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return max(remaining - DEADLINE_MARGIN_SECONDS, 0.001)

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
            try:
                _refuse_undecodable(request)
                async with asyncio.timeout(self._budget(context)):
                    return await behavior(request, context)
            except TimeoutError:
                await self._abort(context, self._deadline_error(), method)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(context, error, method)

        return wrapped

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                _refuse_undecodable(request)
                async for response in behavior(request, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(context, error, method)

        return wrapped


def _deadline_error() -> ServiceError:
    return Unavailable(
        "a backend did not answer within the call's deadline", reason="BACKEND_TIMEOUT"
    )
