"""Two state-service replicas on one real Redis (one node, and a Redis Cluster):
concurrent writers, idempotent retries across replicas and restarts, and cache
coherence."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from state_service.client import EtagMismatchError, StateClient
from tests.conftest import StateServerFactory


@pytest.fixture(params=["single", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one redis-server and on a Redis Cluster."""
    return str(request.param)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def test_concurrent_writers_over_two_replicas_lose_nothing(
    state_server_factory: StateServerFactory,
) -> None:
    a = await state_server_factory()
    b = await state_server_factory()
    writers, appends = 64, 50
    async with StateClient([a.address, b.address]) as client:

        async def writer(w: int) -> None:
            for i in range(appends):
                await client.append_items("shared", [user(f"{w}:{i}")])

        await asyncio.gather(*(writer(w) for w in range(writers)))
        items = await client.all_items("shared")
    assert len(items) == writers * appends
    assert [i.seq for i in items] == list(range(1, writers * appends + 1))
    contents = [i.data["content"] for i in items]
    assert len(set(contents)) == len(contents)
    # Each writer's own appends keep their order.
    for w in range(writers):
        mine = [c for c in contents if c.startswith(f"{w}:")]
        assert mine == [f"{w}:{i}" for i in range(appends)]


async def test_concurrent_conditional_writers_exactly_one_wins(
    state_server_factory: StateServerFactory,
) -> None:
    a = await state_server_factory()
    b = await state_server_factory()
    async with StateClient(a.address) as via_a, StateClient(b.address) as via_b:
        base = await via_a.append_items("s", [user("start")])
        clients = [via_a, via_b] * 8

        async def attempt(n: int, client: StateClient) -> bool:
            try:
                await client.append_items("s", [user(f"turn {n}")], etag=base.etag)
                return True
            except EtagMismatchError:
                return False

        outcomes = await asyncio.gather(*(attempt(n, c) for n, c in enumerate(clients)))
        assert sum(outcomes) == 1
        assert len(await via_b.all_items("s")) == 2


async def test_request_id_is_idempotent_across_replicas_and_restarts(
    state_server_factory: StateServerFactory,
) -> None:
    a = await state_server_factory()
    b = await state_server_factory()
    item = [user("pay invoice 42")]
    async with StateClient(a.address) as via_a, StateClient(b.address) as via_b:
        first = await via_a.append_items("s", item, request_id="req-1")
        replay = dataclasses.replace(first, replayed=True)
        assert await via_a.append_items("s", item, request_id="req-1") == replay
        assert await via_b.append_items("s", item, request_id="req-1") == replay
    await a.stop(grace=0.5)
    restarted = await state_server_factory()
    async with StateClient(restarted.address) as via_new:
        assert await via_new.append_items("s", item, request_id="req-1") == replay
        assert len(await via_new.all_items("s")) == 1
        second = await via_new.append_items("s", item, request_id="req-2")
        assert second.first_seq == 2


async def test_cache_is_coherent_across_replicas(
    state_server_factory: StateServerFactory,
) -> None:
    a = await state_server_factory()
    b = await state_server_factory()
    assert b.cache is not None
    pairs = 1000
    stale = 0
    async with StateClient(a.address) as via_a, StateClient(b.address) as via_b:
        for n in range(pairs):
            written = await via_a.append_items("s", [user(f"m{n}")])
            seen = await via_b.get_context("s", token_budget=1_000_000)
            if seen.etag != written.etag or seen.items[-1].seq != written.last_seq:
                stale += 1
            # Read again with no write in between: served from B's cache.
            again = await via_b.get_context("s", token_budget=1_000_000)
            if again.etag != written.etag:
                stale += 1
        # Pops and deletes through A are seen by B too.
        popped = await via_a.pop_item("s")
        assert popped.item is not None
        after_pop = await via_b.get_context("s", token_budget=1_000_000)
        assert after_pop.items[-1].seq == popped.item.seq - 1
        await via_a.delete_session("s")
        assert (await via_b.get_context("s")).items == []
    assert stale == 0
    # Every read after a write fetched only the new item; every re-read was a hit.
    assert b.cache.stats.hits >= pairs
    assert b.cache.stats.partial >= pairs - 1
    assert b.cache.stats.misses <= 3


async def test_cache_disabled_serves_the_same(
    state_server_factory: StateServerFactory,
) -> None:
    # No background summarizer: its commits would move summary_lag between
    # the two reads. The default (tiered) composition is still compared.
    cached = await state_server_factory(summarizer="none")
    uncached = await state_server_factory(cache_enabled=False, summarizer="none")
    assert uncached.cache is None
    async with StateClient(cached.address) as c1, StateClient(uncached.address) as c2:
        for n in range(30):
            await c1.append_items("s", [user(f"m{n}" * 40)])
            one = await c1.get_context("s", token_budget=700)
            two = await c2.get_context("s", token_budget=700)
            assert one == two
