"""Context compression end to end: real state servers on a real Redis, the
background summarizer, retrieval, and an OpenAI-compatible fake on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from state_service import metrics
from state_service.client import NewItem, StateClient, TierShares
from state_service.compression.summarizer import ExtractiveSummarizer, SummaryInput
from state_service.compression.text import item_role, item_text
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from state_service.tokens import EstimatingTokenCounter
from tests.conftest import StateServerFactory
from tests.fake_openai_compression import FakeOpenAI


@pytest.fixture
def state_server_factory(
    state_server_factory: StateServerFactory,
) -> StateServerFactory:
    """These tests watch the summarizer work on small logs: appends schedule
    it from the first item (the default waits for a log no budget holds whole,
    see test_short_sessions_get_no_background_run)."""

    async def start(**overrides: Any) -> StateServer:
        return await state_server_factory(**{"summary_min_log_tokens": 0, **overrides})

    return start


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


CHAT = [
    "How is your day going?",
    "Tell me a joke about cats.",
    "What is a good name for a goldfish?",
    "Can you recommend a podcast?",
    "I am bored, say something fun.",
]


def turn_items(n: int) -> list[Any]:
    """Turn n: chit-chat, sometimes a tool call; a few turns plant facts."""
    items: list[Any] = [user(f"{CHAT[n % len(CHAT)]} (turn {n})")]
    if n % 7 == 3:
        items += [
            {"type": "function_call", "call_id": f"c{n}", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{n}", "output": f"cloudy {n}"},
        ]
    items.append(NewItem(assistant(f"Here is a thought for turn {n}."), {"turn": str(n)}))
    return items


async def settle(*servers: StateServer) -> None:
    """Lets every replica's background summarizer finish what is queued."""
    for _ in range(3):
        for server in servers:
            compressor = server.compression.compressor
            assert compressor is not None
            await asyncio.wait_for(compressor.idle(), 60)


async def test_every_strategy_over_the_api(
    state_server_factory: StateServerFactory,
) -> None:
    server = await state_server_factory()
    async with StateClient(server.address) as client:
        for n in range(120):
            items = turn_items(n)
            if n == 5:
                items[0] = user("My passport number is K7731 and it expires on 3 March.")
            await client.append_items("s", items)
        await settle(server)
        log = {i.seq: i for i in await client.all_items("s")}
        for strategy in ("sliding_window", "token_window", "summary", "retrieval", "tiered"):
            for budget in (300, 1000, 2000):
                context = await client.get_context(
                    "s", token_budget=budget, strategy=strategy, query="passport expires"
                )
                assert context.strategy == strategy
                assert 0 < context.token_count <= budget
                parts = [r.item for r in context.retrieved] + context.items
                seqs = [i.seq for i in parts]
                assert seqs == sorted(set(seqs))
                for stored in parts:  # verbatim, with seq and metadata
                    assert stored == log[stored.seq]
                assert context.items[0].data.get("role") == "user"
                calls = {
                    i.data.get("call_id") for i in parts if i.data.get("type") == "function_call"
                }
                outputs = {
                    i.data["call_id"] for i in parts if i.data.get("type") == "function_call_output"
                }
                assert calls == outputs
                if strategy in ("retrieval", "tiered") and budget >= 1000:
                    assert 6 in {r.item.seq for r in context.retrieved} or any(
                        "K7731" in str(r.item.data) for r in context.retrieved
                    )
                if strategy in ("summary", "tiered") and budget >= 1000:
                    assert context.summary is not None
                    assert context.summary.first_seq == 1
                    assert "K7731" in context.summary.text
        sliding = await client.get_context("s", strategy="sliding_window", max_items=5)
        assert len(sliding.items) <= 5


async def test_session_strategy_and_shares_via_update_session(client: StateClient) -> None:
    await client.append_items("s", [user("hello")])
    info = await client.update_session(
        "s", context_strategy="sliding_window", tier_shares=TierShares(0.5, 0.25, 0.25)
    )
    assert info.context_strategy == "sliding_window"
    assert info.tier_shares == TierShares(0.5, 0.25, 0.25)
    assert (await client.get_context("s")).strategy == "sliding_window"
    assert (await client.get_context("s", strategy="retrieval")).strategy == "retrieval"
    # A retention change leaves the compression settings alone, and back.
    info = await client.update_session("s", persist=True)
    assert info.persist and info.context_strategy == "sliding_window"
    info = await client.update_session("s", context_strategy="default")
    assert info.persist and info.context_strategy is None
    assert (await client.get_context("s")).strategy == "tiered"


async def test_summary_is_incremental_under_concurrent_appends_on_two_replicas(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis
) -> None:
    options = {"summary_max_tokens": 1_000_000, "summary_min_batch_items": 4}
    a = await state_server_factory(**options)
    b = await state_server_factory(**options)
    writers, turns = 6, 25
    async with StateClient([a.address, b.address]) as client:

        async def writer(w: int) -> None:
            for t in range(turns):
                await client.append_items(
                    "shared",
                    [user(f"Writer {w} booked table {t} for {t + 1} May."), assistant("Noted.")],
                )

        await asyncio.gather(*(writer(w) for w in range(writers)))
        await settle(a, b)
        # Both replicas look once more, concurrently: at most one commits.
        results = await asyncio.gather(
            *(s.compression.compressor.run_once("default", "shared", force=True) for s in (a, b))  # type: ignore[union-attr]
        )
        assert results.count("committed") <= 1
        await settle(a, b)
        items = await client.all_items("shared")
        context = await client.get_context("shared", token_budget=1_000_000, strategy="summary")
    # The log is whole: compression never touched it.
    assert [i.seq for i in items] == list(range(1, writers * turns * 2 + 1))
    r = aioredis.from_url(redis_server.url)
    try:
        stored: dict[Any, Any] = await r.hgetall("statecar:{default:shared}:s")
    finally:
        await r.aclose()
    upto = int(stored[b"upto"])
    assert int(stored[b"from"]) == 1
    keep = a.settings.summary_keep_recent_items
    assert len(items) - keep - a.settings.summary_min_batch_items < upto <= len(items) - keep
    # Folded batch by batch across two replicas, it equals one fold of 1..upto.
    summarizer = ExtractiveSummarizer(EstimatingTokenCounter(), max_tokens=1_000_000)
    expected = summarizer.fold_sync(
        "",
        [SummaryInput(i.seq, item_role(i.data), item_text(i.data)) for i in items if i.seq <= upto],
    )
    assert bytes(stored[b"text"]).decode() == expected
    assert expected.count("booked table") == sum(1 for i in items if i.seq <= upto) // 2
    # The whole log fits this budget, so it is sent verbatim.
    assert len(context.items) == len(items)


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


async def test_llm_summarizer_through_an_openai_compatible_endpoint(
    state_server_factory: StateServerFactory, fake_openai: FakeOpenAI
) -> None:
    server = await state_server_factory(
        summarizer="llm", summarizer_base_url=fake_openai.base_url, summarizer_model="m"
    )
    async with StateClient(server.address) as client:
        for n in range(40):
            await client.append_items("s", turn_items(n))
        await settle(server)
        context = await client.get_context("s", token_budget=600, strategy="summary")
    assert context.summary is not None
    assert context.summary.text.startswith("LLM SUMMARY through #")
    assert context.summary.last_seq == int(context.summary.text.rsplit("#", 1)[1])
    chats = [body for path, body in fake_openai.requests if path.endswith("/chat/completions")]
    assert chats and chats[0]["model"] == "m"
    # Incremental: each call folds onto the previous summary.
    if len(chats) > 1:
        assert "LLM SUMMARY" in chats[1]["messages"][-1]["content"]


async def test_summarizer_failure_never_fails_appends_or_reads(
    state_server_factory: StateServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail = True
    server = await state_server_factory(summarizer="llm", summarizer_base_url=fake_openai.base_url)
    failed_before = metrics.COMPRESSION_RUNS.labels("failed")._value.get()
    async with StateClient(server.address) as client:
        for n in range(60):
            await client.append_items("s", turn_items(n))
        await settle(server)
        for strategy in ("summary", "tiered"):
            context = await client.get_context("s", token_budget=500, strategy=strategy)
            assert context.summary is None  # falls back to a window
            assert context.items and 0 < context.token_count <= 500
            assert context.summary_lag > 0
        assert len(await client.all_items("s")) == len(
            [i for n in range(60) for i in turn_items(n)]
        )
    assert fake_openai.requests
    assert metrics.COMPRESSION_RUNS.labels("failed")._value.get() > failed_before


async def test_hybrid_retrieval_uses_embeddings(
    state_server_factory: StateServerFactory, fake_openai: FakeOpenAI
) -> None:
    server = await state_server_factory(embeddings_base_url=fake_openai.base_url, summarizer="none")
    async with StateClient(server.address) as client:
        for n in range(80):
            items = turn_items(n)
            if n == 4:
                items[0] = user("Remember that my car is a green Skoda.")
            await client.append_items("s", items)
        await client.get_context("s", strategy="retrieval")  # schedules embedding
        await settle(server)
        context = await client.get_context(
            "s", token_budget=400, strategy="retrieval", query="what automobile do I drive"
        )
    assert any("Skoda" in str(r.item.data) for r in context.retrieved)
    assert any(path.endswith("/embeddings") for path, _ in fake_openai.requests)


async def test_embeddings_failure_keeps_retrieval_lexical(
    state_server_factory: StateServerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail = True
    server = await state_server_factory(embeddings_base_url=fake_openai.base_url)
    async with StateClient(server.address) as client:
        for n in range(60):
            items = turn_items(n)
            if n == 4:
                items[0] = user("My locker code is 4471.")
            await client.append_items("s", items)
        await settle(server)
        context = await client.get_context(
            "s", token_budget=400, strategy="retrieval", query="locker code"
        )
    assert any("4471" in str(r.item.data) for r in context.retrieved)


@pytest.mark.slow
async def test_retrieval_finds_a_fact_from_turn_5_at_turn_500(client: StateClient) -> None:
    for n in range(500):
        items = turn_items(n)
        if n == 5:
            items[0] = user("My dentist appointment is with Dr. Okafor on 12 August.")
        await client.append_items("long", items)
    await client.append_items("long", [user("Who is my dentist and when do I see them?")])
    for strategy in ("retrieval", "tiered"):
        context = await client.get_context("long", token_budget=2000, strategy=strategy)
        assert context.query == "Who is my dentist and when do I see them?"
        assert any("Okafor" in str(r.item.data) for r in context.retrieved), strategy
        assert context.token_count <= 2000


async def test_pop_drops_a_summary_that_covers_the_popped_item(
    state_server_factory: StateServerFactory,
) -> None:
    server = await state_server_factory(summary_keep_recent_items=0, summary_min_batch_items=1)
    async with StateClient(server.address) as client:
        for n in range(10):
            await client.append_items("s", [user(f"Order {n} ships on {n + 1} May.")])
        await settle(server)
        before = await client.get_context("s", token_budget=30, strategy="summary")
        assert before.summary is not None and before.summary.last_seq == 10
        await client.pop_item("s")
        after = await client.get_context("s", token_budget=30, strategy="summary")
        assert after.summary is None or after.summary.last_seq <= 9
