"""5. The design brief's trade-off table, measured: stateful (in-process dict),
stateless (Redis every request, the brief's GET/trim-to-40/SETEX sketch) and
hybrid (statecar). The model is left out: these are the state costs per turn."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import Stats, redis_process, state_service, table, throughput
from bench.report import Report
from state_service.client import EtagMismatchError, StateClient
from state_service.tokens import EstimatingTokenCounter

TURNS = 500
CHECKPOINTS = (10, 100, 500)
BUDGET = 2000
COUNTER = EstimatingTokenCounter()


def user(n: int) -> dict[str, Any]:
    return {"role": "user", "content": f"turn {n}: tell me about item {n * 7 % 97} " * 3}


def reply(n: int) -> dict[str, Any]:
    return {"role": "assistant", "content": f"answer {n}: " + "here is what I know " * 8}


def tokens(items: list[dict[str, Any]]) -> int:
    return sum(COUNTER.count(json.dumps(i).encode()) for i in items)


class Stateful:
    """The brief's StatefulAgentServer: history in a dict, sent whole."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[dict[str, Any]]] = {}

    async def turn(self, sid: str, n: int) -> int:
        history = self.sessions.setdefault(sid, [])
        history.append(user(n))
        sent = tokens(history)
        history.append(reply(n))
        return sent


class Stateless:
    """The brief's StatelessAgentServer: GET JSON, trim to 40, SETEX JSON."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def turn(self, sid: str, n: int) -> int:
        raw = await self.redis.get(f"brief:{sid}")
        history = json.loads(raw) if raw else []
        history.append(user(n))
        if len(history) > 40:
            history = history[:2] + history[-38:]
        sent = tokens(history)
        history.append(reply(n))
        await self.redis.setex(f"brief:{sid}", 3600, json.dumps(history))
        return sent


class Hybrid:
    """statecar: GetContext within a token budget, one conditional append."""

    def __init__(self, client: StateClient) -> None:
        self.client = client

    async def turn(self, sid: str, n: int) -> int:
        context = await self.client.get_context(sid, token_budget=BUDGET)
        sent = context.token_count + tokens([user(n)])
        await self.client.append_items(sid, [user(n), reply(n)], etag=context.etag)
        return sent


async def _conversation(store: Any, sid: str) -> tuple[Stats, dict[int, int]]:
    latencies, sent = [], {}
    for n in range(1, TURNS + 1):
        started = time.perf_counter()
        count = await store.turn(sid, n)
        latencies.append(time.perf_counter() - started)
        if n in CHECKPOINTS:
            sent[n] = count
    return Stats.of(latencies), sent


async def run(report: Report) -> None:
    rows = []
    lost: dict[str, str] = {}
    with redis_process() as redis_server:
        raw = aioredis.from_url(redis_server.url)
        with (
            state_service(redis_server.url) as (a, process_a),
            state_service(redis_server.url) as (b, _),
        ):
            async with StateClient([a, b]) as client:
                stores = {"stateful (dict)": Stateful(), "stateless (brief)": Stateless(raw),
                          "hybrid (statecar)": Hybrid(client)}  # fmt: skip
                for name, store in stores.items():
                    stats, sent = await _conversation(store, "conv")
                    rows.append([name, f"{stats.p50:.3f}", f"{stats.p99:.3f}",
                                 *(f"{sent[c]:,}" for c in CHECKPOINTS)])  # fmt: skip

                # Kill one of two instances with 100 sessions spread over them.
                sessions = [f"k{i}" for i in range(100)]
                instances = [Stateful(), Stateful()]  # sticky: session i lives on i % 2
                for i, sid in enumerate(sessions):
                    await instances[i % 2].turn(sid, 1)
                survivors = instances[1].sessions
                lost["stateful (dict)"] = f"{sum(s not in survivors for s in sessions)} of 100"
                stateless = Stateless(raw)
                for sid in sessions:
                    await stateless.turn(sid, 1)
                lost["stateless (brief)"] = "0 of 100 (state is in Redis)"
                hybrid = Hybrid(client)
                for sid in sessions:
                    await hybrid.turn(sid, 1)
                process_a.send_signal(signal.SIGKILL)
                await asyncio.sleep(0.2)
                missing = 0
                for sid in sessions:
                    if not (await client.get_context(sid)).items:
                        missing += 1
                lost["hybrid (statecar)"] = f"{missing} of 100 (replica a killed with -9)"
        await raw.aclose()

        # Throughput of hybrid turns: one vs two state-service instances.
        rates = {}
        conflicts: dict[int, int] = {}
        for replicas in (1, 2):
            with (
                state_service(redis_server.url) as (a, _),
                state_service(redis_server.url) as (b, _),
            ):
                targets = [a] if replicas == 1 else [a, b]
                async with StateClient(targets) as client:
                    hybrid = Hybrid(client)
                    counter = iter(range(10**9))

                    async def one_turn() -> None:
                        n = next(counter)
                        while True:
                            try:
                                await hybrid.turn(f"t{n % 64}", n)
                                return
                            except EtagMismatchError:
                                # Two callers on one session: the second turn is
                                # refused (nothing stored) and, as an agent would,
                                # rerun on the fresh context.
                                conflicts[replicas] = conflicts.get(replicas, 0) + 1

                    rates[replicas] = await throughput(one_turn, concurrency=32, seconds=4)

    text = (
        f"One {TURNS}-turn conversation per approach; state work only (no model). Tokens are what "
        f"would be sent to the model at that turn (budget {BUDGET} for statecar):\n\n"
        + table(
            [
                "approach",
                "turn p50 ms",
                "turn p99 ms",
                *(f"tokens @ turn {c}" for c in CHECKPOINTS),
            ],
            rows,
        )  # fmt: skip
    )
    text += "\n\nSessions lost when one of two instances dies:\n\n" + table(
        ["approach", "sessions lost"], [[k, v] for k, v in lost.items()]
    )
    text += (
        f"\n\nHybrid throughput (turn = GetContext + AppendItems, 32 concurrent callers): "
        f"1 instance {rates[1]:.0f} turns/s, 2 instances {rates[2]:.0f} turns/s "
        f"({rates[2] / rates[1]:.2f}×) — on 2 cores shared with Redis and the load generator. "
        f"Turns refused because another caller's turn on the same session (64 sessions) "
        f"came first, then rerun: {conflicts.get(1, 0)} and {conflicts.get(2, 0)}."
    )
    report.add("5. The brief's table, measured", text)
