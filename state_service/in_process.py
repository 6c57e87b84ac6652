"""The state service inside another process, with no gRPC hop.

In a sidecar deployment the agent replica and its state service share a pod,
and each turn crosses gRPC twice on loopback only to reach code that could run
in the agent's own process: about 0.5 ms of Python gRPC per call on each end
(BENCHMARKS.md, "Turn cost"). ``InProcessState`` runs a whole ``StateEngine``
(storage, cache, compression, readiness, background work) in the caller's
process and gives it a ``grpc.aio.Channel`` that calls the engine's handlers
directly. ``StateClient(channel=state.channel)`` and everything built on it
(the agent service, ``StateServiceSession``) work unchanged.

Nothing about a call changes but the transport: each call goes through the
same server interceptors as over gRPC (metrics, logging, errors to statuses
with their ErrorInfo, the deadline, the tenant), runs in its own task with its
own context variables (as a gRPC server runs each call), and a refusal reaches
the client as the ``AioRpcError`` a remote call would raise. Requests and
responses are passed as objects, not bytes: neither side may change a message
after handing it over (the engine's cached responses are shared). Replicas
that run the engine in process share Redis with each other and with state
service processes exactly as state service replicas do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc

from shared_runtime.auth import DEFAULT_TENANT, AuthInterceptor, anonymous_authenticator
from shared_runtime.handlers import Handler
from state_service.server import StateEngine
from state_service.settings import StateServiceSettings

logger = logging.getLogger("statecar.state")

Metadata = Sequence[tuple[str, str | bytes]]
_NO_METADATA = grpc.aio.Metadata()


def _rpc_error(
    code: grpc.StatusCode, details: str, trailing: Metadata = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _NO_METADATA, grpc.aio.Metadata(*trailing), details)


class _CallContext:
    """The part of grpc.aio.ServicerContext the engine's handlers and
    interceptors use, for one in-process call."""

    def __init__(self, metadata: Metadata, deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def peer(self) -> str:
        return "in-process"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def error(self) -> grpc.aio.AioRpcError:
        """What the client sees for a call that ended with this context's status."""
        return _rpc_error(self._code or grpc.StatusCode.UNKNOWN, self._details, self._trailing)


class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _HandlerRegistry:
    """Takes the place of a grpc.aio.Server for the generated
    add_*Servicer_to_server functions, and resolves a method's handler
    through the interceptor chain once, as the server does."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._interceptors = list(interceptors)
        self._resolved: dict[str, Handler | None] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Registered methods are a server-side speed-up; the generic handlers
        added beside them resolve the same methods."""

    async def handler(self, method: str) -> Handler | None:
        if method in self._resolved:
            return self._resolved[method]
        details = _HandlerCallDetails(method)

        async def servicer(_: grpc.HandlerCallDetails) -> Handler | None:
            for generic in self._generic:
                found = generic.service(details)
                if found is not None:
                    return found
            return None

        resolve: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]] = servicer
        for interceptor in reversed(self._interceptors):
            resolve = _chained(interceptor, resolve)
        found = await resolve(details)
        self._resolved[method] = found
        return found


def _chained(
    interceptor: grpc.aio.ServerInterceptor,
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
) -> Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]:
    async def resolve(details: grpc.HandlerCallDetails) -> Handler | None:
        return await interceptor.intercept_service(continuation, details)

    return resolve


class _UnaryUnary:
    def __init__(self, channel: InProcessChannel, method: str) -> None:
        self._channel = channel
        self._method = method

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Awaitable[Any]:
        return self._channel.call(self._method, request, timeout, metadata or ())


class _Unsupported:
    def __init__(self, method: str) -> None:
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _rpc_error(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{self._method}: only unary calls are served in process",
        )


class InProcessChannel(grpc.aio.Channel):
    """A channel whose calls run a StateEngine's handlers in this process."""

    def __init__(self, registry: _HandlerRegistry, max_message_bytes: int) -> None:
        self._registry = registry
        self._max_message_bytes = max_message_bytes
        self._closed = False

    async def call(
        self, method: str, request: Any, timeout: float | None, metadata: Metadata
    ) -> Any:
        if self._closed:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "the in-process state service stopped")
        handler = await self._registry.handler(method)
        if handler is None or handler.unary_unary is None:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served here")
        if request.ByteSize() > self._max_message_bytes:
            # What grpc answers for a message over the server's limit.
            raise _rpc_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({request.ByteSize()} vs. "
                f"{self._max_message_bytes})",
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        context = _CallContext(metadata, deadline)
        # Its own task and context variables, as a gRPC server runs each call:
        # the tenant the auth interceptor sets must not leak into the caller.
        # Cancelling the caller cancels the task (it awaits it).
        task = asyncio.get_running_loop().create_task(
            handler.unary_unary(request, cast(Any, context)),
            context=contextvars.copy_context(),
        )
        try:
            async with asyncio.timeout(timeout):
                response = await task
        except TimeoutError:
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except grpc.aio.AbortError:
            raise context.error() from None
        except Exception:  # no interceptor mapped it: grpc would answer UNKNOWN
            logger.exception("%s failed unexpectedly in process", method)
            raise _rpc_error(grpc.StatusCode.UNKNOWN, "Exception calling application") from None
        if context.code() not in (None, grpc.StatusCode.OK):
            raise context.error()
        return response

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryUnary(self, method)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unsupported(method)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unsupported(method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unsupported(method)

    async def __aenter__(self) -> InProcessChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        # The engine's owner (InProcessState) stops it; a client closing its
        # channel only stops using it.
        pass

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        # READY until shut; nothing here waits on that.
        raise NotImplementedError("an in-process channel does not change state")

    async def channel_ready(self) -> None:
        return None

    def shut(self) -> None:
        self._closed = True


class InProcessState:
    """A StateEngine in this process and the channel that reaches it."""

    def __init__(self, engine: StateEngine, channel: InProcessChannel) -> None:
        self.engine = engine
        self.channel = channel

    @classmethod
    async def start(cls, settings: StateServiceSettings) -> InProcessState:
        """Starts the engine (Redis, cache, compression, readiness...) as the
        state service would, minus its gRPC server and metrics endpoint: the
        host process serves metrics (one registry) and health."""
        async with contextlib.AsyncExitStack() as undo:
            engine = await StateEngine.start(settings, undo)
            # The host process authenticated its own callers; acting for them
            # (statecar-tenant metadata) is what a trusted delegate does.
            auth = AuthInterceptor(anonymous_authenticator, frozenset({DEFAULT_TENANT}))
            registry = _HandlerRegistry(engine.interceptors(auth))
            engine.add_to_server(registry)
            undo.pop_all()
            return cls(engine, InProcessChannel(registry, settings.max_message_bytes))
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        """Turns NOT_SERVING, refuses new calls and stops the engine; the host
        drains its own calls (and with them these) first."""
        await self.engine.readiness.drain()
        self.channel.shut()
        await self.engine.stop()
