"""Agent-service replicas as real processes: round robin across two, kill -9
of one mid-conversation and mid-turn, SIGTERM drain. Nothing acknowledged is
lost, no turn is stored twice or in part.

Each test prints the figures docs/RELIABILITY.md reports (run with -s)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from agent_service.client import AgentClient, AgentServiceError, ChatResult
from agent_service.turns import REQUEST_ID_KEY
from state_service.client import StateClient
from state_service.server import StateServer
from tests.fake_openai import FakeOpenAI, Step
from tests.patience import patience
from tests.processes import agent_service_process, wait_serving

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@pytest.fixture
def slow_fake() -> FakeOpenAI:
    """A model endpoint that takes 0.3 s per call, so turns are in flight long
    enough to be killed."""
    return FakeOpenAI(default=Step(text="a considered answer", delay=0.3))


@pytest.fixture
def slow_model(slow_fake: FakeOpenAI) -> Iterator[str]:
    with slow_fake.serve() as url:
        yield url


def _model_env(url: str) -> dict[str, str]:
    return {
        "AGENT_SERVICE_MODEL_BASE_URL": url,
        "AGENT_SERVICE_MODEL_API_KEY": "test-key",
        "AGENT_SERVICE_DRAIN_SECONDS": "10",
    }


async def _chat_until_stored(
    agents: AgentClient, session: str, message: str, request_id: str
) -> tuple[ChatResult, int]:
    """What a careful caller does: retry UNAVAILABLE with the same request_id."""
    failures = 0
    while True:
        try:
            return await agents.chat(session, message, request_id=request_id, timeout=10), failures
        except AgentServiceError as error:
            assert error.code == grpc.StatusCode.UNAVAILABLE, error
            failures += 1
            assert failures < 50
            await asyncio.sleep(0.05)


async def test_two_replicas_share_a_conversation_and_a_kill9_loses_nothing(
    state_server: StateServer, client: StateClient, slow_model: str
) -> None:
    with (
        agent_service_process(state_server.address, _model_env(slow_model)) as (a, process_a),
        agent_service_process(state_server.address, _model_env(slow_model)) as (b, _),
    ):
        await asyncio.gather(wait_serving(a), wait_serving(b))
        async with AgentClient([a, b], timeout=10) as agents:
            turns = 12
            failures = 0
            for n in range(turns):
                turn = asyncio.create_task(
                    _chat_until_stored(agents, "conv", f"message {n}", f"req-{n}")
                )
                if n == 5:
                    await asyncio.sleep(0.15)  # the turn is in flight now
                    process_a.kill()
                _, turn_failures = await turn
                failures += turn_failures
    stored = await client.all_items("conv")
    by_turn = Counter(item.metadata[REQUEST_ID_KEY] for item in stored)
    assert by_turn == {f"turn:req-{n}": 2 for n in range(turns)}
    users = [i.data["content"] for i in stored if i.data.get("role") == "user"]
    assert users == [f"message {n}" for n in range(turns)]
    print(f"\nagent kill -9: {turns} turns, {failures} UNAVAILABLE retried, 0 lost, 0 duplicated")


async def test_kill9_mid_turn_stores_the_turn_whole_or_not_at_all(
    state_server: StateServer, client: StateClient, slow_model: str
) -> None:
    with agent_service_process(state_server.address, _model_env(slow_model)) as (address, proc):
        await wait_serving(address)
        async with AgentClient(address, timeout=10) as agents:
            calls = []
            for n in range(8):  # staggered: some finish before the kill, some do not
                calls.append(asyncio.create_task(agents.chat(f"s{n}", "hi", request_id=f"r{n}")))
                await asyncio.sleep(0.08)
            proc.kill()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
    acknowledged = [o for o in outcomes if isinstance(o, ChatResult)]
    for n in range(8):
        stored = await client.all_items(f"s{n}")
        assert len(stored) in (0, 2), stored  # the user message and the reply, or nothing
    for result in acknowledged:
        assert len(await client.all_items(result.session_id)) == 2
    print(f"\nagent kill -9 mid-turn: {len(acknowledged)}/8 acknowledged, 0 partial turns")


async def test_sigterm_drains_in_flight_turns(
    state_server: StateServer, client: StateClient, slow_fake: FakeOpenAI, slow_model: str
) -> None:
    with agent_service_process(state_server.address, _model_env(slow_model)) as (
        address,
        process,
    ):
        await wait_serving(address)
        async with AgentClient(address, timeout=10) as agents:
            calls = [
                asyncio.create_task(agents.chat(f"d{n}", "hello", request_id=f"d{n}"))
                for n in range(6)
            ]
            # All six have reached the agent (each has called the model, which
            # takes 0.3 s to answer): a fixed sleep was not enough under load.
            deadline = asyncio.get_running_loop().time() + patience(20)
            while len(slow_fake.requests) < 6:
                assert asyncio.get_running_loop().time() < deadline, slow_fake.requests
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            returncode = await asyncio.to_thread(process.wait, 15)
    assert returncode == 0
    assert all(isinstance(o, ChatResult) for o in outcomes), outcomes
    for n in range(6):
        assert len(await client.all_items(f"d{n}")) == 2
    print("\nagent SIGTERM: 6/6 in-flight turns completed and stored, exit 0")
