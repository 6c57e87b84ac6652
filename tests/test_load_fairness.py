"""Load test of issue 13: one tenant hammers the worst requests it can make
while another tenant's small calls (1 s deadline) keep succeeding, against two
state-service processes on one real Redis. Bounded in time (HAMMER_SECONDS)
and count. Prints the figures docs/RELIABILITY.md quotes:

    .venv/bin/pytest -s tests/test_load_fairness.py
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from state_service.client import StateClient, StateServiceError
from state_service.storage.embedded import EmbeddedRedis
from tests.helpers import SERVING, health_status
from tests.processes import state_service_process, wait_serving

pytestmark = pytest.mark.slow

HAMMER_SECONDS = 8.0
HAMMERS_PER_REPLICA = 6
ITEMS = 80
ITEM_BYTES = 100_000
# The replicas run with a 64 MiB cache; their RSS must stay below this (half
# the state service's Kubernetes memory limit, k8s/base/state-service.yaml).
RSS_BOUND_BYTES = 512 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_one_tenant_hammering_cannot_starve_another(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("heavy:token-heavy\nlight:token-light\n")
    env = {
        "STATE_SERVICE_AUTH": "token",
        "STATE_SERVICE_AUTH_TOKENS_FILE": str(tokens),
        "STATE_SERVICE_CACHE_MAX_BYTES": str(64 * 1024 * 1024),
    }
    with (
        state_service_process(redis_server.url, env) as (first, first_process),
        state_service_process(redis_server.url, env) as (second, second_process),
    ):
        replicas = [first, second]
        for address in replicas:
            await wait_serving(address)
        async with StateClient(first, bearer_token="token-heavy", timeout=30.0) as client:
            for i in range(0, ITEMS, 10):
                await client.append_items(
                    "worst",
                    [
                        {"role": "user", "content": f"{j} " + "lorem ipsum " * (ITEM_BYTES // 12)}
                        for j in range(i, i + 10)
                    ],
                )
        stop = asyncio.Event()
        heavy_outcomes: Counter[str] = Counter()
        light_latencies: list[float] = []
        light_failures: Counter[str] = Counter()
        not_serving: list[str] = []
        peak_rss = [0, 0]

        async def hammer(address: str, n: int) -> None:
            async with StateClient(address, bearer_token="token-heavy") as heavy:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        if i % 5 == 0:
                            await heavy.list_items("worst", page_size=1000, timeout=5.0)
                        else:
                            await heavy.get_context(
                                "worst",
                                token_budget=1_000_000,
                                max_items=1_000_000,
                                strategy="retrieval" if i % 2 else "tiered",
                                query=f"lorem {n} {i} " * 300,
                                timeout=2.0,
                            )
                        heavy_outcomes["OK"] += 1
                    except StateServiceError as error:
                        heavy_outcomes[f"{error.code.name} {error.reason}"] += 1
                        if error.code.name == "RESOURCE_EXHAUSTED":
                            await asyncio.sleep(float(error.metadata["retry_after_seconds"]))

        async def light() -> None:
            clients = [StateClient(a, bearer_token="token-light", timeout=1.0) for a in replicas]
            try:
                await clients[0].append_items("mine", [{"role": "user", "content": "hi"}])
                i = 0
                while not stop.is_set():
                    i += 1
                    client = clients[i % 2]
                    started = time.perf_counter()
                    try:
                        if i % 3 == 0:
                            await client.append_items(
                                "mine", [{"role": "user", "content": f"turn {i}"}], timeout=1.0
                            )
                        elif i % 3 == 1:
                            await client.get_context("mine", token_budget=500, timeout=1.0)
                        else:
                            await client.get_session("mine", timeout=1.0)
                        light_latencies.append(time.perf_counter() - started)
                    except StateServiceError as error:
                        light_failures[f"{error.code.name} {error.reason}"] += 1
                    await asyncio.sleep(0.02)
            finally:
                for client in clients:
                    await client.close()

        async def watch() -> None:
            while not stop.is_set():
                for k, (address, process) in enumerate(
                    ((first, first_process), (second, second_process))
                ):
                    peak_rss[k] = max(peak_rss[k], rss_bytes(process.pid))
                    try:
                        if await health_status(address) != SERVING:
                            not_serving.append(address)
                    except Exception as error:  # a health call that fails counts too
                        not_serving.append(f"{address}: {error.__class__.__name__}")
                await asyncio.sleep(0.2)

        tasks = [
            asyncio.create_task(hammer(address, n))
            for address in replicas
            for n in range(HAMMERS_PER_REPLICA)
        ]
        tasks += [asyncio.create_task(light()), asyncio.create_task(watch())]
        await asyncio.sleep(HAMMER_SECONDS)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    calls = len(light_latencies) + sum(light_failures.values())
    success = len(light_latencies) / calls
    p99 = sorted(light_latencies)[int(0.99 * (len(light_latencies) - 1))]
    print(
        f"\nheavy tenant ({2 * HAMMERS_PER_REPLICA} loops, {HAMMER_SECONDS:g} s): "
        f"{dict(heavy_outcomes)}"
        f"\nlight tenant: {len(light_latencies)}/{calls} ok ({success:.2%}), "
        f"p50 {sorted(light_latencies)[len(light_latencies) // 2] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, failures {dict(light_failures)}"
        f"\npeak RSS: {[f'{r / 2**20:.0f} MiB' for r in peak_rss]}; "
        f"health checks not SERVING: {len(not_serving)}"
    )
    assert calls >= 50
    assert success >= 0.99, dict(light_failures)
    assert p99 < 1.0
    assert not not_serving, not_serving[:5]
    assert max(peak_rss) < RSS_BOUND_BYTES
    assert heavy_outcomes["OK"] > 0
