"""Fast servicer tests without a gRPC transport (grpcio-testing).

grpcio-testing drives synchronous servicers only, so a thin adapter runs the
asyncio servicer on a loop thread and maps ServiceError exactly as the
exception interceptor does. Storage is still a real redis-server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from shared_runtime.errors import ServiceError
from state_service.cache import SessionCache
from state_service.reader import LogReader
from state_service.servicer import StateServicer
from state_service.storage.embedded import EmbeddedRedis
from state_service.storage.redis import RedisStorage
from state_service.tokens import EstimatingTokenCounter
from statecar.state.v1 import state_service_pb2 as pb
from tests.conftest import state_settings

SERVICE = pb.DESCRIPTOR.services_by_name["StateService"]
DOMAIN = "state.statecar.dev"


class SyncServicer:
    """Runs each async servicer method to completion on `loop`."""

    def __init__(self, servicer: StateServicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Any, Any], Any]:
        method = getattr(self._servicer, name)

        def call(request: Any, context: Any) -> Any:
            future = asyncio.run_coroutine_threadsafe(method(request, context), self._loop)
            try:
                return future.result(timeout=10)
            except ServiceError as error:
                # grpc_testing's abort() drops trailing metadata: set the
                # status and return, as a sync servicer may.
                status = error.to_status(DOMAIN)
                context.set_trailing_metadata(status.trailing_metadata)
                context.set_code(status.code)
                context.set_details(status.details)
                return None

        return call


@pytest.fixture
def servicer_server(redis_server: EmbeddedRedis) -> Iterator[grpc_testing.Server]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = state_settings(redis_server.url)

    async def build() -> tuple[RedisStorage, StateServicer]:
        storage = RedisStorage.from_url(redis_server.url)
        cache = SessionCache(max_sessions=100, ttl_seconds=60, max_items=64)
        counter = EstimatingTokenCounter()
        reader = LogReader(storage, cache=cache, token_counter=counter)
        return storage, StateServicer.over(storage, reader, settings, token_counter=counter)

    storage, servicer = asyncio.run_coroutine_threadsafe(build(), loop).result(10)
    yield grpc_testing.server_from_dictionary(
        {SERVICE: SyncServicer(servicer, loop)}, grpc_testing.strict_real_time()
    )
    asyncio.run_coroutine_threadsafe(storage.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def invoke(server: grpc_testing.Server, method: str, request: Any) -> tuple[Any, Any, Any, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, 5)
    response, trailing, code, details = rpc.termination()
    return response, trailing, code, details


def error_reason(trailing: Any) -> str:
    for key, value in trailing:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            status.details[0].Unpack(info)
            return str(info.reason)
    return ""


def test_append_then_context(servicer_server: grpc_testing.Server) -> None:
    item = pb.Item(json='{"role":"user","content":"hi"}', metadata={"k": "v"})
    response, _, code, _ = invoke(
        servicer_server, "AppendItems", pb.AppendItemsRequest(session_id="u", items=[item])
    )
    assert code == grpc.StatusCode.OK
    assert response.first_seq == 1
    context, _, code, _ = invoke(
        servicer_server, "GetContext", pb.GetContextRequest(session_id="u")
    )
    assert code == grpc.StatusCode.OK
    assert context.items[0].json == item.json
    assert context.items[0].metadata["k"] == "v"
    assert context.etag == response.etag


def test_validation_error_carries_error_info(servicer_server: grpc_testing.Server) -> None:
    _, trailing, code, details = invoke(
        servicer_server, "AppendItems", pb.AppendItemsRequest(session_id="bad id")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("session_id:")
    assert error_reason(trailing) == "INVALID_FIELD"


def test_stale_etag_is_aborted(servicer_server: grpc_testing.Server) -> None:
    item = pb.Item(json='{"role":"user","content":"hi"}')
    first, *_ = invoke(
        servicer_server, "AppendItems", pb.AppendItemsRequest(session_id="e", items=[item])
    )
    invoke(servicer_server, "AppendItems", pb.AppendItemsRequest(session_id="e", items=[item]))
    _, trailing, code, _ = invoke(
        servicer_server,
        "AppendItems",
        pb.AppendItemsRequest(session_id="e", items=[item], etag=first.etag),
    )
    assert code == grpc.StatusCode.ABORTED
    assert error_reason(trailing) == "ETAG_MISMATCH"


def test_get_missing_session_is_not_found(servicer_server: grpc_testing.Server) -> None:
    _, trailing, code, _ = invoke(
        servicer_server, "GetSession", pb.GetSessionRequest(session_id="nobody")
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert error_reason(trailing) == "SESSION_NOT_FOUND"
