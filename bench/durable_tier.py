"""The durable tier's cost: hot-path latency with and without it (one run,
interleaved), and rehydration cost vs session size.

    python -m bench.durable_tier            # needs PostgreSQL's server binaries

Two state-service processes on one redis-server (different key prefixes), one
of them with STATE_SERVICE_POSTGRES_URL pointing at a PostgreSQL started from
the machine's binaries (tests/postgres.py) in a temporary directory, its
archiver running as in production (every second). Each hot-path call is timed
against both services in alternating rounds. Rehydration: the session's keys
are deleted from Redis (as an eviction or expiry would), then one GetContext
loads it back from PostgreSQL; timed per size, against a GetContext of the
same session when hot.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import Stats, interleaved, ratio, redis_process, state_service, table
from state_service.client import StateClient
from state_service.storage.postgres import PostgresTier
from tests.postgres import PostgresServer

SIZES = (20, 200, 2000)
HOT_SESSION_ITEMS = 200


def message(n: int) -> dict[str, Any]:
    role = "user" if n % 2 == 0 else "assistant"
    return {"role": role, "content": f"message {n}: " + "some words of a conversation " * 6}


async def _fill(client: StateClient, session_id: str, count: int) -> None:
    history = [message(i) for i in range(count)]
    for start in range(0, count, 500):
        await client.append_items(session_id, history[start : start + 500])


async def _archived(raw: Any, prefix: str) -> None:
    while await raw.zcard(f"{prefix}:archive:dirty"):
        await asyncio.sleep(0.05)


async def run_benchmark(count: int = 3000, evictions: int = 30) -> str:
    pg = PostgresServer()
    pg.init()
    pg.start()
    try:
        tier = await PostgresTier.connect(pg.url)
        await tier.migrate()
        await tier.close()
        with (
            redis_process() as redis_server,
            state_service(redis_server.url, STATE_SERVICE_KEY_PREFIX="plain") as (plain_addr, _),
            state_service(
                redis_server.url,
                STATE_SERVICE_KEY_PREFIX="tiered",
                STATE_SERVICE_POSTGRES_URL=pg.url,
            ) as (tiered_addr, _),
        ):
            raw = aioredis.from_url(redis_server.url)
            async with StateClient(plain_addr) as plain, StateClient(tiered_addr) as tiered:
                for client in (plain, tiered):
                    await _fill(client, "hot", HOT_SESSION_ITEMS)
                turn = [message(1)]

                def append(client: StateClient) -> Any:
                    async def call() -> object:
                        return await client.append_items("hot", turn)

                    return call

                def context(client: StateClient) -> Any:
                    async def call() -> object:
                        return await client.get_context("hot", token_budget=4000)

                    return call

                hot = await interleaved(
                    {
                        "AppendItems, Redis only": append(plain),
                        "AppendItems, with the tier": append(tiered),
                        "GetContext, Redis only": context(plain),
                        "GetContext, with the tier": context(tiered),
                    },
                    count,
                )
                rows = []
                for call in ("AppendItems", "GetContext"):
                    base = hot[f"{call}, Redis only"]
                    with_tier = hot[f"{call}, with the tier"]
                    rows.append(
                        [
                            call,
                            f"{base.p50:.3f}",
                            f"{with_tier.p50:.3f}",
                            ratio(with_tier.p50, base.p50),
                            f"{base.p99:.3f}",
                            f"{with_tier.p99:.3f}",
                            ratio(with_tier.p99, base.p99),
                        ]
                    )
                hot_table = table(
                    [
                        "call",
                        "p50 ms Redis only",
                        "p50 ms with tier",
                        "p50 ratio",
                        "p99 ms Redis only",
                        "p99 ms with tier",
                        "p99 ratio",
                    ],
                    rows,
                )

                cold_rows = []
                for size in SIZES:
                    sid = f"cold{size}"
                    await _fill(tiered, sid, size)
                    await _archived(raw, "tiered")
                    keys = [f"tiered:{{default:{sid}}}:{part}" for part in "mlrs"]
                    loads, hits = [], []
                    for _ in range(evictions):
                        await raw.delete(*keys)
                        started = time.perf_counter()
                        await tiered.get_context(sid, token_budget=4000)
                        loads.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        await tiered.get_context(sid, token_budget=4000)
                        hits.append(time.perf_counter() - started)
                    load, hit = Stats.of(loads), Stats.of(hits)
                    cold_rows.append(
                        [
                            str(size),
                            f"{load.p50:.2f}",
                            f"{load.p99:.2f}",
                            f"{hit.p50:.3f}",
                            ratio(load.p50, hit.p50),
                            f"{load.p50 * 1000 / size:.0f}",
                        ]
                    )
                cold_table = table(
                    [
                        "items",
                        "first GetContext p50 ms (rehydrates)",
                        "p99 ms",
                        "hot GetContext p50 ms",
                        "ratio",
                        "µs per item",
                    ],
                    cold_rows,
                )
            await raw.aclose()
    finally:
        pg.close()
    return (
        f"Hot path, {count} calls each, interleaved in rounds, one item appended per "
        f"AppendItems, GetContext of a {HOT_SESSION_ITEMS}-item session with a 4,000-token "
        "budget:\n\n"
        f"{hot_table}\n\n"
        f"Rehydration ({evictions} evictions per size; the session's keys deleted from Redis, "
        "then the first GetContext loads it back from PostgreSQL):\n\n"
        f"{cold_table}\n"
    )


def main() -> None:
    print(asyncio.run(run_benchmark()))


if __name__ == "__main__":
    main()
