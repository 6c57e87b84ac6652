"""The server interceptor chain (metrics -> logging -> exception-to-status ->
auth) as one interceptor: one wrapper per unary method, built when the server
first resolves the method.

Each interceptor of the chain is its own coroutine frame per call, plus its
own clock reads and status lookups; on a unary RPC (every hot path of both
services) this does their work in one frame, in the same order and with the
same outcomes: the same metrics, log lines, statuses with ErrorInfo,
deadline budget and tenant. Streaming RPCs keep the interceptors' own
wrappers, nested, since their per-call cost is spread over a stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import grpc

from shared_runtime.auth import AuthInterceptor
from shared_runtime.grpc_metrics import ServerMetricsInterceptor, failure_code
from shared_runtime.handlers import (
    UNARY,
    Context,
    Handler,
    UnaryBehavior,
    WrappingInterceptor,
    status_code,
)
from shared_runtime.interceptors import (
    DEADLINE_MARGIN_SECONDS,
    ExceptionToStatusInterceptor,
    LoggingInterceptor,
    UndecodableRequest,
    _refuse_undecodable,
    _tolerant,
)

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN


class ServerChain(WrappingInterceptor):
    """metrics -> logging -> exception-to-status -> auth (when given), fused.

    Behaves as ``[metrics, logging, exceptions, auth]`` passed to
    ``grpc.aio.server``, which tests/test_server_chain.py checks."""

    def __init__(
        self,
        metrics: ServerMetricsInterceptor,
        logging: LoggingInterceptor,
        exceptions: ExceptionToStatusInterceptor,
        auth: AuthInterceptor | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._exceptions = exceptions
        self._auth = auth
        self._layers: list[WrappingInterceptor] = [metrics, logging, exceptions]
        if auth is not None:
            self._layers.append(auth)

    def _wrap(self, handler: Handler | None, method: str) -> Handler | None:
        if handler is None or handler.unary_unary is None:
            for layer in reversed(self._layers):
                if layer._applies_to(method):
                    handler = layer._wrap(handler, method)
            return handler
        deserializer = handler.request_deserializer
        return grpc.unary_unary_rpc_method_handler(
            self._unary_chain(cast(UnaryBehavior, handler.unary_unary), method),
            request_deserializer=_tolerant(deserializer) if deserializer is not None else None,
            response_serializer=handler.response_serializer,
        )

    def _unary_chain(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        labels = self._metrics.metrics.labels(method, UNARY)
        started_counter, received, sent = labels.started, labels.msg_received, labels.msg_sent
        finish = labels.finish
        log = LoggingInterceptor.outcome
        abort = self._exceptions._abort
        deadline_error = self._exceptions._deadline_error
        auth = self._auth
        authenticate = auth._enter if auth is not None and auth._applies_to(method) else None
        perf_counter = time.perf_counter

        async def wrapped(request: Any, context: Context) -> Any:
            started = perf_counter()
            started_counter.inc()
            received.inc()
            code = _UNKNOWN
            logged: grpc.StatusCode | None = None
            try:
                response = None
                try:
                    if isinstance(request, UndecodableRequest):
                        _refuse_undecodable(request)
                    if authenticate is not None:
                        authenticate(context)
                    remaining = context.time_remaining()
                    if remaining is None:  # no deadline: no timer to arm
                        response = await behavior(request, context)
                    else:
                        # asyncio.timeout(budget), inline: the same timer and
                        # the same cancel/uncancel bookkeeping, without its
                        # context-manager object and state machine (about
                        # 3 µs of its 5 µs per call).
                        budget = max(remaining - DEADLINE_MARGIN_SECONDS, 0.001)
                        loop = asyncio.get_running_loop()
                        task = asyncio.current_task()
                        assert task is not None
                        cancelling = task.cancelling()
                        expired = False

                        def expire() -> None:
                            nonlocal expired
                            expired = True
                            task.cancel()

                        timer = loop.call_at(loop.time() + budget, expire)
                        try:
                            response = await behavior(request, context)
                        except BaseException as error:
                            timer.cancel()
                            if (
                                expired
                                and task.uncancel() <= cancelling
                                and isinstance(error, asyncio.CancelledError)
                            ):
                                raise TimeoutError from error
                            raise
                        timer.cancel()
                        if expired:
                            task.uncancel()
                except TimeoutError:
                    await abort(context, deadline_error(), method)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as error:
                    await abort(context, error, method)
                code = logged = status_code(context)
                if code == _OK:
                    sent.inc()
                return response
            except BaseException as error:
                code = failure_code(context, error)
                raise
            finally:
                elapsed = perf_counter() - started
                log(method, status_code(context) if logged is None else logged, elapsed * 1000)
                finish(code, elapsed)

        return wrapped
