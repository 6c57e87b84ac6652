"""The Session adapter's own cost (issue 17): Runner + StateServiceSession
against Runner + RedisSession in this process, paths interleaved in rounds,
and where a StateServiceSession turn's CPU goes.

    python -m bench.session_cost --sizes 20,200,2000 --turns 120 --rounds 12
    python -m bench.session_cost --sizes 200 --profile       # + cProfile of our turns
    python -m bench.session_cost --baseline /tmp/old_session.py   # A/B one process
    python -m bench.session_cost --in-process   # the state engine in this process

`--primitive-calls N` first measures GetContext (a 20-item session, cache
hit) against bench/echo_server.py answering the same bytes: the raw stub, the
raw stub plus this tree's Context.from_proto, plus `--baseline-types`' (an
older state_service/client/types.py), and StateClient.get_context.

`--baseline` loads another version of state_service/client/session.py (say
`git show main:state_service/client/session.py > /tmp/old_session.py`) as a
third path, so before and after are measured in one run. Both use this tree's
StateClient. `--in-process` reaches a StateEngine in this process
(state_service/in_process.py) instead of a state service over gRPC: what is
left is our client and engine code. Sessions and the model are
bench/turn_cost.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from agent_service.models.offline import OfflineModel
from bench.common import Stats, redis_process, state_and_echo, state_service, table
from bench.sidecar import MESSAGES
from bench.turn_cost import POOL, _history
from state_service.client import StateClient, StateServiceSession
from state_service.client.types import Context
from state_service.in_process import InProcessState
from state_service.settings import StateServiceSettings
from statecar.state.v1 import state_service_pb2 as pb

REDIS = "Runner + RedisSession"
OURS = "Runner + StateServiceSession"
BASELINE = "Runner + StateServiceSession (baseline)"
BARE = "Runner, no session"


def _module(name: str, path: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def _primitives(address: str, client: StateClient, args: argparse.Namespace) -> list[str]:
    await client.append_items("prim", MESSAGES)
    request = pb.GetContextRequest(session_id="prim")
    baseline = _module("baseline_types", args.baseline_types) if args.baseline_types else None
    async with state_and_echo(address, "prim") as (state, echo):

        async def converted(convert: Callable[[Any], object]) -> object:
            return convert(await state.GetContext(request))

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "GetContext floor (grpc.aio echo)": lambda: echo.GetContext(request),
            "GetContext, raw stub": lambda: state.GetContext(request),
            "raw stub + Context.from_proto": lambda: converted(Context.from_proto),
            "GetContext, StateClient": lambda: client.get_context("prim"),
        }
        if baseline:
            calls["raw stub + baseline Context.from_proto"] = lambda: converted(
                baseline.Context.from_proto
            )
        for call in calls.values():
            for _ in range(100):
                await call()
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                for _ in range(max(1, args.primitive_calls // args.rounds)):
                    started = time.perf_counter()
                    await call()
                    latencies[name].append(time.perf_counter() - started)
    floor = Stats.of(latencies["GetContext floor (grpc.aio echo)"]).p50
    rows = []
    for name, kept in latencies.items():
        stats = Stats.of(kept)
        rows.append([name, *stats.row(), f"{stats.p50 / floor:.2f}×"])
    return [
        f"GetContext, {args.primitive_calls} calls each, interleaved (ms):\n",
        table(["path", "p50", "p90", "p99", "p50 vs floor"], rows),
        "",
    ]


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    config = RunConfig(tracing_disabled=True)
    agent = Agent(name="bench", instructions="Answer briefly.", model=OfflineModel())
    baseline = (
        _module("baseline_session", args.baseline).StateServiceSession if args.baseline else None
    )
    lines = [f"python -m bench.session_cost {' '.join(sys.argv[1:])}\n"]
    rows = []
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(redis_process())
        redis = aioredis.from_url(redis_server.url)
        if args.in_process:
            settings: dict[str, Any] = {"redis_url": redis_server.url, "metrics_port": 0}
            local = await InProcessState.start(StateServiceSettings(**settings))
            client = StateClient("in-process", channel=local.channel)
        else:
            address, _ = stack.enter_context(state_service(redis_server.url))
            client = StateClient(address)
        try:
            if args.primitive_calls and not args.in_process:
                lines += await _primitives(address, client, args)
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
        finally:
            await client.close()
            if args.in_process:
                await local.stop()
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
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--primitive-calls", type=int, default=0)
    parser.add_argument("--baseline-types", default="")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
