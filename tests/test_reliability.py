"""Faults under a bounded write load; nothing acknowledged may be lost.

Each test prints the figures docs/RELIABILITY.md reports (run with -s)."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis.asyncio as aioredis

from state_service.client import StateClient, StateServiceError
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.conftest import StateServerFactory
from tests.helpers import redis_digest
from tests.processes import state_service_process, wait_serving

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@dataclass
class Load:
    """Writers appending unique items; records what was acknowledged and when
    errors reached the caller."""

    client: StateClient
    session_id: str
    acknowledged: set[str] = field(default_factory=set)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, w: int, limit: int) -> None:
        for n in range(limit):
            if self.stop.is_set():
                return
            content = f"{w}:{n}"
            try:
                await self.client.append_items(
                    self.session_id, [{"role": "user", "content": content}], timeout=5.0
                )
                self.acknowledged.add(content)
            except StateServiceError as error:
                self.errors.append((time.monotonic(), error.code.name))
                await asyncio.sleep(0.01)

    async def run(self, writers: int, limit: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.writer(w, limit)) for w in range(writers)]


async def stored_contents(redis_url: str, session_id: str) -> list[str]:
    from state_service import log

    r = aioredis.from_url(redis_url)
    try:
        raw = await r.lrange(f"statecar:{{default:{session_id}}}:l", 0, -1)
    finally:
        await r.aclose()
    import json

    return [json.loads(log.decode(cast(bytes, entry)).json)["content"] for entry in raw]


async def test_kill9_of_one_replica_loses_no_acknowledged_append(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", port=free_port()) as redis_server:
        with (
            state_service_process(redis_server.url) as (address_a, process_a),
            state_service_process(redis_server.url) as (address_b, _),
        ):
            await wait_serving(address_a)
            await wait_serving(address_b)
            async with StateClient([address_a, address_b]) as client:
                load = Load(client, "kill9")
                tasks = await load.run(writers=16, limit=5000)
                await asyncio.sleep(0.5)
                before_kill = len(load.acknowledged)
                killed_at = time.monotonic()
                process_a.send_signal(signal.SIGKILL)
                await asyncio.sleep(1.5)
                load.stop.set()
                await asyncio.gather(*tasks)
                after_kill = len(load.acknowledged) - before_kill
            stored = await stored_contents(redis_server.url, "kill9")
    assert load.acknowledged <= set(stored), "an acknowledged append is missing"
    assert len(stored) == len(set(stored)), "a retried append was stored twice"
    window = max(t for t, _ in load.errors) - killed_at if load.errors else 0.0
    print(
        f"\nkill -9 of 1 of 2 replicas: {len(load.acknowledged)} acknowledged, "
        f"{len(stored)} stored, {len(load.errors)} errors seen by callers "
        f"({sorted({c for _, c in load.errors})}), error window {window * 1000:.0f} ms; "
        f"{after_kill} acknowledged after the kill"
    )
    assert after_kill > 0, "the surviving replica took over"


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_redis_kill9_and_restart_during_load(tmp_path: Path, appendfsync: str) -> None:
    port = free_port()
    redis_server = EmbeddedRedis(tmp_path / "redis", port=port, appendfsync=appendfsync)
    redis_server.start()
    try:
        with state_service_process(redis_server.url) as (address, _):
            await wait_serving(address)
            async with StateClient(address) as client:
                load = Load(client, "restart")
                tasks = await load.run(writers=8, limit=5000)
                await asyncio.sleep(0.5)
                redis_server.stop(kill=True)
                down_at = time.monotonic()
                acknowledged_before = len(load.acknowledged)
                await asyncio.sleep(0.3)
                redis_server.start()
                await asyncio.sleep(1.5)
                load.stop.set()
                await asyncio.gather(*tasks)
                assert len(load.acknowledged) > acknowledged_before, "load resumed"
                recovered = [t for t, _ in load.errors]
            stored = await stored_contents(redis_server.url, "restart")
    finally:
        redis_server.close()
    lost = load.acknowledged - set(stored)
    last_error_ms = ((max(recovered) - down_at) if recovered else 0) * 1000
    print(
        f"\nredis kill -9 + restart (appendfsync {appendfsync}): "
        f"{len(load.acknowledged)} acknowledged, {len(lost)} lost, {len(stored)} stored, "
        f"{len(load.errors)} errors, last error {last_error_ms:.0f} ms after the kill"
    )
    # A SIGKILL of the Redis process loses nothing either way: Redis write()s
    # the AOF before it replies. appendfsync only matters for an OS crash or
    # power loss (everysec: up to ~1 s of acknowledged writes; always: none).
    assert not lost
    assert len(stored) == len(set(stored))


async def test_maxmemory_is_resource_exhausted_and_writes_nothing(
    tmp_path: Path, state_server_factory: StateServerFactory
) -> None:
    with EmbeddedRedis(tmp_path / "small", port=free_port(), maxmemory="3mb") as small:
        server = await state_server_factory(redis_url=small.url)
        r = aioredis.from_url(small.url)
        async with StateClient(server.address) as client:
            big = {"role": "user", "content": "x" * 60_000}
            refused = None
            for n in range(200):
                try:
                    await client.append_items(f"s{n % 3}", [big])
                except StateServiceError as error:
                    refused = error
                    break
            assert refused is not None, "maxmemory was never reached"
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.reason == "BACKEND_FULL"
            assert "out of memory" in refused.message
            # Every refused write leaves Redis exactly as it was (memory hovers
            # around the limit, so some of these may still fit and succeed).
            refusals = 0
            for attempt in range(6):
                before = await redis_digest(r)
                try:
                    await client.append_items("s0" if attempt % 2 else "brand-new", [big, big])
                except StateServiceError as error:
                    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert await redis_digest(r) == before
                    refusals += 1
            assert refusals > 0
            # Reads keep working, and deleting frees room for writes again.
            assert (await client.get_context("s0")).total_item_count > 0
            await client.delete_session("s1")
            await client.delete_session("s2")
            await client.append_items("s0", [{"role": "user", "content": "small"}])
        await r.aclose()
