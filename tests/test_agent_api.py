"""The agent service end to end with the offline model: real agent and state
servers on loopback, real Redis. What a turn stores, replays and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from agent_service.client import (
    AgentClient,
    AgentServiceError,
    ChatResult,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
)
from agent_service.turns import AGENT_KEY, REQUEST_ID_KEY
from state_service.client import StateClient
from statecar.agent.v1 import agent_service_pb2 as pb
from tests.conftest import AgentServerFactory, write_agents_file


async def test_chat_stores_the_turn_in_the_state_service(
    agents: AgentClient, client: StateClient
) -> None:
    result = await agents.chat("s1", "Hello there.", request_id="r1")
    assert result.reply.startswith("(offline model)")
    assert result.agent == "assistant"
    assert not result.replayed
    assert [i.seq for i in result.items] == [1, 2]
    stored = await client.all_items("s1")
    assert [s.data for s in stored] == [i.data for i in result.items]
    assert stored[0].data == {"role": "user", "content": "Hello there."}
    assert stored[1].data["role"] == "assistant"
    assert all(s.metadata[REQUEST_ID_KEY] == "turn:r1" for s in stored)
    assert all(s.metadata[AGENT_KEY] == "assistant" for s in stored)
    assert result.etag == (await client.get_session("s1")).etag
    assert result.input_tokens > 0 and result.output_tokens > 0


async def test_the_model_sees_the_session_context(agents: AgentClient) -> None:
    await agents.chat("s1", "My name is Ada Lovelace and I live in London.")
    await agents.chat("s1", "I prefer tea over coffee.")
    result = await agents.chat("s1", "Where do I live?")
    assert "London" in result.reply
    assert result.context_items == 4
    assert result.context_tokens > 0


async def test_a_function_tool_round_trip_is_stored_whole(
    agents: AgentClient, client: StateClient
) -> None:
    result = await agents.chat("s1", "What is (17 + 5) * 3?")
    assert [i.type for i in result.items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert result.items[1].data["name"] == "calculate"
    assert result.items[2].data["output"] == "66"
    assert "66" in result.reply
    assert result.model_requests == 2
    assert len(await client.all_items("s1")) == 4


async def test_notes_survive_across_turns_and_replicas(
    agents: AgentClient, agent_server_factory: AgentServerFactory
) -> None:
    await agents.chat("s1", "Remember: the launch code is 4711")
    other = await agent_server_factory()
    async with AgentClient(other.address) as second:
        result = await second.chat("s1", "Please list my notes")
    assert "the launch code is 4711" in result.reply


async def test_stream_chat_streams_text_then_the_stored_turn(
    agents: AgentClient, client: StateClient
) -> None:
    events = [e async for e in agents.stream_chat("s1", "Remember that I like green tea")]
    final = events[-1]
    assert isinstance(final, ChatResult)
    assert any(isinstance(e, ToolCallStarted) and e.name == "save_note" for e in events)
    assert any(isinstance(e, ToolCallFinished) for e in events)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 3
    assert "".join(deltas) == final.reply
    assert len(await client.all_items("s1")) == len(final.items) == 4


async def test_a_retried_chat_stores_one_turn(agents: AgentClient, client: StateClient) -> None:
    first = await agents.chat("s1", "Hello", request_id="same")
    again = await agents.chat("s1", "Hello", request_id="same")
    assert again.replayed
    assert again.reply == first.reply
    assert [i.data for i in again.items] == [i.data for i in first.items]
    assert [i.seq for i in again.items] == [1, 2]
    assert len(await client.all_items("s1")) == 2


async def test_a_retry_found_only_in_the_log_is_replayed(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    # A budget so small that the retried turn is no longer in the context:
    # the model runs again, the append is recognised and the stored turn returned.
    config = write_agents_file(tmp_path, "agents:\n  - name: tiny\n    token_budget: 100\n")
    server = await agent_server_factory(agents_config=config)
    async with AgentClient(server.address) as agents:
        first = await agents.chat("s1", "The first thing I say", request_id="t1")
        for n in range(6):
            await agents.chat("s1", f"Filler message number {n} with some words in it")
        again = await agents.chat("s1", "The first thing I say", request_id="t1")
    assert again.replayed
    assert again.reply == first.reply
    assert [i.seq for i in again.items] == [1, 2]
    assert len(await client.all_items("s1")) == 14


async def test_list_agents(agents: AgentClient) -> None:
    listed, default = await agents.list_agents()
    assert default == "assistant"
    assert [a.name for a in listed] == ["assistant"]
    assert listed[0].model == "offline"
    assert set(listed[0].tools) == {"calculate", "current_time", "list_notes", "save_note"}


@pytest.mark.parametrize(
    ("session", "message", "agent", "request_id", "code", "field"),
    [
        ("", "hi", "", "r", grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        ("bad id!", "hi", "", "r", grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        ("s", "", "", "r", grpc.StatusCode.INVALID_ARGUMENT, "message"),
        ("s", "   ", "", "r", grpc.StatusCode.INVALID_ARGUMENT, "message"),
        ("s", "x" * 40_000, "", "r", grpc.StatusCode.INVALID_ARGUMENT, "message"),
        ("s", "hi", "", "bad id!", grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ("s", "hi", "nobody", "r", grpc.StatusCode.NOT_FOUND, None),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_stored(
    agents: AgentClient,
    client: StateClient,
    session: str,
    message: str,
    agent: str,
    request_id: str,
    code: grpc.StatusCode,
    field: str | None,
) -> None:
    with pytest.raises(AgentServiceError) as caught:
        await agents.chat(session, message, agent=agent, request_id=request_id)
    assert caught.value.code == code
    if field is not None:
        assert caught.value.reason == "INVALID_FIELD"
        assert caught.value.metadata["field"] == field
    else:
        assert caught.value.reason == "AGENT_NOT_FOUND"
    assert (await client.list_sessions()).sessions == []


async def test_state_service_down_is_unavailable(
    agent_server_factory: AgentServerFactory,
) -> None:
    from state_service.storage.embedded import free_port

    server = await agent_server_factory(
        state_target=f"127.0.0.1:{free_port()}", state_timeout_seconds=0.5
    )
    async with AgentClient(server.address, timeout=5) as agents:
        with pytest.raises(AgentServiceError) as caught:
            await agents.chat("s1", "hello")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "STATE_UNAVAILABLE"


async def test_items_are_json_objects_a_session_adapter_can_read(
    agents: AgentClient, client: StateClient
) -> None:
    result = await agents.chat("s1", "What time is it?")
    assert result.items[1].data["name"] == "current_time"
    for item in await client.all_items("s1"):
        json.dumps(item.data)


async def test_compressed_context_reaches_the_model(
    agent_server_factory: AgentServerFactory, tmp_path: Path
) -> None:
    # A budget far below the conversation: the state service's default tiered
    # strategy retrieves the old fact into the context the model is given.
    config = write_agents_file(tmp_path, "agents:\n  - name: small\n    token_budget: 400\n")
    server = await agent_server_factory(agents_config=config)
    async with AgentClient(server.address) as agents:
        await agents.chat("long", "My locker code is 4471 and my locker is in hall B.")
        for n in range(40):
            await agents.chat("long", f"Chit-chat number {n}: the weather is mild and grey today.")
        result = await agents.chat("long", "What is my locker code?")
    assert "4471" in result.reply
    assert result.retrieval_used
    assert result.raw.context.strategy == pb.CONTEXT_STRATEGY_TIERED
    assert result.context_tokens <= 400
