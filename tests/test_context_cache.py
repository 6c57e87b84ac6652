"""The agent replica's context cache (agent_service/context_cache.py): a
second turn on the same replica skips GetContext; any other write in between
is found by the append's etag and the turn is redone on the fresh context;
nothing is lost or stored twice; tenants and request_id replays behave as
without the cache. Real agent and state servers, real Redis, offline model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from agent_service.client import AgentClient, AgentServiceError
from agent_service.context_cache import ContextCache
from agent_service.turns import REQUEST_ID_KEY
from state_service.client import AppendResult, Context, NewItem, StateClient, StoredItem
from state_service.server import StateServer
from tests.conftest import AgentServerFactory, StateServerFactory, write_agents_file
from tests.fake_openai import FakeOpenAI, Step
from tests.helpers import metric

PLAIN_AGENT = "agents:\n  - name: plain\n    token_budget: 4000\n"


def get_contexts() -> float:
    """GetContext calls the state service answered (this process serves both)."""
    return metric(
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service="statecar.state.v1.StateService",
        grpc_method="GetContext",
        grpc_code="OK",
    )


def cache_outcomes() -> dict[str, float]:
    return {
        outcome: metric("statecar_agent_context_cache_total", outcome=outcome)
        for outcome in ("hit", "miss", "stale")
    }


def grown(before: dict[str, float]) -> dict[str, float]:
    return {outcome: value - before[outcome] for outcome, value in cache_outcomes().items()}


async def plain_agent(factory: AgentServerFactory, tmp_path: Path, **settings: object) -> str:
    config = write_agents_file(tmp_path, PLAIN_AGENT)
    return (await factory(agents_config=config, **settings)).address


async def test_the_second_turn_on_a_replica_skips_get_context(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    address = await plain_agent(agent_server_factory, tmp_path)
    before, reads = cache_outcomes(), get_contexts()
    async with AgentClient(address, timeout=10) as agents:
        await agents.chat("s1", "My name is Ada Lovelace and I live in London.")
        await agents.chat("s1", "I prefer tea over coffee.")
        last = await agents.chat("s1", "Where do I live?")
    assert get_contexts() - reads == 1
    assert grown(before) == {"hit": 2, "miss": 1, "stale": 0}
    assert "London" in last.reply
    assert last.context_items == 4
    stored = await client.all_items("s1")
    assert [item.seq for item in stored] == [1, 2, 3, 4, 5, 6]
    assert last.etag == (await client.get_session("s1")).etag
    assert [item.seq for item in last.items] == [5, 6]


async def test_hits_last_until_the_log_outgrows_the_budget_with_exact_counts(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    """The append's own count of the log keeps a session on the cache for as
    long as GetContext would return the whole log, with the count GetContext
    would give; the turn after that reads a compressed context."""
    config = write_agents_file(tmp_path, "agents:\n  - name: plain\n    token_budget: 600\n")
    address = (await agent_server_factory(agents_config=config)).address
    message = "Tell me more about the history of tea in England, please. " * 2
    before, reads = cache_outcomes(), get_contexts()
    async with AgentClient(address, timeout=10) as agents:
        turns = 0
        while True:
            expected = await client.get_context("s1", token_budget=600)
            result = await agents.chat("s1", message)
            turns += 1
            if expected.omitted_item_count or expected.summary is not None:
                break  # the log outgrew the budget: this turn read its context
            assert result.context_tokens == expected.token_count
            assert result.context_items == len(expected.items)
            assert turns < 50
    outcomes = grown(before)
    assert turns > 3
    # One read for the first turn and one for the last; every turn between
    # ran on the cache, never on a count from above.
    assert outcomes == {"hit": turns - 2, "miss": 2, "stale": 0}
    assert get_contexts() - reads == turns + 2  # this test's own reads included


async def test_a_write_by_another_client_makes_the_turn_start_over(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    address = await plain_agent(agent_server_factory, tmp_path)
    async with AgentClient(address, timeout=10) as agents:
        await agents.chat("s1", "I prefer tea over coffee.")
        await client.append_items(
            "s1", [NewItem({"role": "user", "content": "My name is Ada and I live in Paris."})]
        )
        before, reads = cache_outcomes(), get_contexts()
        result = await agents.chat("s1", "Where do I live?", request_id="q1")
    assert grown(before) == {"hit": 0, "miss": 0, "stale": 1}
    assert get_contexts() - reads == 1
    assert "Paris" in result.reply  # the redone turn saw the other client's item
    stored = await client.all_items("s1")
    assert [item.seq for item in stored] == [1, 2, 3, 4, 5]
    assert stored[2].data["content"] == "My name is Ada and I live in Paris."
    assert [item.data for item in stored[3:]] == [item.data for item in result.items]
    assert [item.metadata[REQUEST_ID_KEY] for item in stored[3:]] == ["turn:q1", "turn:q1"]


async def test_a_turn_stored_by_another_replica_is_not_lost_or_duplicated(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    first = await plain_agent(agent_server_factory, tmp_path)
    second = await plain_agent(agent_server_factory, tmp_path)
    async with AgentClient(first, timeout=10) as a, AgentClient(second, timeout=10) as b:
        await a.chat("s1", "I live in London.")
        await b.chat("s1", "I moved to Rome.")
        before = cache_outcomes()
        await a.chat("s1", "Noted?")
        # A retry, on replica a, of a turn replica b stored: a's cached
        # context is stale; the stored turn is returned, nothing appended.
        stored_by_b = await b.chat("s1", "And now?", request_id="r-b")
        again = await a.chat("s1", "And now?", request_id="r-b")
    # a's "Noted?" and b's "And now?" found a stale context; the session is
    # then shared, so a's retry reads its context (and finds the turn there).
    assert grown(before) == {"hit": 0, "miss": 1, "stale": 2}
    assert again.replayed
    assert [item.data for item in again.items] == [item.data for item in stored_by_b.items]
    assert [item.seq for item in again.items] == [item.seq for item in stored_by_b.items]
    stored = await client.all_items("s1")
    assert [item.seq for item in stored] == list(range(1, 9))
    assert [item.data["content"] for item in stored[::2]] == [
        "I live in London.",
        "I moved to Rome.",
        "Noted?",
        "And now?",
    ]


async def test_a_session_alternating_between_replicas_stops_using_the_cache(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    first = await plain_agent(agent_server_factory, tmp_path)
    second = await plain_agent(agent_server_factory, tmp_path)
    before = cache_outcomes()
    async with AgentClient(first, timeout=10) as a, AgentClient(second, timeout=10) as b:
        for n in range(8):
            await (a, b)[n % 2].chat("s1", f"message {n}")  # strictly alternating
        # One stale turn per replica, then each reads the context.
        assert grown(before) == {"hit": 0, "miss": 6, "stale": 2}
        assert len(await client.all_items("s1")) == 16
    # Back on one replica: the first read shows nobody else wrote since its
    # own last append, and it caches again.
    async with AgentClient(first, timeout=10) as agents:
        before = cache_outcomes()
        for n in range(3):
            await agents.chat("s1", f"alone {n}")
    assert grown(before) == {"hit": 1, "miss": 2, "stale": 0}
    stored = await client.all_items("s1")
    assert [item.seq for item in stored] == list(range(1, 23))


async def test_a_session_that_outgrows_the_budget_stops_using_the_cache(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    config = write_agents_file(tmp_path, "agents:\n  - name: small\n    token_budget: 200\n")
    address = (await agent_server_factory(agents_config=config)).address
    filler = "a sentence of filler words to make the session grow quickly " * 2
    outcomes: list[dict[str, float]] = []
    async with AgentClient(address, timeout=10) as agents:
        for n in range(8):
            before = cache_outcomes()
            result = await agents.chat("s1", f"{n}: {filler}")
            outcomes.append(grown(before))
    assert outcomes[0] == {"hit": 0, "miss": 1, "stale": 0}
    # Once the log no longer fits, every turn reads its context again.
    assert all(o == {"hit": 0, "miss": 1, "stale": 0} for o in outcomes[-3:])
    assert result.context_items < 16
    assert len(await client.all_items("s1")) == 16


async def test_tenants_never_share_a_cached_context(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    state_tokens = tmp_path / "state-tokens"
    state_tokens.write_text("agents:agent-secret\n")
    state = await state_server_factory(
        auth="token", auth_tokens_file=state_tokens, auth_delegates="agents"
    )
    caller_tokens = tmp_path / "caller-tokens"
    caller_tokens.write_text("alice:alice-token\nbob:bob-token\n")
    address = await plain_agent(
        agent_server_factory,
        tmp_path,
        state_target=state.address,
        state_bearer_token="agent-secret",
        auth="token",
        auth_tokens_file=caller_tokens,
    )
    before = cache_outcomes()
    async with (
        AgentClient(address, bearer_token="alice-token", timeout=10) as alice,
        AgentClient(address, bearer_token="bob-token", timeout=10) as bob,
    ):
        await alice.chat("s1", "My locker code is 4471.")
        await bob.chat("s1", "Hello, I am Bob.")
        assert "4471" not in (await bob.chat("s1", "What is my locker code?")).reply
        assert "4471" in (await alice.chat("s1", "What is my locker code?")).reply
    assert grown(before) == {"hit": 2, "miss": 2, "stale": 0}

    def acting_for(tenant: str) -> StateClient:
        return StateClient(state.address, bearer_token="agent-secret", acting_for=lambda: tenant)

    async with acting_for("alice") as as_alice, acting_for("bob") as as_bob:
        assert len(await as_alice.all_items("s1")) == 4
        assert len(await as_bob.all_items("s1")) == 4


async def test_a_retried_request_id_is_replayed_as_without_the_cache(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    address = await plain_agent(agent_server_factory, tmp_path)
    async with AgentClient(address, timeout=10) as agents:
        first = await agents.chat("s1", "Hello", request_id="same")
        second = await agents.chat("s1", "How are you?", request_id="other")
        before, reads = cache_outcomes(), get_contexts()
        again = await agents.chat("s1", "How are you?", request_id="other")
        oldest = await agents.chat("s1", "Hello", request_id="same")
    # Each retry is answered from a fresh read (a miss), never run on the cache.
    assert grown(before) == {"hit": 0, "miss": 2, "stale": 0}
    assert get_contexts() - reads == 2
    assert again.replayed and oldest.replayed
    assert [i.data for i in again.items] == [i.data for i in second.items]
    assert [i.data for i in oldest.items] == [i.data for i in first.items]
    assert again.etag == second.etag
    assert len(await client.all_items("s1")) == 4


async def test_the_setting_turns_the_cache_off(
    agent_server_factory: AgentServerFactory, tmp_path: Path
) -> None:
    address = await plain_agent(agent_server_factory, tmp_path, context_cache=False)
    before, reads = cache_outcomes(), get_contexts()
    async with AgentClient(address, timeout=10) as agents:
        for n in range(3):
            await agents.chat("s1", f"message {n}")
    assert get_contexts() - reads == 3
    assert grown(before) == {"hit": 0, "miss": 0, "stale": 0}


async def test_agents_with_tools_and_streamed_turns_read_the_context(
    agents: AgentClient, state_server: StateServer
) -> None:
    # The default test agent has tools: a stale context would run them twice.
    before, reads = cache_outcomes(), get_contexts()
    await agents.chat("s1", "Hello")
    await agents.chat("s1", "Hello again")
    _ = [event async for event in agents.stream_chat("s1", "And once more")]
    assert get_contexts() - reads == 3
    assert grown(before) == {"hit": 0, "miss": 0, "stale": 0}


def _context(items: int, item_text: str = "x" * 100) -> Context:
    return Context(
        items=[
            StoredItem(
                seq=n + 1,
                data={"role": "user", "content": item_text},
                metadata={},
                create_time=None,
            )
            for n in range(items)
        ],
        etag="1",
        token_count=40 * items,
        token_budget=4000,
        total_item_count=items,
        omitted_item_count=0,
        strategy="tiered",
    )


def _appended(
    turn: list[tuple[dict[str, Any], dict[str, str]]], log_token_count: int = 0
) -> AppendResult:
    """What AppendItems answers for `turn` appended after a 4-item log."""
    return AppendResult("2", 5, 4 + len(turn), log_token_count=log_token_count)


def test_the_services_count_of_the_log_replaces_the_bound_when_consistent() -> None:
    turn: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"role": "user", "content": "a question of about sixty bytes " * 3}, {})
    ]
    near_full = replace(_context(4), token_count=3900)
    bound = 3900 + len(json.dumps(turn[0][0], separators=(",", ":")).encode()) + 8
    assert bound > 4000  # the bound alone says the next turn may not fit
    cache = ContextCache(max_bytes=1 << 20, max_items=1000)
    cache.after_append("t", "s", 0, near_full, None, turn, _appended(turn))
    assert cache.get("t", "s", 0) is None
    cache.after_append("t", "s", 0, near_full, None, turn, _appended(turn, 3930))
    entry = cache.get("t", "s", 0)
    assert entry is not None and entry.context.token_count == 3930
    # A count that cannot be this log's (not above what the turn started
    # from, or above the bound) is not trusted: the bound decides.
    small = _context(4)
    for impossible in (small.token_count, small.token_count + 10_000):
        cache.after_append("t", "s", 0, small, None, turn, _appended(turn, impossible))
        entry = cache.get("t", "s", 0)
        assert entry is not None
        assert entry.context.token_count == small.token_count + bound - 3900


def test_the_cache_is_bounded_by_bytes_least_recently_used_first() -> None:
    cache = ContextCache(max_bytes=2000, max_items=1000)
    turn: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"role": "user", "content": "hi"}, {}),
        ({"role": "assistant", "content": "ok"}, {}),
    ]
    for session in ("a", "b", "c"):
        cache.after_append("t", session, 0, _context(4), None, turn, _appended(turn))
    assert cache.size_bytes <= 2000
    assert cache.get("t", "a", 0) is None  # the oldest went first
    assert cache.get("t", "c", 0) is not None
    assert cache.get("other-tenant", "c", 0) is None
    entry = cache.get("t", "c", 0)
    assert entry is not None
    assert [i.seq for i in entry.context.items] == [1, 2, 3, 4, 5, 6]
    assert entry.context.etag == "2"
    assert cache.get("t", "c", 100) is None  # another budget: not this entry


def test_a_context_that_is_not_the_whole_log_is_not_kept() -> None:
    cache = ContextCache(max_bytes=1 << 20, max_items=1000)
    turn: list[tuple[dict[str, Any], dict[str, str]]] = [({"role": "user", "content": "hi"}, {})]
    partial = _context(4)
    for context in (
        replace(partial, omitted_item_count=1, total_item_count=5),
        replace(partial, strategy="sliding_window"),
        replace(partial, token_count=3990),  # the next turn could not fit
    ):
        cache.after_append("t", "s", 0, context, None, turn, _appended(turn))
        assert cache.get("t", "s", 0) is None
    cache.after_append("t", "s", 0, partial, None, turn, _appended(turn))
    assert cache.get("t", "s", 0) is not None
    small = ContextCache(max_bytes=1 << 20, max_items=4)
    small.after_append("t", "s", 0, partial, None, turn, _appended(turn))
    assert small.get("t", "s", 0) is None


async def test_concurrent_turns_on_one_replica_still_conflict(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    # The second of two overlapping turns reads the context instead of using
    # the cache, so it is refused as without the cache (not silently redone).
    slow = FakeOpenAI(default=Step(text="slow answer", delay=0.5))
    config = write_agents_file(tmp_path, PLAIN_AGENT)
    with slow.serve() as url:
        server = await agent_server_factory(
            agents_config=config,
            model_base_url=url,
            model_api_key="test-key",
            model_name="fake-model",
        )
        async with AgentClient(server.address, timeout=10) as agents:
            await agents.chat("s1", "warm the cache")
            outcomes = await asyncio.gather(
                agents.chat("s1", "first"), agents.chat("s1", "second"), return_exceptions=True
            )
    failures = [o for o in outcomes if isinstance(o, AgentServiceError)]
    assert len(failures) == 1
    assert failures[0].code == grpc.StatusCode.ABORTED
    assert failures[0].reason == "CONCURRENT_TURN"
    stored = await client.all_items("s1")
    assert len(stored) == 4
    assert len({s.metadata[REQUEST_ID_KEY] for s in stored}) == 2
