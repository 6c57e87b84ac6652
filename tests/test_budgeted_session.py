"""Budgeted StateServiceSession under openai-agents' Runner, against a real
state service and Redis; only the model is fake (the SDK's ScriptedModel,
which records every input it is sent).

Tokens are counted the way the state server counts them: the same
`make_token_counter` with the server's own settings (tiktoken's o200k_base
when its file is cached offline, else the server's estimate), applied to each
input item's compact JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, cast

import pytest
from agents import Agent, RunConfig, Runner, SQLiteSession
from agents.memory.session_settings import SessionSettings
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from agents.tool import function_tool

from state_service.client import (
    BudgetedSessionSettings,
    Context,
    ContextSummary,
    RetrievedItem,
    StateClient,
    StateServiceSession,
    StoredItem,
)
from state_service.client.rendering import (
    RETRIEVED_HEADER,
    SUMMARY_HEADER,
    budgeted_input_items,
    estimate_tokens,
    item_text,
)
from state_service.server import StateServer
from state_service.tokens import TokenCounter, make_token_counter
from tests.conftest import StateServerFactory

SUMMARY_START = SUMMARY_HEADER.split("(")[0]
RETRIEVED_START = RETRIEVED_HEADER.split("(")[0]

PEOPLE = ["Ada", "Bjorn", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
THINGS = ["colour", "city", "book", "tea", "mountain", "song", "river", "painter", "bird"]


@pytest.fixture(params=["auto", "estimate"])
async def state_server(
    request: pytest.FixtureRequest, state_server_factory: StateServerFactory
) -> StateServer:
    """Every test against a server counting with tiktoken (auto: where its file
    is cached, as here) and one counting with the estimate: the session's
    framing charge is exact for the second and converted for the first."""
    return await state_server_factory(token_counter=request.param)


def server_counter(server: StateServer) -> TokenCounter:
    return make_token_counter(server.settings.token_counter, server.settings.tiktoken_encoding)


def tokens(counter: TokenCounter, items: list[Any]) -> int:
    return sum(
        counter.count(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode())
        for item in items
    )


def is_marker(item: Mapping[str, Any], start: str) -> bool:
    content = item.get("content")
    return item.get("role") == "user" and isinstance(content, str) and content.startswith(start)


def user_text(n: int) -> str:
    person, thing = PEOPLE[n % len(PEOPLE)], THINGS[n % len(THINGS)]
    return f"Turn {n}: remember that {person}'s favourite {thing} is number {n * 37 % 1000}."


async def read(session: StateServiceSession) -> list[dict[str, Any]]:
    """get_items() as plain dicts (the SDK types them as a union of TypedDicts)."""
    return cast(list[dict[str, Any]], await session.get_items())


def assert_calls_paired(items: list[Any]) -> None:
    """Every function_call has its output in `items` and every output its call."""
    calls = [i["call_id"] for i in items if i.get("type") == "function_call"]
    outputs = [i["call_id"] for i in items if i.get("type") == "function_call_output"]
    assert sorted(calls) == sorted(outputs), (calls, outputs)


@function_tool
def lookup_order(order_id: str) -> str:
    """Looks up an order."""
    return f"Order {order_id} shipped from the Lyon warehouse, tracking LY{order_id}X."


def turn_model(turns: int, tool_every: int) -> tuple[ScriptedModel, list[list[Any]]]:
    """A model that replies with a short fixed text (every `tool_every`-th turn
    it first calls lookup_order), and the inputs it was sent, as JSON values.
    Every item gets its own id, as a real model's would (the Runner
    deduplicates input items by id). Inputs are recorded here because
    ScriptedModel.calls deep-copies every call on each access."""
    state = {"turn": 0}
    sent: list[list[Any]] = []

    def respond(call: ModelCall) -> list[Any]:
        sent.append(json.loads(json.dumps(call.input)))
        last = sent[-1][-1]
        n = state["turn"]
        if n % tool_every == tool_every - 1 and last.get("type") != "function_call_output":
            return [function_call("lookup_order", {"order_id": f"A{n}"}, call_id=f"call-{n}")]
        state["turn"] += 1
        return [assistant_message(f"Noted, turn {n}.", item_id=f"msg-{n}")]

    steps = turns + turns // tool_every
    return ScriptedModel([ModelStep.respond(respond) for _ in range(steps)]), sent


async def test_500_turns_under_runner_stay_within_the_budget(
    state_server: StateServer, client: StateClient
) -> None:
    """The proof: what the session hands the Runner (everything the model is
    sent before this turn's own items) stays within the budget on every one of
    500 turns while the log keeps all 1,100 items. About 10 s per counter on a
    loaded 2-core machine, so not marked slow."""
    turns, tool_every, budget = 500, 10, 1000
    counter = server_counter(state_server)
    model, sent_inputs = turn_model(turns, tool_every)
    agent = Agent(name="notes", instructions="Keep notes.", model=model, tools=[lookup_order])
    session = StateServiceSession("long-run", client=client, token_budget=budget)
    config = RunConfig(tracing_disabled=True)
    history_tokens: list[int] = []
    input_tokens: list[int] = []
    summary_turns: list[int] = []
    retrieval_turns: list[int] = []
    seen = 0
    for n in range(turns):
        text = user_text(n)
        result = await Runner.run(agent, text, session=session, run_config=config)
        assert result.final_output == f"Noted, turn {n}."
        calls = sent_inputs[seen:]
        seen = len(sent_inputs)
        assert len(calls) == (2 if n % tool_every == tool_every - 1 else 1)
        for sent in calls:
            start = max(i for i, item in enumerate(sent) if item.get("content") == text)
            history = sent[:start]
            history_tokens.append(tokens(counter, history))
            input_tokens.append(tokens(counter, sent))
            # The rest is this turn's own: the new message, a tool call and its output.
            assert len(sent) - start <= 3
            assert_calls_paired(sent)
            # What the session returned is history only: the new turn follows it.
            assert not any(item.get("content") == text for item in history)
        first = calls[0]
        if any(is_marker(i, SUMMARY_START) for i in first):
            summary_turns.append(n)
        if any(is_marker(i, RETRIEVED_START) for i in first):
            retrieval_turns.append(n)

    log = await client.all_items("long-run")
    expected_items = 2 * turns + 2 * (turns // tool_every)
    log_tokens = tokens(counter, [item.data for item in log])
    print(
        f"\n{turns} turns, budget {budget} ({counter.name} tokens): history sent per turn "
        f"max {max(history_tokens)}, whole input max {max(input_tokens)}; "
        f"log {len(log)} items, {log_tokens} tokens; "
        f"summary marker in {len(summary_turns)} turns (from turn {summary_turns[:1]}), "
        f"retrieval marker in {len(retrieval_turns)} (from turn {retrieval_turns[:1]})"
    )
    assert len(log) == expected_items
    assert [i.data.get("content") for i in log if i.data.get("role") == "user"] == [
        user_text(n) for n in range(turns)
    ]
    # The log is many times the budget (16.9x with tiktoken since the counter
    # counts what the model reads, not the items' JSON; 51x estimated).
    assert log_tokens > 15 * budget
    assert max(history_tokens) <= budget
    assert len(retrieval_turns) > turns // 2


async def _fill(session: StateServiceSession, turns: int) -> None:
    """`turns` turns straight into the log: a planted fact in turn 3, a tool
    call with its output every 7th turn."""
    batch: list[Any] = []
    for n in range(turns):
        text = "The vault code is ZEBRA-7781, keep it." if n == 3 else user_text(n)
        batch.append({"role": "user", "content": text})
        if n % 7 == 6:
            batch.append(
                {
                    "type": "function_call",
                    "call_id": f"call-{n}",
                    "name": "lookup_order",
                    "arguments": json.dumps({"order_id": f"A{n}"}),
                }
            )
            batch.append(
                {
                    "type": "function_call_output",
                    "call_id": f"call-{n}",
                    "output": f"Order A{n} shipped from the Lyon warehouse.",
                }
            )
        batch.append({"role": "assistant", "content": f"Noted, turn {n}."})
    for start in range(0, len(batch), 200):
        await session.add_items(batch[start : start + 200])


async def _eventually(
    session: StateServiceSession, condition: Callable[[list[Any]], bool]
) -> list[Any]:
    """get_items() once `condition` holds: the summarizer works in the
    background, off the request path."""
    for _ in range(300):
        items = await session.get_items()
        if condition(items):
            return items
        await asyncio.sleep(0.2)
    raise AssertionError(f"never happened; last read: {items}")


async def test_summary_and_retrieval_markers_once_the_log_outgrows_the_budget(
    state_server: StateServer, client: StateClient
) -> None:
    counter = server_counter(state_server)
    budget = 600
    session = StateServiceSession("markers", client=client, token_budget=budget, strategy="tiered")
    await _fill(session, 300)  # more than 10x the budget in tokens the model reads
    await session.add_items([{"role": "user", "content": "What was the vault code ZEBRA?"}])
    log = await client.all_items("markers")
    assert tokens(counter, [i.data for i in log]) > 10 * budget

    items = await _eventually(session, lambda got: is_marker(got[0], SUMMARY_START))
    summary, retrieved = items[0], items[1]
    assert summary["content"].startswith("Summary of the earlier conversation (items 1-")
    assert is_marker(retrieved, RETRIEVED_START)
    assert "ZEBRA-7781" in retrieved["content"]
    assert "#7 user: The vault code is ZEBRA-7781" in retrieved["content"]
    # Then the newest items verbatim, from a turn start, ending at the log's end.
    recent = items[2:]
    assert recent == [i.data for i in log[-len(recent) :]]
    assert recent[0]["role"] == "user"
    assert not any(is_marker(i, SUMMARY_START) or is_marker(i, RETRIEVED_START) for i in recent)
    assert tokens(counter, items) <= budget
    # The log itself is untouched.
    assert [i.data for i in await client.all_items("markers")] == [i.data for i in log]


async def test_a_tool_call_and_its_output_stay_together(
    state_server: StateServer, client: StateClient
) -> None:
    counter = server_counter(state_server)
    plain = StateServiceSession("tools-kept", client=client)
    await _fill(plain, 60)
    log = [i.data for i in await client.all_items("tools-kept")]
    for budget in [20, 60, *range(150, 1500, 37)]:
        for strategy in ("token_window", "retrieval", "tiered"):
            session = StateServiceSession(
                "tools-kept",
                client=client,
                token_budget=budget,
                strategy=strategy,
                query="lookup_order Lyon warehouse shipped",
            )
            items = await read(session)
            raw = [i for i in items if not is_marker(i, RETRIEVED_START)]
            raw = [i for i in raw if not is_marker(i, SUMMARY_START)]
            assert_calls_paired(raw)
            assert raw == log[len(log) - len(raw) :], (budget, strategy)
            assert tokens(counter, items) <= budget, (budget, strategy)
            for marker in items[: len(items) - len(raw)]:
                # A retrieved tool call is quoted text, never a raw call item.
                assert set(marker) == {"role", "content"}
    retrieval = StateServiceSession(
        "tools-kept", client=client, token_budget=400, strategy="retrieval", query="A48 Lyon"
    )
    marker = (await read(retrieval))[0]
    assert is_marker(marker, RETRIEVED_START)
    assert 'called lookup_order({"order_id": "A48"})' in marker["content"]
    assert "lookup_order returned: Order A48 shipped" in marker["content"]


async def test_limit_keeps_its_sdk_meaning(state_server: StateServer, client: StateClient) -> None:
    reference = SQLiteSession("limits")
    budgeted = StateServiceSession("limits", client=client, token_budget=200)
    try:
        batch: list[Any] = []
        for n in range(40):
            batch += [
                {"role": "user", "content": user_text(n)},
                {"role": "assistant", "content": f"a{n}"},
            ]
        await reference.add_items(batch)
        await budgeted.add_items(batch)
        # An explicit limit: the newest `limit` items verbatim, budget or not.
        for limit in (0, 1, 3, 50, 100):
            assert await budgeted.get_items(limit) == await reference.get_items(limit)
        assert len(await budgeted.get_items()) < 80
    finally:
        reference.close()

    with pytest.raises(ValueError, match="limit always wins"):
        StateServiceSession(
            "limits", client=client, token_budget=200, session_settings=SessionSettings(limit=4)
        )

    # A run-level limit (RunConfig.session_settings) wins for that run.
    model = ScriptedModel([[assistant_message("ok", item_id="m-limit")]])
    agent = Agent(name="a", instructions="x", model=model)
    config = RunConfig(tracing_disabled=True, session_settings=SessionSettings(limit=3))
    await Runner.run(agent, "next", session=budgeted, run_config=config)
    assert model.first_call is not None
    assert list(model.first_call.input) == [*batch[-3:], {"role": "user", "content": "next"}]


async def test_settings_and_constructor_are_the_same_configuration(client: StateClient) -> None:
    await _fill(StateServiceSession("configured", client=client), 40)
    by_arguments = StateServiceSession(
        "configured", client=client, token_budget=300, strategy="retrieval", query="Lyon"
    )
    settings = BudgetedSessionSettings(token_budget=300, strategy="retrieval", query="Lyon")
    by_settings = StateServiceSession("configured", client=client, session_settings=settings)
    assert by_arguments.session_settings == settings
    assert await by_arguments.get_items() == await by_settings.get_items()
    # The per-session settings are the session's own: changing them is seen next read.
    by_settings.session_settings = BudgetedSessionSettings(token_budget=300, marker_role="system")
    items = await read(by_settings)
    markers = [i for i in items if str(i.get("content")).startswith(RETRIEVED_START)]
    assert [m["role"] for m in markers] == ["system"]
    with pytest.raises(ValueError, match="positive"):
        BudgetedSessionSettings(token_budget=0)
    # The Runner overlays a plain SessionSettings on ours.
    assert settings.resolve(SessionSettings(limit=2)) == BudgetedSessionSettings(
        limit=2, token_budget=300, strategy="retrieval", query="Lyon"
    )
    context = await by_arguments.get_context()
    assert context.token_budget < 300  # the markers' framing is reserved


async def test_without_a_budget_the_session_is_unchanged(client: StateClient) -> None:
    await _fill(StateServiceSession("plain", client=client), 30)
    log = [i.data for i in await client.all_items("plain")]
    for settings in (None, SessionSettings(), BudgetedSessionSettings(strategy="tiered")):
        session = StateServiceSession("plain", client=client, session_settings=settings)
        assert await session.get_items() == log
        assert await session.get_items(5) == log[-5:]
        with pytest.raises(ValueError, match="no token_budget"):
            await session.get_context()


def _stored(seq: int, data: dict[str, Any]) -> StoredItem:
    return StoredItem(seq=seq, data=data, metadata={}, create_time=None)


def test_framing_that_would_overflow_drops_the_least_relevant_first() -> None:
    """The server counted the retrieved items' JSON; if their rendering cost
    more, the weakest retrieved item goes, then the summary: never the recent
    items the server chose."""
    recent = [_stored(100, {"role": "user", "content": "now"})]
    retrieved = [
        RetrievedItem(_stored(seq, {"role": "user", "content": f"old {seq} " * 5}), score)
        for seq, score in ((10, 0.9), (20, 0.1), (30, 0.5))
    ]
    summary = ContextSummary("things were said", 1, 9, estimate_tokens("things were said"))
    parts = (
        estimate_tokens(summary.text)
        + sum(estimate_tokens(r.item.data) for r in retrieved)
        + estimate_tokens(recent[0].data)
    )

    def context(count: int) -> Context:
        return Context(
            items=recent,
            etag="e",
            token_count=count,
            token_budget=count,
            total_item_count=100,
            omitted_item_count=96,
            summary=summary,
            retrieved=retrieved,
        )

    everything = budgeted_input_items(context(parts), token_budget=10_000)
    assert [i["content"].split(" (")[0] for i in everything[:2]] == [
        SUMMARY_START.rstrip(),
        RETRIEVED_START.rstrip(),
    ]
    assert everything[2:] == [recent[0].data]
    assert [line[:9] for line in everything[1]["content"].splitlines()[1:]] == [
        "#10 user:",
        "#20 user:",
        "#30 user:",
    ]
    full_cost = sum(estimate_tokens(i) for i in everything)
    trimmed = budgeted_input_items(context(parts), token_budget=full_cost - 1)
    assert "#20 user" not in trimmed[1]["content"]
    assert "#10 user" in trimmed[1]["content"]
    assert sum(estimate_tokens(i) for i in trimmed) <= full_cost - 1
    bare = budgeted_input_items(context(parts), token_budget=estimate_tokens(recent[0].data))
    assert bare == [recent[0].data]


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ({"role": "user", "content": "hi"}, "user: hi"),
        (
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
            },
            "assistant: Hello",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "see"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                    {"type": "input_file", "filename": "a.pdf", "file_data": "AAAA"},
                ],
            },
            "user: see [image] [file a.pdf]",
        ),
        (
            {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a":2}'},
            'called add({"a":2})',
        ),
        ({"type": "function_call_output", "call_id": "c1", "output": "5"}, "add returned: 5"),
        ({"type": "function_call_output", "call_id": "c9", "output": "7"}, "a tool returned: 7"),
        (
            {"type": "custom_tool_call", "call_id": "c2", "name": "grep", "input": "foo"},
            "called grep(foo)",
        ),
        (
            {
                "type": "computer_call_output",
                "call_id": "c3",
                "output": {"type": "computer_screenshot", "image_url": "data:AAAA"},
            },
            "a tool returned: [image]",
        ),
        (
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "t"}]},
            "(reasoning) t",
        ),
        ({"type": "image_generation_call", "id": "ig", "result": "A" * 5000}, None),
    ],
)
def test_retrieved_items_render_as_one_line_of_text(item: dict[str, Any], text: str | None) -> None:
    rendered = item_text(item, {"c1": "add"})
    if text is None:
        assert rendered.startswith('(image_generation_call) {"result":"AAA')
        assert len(rendered) < 1100
    else:
        assert rendered == text
