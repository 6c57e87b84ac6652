"""The Session adapter's own cost (issue 17): Runner + StateServiceSession
against Runner + RedisSession in this process, paths interleaved in rounds,
and where a StateServiceSession turn's CPU goes.

    python -m bench.session_cost --sizes 20,200,2000 --turns 120 --rounds 12
    python -m bench.session_cost --sizes 200 --profile       # + cProfile of our turns
    python -m bench.session_cost --baseline /tmp/old_session.py   # A/B one process

`--baseline` loads another version of state_service/client/session.py (say
`git show main:state_service/client/session.py > /tmp/old_session.py`) as a
third path, so before and after are measured in one run. Both use this tree's
StateClient. Sessions and the model are bench/turn_cost.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import io
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from agents import Agent, RunConfig, Runner
from agents.extensions.memory.redis_session import RedisSession

from bench.common import Stats, redis_process, state_service, table
from bench.turn_cost import POOL, FixedReplyModel, _history
from state_service.client import StateClient, StateServiceSession

REDIS = "Runner + RedisSession"
OURS = "Runner + StateServiceSession"
BASELINE = "Runner + StateServiceSession (baseline)"
BARE = "Runner, no session"


def _baseline_class(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_session", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_session"] = module
    spec.loader.exec_module(module)
    return module.StateServiceSession


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    config = RunConfig(tracing_disabled=True)
    agent = Agent(name="bench", instructions="Answer briefly.", model=FixedReplyModel())
    baseline = _baseline_class(args.baseline) if args.baseline else None
    lines = [f"python -m bench.session_cost {' '.join(sys.argv[1:])}\n"]
    rows = []
    with redis_process() as redis_server, state_service(redis_server.url) as (address, _):
        redis = aioredis.from_url(redis_server.url)
        async with StateClient(address) as client:
            for n in sizes:
                history = _history(n)
                kinds = ["redis", "ours"] + (["base"] if baseline else [])
                for kind in kinds:
                    for k in range(POOL):
                        sid = f"{kind}-{n}-{k}"
                        if kind == "redis":
                            await RedisSession(sid, redis_client=redis).add_items(history)  # type: ignore[arg-type]
                        else:
                            for start in range(0, n, 500):
                                await client.append_items(sid, history[start : start + 500])
                ours = {k: StateServiceSession(f"ours-{n}-{k}", client=client) for k in range(POOL)}
                base = (
                    {k: baseline(f"base-{n}-{k}", client=client) for k in range(POOL)}
                    if baseline
                    else {}
                )

                async def with_redis(i: int, n: int = n) -> object:
                    session = RedisSession(f"redis-{n}-{i % POOL}", redis_client=redis)
                    return await Runner.run(agent, f"Q {i}?", session=session, run_config=config)

                def runner(sessions: dict[int, Any]) -> Callable[[int], Awaitable[object]]:
                    async def run(i: int) -> object:
                        return await Runner.run(
                            agent, f"Q {i}?", session=sessions[i % POOL], run_config=config
                        )

                    return run

                async def bare(i: int) -> object:
                    return await Runner.run(agent, f"Q {i}?", run_config=config)

                calls: dict[str, Callable[[int], Awaitable[object]]] = {
                    REDIS: with_redis,
                    OURS: runner(ours),
                    BARE: bare,
                }
                if baseline:
                    calls[BASELINE] = runner(base)
                for call in calls.values():
                    for i in range(POOL):
                        await call(i)
                latencies: dict[str, list[float]] = {name: [] for name in calls}
                cpu = dict.fromkeys(calls, 0.0)
                counter = 0
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        cpu_before = time.process_time()
                        for _ in range(max(1, args.turns // args.rounds)):
                            counter += 1
                            started = time.perf_counter()
                            await call(counter)
                            latencies[name].append(time.perf_counter() - started)
                        cpu[name] += time.process_time() - cpu_before
                p50 = {name: Stats.of(kept).p50 for name, kept in latencies.items()}
                for name in calls:
                    rows.append(
                        [
                            str(n),
                            name,
                            f"{p50[name]:.2f}",
                            f"{1000 * cpu[name] / len(latencies[name]):.2f}",
                            f"{p50[name] / p50[REDIS]:.2f}×",
                        ]
                    )
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for i in range(args.turns):
                        await calls[OURS](i)
                    profiler.disable()
                    out = io.StringIO()
                    stats = pstats.Stats(profiler, stream=out)
                    stats.sort_stats(args.sort).print_stats(args.top)
                    lines.append(f"\n== cProfile of {args.turns} {OURS} turns, n={n}\n")
                    lines.append(out.getvalue())
        await redis.aclose()
    lines.append(
        table(["n", "path", "p50 ms", "CPU ms/turn", "p50 vs RedisSession"], rows)  # fmt: skip
    )
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="20,200,2000")
    parser.add_argument("--turns", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--baseline", default="")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
