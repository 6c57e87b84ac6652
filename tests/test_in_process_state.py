"""The state service inside the agent's process (state_service/in_process.py,
AGENT_SERVICE_STATE_IN_PROCESS): the same API, statuses, tenants, deadlines and
metrics as over gRPC, sharing Redis with state-service processes and with
other replicas. Real Redis, real agent servers, offline model."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from agent_service.client import AgentClient
from agent_service.server import AgentServer
from shared_runtime.auth import current_tenant
from state_service.client import (
    EtagMismatchError,
    InvalidRequestError,
    SessionNotFoundError,
    StateClient,
    StateServiceError,
)
from state_service.in_process import InProcessState
from state_service.storage.embedded import EmbeddedRedis
from tests.conftest import StateServerFactory, agent_settings, state_settings, write_agents_file
from tests.helpers import SERVING, health_status, metric
from tests.processes import agent_service_process, wait_serving

USER = {"role": "user", "content": "hello"}
PLAIN_AGENT = "agents:\n  - name: plain\n    token_budget: 4000\n"


@pytest.fixture
async def in_process(redis_server: EmbeddedRedis) -> AsyncIterator[InProcessState]:
    state = await InProcessState.start(state_settings(redis_server.url))
    try:
        yield state
    finally:
        await state.stop()


def handled(method: str, code: str) -> float:
    return metric(
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service="statecar.state.v1.StateService",
        grpc_method=method,
        grpc_code=code,
    )


async def test_the_client_api_works_over_the_in_process_channel(
    in_process: InProcessState,
) -> None:
    client = StateClient("in-process", channel=in_process.channel)
    first = await client.append_items("s", [USER], request_id="r1")
    second = await client.append_items("s", [USER], etag=first.etag)
    assert (first.first_seq, second.first_seq) == (1, 2)
    replay = await client.append_items("s", [USER], request_id="r1")
    assert replay.replayed and replay.first_seq == 1
    context = await client.get_context("s", token_budget=1000)
    assert [item.seq for item in context.items] == [1, 2]
    assert context.etag == second.etag
    await client.check_ready(timeout=2)


async def test_refusals_keep_their_status_and_error_info(in_process: InProcessState) -> None:
    client = StateClient("in-process", channel=in_process.channel)
    first = await client.append_items("s", [USER])
    await client.append_items("s", [USER])
    aborted = handled("AppendItems", "Aborted")
    with pytest.raises(EtagMismatchError) as stale:
        await client.append_items("s", [USER], etag=first.etag)
    assert stale.value.code == grpc.StatusCode.ABORTED
    assert stale.value.reason == "ETAG_MISMATCH"
    assert stale.value.metadata["current_etag"] != first.etag
    # Counted as over gRPC, where dashboards look for it.
    assert handled("AppendItems", "Aborted") == aborted + 1
    with pytest.raises(InvalidRequestError) as invalid:
        await client.append_items("", [USER])
    assert invalid.value.metadata == {"field": "session_id"}
    with pytest.raises(SessionNotFoundError):
        await client.get_session("never-written")
    assert [item.seq for item in await client.all_items("s")] == [1, 2]  # nothing half-written


async def test_tenants_stay_apart_and_do_not_leak_into_the_caller(
    in_process: InProcessState,
) -> None:
    def acting_for(tenant: str) -> StateClient:
        return StateClient("in-process", channel=in_process.channel, acting_for=lambda: tenant)

    await acting_for("tenant-a").append_items("shared-name", [USER])
    with pytest.raises(SessionNotFoundError):
        await acting_for("tenant-b").get_session("shared-name")
    assert (await acting_for("tenant-a").get_session("shared-name")).item_count == 1
    # The call ran in its own context: the tenant it set stays there.
    assert current_tenant() == "default"
    with pytest.raises(InvalidRequestError) as invalid:
        await acting_for("not a tenant!").get_session("shared-name")
    assert invalid.value.metadata["field"] == "statecar-tenant metadata"


async def test_a_hung_redis_answers_within_the_callers_deadline(
    in_process: InProcessState, redis_server: EmbeddedRedis
) -> None:
    client = StateClient("in-process", channel=in_process.channel, timeout=0.5)
    await client.append_items("s", [USER])
    redis_server.pause()
    try:
        with pytest.raises(StateServiceError) as late:
            await client.append_items("s", [USER])
    finally:
        redis_server.resume()
    assert late.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_in_process_and_remote_state_services_share_sessions(
    in_process: InProcessState, state_server_factory: StateServerFactory
) -> None:
    remote_server = await state_server_factory()
    local = StateClient("in-process", channel=in_process.channel)
    async with StateClient(remote_server.address, timeout=5) as remote:
        written = await local.append_items("s", [USER])
        after = await remote.append_items("s", [USER], etag=written.etag)
        with pytest.raises(EtagMismatchError):
            await local.append_items("s", [USER], etag=written.etag)
        context = await local.get_context("s", token_budget=1000)
    assert context.etag == after.etag
    assert [item.seq for item in context.items] == [1, 2]


async def test_a_stopped_engine_refuses_calls(redis_server: EmbeddedRedis) -> None:
    state = await InProcessState.start(state_settings(redis_server.url))
    client = StateClient("in-process", channel=state.channel)
    await client.append_items("s", [USER])
    await state.stop()
    with pytest.raises(StateServiceError) as refused:
        await client.append_items("s", [USER])
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_remote_state_settings_are_refused_with_in_process_state() -> None:
    with pytest.raises(ValidationError, match="state_in_process"):
        agent_settings("unused", state_in_process=True, state_bearer_token="secret")


async def test_agent_replicas_with_in_process_state_serve_any_turn(
    redis_server: EmbeddedRedis, state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    """Two replicas, each with its own engine and cache, on one Redis, called
    round robin: every turn sees the turns before it, whichever replica stored
    them, and a state-service process reads the same session."""
    config = write_agents_file(tmp_path, PLAIN_AGENT)
    replicas: list[AgentServer] = []
    try:
        for _ in range(2):
            replicas.append(
                await AgentServer.start(
                    agent_settings("unused", state_in_process=True, agents_config=config),
                    state_settings=state_settings(redis_server.url),
                )
            )
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(AgentClient(replica.address, timeout=10))
                for replica in replicas
            ]
            for turn in range(6):
                result = await clients[turn % 2].chat("round-robin", f"message {turn}")
                assert result.context_items == 2 * turn
        remote_server = await state_server_factory()
        async with StateClient(remote_server.address, timeout=5) as remote:
            items = await remote.all_items("round-robin")
        assert [item.seq for item in items] == list(range(1, 13))
        assert [item.data["content"] for item in items[::2]] == [f"message {t}" for t in range(6)]
    finally:
        for replica in replicas:
            await replica.stop(grace=0.5)


async def test_the_agent_process_serves_with_state_in_process_and_drains(
    redis_server: EmbeddedRedis,
) -> None:
    """`agent-service` with AGENT_SERVICE_STATE_IN_PROCESS and STATE_SERVICE_*
    variables: ready once Redis is, answers turns, exits cleanly on SIGTERM."""
    env = {
        "AGENT_SERVICE_STATE_IN_PROCESS": "true",
        "STATE_SERVICE_REDIS_URL": redis_server.url,
        "STATE_SERVICE_HEALTH_INTERVAL_SECONDS": "0.2",
    }
    with agent_service_process("unused:1", env) as (address, process):
        await wait_serving(address)
        async with AgentClient(address, timeout=10) as agents:
            await agents.chat("s", "hello")
            assert (await agents.chat("s", "again")).context_items == 2
        assert await health_status(address) == SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0


async def test_callers_of_an_authenticating_agent_are_tenants_of_its_in_process_state(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    caller_tokens = tmp_path / "caller-tokens"
    caller_tokens.write_text("alice:alice-token\nbob:bob-token\n")
    agent = await AgentServer.start(
        agent_settings(
            "unused",
            state_in_process=True,
            auth="token",
            auth_tokens_file=caller_tokens,
            agents_config=write_agents_file(tmp_path, PLAIN_AGENT),
        ),
        state_settings=state_settings(redis_server.url),
    )
    try:
        async with (
            AgentClient(agent.address, bearer_token="alice-token", timeout=10) as alice,
            AgentClient(agent.address, bearer_token="bob-token", timeout=10) as bob,
        ):
            await alice.chat("s1", "My locker code is 4471.")
            assert (await bob.chat("s1", "What is my locker code?")).context_items == 0
            assert (await alice.chat("s1", "What is my locker code?")).context_items == 2
        # Ready: the in-process state service honours the tenant it is given.
        assert await health_status(agent.address) == SERVING
        assert agent.in_process_state is not None
        state = agent.in_process_state.channel

        def acting_for(tenant: str) -> StateClient:
            return StateClient("in-process", channel=state, acting_for=lambda: tenant)

        assert len(await acting_for("alice").all_items("s1")) == 4
        assert len(await acting_for("bob").all_items("s1")) == 2
        assert await StateClient("in-process", channel=state).all_items("s1") == []
    finally:
        await agent.stop(grace=0.5)
