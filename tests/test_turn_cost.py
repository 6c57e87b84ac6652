"""What an append costs beyond its own write: the background summarizer
leaves sessions that fit a budget alone, and its per-append work does not grow
with the log. (Timings are bench/turn_cost.py's; these check the behaviour.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared_runtime.process import reachable_address
from state_service.client import StateClient, StateServiceSession
from state_service.client.types import StoredItem
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from statecar.state.v1 import state_service_pb2 as pb
from tests.conftest import StateServerFactory


async def _settle(server: StateServer) -> None:
    compressor = server.compression.compressor
    assert compressor is not None
    await asyncio.wait_for(compressor.idle(), 60)


def _message(n: int) -> Any:
    return {"role": "user" if n % 2 else "assistant", "content": f"message {n} " + "word " * 40}


async def test_short_sessions_get_no_background_run_and_no_summary(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis
) -> None:
    server = await state_server_factory(summary_min_log_tokens=2000)
    compressor = server.compression.compressor
    assert compressor is not None
    looked: list[str] = []
    run_once = compressor.run_once

    async def counting_run_once(tenant: str, session_id: str, *, force: bool = False) -> Any:
        looked.append(session_id)
        return await run_once(tenant, session_id, force=force)

    compressor.run_once = counting_run_once  # type: ignore[method-assign]
    r = aioredis.from_url(redis_server.url)
    try:
        async with StateClient(server.address) as client:
            for n in range(20):  # about 1,000 tokens: fits the default budget whole
                await client.append_items("short", [_message(n)])
            await _settle(server)
            assert looked == []
            assert not await r.exists("statecar:{default:short}:s")
            # Past the threshold the summarizer catches up in the background.
            for n in range(20, 80):
                await client.append_items("short", [_message(n)])
            await _settle(server)
            assert looked
            assert await r.exists("statecar:{default:short}:s")
            # Appends that cannot make a batch yet are not even looked at.
            before = len(looked)
            await client.append_items("short", [_message(80)])
            await _settle(server)
            assert len(looked) == before
            context = await client.get_context("short", token_budget=800, strategy="summary")
            assert context.summary is not None
    finally:
        await r.aclose()


async def test_a_read_that_lacks_a_summary_still_schedules_one(
    state_server_factory: StateServerFactory,
) -> None:
    # A budget smaller than the threshold: the read finds the summary lacking
    # (by far more items than a batch: the window holds about 8 of the 40).
    server = await state_server_factory(summary_min_log_tokens=1_000_000, summary_min_batch_items=8)
    async with StateClient(server.address) as client:
        for n in range(40):
            await client.append_items("s", [_message(n)])
        await _settle(server)
        first = await client.get_context("s", token_budget=400, strategy="summary")
        assert first.summary is None and first.summary_lag > 0
        for _ in range(3):
            await _settle(server)
        again = await client.get_context("s", token_budget=400, strategy="summary")
        assert again.summary is not None


async def test_session_serves_its_copy_of_the_log_only_while_unchanged(
    state_server: StateServer,
) -> None:
    async with StateClient(state_server.address) as client:
        mine = StateServiceSession("shared", client=client)
        other = StateServiceSession("shared", client=client)
        await mine.add_items([_message(0), _message(1)])
        assert await mine.get_items() == [_message(0), _message(1)]  # now cached
        await mine.add_items([_message(2)])  # extends the copy
        assert await mine.get_items() == [_message(n) for n in range(3)]
        assert await mine.get_items(limit=2) == [_message(1), _message(2)]
        # Another writer: the etag moved, so the copy is not served.
        await other.add_items([_message(3)])
        assert await mine.get_items() == [_message(n) for n in range(4)]
        # Interleaved writes: this session's append no longer follows its copy.
        await other.add_items([_message(4)])
        await mine.add_items([_message(5)])
        assert await mine.get_items() == [_message(n) for n in range(6)]
        assert await other.pop_item() == _message(5)
        assert await mine.get_items() == [_message(n) for n in range(5)]
        # Returned items are fresh objects: changing them changes no later read.
        first: Any = await mine.get_items()
        first[0]["content"] = "changed"
        assert (await mine.get_items())[0] == _message(0)
        await other.clear_session()
        assert await mine.get_items() == []


def test_a_unix_socket_listen_address_is_reported_as_given() -> None:
    # The sidecar deployment (agent and state service in one pod) can use a
    # Unix domain socket; grpcio reports port 1 for it.
    assert reachable_address("unix:/run/statecar/state.sock", 1) == "unix:/run/statecar/state.sock"
    assert reachable_address("0.0.0.0:50051", 50051) == "127.0.0.1:50051"


def test_items_decoded_in_one_pass_equal_those_decoded_one_by_one() -> None:
    items = [pb.Item(seq=n, json=json.dumps(_message(n)), metadata={"k": str(n)}) for n in range(5)]
    items[2].create_time.GetCurrentTime()
    assert StoredItem.all_from_proto(items) == [StoredItem.from_proto(i) for i in items]
    assert StoredItem.all_from_proto([]) == []
    # JSON the service would have refused is not split across items: each
    # item is decoded on its own, and fails as it did.
    odd = [pb.Item(seq=1, json='{"a": 1}'), pb.Item(seq=2, json='{"b": 2}, {"c": 3}')]
    with pytest.raises(json.JSONDecodeError):
        StoredItem.all_from_proto(odd)
