"""The agent service against a fake OpenAI-compatible server on loopback: the
real `openai` client path (Responses and Chat Completions), streaming, tool
round trips, what the model is sent, failures, deadlines and racing turns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_service.client import AgentClient, AgentServiceError, ChatResult, TextDelta
from state_service.client import StateClient
from tests.conftest import AgentServerFactory, write_agents_file
from tests.fake_openai import FakeOpenAI, Step


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def fake_url(fake: FakeOpenAI) -> Iterator[str]:
    with fake.serve() as url:
        yield url


async def _agents(factory: AgentServerFactory, url: str, **overrides: Any) -> AgentClient:
    server = await factory(
        model_base_url=url, model_api_key="test-key", model_name="fake-model", **overrides
    )
    return AgentClient(server.address, timeout=10)


def _texts(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) of the messages among model input items."""
    pairs = []
    for item in items:
        if item.get("type", "message") != "message":
            continue
        content = item["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        pairs.append((item["role"], text))
    return pairs


async def test_plain_reply_through_the_responses_api(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str
) -> None:
    fake.steps = [Step(text="Hello from the fake model")]
    async with await _agents(agent_server_factory, fake_url) as agents:
        result = await agents.chat("s1", "Hi!")
        listed, _ = await agents.list_agents()
    assert result.reply == "Hello from the fake model"
    assert (result.input_tokens, result.output_tokens) == (11, 7)
    assert listed[0].model == "openai"
    request = fake.requests[0]
    assert request["model"] == "fake-model"
    assert "helpful" in request["instructions"]
    assert _texts(request["input"]) == [("user", "Hi!")]


async def test_the_model_is_sent_exactly_what_get_context_returned(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    await client.append_items(
        "s1",
        [
            {"role": "user", "content": "My favourite colour is teal."},
            {"role": "assistant", "content": "Teal it is."},
        ],
    )
    context = await client.get_context("s1", token_budget=4000)
    fake.steps = [Step(text="You said teal.")]
    async with await _agents(agent_server_factory, fake_url) as agents:
        await agents.chat("s1", "What is my favourite colour?")
    sent = fake.requests[0]["input"]
    assert _texts(sent) == [
        *_texts([item.data for item in context.items]),
        ("user", "What is my favourite colour?"),
    ]


async def test_streamed_reply(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    fake.steps = [Step(text="one two three four five")]
    async with await _agents(agent_server_factory, fake_url) as agents:
        events = [e async for e in agents.stream_chat("s1", "Count to five")]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["one ", "two ", "three ", "four ", "five"]
    final = events[-1]
    assert isinstance(final, ChatResult)
    assert final.reply == "one two three four five"
    assert fake.requests[0]["stream"] is True
    assert len(await client.all_items("s1")) == 2


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_function_tool_round_trip(
    agent_server_factory: AgentServerFactory,
    fake: FakeOpenAI,
    fake_url: str,
    client: StateClient,
    api: str,
) -> None:
    fake.steps = [Step(call=("calculate", {"expression": "2 + 3"})), Step(text="It is 5.")]
    async with await _agents(agent_server_factory, fake_url, model_api=api) as agents:
        result = await agents.chat("s1", "What is 2 + 3?")
    assert result.reply == "It is 5."
    assert [i.type for i in result.items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert result.items[2].data["output"] == "5"
    assert len(fake.requests) == 2
    second = str(fake.requests[1])
    assert "'5'" in second or '"5"' in second  # the tool output went back to the model
    tool_names = str(fake.requests[0]["tools"])
    assert "calculate" in tool_names and "current_time" in tool_names
    assert len(await client.all_items("s1")) == 4


async def test_model_failure_is_unavailable_and_stores_nothing(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    fake.default = Step(status=500)
    async with await _agents(agent_server_factory, fake_url) as agents:
        with pytest.raises(AgentServiceError) as caught:
            await agents.chat("s1", "hello")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "MODEL_FAILED"
    assert "nothing was stored" in caught.value.message
    assert await client.all_items("s1") == []


async def test_deadline_is_deadline_exceeded_and_stores_nothing(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    fake.default = Step(text="too late", delay=2.0)
    async with await _agents(agent_server_factory, fake_url) as agents:
        with pytest.raises(AgentServiceError) as caught:
            await agents.chat("s1", "hello", timeout=0.8)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(1.5)  # the model's late answer must not be stored either
    assert await client.all_items("s1") == []


async def test_concurrent_turns_on_one_session_one_is_aborted(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    fake.default = Step(text="slow answer", delay=0.5)
    async with await _agents(agent_server_factory, fake_url) as agents:
        outcomes = await asyncio.gather(
            agents.chat("s1", "first"), agents.chat("s1", "second"), return_exceptions=True
        )
    failures = [o for o in outcomes if isinstance(o, AgentServiceError)]
    assert len(failures) == 1
    assert failures[0].code == grpc.StatusCode.ABORTED
    assert failures[0].reason == "CONCURRENT_TURN"
    stored = await client.all_items("s1")
    assert len(stored) == 2
    assert len({s.metadata["statecar.request_id"] for s in stored}) == 1


async def test_concurrent_turns_are_serialized_when_configured(
    agent_server_factory: AgentServerFactory, fake: FakeOpenAI, fake_url: str, client: StateClient
) -> None:
    fake.default = Step(text="slow answer", delay=0.5)
    async with await _agents(agent_server_factory, fake_url, on_conflict="retry") as agents:
        results = await asyncio.gather(agents.chat("s1", "first"), agents.chat("s1", "second"))
    assert {r.reply for r in results} == {"slow answer"}
    stored = await client.all_items("s1")
    assert len(stored) == 4
    turns = [s.metadata["statecar.request_id"] for s in stored]
    assert turns[0] == turns[1] and turns[2] == turns[3] and turns[0] != turns[2]
    # The retried turn ran on the fresh context, which held the other turn.
    assert len(fake.requests) == 3
    assert len(_texts(fake.requests[2]["input"])) == 3


async def test_each_agent_can_have_its_own_endpoint(
    agent_server_factory: AgentServerFactory,
    fake: FakeOpenAI,
    fake_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = FakeOpenAI(default=Step(text="from the other endpoint"))
    fake.default = Step(text="from the first endpoint")
    monkeypatch.setenv("OTHER_LLM_KEY", "other-secret")
    config = write_agents_file(
        tmp_path,
        f"""
agents:
  - name: first
    model: openai:model-a
    base_url: {fake_url}
  - name: second
    model: openai:model-b
    base_url: BASE
    api_key_env: OTHER_LLM_KEY
    api: chat_completions
  - name: local
    model: offline
""",
    )
    with other.serve() as other_url:
        config.write_text(config.read_text().replace("BASE", other_url))
        server = await agent_server_factory(agents_config=config)
        async with AgentClient(server.address) as agents:
            first = await agents.chat("s1", "hi", agent="first")
            second = await agents.chat("s2", "hi", agent="second")
            local = await agents.chat("s3", "hi", agent="local")
            listed, _ = await agents.list_agents()
    assert first.reply == "from the first endpoint"
    assert second.reply == "from the other endpoint"
    assert local.reply.startswith("(offline model)")
    assert fake.requests[0]["model"] == "model-a"
    assert other.paths == ["/v1/chat/completions"]
    assert other.requests[0]["model"] == "model-b"
    assert [a.model for a in listed] == ["openai:model-a", "openai:model-b", "offline"]
