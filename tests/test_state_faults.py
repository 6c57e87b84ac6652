"""Faults with real components: Redis stopped, frozen and restarted; SIGTERM
while RPCs are in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from state_service.client import StateClient, StateServiceError, StateUnavailableError
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.conftest import StateServerFactory
from tests.helpers import NOT_SERVING, SERVING, health_status
from tests.patience import patience

pytestmark = pytest.mark.fault
REFUSED_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def test_redis_down_means_unavailable_and_not_serving_then_recovers(
    redis_server: EmbeddedRedis, state_server_factory: StateServerFactory
) -> None:
    server = await state_server_factory()
    async with StateClient(server.address, timeout=3.0) as client:
        await client.append_items("s", [{"role": "user", "content": "before"}])
        await client.get_context("s")  # warm the cache
        redis_server.stop()

        started = time.monotonic()
        with pytest.raises(StateUnavailableError) as raised:
            await client.get_context("s", timeout=2.0)
        assert time.monotonic() - started < 2.5  # within the caller's deadline (+ slack)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(StateUnavailableError):
            await client.append_items("s", [{"role": "user", "content": "lost?"}], timeout=2.0)

        deadline = time.monotonic() + patience(5)
        while await health_status(server.address) != NOT_SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            await asyncio.sleep(0.05)
        assert await health_status(server.address, "liveness") == SERVING

        redis_server.start()
        back = time.monotonic()
        while await health_status(server.address) != SERVING:
            assert time.monotonic() - back < 2.0, "not serving 2 s after Redis returned"
            await asyncio.sleep(0.05)
        recovered_in = time.monotonic() - back
        context = await client.get_context("s")
        # AOF with appendfsync always: the acknowledged write survived the restart;
        # the write refused with UNAVAILABLE is not there.
        assert [i.data["content"] for i in context.items] == ["before"]
        await client.append_items("s", [{"role": "user", "content": "after"}])
        assert len(await client.all_items("s")) == 2
    assert recovered_in < 2.0


async def test_frozen_redis_respects_the_callers_deadline(
    redis_server: EmbeddedRedis, state_server_factory: StateServerFactory
) -> None:
    server = await state_server_factory(redis_timeout_seconds=5.0)
    async with StateClient(server.address) as client:
        await client.append_items("s", [{"role": "user", "content": "x"}])
        redis_server.pause()
        try:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(client.get_context("s", timeout=0.5) for _ in range(20)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        finally:
            redis_server.resume()
        assert all(isinstance(o, StateUnavailableError) for o in outcomes), outcomes
        assert elapsed < 3.0  # no pile-up: all 20 answered around their 0.5 s deadline
        assert len((await client.get_context("s")).items) == 1


@pytest.mark.slow
async def test_sigterm_drains_in_flight_rpcs(tmp_path: Path) -> None:
    """A real `state-service` process: SIGTERM while a load runs fails no RPC
    that the server had accepted; the process exits 0."""
    with EmbeddedRedis(tmp_path / "redis", port=free_port()) as redis_server:
        port = free_port()
        env = {
            **os.environ,
            "STATE_SERVICE_LISTEN": f"127.0.0.1:{port}",
            "STATE_SERVICE_REDIS_URL": redis_server.url,
            "STATE_SERVICE_METRICS_PORT": "0",
            "STATE_SERVICE_DRAIN_SECONDS": "5",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "state_service"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            address = f"127.0.0.1:{port}"
            async with StateClient(address, timeout=10.0) as client:
                for _ in range(100):
                    try:
                        if await health_status(address) == SERVING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)
                acknowledged: list[int] = []
                failures: list[BaseException] = []
                stop = asyncio.Event()

                async def load(w: int) -> None:
                    n = 0
                    while not stop.is_set() and n < 400:
                        try:
                            result = await client.append_items(
                                "drain", [{"role": "user", "content": f"{w}:{n}"}]
                            )
                            acknowledged.append(result.last_seq)
                        except StateServiceError as exc:
                            # Sent after the server stopped accepting: refused
                            # without running. Anything the server ran must
                            # have been answered, which the storage check proves.
                            assert exc.code in REFUSED_CODES, exc
                            failures.append(exc)
                            return
                        n += 1

                tasks = [asyncio.create_task(load(w)) for w in range(8)]
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                returncode = await asyncio.to_thread(process.wait, 15)
                stop.set()
                await asyncio.gather(*tasks)
            assert returncode == 0
            assert acknowledged
            r = aioredis.from_url(redis_server.url)
            stored = await r.llen("statecar:{default:drain}:l")
            await r.aclose()
            # Every append the server ran was acknowledged, and vice versa: no
            # in-flight RPC was cut off by the shutdown.
            assert sorted(acknowledged) == list(range(1, stored + 1))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
