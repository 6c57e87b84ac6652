"""Server interceptors, outermost first: metrics -> logging -> exception-to-status.

Each wraps the handler's behaviour once (see handlers.py), for every RPC kind,
so no servicer method carries cross-cutting code. The metrics interceptor
lives in grpc_metrics.py, beside its client-side twin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc.aio import ServicerContext

from shared_runtime.errors import (
    InvalidArgument,
    ServiceError,
    Unavailable,
    internal_status,
)
from shared_runtime.grpc_metrics import SERVER_FAULT_CODES
from shared_runtime.grpc_metrics import ServerMetricsInterceptor as MetricsInterceptor
from shared_runtime.handlers import (
    Deserializer,
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    responses,
    status_code,
)

__all__ = [
    "ExceptionToStatusInterceptor",
    "LoggingInterceptor",
    "MetricsInterceptor",
    "StreamBehavior",
    "UnaryBehavior",
    "WrappingInterceptor",
    "backend_timeout",
]

logger = logging.getLogger("statecar.rpc")

# Part of a caller's deadline kept back so a slow backend is reported as
# UNAVAILABLE (retryable, with a clear message) before the caller gives up.
DEADLINE_MARGIN_SECONDS = 0.05


class LoggingInterceptor(WrappingInterceptor):
    """One line per failed RPC (server faults at WARNING), never message content."""

    @staticmethod
    def _log(method: str, context: ServicerContext[Any, Any], started: float) -> None:
        LoggingInterceptor.outcome(
            method, status_code(context), (time.perf_counter() - started) * 1000
        )

    @staticmethod
    def outcome(method: str, code: grpc.StatusCode, elapsed_ms: float) -> None:
        if code in SERVER_FAULT_CODES:
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
                async for response in responses(behavior(request, context)):
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
        self._deadline_error = deadline_error or backend_timeout

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
                budget = self._budget(context)
                if budget is None:  # no deadline: no timer to arm
                    return await behavior(request, context)
                async with asyncio.timeout(budget):
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
                async for response in responses(behavior(request, context)):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as error:
                await self._abort(context, error, method)

        return wrapped


def backend_timeout() -> ServiceError:
    """The default deadline error: a backend did not answer in time."""
    return Unavailable(
        "a backend did not answer within the call's deadline", reason="BACKEND_TIMEOUT"
    )
