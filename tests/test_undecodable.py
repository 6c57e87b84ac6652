"""Bytes that are not the method's message (bad UTF-8 in a string field,
corrupt wire format) are INVALID_ARGUMENT on every RPC of both services, never
gRPC's own UNKNOWN, and change nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from agent_service.server import AgentServer
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from statecar.agent.v1 import agent_service_pb2
from statecar.state.v1 import state_service_pb2
from tests.helpers import redis_digest


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, length 2, not UTF-8
CORRUPT = b"\xff\xff\xff\xff"  # not protobuf at all


def expected(method: str, raw: bytes) -> set[grpc.StatusCode]:
    if raw == BAD_UTF8 and method.endswith(("/ListSessions", "/ListAgents")):
        # Their field 1 is not a string (or absent): a valid unknown field.
        return {grpc.StatusCode.OK}
    return {grpc.StatusCode.INVALID_ARGUMENT}


def _methods(descriptor: object, service: str) -> list[tuple[str, bool]]:
    methods = descriptor.services_by_name[service].methods  # type: ignore[attr-defined]
    return [(f"/{m.containing_service.full_name}/{m.name}", m.server_streaming) for m in methods]


async def _call(address: str, method: str, streaming: bool, raw: bytes) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        kwargs = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        try:
            if streaming:
                async for _ in channel.unary_stream(method, **kwargs)(raw, timeout=5):
                    pass
            else:
                await channel.unary_unary(method, **kwargs)(raw, timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("method", "streaming"), _methods(state_service_pb2.DESCRIPTOR, "StateService")
)
async def test_state_service(
    state_server: StateServer, redis: aioredis.Redis, method: str, streaming: bool
) -> None:
    before = await redis_digest(redis)
    for raw in (BAD_UTF8, CORRUPT):
        code = await _call(state_server.address, method, streaming, raw)
        assert code in expected(method, raw), (method, raw, code)
    assert await redis_digest(redis) == before


@pytest.mark.parametrize(
    ("method", "streaming"), _methods(agent_service_pb2.DESCRIPTOR, "AgentService")
)
async def test_agent_service(
    agent_server: AgentServer, redis: aioredis.Redis, method: str, streaming: bool
) -> None:
    before = await redis_digest(redis)
    for raw in (BAD_UTF8, CORRUPT):
        code = await _call(agent_server.address, method, streaming, raw)
        assert code in expected(method, raw), (method, raw, code)
    assert await redis_digest(redis) == before


async def test_an_item_that_is_not_utf8_is_refused_and_writes_nothing(
    state_server: StateServer, redis: aioredis.Redis
) -> None:
    # AppendItemsRequest{session_id: "s", items: [{json: b"\xff"}]}, which no
    # generated client can build: Item.json is a string.
    raw = b"\x0a\x01s\x12\x03\x12\x01\xff"
    before = await redis_digest(redis)
    code = await _call(
        state_server.address, "/statecar.state.v1.StateService/AppendItems", False, raw
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert await redis_digest(redis) == before
