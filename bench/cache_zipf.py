"""4. The cache under Zipf-distributed session popularity across two replicas,
cache on vs off: hit ratio (from the replicas' own /metrics) and latency."""

from __future__ import annotations

import random
import urllib.request
from typing import Any

from bench.common import Stats, redis_process, state_service, table
from bench.report import Report
from state_service.client import StateClient
from state_service.storage.embedded import free_port

SESSIONS = 500
ZIPF_S = 1.1


def _lookups(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    counts: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("statecar_state_cache_lookups_total{"):
            result = line.split('result="')[1].split('"')[0]
            counts[result] = counts.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def _workload(addresses: list[str], operations: int, seed: int) -> tuple[Stats, Stats]:
    rng = random.Random(seed)
    weights = [1 / (rank**ZIPF_S) for rank in range(1, SESSIONS + 1)]
    reads, writes = [], []
    import time

    async with StateClient(addresses) as client:
        for sid in range(SESSIONS):
            await client.append_items(
                f"z{sid}",
                [{"role": "user", "content": f"hello {sid} " * 20}] * 20,
            )
        for sid in rng.choices(range(SESSIONS), weights, k=operations):
            started = time.perf_counter()
            if rng.random() < 0.1:
                await client.append_items(f"z{sid}", [{"role": "user", "content": "more"}])
                writes.append(time.perf_counter() - started)
            else:
                await client.get_context(f"z{sid}", token_budget=4000)
                reads.append(time.perf_counter() - started)
    return Stats.of(reads), Stats.of(writes)


async def run(report: Report, *, operations: int = 4000) -> None:
    rows: list[list[str]] = []
    results: dict[str, Any] = {}
    for enabled in (True, False):
        with redis_process() as redis_server:
            ports = [free_port(), free_port()]
            cache = str(enabled).lower()
            with (
                state_service(
                    redis_server.url,
                    STATE_SERVICE_METRICS_PORT=str(ports[0]),
                    STATE_SERVICE_CACHE_ENABLED=cache,
                ) as (a, _),
                state_service(
                    redis_server.url,
                    STATE_SERVICE_METRICS_PORT=str(ports[1]),
                    STATE_SERVICE_CACHE_ENABLED=cache,
                ) as (b, _),
            ):
                reads, writes = await _workload([a, b], operations, seed=7)
                lookups = [_lookups(p) for p in ports]
        hits = sum(c.get("hit", 0) for c in lookups)
        partial = sum(c.get("partial", 0) for c in lookups)
        total = sum(sum(c.values()) for c in lookups)
        label = "cache on" if enabled else "cache off"
        results[label] = reads
        rows.append(
            [
                label,
                f"{hits / total:.1%}" if total else "—",
                f"{partial / total:.1%}" if total else "—",
                *reads.row(),
                f"{writes.p50:.3f}",
            ]
        )
    text = (
        f"{SESSIONS} sessions of 20 items, Zipf(s={ZIPF_S}) popularity, {operations} operations "
        "(90 % GetContext, 10 % AppendItems) round-robin over 2 replicas:\n\n"
        + table(
            [
                "",
                "hit",
                "partial (new items only)",
                "read p50 ms",
                "read p90",
                "read p99",
                "append p50",
            ],
            rows,
        )
    )
    on, off = results["cache on"], results["cache off"]
    text += (
        f"\n\nWith the cache, reads are {off.p50 / on.p50:.2f}× faster at p50. Every read still "
        "asks Redis (one atomic Lua step) whether its cached tail is current; a hit transfers "
        "and decodes no items, a partial hit only the items appended since. Hit ratio here is "
        "per replica: an append through A makes B's next read of that session partial."
    )
    report.add("4. Cache under Zipf popularity, 2 replicas", text)
