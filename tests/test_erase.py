"""Erasure (issue #15 part 3): after EraseSession / EraseTenant a SCAN of
the whole Redis finds nothing of the erased session or tenant (log, meta,
summary and view, request ids, paused runs, fork staging lists, workflows,
index), this replica's cache and retrieval memory forget it, the durable tier
is asked to erase its rows, metrics count it, and another tenant's keys are
byte for byte what they were."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from agent_service import cli
from shared_runtime.errors import error_info
from state_service.client import InvalidRequestError, NewItem, StateClient
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from tests.conftest import StateServerFactory


class RecordingDurableTier:
    """A durable tier that records what it was asked to erase (the
    PostgreSQL tier implements the same two methods)."""

    def __init__(self) -> None:
        self.sessions: list[tuple[str, str]] = []
        self.tenants: list[str] = []

    async def erase_session(self, tenant: str, session_id: str) -> int:
        self.sessions.append((tenant, session_id))
        return 3

    async def erase_tenant(self, tenant: str) -> int:
        self.tenants.append(tenant)
        return 7


def message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def erasures(scope: str) -> float:
    return REGISTRY.get_sample_value("statecar_state_erasures_total", {"scope": scope}) or 0.0


async def every_key(redis: aioredis.Redis) -> dict[str, bytes | None]:
    """Every key in Redis with its DUMP (SCAN everything)."""
    found: dict[str, bytes | None] = {}
    async for key in redis.scan_iter(count=1000):
        found[key.decode()] = await redis.dump(key)
    return found


@pytest.fixture
async def server(state_server_factory: StateServerFactory, tmp_path: Path) -> StateServer:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha:token-alpha\nbeta:token-beta\n")
    return await state_server_factory(auth="token", auth_tokens_file=tokens)


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def populate(client: StateClient, redis: aioredis.Redis, tenant: str) -> None:
    """Every kind of key the service (and its neighbours) keeps for a tenant."""
    await client.append_items(
        "s1", [NewItem(message(f"s1 item {i} about lisbon")) for i in range(30)], request_id="r1"
    )
    await client.append_items("s2", [NewItem(message("s2 hello"))])
    view = await client.get_compacted_view("s2")
    await client.compact_session("s2", [message("compact")], etag=view.etag)
    await client.fork_session("s1", "s1-fork", up_to_seq=3)
    await client.update_workflow(
        "wf1", current_stage="a", results={"x": 1}, agent_sessions={"a": "s1"}
    )
    await client.get_context("s1", query="lisbon", strategy="retrieval", token_budget=200)
    # Paused runs (the approvals feature's hash) and a fork's staging list
    # left by a fork in flight, written as their owners write them.
    await redis.hset(f"statecar:{{{tenant}:s1}}:p", "run-1", "paused")
    await redis.rpush(f"statecar:{{{tenant}:s9}}:f:attempt", "1:x")


async def test_erase_session_then_tenant_leaves_nothing_and_spares_others(
    server: StateServer, redis: aioredis.Redis
) -> None:
    durable = RecordingDurableTier()
    # The server is built without a durable tier; plug one in as the
    # coordinator's wiring of the PostgreSQL tier does (StateServicer.over).
    server.servicer._erasure.durable = durable
    async with (
        StateClient(server.address, bearer_token="token-alpha") as alpha,
        StateClient(server.address, bearer_token="token-beta") as beta,
    ):
        await populate(alpha, redis, "alpha")
        await populate(beta, redis, "beta")
        assert server.compression.memories.get("alpha", "s1") is not None
        assert server.cache is not None and server.cache.get("alpha", "s1") is not None
        betas = {k: v for k, v in (await every_key(redis)).items() if "beta" in k}
        assert any(":p" in k for k in betas) and any(":wf:" in k for k in betas)
        sessions_before, tenants_before = erasures("session"), erasures("tenant")

        erased = await alpha.erase_session("s1")
        assert (erased.sessions, erased.durable_rows) == (1, 3)
        assert erased.deleted_keys >= 5  # meta, log, request ids, paused runs, index entry
        keys = await every_key(redis)
        assert not [k for k in keys if "{alpha:s1}" in k]
        assert [k for k in keys if "{alpha:s1-fork}" in k]  # a fork is its own session
        assert server.compression.memories.get("alpha", "s1") is None
        assert server.cache.get("alpha", "s1") is None
        assert "s1" not in [s.session_id for s in (await alpha.list_sessions()).sessions]
        assert (await alpha.all_items("s1")) == []
        assert durable.sessions == [("alpha", "s1")]
        again = await alpha.erase_session("s1")  # idempotent
        assert (again.sessions, again.deleted_keys) == (0, 0)

        with pytest.raises(InvalidRequestError) as caught:
            await alpha.erase_tenant("beta")  # not the caller's own tenant
        assert caught.value.metadata["field"] == "confirm_tenant"
        assert {k: v for k, v in (await every_key(redis)).items() if "beta" in k} == betas

        # Another deployment on the same Redis whose key prefix starts with ours.
        neighbour = "statecar:v2:{alpha:s2}:m"
        await redis.hset(neighbour, "inc", "x")
        erased = await alpha.erase_tenant("alpha")
        assert erased.sessions == 2  # s2 and s1-fork (s1 is gone already)
        assert erased.durable_rows == 7 and durable.tenants == ["alpha"]
        keys = await every_key(redis)
        assert [k for k in keys if "alpha" in k] == [neighbour]
        assert {k: v for k, v in keys.items() if "beta" in k} == betas
        assert server.compression.memories.sessions_of("alpha") == []
        assert server.cache.sessions_of("alpha") == []
        assert erasures("session") == sessions_before + 2
        assert erasures("tenant") == tenants_before + 1
        # Beta's data still reads as before.
        assert len(await beta.all_items("s1")) == 30


async def test_erase_rpcs_refuse_bad_input(server: StateServer) -> None:
    from statecar.state.v1 import state_service_pb2 as pb
    from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.StateServiceStub(channel)
        metadata = (("authorization", "Bearer token-alpha"),)
        calls: list[tuple[Any, str]] = [
            (
                stub.EraseSession(pb.EraseSessionRequest(session_id="a/b"), metadata=metadata),
                "session_id",
            ),
            (stub.EraseSession(pb.EraseSessionRequest(), metadata=metadata), "session_id"),
            (stub.EraseTenant(pb.EraseTenantRequest(), metadata=metadata), "confirm_tenant"),
        ]
        for call, field in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            info = error_info(caught.value)
            assert info is not None and info.metadata["field"] == field


async def test_cli_erase(client: StateClient, state_server: StateServer) -> None:
    await client.append_items("s", [NewItem(message("x"))])
    target = ["--state-target", state_server.address]
    args = cli.parser().parse_args(["erase", "--tenant", "default", *target])
    assert await args.handler(args) == 2  # no --yes
    assert len(await client.all_items("s")) == 1
    args = cli.parser().parse_args(["erase", "--tenant", "default", "--yes", *target])
    assert await args.handler(args) == 0
    assert await client.all_items("s") == []


@pytest.mark.parametrize("redis_backend", ["cluster"])
async def test_erase_and_import_on_a_cluster(
    state_server_factory: StateServerFactory, request: pytest.FixtureRequest
) -> None:
    from state_service.client.types import ItemRecord
    from tests.redis_cluster import EmbeddedRedisCluster

    cluster: EmbeddedRedisCluster = request.getfixturevalue("redis_cluster")
    server = await state_server_factory()

    def keys_everywhere() -> list[str]:
        found: list[str] = []
        for port in cluster.primary_ports():
            with cluster.client(port) as node:
                found += [k.decode() for k in node.scan_iter(count=1000)]
        return found

    async with StateClient(server.address) as client:
        for i in range(8):  # sessions in many slots
            await client.append_items(f"s{i}", [NewItem(message(f"x{i}"))], request_id=f"r{i}")
        await client.import_items("imported", [ItemRecord(4, '{"role":"user","content":"i"}')])
        await client.update_workflow("wf", current_stage="a", results={}, agent_sessions={})
        assert (await client.list_sessions()).sessions[0].session_id == "imported"
        assert (await client.erase_session("s0")).sessions == 1
        assert not [k for k in keys_everywhere() if "{default:s0}" in k]
        erased = await client.erase_tenant("default")
        assert erased.sessions == 8
        assert not [k for k in keys_everywhere() if "default" in k]
