"""StateServiceSession as an openai-agents Session: under Runner.run, and side
by side with the SDK's own SQLiteSession for the same operations."""

from __future__ import annotations

from typing import Any

from agents import Agent, Runner, SQLiteSession
from agents.memory import Session
from agents.memory.session_settings import SessionSettings
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from agents.tool import function_tool

from state_service.client import StateClient, StateServiceSession
from state_service.server import StateServer


def _texts(call: ModelCall) -> list[str]:
    texts = []
    for item in call.input if isinstance(call.input, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return texts


def remembering_model() -> ScriptedModel:
    """Answers with everything the user said so far, as found in its input."""

    def respond(call: ModelCall) -> list[Any]:
        said = [t for t in _texts(call) if t.startswith("I ")]
        return [assistant_message("You said: " + " | ".join(said))]

    return ScriptedModel([ModelStep.respond(respond) for _ in range(10)])


async def test_session_under_runner_keeps_the_conversation(
    client: StateClient,
) -> None:
    model = remembering_model()
    agent = Agent(name="memo", instructions="Remember.", model=model)
    session = StateServiceSession("runner-1", client=client)
    assert isinstance(session, Session)
    await Runner.run(agent, "I like tea", session=session)
    await Runner.run(agent, "I live in Oslo", session=session)
    result = await Runner.run(agent, "I am 41", session=session)
    assert result.final_output == "You said: I like tea | I live in Oslo | I am 41"
    items = await session.get_items()
    assert [i.get("role") for i in items] == ["user", "assistant"] * 3
    # Another session sees none of it.
    other = StateServiceSession("runner-2", client=client)
    result = await Runner.run(agent, "I am new", session=other)
    assert result.final_output == "You said: I am new"


async def test_session_with_tool_calls_under_runner(client: StateClient) -> None:
    @function_tool
    def add(a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    model = ScriptedModel(
        [
            [function_call("add", {"a": 2, "b": 3}, call_id="call-1")],
            [assistant_message("5")],
        ]
    )
    agent = Agent(name="calc", instructions="Add.", model=model, tools=[add])
    session = StateServiceSession("tools", client=client)
    result = await Runner.run(agent, "2+3?", session=session)
    assert result.final_output == "5"
    kinds = [i.get("type", i.get("role")) for i in await session.get_items()]
    assert kinds == ["user", "function_call", "function_call_output", "message"]
    # The stored turn is a valid context: the call travels with its output.
    context = await client.get_context("tools")
    assert [i.data.get("type", i.data.get("role")) for i in context.items] == kinds


async def test_behaves_like_the_sdks_own_session_store(state_server: StateServer) -> None:
    reference = SQLiteSession("same")
    ours = StateServiceSession("same", target=state_server.address)
    try:
        for session in (reference, ours):
            assert await session.get_items() == []
            assert await session.pop_item() is None
        batches: list[list[Any]] = [
            [{"role": "user", "content": f"u{n}"}, {"role": "assistant", "content": f"a{n}"}]
            for n in range(6)
        ]
        for batch in batches:
            await reference.add_items(batch)
            await ours.add_items(batch)
        await ours.add_items([])
        for limit in (None, 0, 1, 3, 12, 50):
            assert await ours.get_items(limit) == await reference.get_items(limit), limit
        assert await ours.pop_item() == await reference.pop_item()
        assert await ours.get_items(2) == await reference.get_items(2)
        limited = StateServiceSession(
            "same", target=state_server.address, session_settings=SessionSettings(limit=4)
        )
        assert await limited.get_items() == (await reference.get_items())[-4:]
        await limited.close()
        await reference.clear_session()
        await ours.clear_session()
        await ours.clear_session()  # clearing twice is fine
        assert await ours.get_items() == await reference.get_items() == []
    finally:
        reference.close()
        await ours.close()


async def test_large_history_pages_through(client: StateClient) -> None:
    session = StateServiceSession("long", client=client)
    items: list[Any] = [{"role": "user", "content": f"m{n}"} for n in range(2500)]
    for start in range(0, len(items), 500):
        await session.add_items(items[start : start + 500])
    assert await session.get_items() == items
    assert await session.get_items(1200) == items[-1200:]
