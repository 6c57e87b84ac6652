"""Wrapping gRPC method handlers once, for every kind of RPC.

An interceptor here wraps a method's *behaviour* (the coroutine or async
generator that handles one call) when the server first resolves the method,
and reuses the wrapped handler for every later call. All four RPC kinds are
covered: a wrapper for single responses (unary and client-streaming RPCs) and
one for response streams (server-streaming and bidi RPCs). The request is
passed through untouched, so the same wrapper serves a single request and a
request iterator alike.

A streaming handler may either be an async generator (``yield`` each
response) or a coroutine that writes with ``await context.write(...)``, as
grpc_health's ``Watch`` does; :func:`responses` accepts both.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc.aio import ServicerContext

Context = ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
Wrapper = Callable[[UnaryBehavior, str], UnaryBehavior]
StreamWrapper = Callable[[StreamBehavior, str], StreamBehavior]
Deserializer = Callable[[bytes], Any]
DeserializerWrapper = Callable[[Deserializer], Deserializer] | None

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]

# go-grpc-prometheus's grpc_type label values.
UNARY = "unary"
CLIENT_STREAM = "client_stream"
SERVER_STREAM = "server_stream"
BIDI_STREAM = "bidi_stream"


def grpc_type(handler: Handler) -> str:
    if handler.unary_unary is not None:
        return UNARY
    if handler.unary_stream is not None:
        return SERVER_STREAM
    if handler.stream_unary is not None:
        return CLIENT_STREAM
    return BIDI_STREAM


async def responses(result: AsyncIterator[Any] | Awaitable[Any]) -> AsyncIterator[Any]:
    """The responses of a streaming handler, whichever style it is written in:
    an async generator's items, or nothing for a coroutine that wrote its
    responses itself with context.write()."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def wrap_handler(
    handler: Handler | None,
    method: str,
    unary: Wrapper,
    stream: StreamWrapper,
    deserializer: DeserializerWrapper = None,
) -> Handler | None:
    """The handler with its behaviour wrapped: `unary` for single responses,
    `stream` for response streams; `deserializer` wraps the request
    deserializer of single-request RPCs (the wrappers see that request)."""
    if handler is None:
        return None
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    single_request = {**options}
    if deserializer is not None and handler.request_deserializer is not None:
        single_request["request_deserializer"] = deserializer(handler.request_deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(UnaryBehavior, handler.unary_unary), method), **single_request
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(cast(StreamBehavior, handler.unary_stream), method), **single_request
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            unary(cast(UnaryBehavior, handler.stream_unary), method), **options
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream(cast(StreamBehavior, handler.stream_stream), method), **options
        )
    return handler


def status_code(context: Context) -> grpc.StatusCode:
    """The status the handler set (OK when it set none)."""
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
    the per-RPC cost of an interceptor is its wrapper, not new handler objects.

    Subclasses implement `_unary` and `_stream` (or override `_wrap` to see the
    whole handler, as the metrics interceptor does to learn the RPC kind)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler | None] = {}

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        raise NotImplementedError

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        raise NotImplementedError

    def _applies_to(self, method: str) -> bool:
        return True

    # Wraps the request deserializer of single-request RPCs (None: unchanged).
    _deserializer: DeserializerWrapper = None

    def _wrap(self, handler: Handler | None, method: str) -> Handler | None:
        return wrap_handler(handler, method, self._unary, self._stream, self._deserializer)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if self._applies_to(method):
            handler = self._wrap(handler, method)
        if handler is not None:
            # Handlers are per method and never change for a running server;
            # unknown methods are not remembered (their names are caller-chosen).
            self._wrapped[method] = handler
        return handler
