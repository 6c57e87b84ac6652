"""Turn cost (issue 17): a stateless agent-service turn against openai-agents'
in-process turn, and the state-service primitives against the gRPC floor, all
measured in one run with the paths interleaved in rounds.

    python -m bench.turn_cost                     # sizes 20, 200, 2000
    python -m bench.turn_cost --sizes 20 --turns 40 --rounds 4 --seconds 2

Paths per session size n (the session holds n items when a round starts; a
pool of sessions per path keeps the growth during the run small):

- agent-service Chat through AgentClient (a tool-less agent on the offline
  model, token budget 4,000), against real state-service and agent-service
  processes on loopback;
- the same with the state service inside the agent-service process
  (AGENT_SERVICE_STATE_IN_PROCESS: the sidecar deployment without the gRPC
  hop; state_service/in_process.py);
- openai-agents Runner + RedisSession in this process, with the offline
  model's reply to the newest item (bench/fixed_reply_agent.py: the same cost
  at any n; the agent services run the same, so the model is excluded on both
  sides, as issue 17 measures);
- Runner + StateServiceSession in this process (one session object per
  conversation, as an application keeps it; unbudgeted, like RedisSession),
  over gRPC to the state service, and over an in-process state service
  (InProcessState in this process);
- Runner with no session (the SDK's own floor), on one message, and on a
  20-item conversation (the SDK's own cost over the input every n=20 path
  hands it);
- the lower bound of a Python turn server (bench/minimal_agent.py): Chat over
  grpc.aio, the SDK on 20 items from memory, one Redis RPUSH, nothing else:
  what any Python design pays before it does anything of its own.

CPU per turn is the CPU time of the process(es) doing the turn's work, read
from /proc around each path's rounds: the agent service's (and, shown apart,
the state service's) for Chat, this process's for the in-process paths
(Redis' own CPU not counted on either side).

Primitives: GetContext (20-item session, cache hit) and AppendItems (one
item) against bench/echo_server.py answering the same bytes; also through
StateClient over the in-process state service (no gRPC at all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from agents import Agent, RunConfig, Runner
from agents.extensions.memory.redis_session import RedisSession

from agent_service.client import AgentClient
from agent_service.models.offline import OfflineModel
from bench.common import (
    ROOT,
    Stats,
    redis_process,
    service_process,
    state_and_echo,
    state_service,
    table,
)
from bench.fixed_reply_agent import use_fixed_replies
from bench.report import Report
from bench.sidecar import MESSAGES
from state_service.client import StateClient, StateServiceSession
from state_service.in_process import InProcessState
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import free_port
from statecar.state.v1 import state_service_pb2 as pb

CHAT = "agent-service Chat (AgentClient)"
CHAT_LOCAL = "agent-service Chat, state in process"
REDIS = "Runner + RedisSession (in process)"
OURS = "Runner + StateServiceSession (gRPC)"
OURS_LOCAL = "Runner + StateServiceSession (state in process)"
BARE = "Runner, no session (SDK floor)"
# The SDK's own cost over a 20-item conversation of its own items (what every
# path at n=20 hands it after a few turns), with no session: how much of any
# turn's CPU is the SDK's.
BARE_20 = "Runner, no session, 20-item input"
# The least any Python turn server costs: gRPC in, the SDK on 20 items, one
# Redis write (bench/minimal_agent.py); the same work at every n.
LOWER_BOUND = "lower bound: grpc.aio Chat + SDK on 20 items + 1 Redis write"
PATHS = (CHAT, CHAT_LOCAL, REDIS, OURS, OURS_LOCAL, BARE, BARE_20, LOWER_BOUND)
# Each path's own sessions (a "redis" prefix lives in RedisSession's keys).
PREFIX = {CHAT: "chat", CHAT_LOCAL: "chatlocal", REDIS: "redis", OURS: "ours", OURS_LOCAL: "local"}
# 16 callers of one tenant at n=2000 all want heavy work (retrieval): they
# queue for the tenant's slots instead of being refused after 0.2 s.
HEAVY_WAIT_SECONDS = "10"
POOL = 16  # also one session per caller in the throughput runs
AGENTS_YAML = """\
default_agent: bench
agents:
  - name: bench
    instructions: Answer briefly.
    model: offline
    token_budget: 4000
"""


def _history(n: int) -> list[dict[str, Any]]:
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"message {i}: " + "lorem ipsum dolor sit amet " * 6,
        }
        for i in range(n)
    ]


async def _conversation(agent: Agent[Any], config: RunConfig, n: int) -> list[Any]:
    """The newest `n` items of a conversation the SDK produced itself: its
    assistant messages as `to_input_item()` gives them (content parts, ids,
    status), as sessions store them, not plain role/content pairs."""
    items: list[Any] = []
    turn = 0
    while len(items) < n + 2:
        turn += 1
        user: Any = {"role": "user", "content": f"Question {turn}?"}
        result = await Runner.run(agent, [*items, user], run_config=config)
        items += [user, *(item.to_input_item() for item in result.new_items)]
    return items[-n:]


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0  # seconds, of the process(es) doing the work
    state_cpu: float = 0.0  # seconds, of the state service (Chat only)

    def cpu_ms(self) -> float:
        return 1000 * self.cpu / max(1, len(self.latencies))

    def state_cpu_ms(self) -> float:
        return 1000 * self.state_cpu / max(1, len(self.latencies))


@contextlib.contextmanager
def minimal_agent(redis_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """bench/minimal_agent.py's process: the lower bound of a turn server."""
    address = f"127.0.0.1:{free_port()}"
    settings = {
        "MINIMAL_AGENT_LISTEN": address,
        "MINIMAL_AGENT_REDIS_URL": redis_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with service_process("bench.minimal_agent", address, settings) as process:
        yield address, process


@contextlib.contextmanager
def agent_service(
    state_address: str, in_process_redis: str = ""
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An agent-service process; with `in_process_redis`, its state service
    runs inside it over that Redis."""
    port = free_port()
    in_process = (
        {
            "AGENT_SERVICE_STATE_IN_PROCESS": "true",
            "STATE_SERVICE_REDIS_URL": in_process_redis,
            "STATE_SERVICE_TENANT_HEAVY_WAIT_SECONDS": HEAVY_WAIT_SECONDS,
            "STATE_SERVICE_LOG_LEVEL": "WARNING",
        }
        if in_process_redis
        else {}
    )
    config = Path(tempfile.mkdtemp(prefix="bench-agents-")) / "agents.yaml"
    config.write_text(AGENTS_YAML)
    address = f"127.0.0.1:{port}"
    settings = {
        "AGENT_SERVICE_LISTEN": address,
        "AGENT_SERVICE_STATE_TARGET": state_address,
        "AGENT_SERVICE_AGENTS_CONFIG": str(config),
        "AGENT_SERVICE_METRICS_PORT": "0",
        "AGENT_SERVICE_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **in_process,
    }
    with service_process("bench.fixed_reply_agent", address, settings) as process:
        yield address, process


async def _seed(client: StateClient, redis: Any, session_id: str, n: int) -> None:
    """n items in the state service, or with a "redis" id in RedisSession's keys."""
    history = _history(n)
    if session_id.startswith("redis"):
        if n:
            await RedisSession(session_id, redis_client=redis).add_items(history)  # type: ignore[arg-type]
        return
    for start in range(0, n, 500):
        await client.append_items(session_id, history[start : start + 500])


async def _rounds(
    calls: dict[str, Callable[[int], Awaitable[object]]],
    pids: dict[str, list[int]],
    state_pids: dict[str, int],
    turns: int,
    rounds: int,
) -> dict[str, Samples]:
    samples = {name: Samples() for name in calls}
    per_round = max(1, turns // rounds)
    counter = 0
    for _ in range(rounds):
        for name, call in calls.items():
            before = [_cpu(p) for p in pids[name]] if pids[name] else [time.process_time()]
            state_pid = state_pids.get(name)
            state_before = _cpu(state_pid) if state_pid else 0.0
            for _ in range(per_round):
                counter += 1
                started = time.perf_counter()
                await call(counter)
                samples[name].latencies.append(time.perf_counter() - started)
            after = [_cpu(p) for p in pids[name]] if pids[name] else [time.process_time()]
            samples[name].cpu += sum(after) - sum(before)
            if state_pid:
                samples[name].state_cpu += _cpu(state_pid) - state_before
    return samples


async def _throughput(
    call: Callable[[int], Awaitable[object]], callers: int, seconds: float
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(c: int) -> None:
        nonlocal done
        turn = 0
        while time.perf_counter() < stop:
            turn += 1
            await call(turn * POOL + c)  # caller c keeps to session c: no conflicts
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return done / (time.perf_counter() - started)


async def _primitives(
    state_address: str, client: StateClient, local: StateClient, count: int, rounds: int
) -> dict[str, Stats]:
    await client.append_items("prim", MESSAGES)
    message = {"role": "user", "content": "hello there " * 16}
    item = pb.Item(json=json.dumps(message, separators=(",", ":")))
    async with state_and_echo(state_address, "prim") as (state, echo):
        request = pb.GetContextRequest(session_id="prim")
        sequence = [0]
        etags: dict[str, str] = {}

        def append_request(etag: bool) -> pb.AppendItemsRequest:
            sequence[0] += 1
            session = f"append-{'e' if etag else 'n'}-{sequence[0] % 300}"
            return pb.AppendItemsRequest(
                session_id=session,
                items=[item],
                request_id=f"r{sequence[0]}",
                etag=etags.get(session, "") if etag else "",
            )

        async def append_echo() -> object:
            return await echo.AppendItems(append_request(False))

        async def append_raw() -> object:
            return await state.AppendItems(append_request(False))

        async def append_raw_etag() -> object:
            request = append_request(True)
            response = await state.AppendItems(request)
            etags[request.session_id] = response.etag
            return response

        async def append_client() -> object:
            sequence[0] += 1
            return await client.append_items(f"append-c-{sequence[0] % 300}", [message])

        async def append_local() -> object:
            sequence[0] += 1
            return await local.append_items(f"append-l-{sequence[0] % 300}", [message])

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "GetContext floor (grpc.aio echo)": lambda: echo.GetContext(request),
            "GetContext, raw stub": lambda: state.GetContext(request),
            "GetContext, StateClient": lambda: client.get_context("prim"),
            "GetContext, StateClient, state in process": lambda: local.get_context("prim"),
            "AppendItems floor (grpc.aio echo)": append_echo,
            "AppendItems, raw stub, no etag": append_raw,
            "AppendItems, raw stub, etag": append_raw_etag,
            "AppendItems, StateClient": append_client,
            "AppendItems, StateClient, state in process": append_local,
        }
        for call in calls.values():
            for _ in range(100):
                await call()
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(max(1, count // rounds)):
                    started = time.perf_counter()
                    await call()
                    latencies[name].append(time.perf_counter() - started)
    return {name: Stats.of(kept) for name, kept in latencies.items()}


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    config = RunConfig(tracing_disabled=True)
    use_fixed_replies()  # this process's paths, as the agent services' (fixed_reply_agent)
    agent = Agent(name="bench", instructions="Answer briefly.", model=OfflineModel())
    text = [
        (
            f"Turn cost, {args.turns} turns per path and size in {args.rounds} interleaved "
            f"rounds; {args.callers} callers for {args.seconds:.0f} s for throughput; Redis "
            f"appendfsync {args.appendfsync}; "
            f"python -m bench.turn_cost {' '.join(sys.argv[1:])}\n"
        )
    ]
    with (
        redis_process(args.appendfsync) as redis_server,
        state_service(
            redis_server.url, STATE_SERVICE_TENANT_HEAVY_WAIT_SECONDS=HEAVY_WAIT_SECONDS
        ) as (state_address, state_process),
        agent_service(state_address) as (agent_address, agent_process),
        agent_service("unused:1", in_process_redis=redis_server.url) as (
            local_agent_address,
            local_agent_process,
        ),
        minimal_agent(redis_server.url) as (minimal_address, minimal_process),
    ):
        redis = aioredis.from_url(redis_server.url)
        local_settings: dict[str, Any] = {
            "redis_url": redis_server.url,
            "metrics_port": 0,
            "tenant_heavy_wait_seconds": float(HEAVY_WAIT_SECONDS),
        }
        local_state = await InProcessState.start(StateServiceSettings(**local_settings))
        async with (
            StateClient(state_address) as client,
            StateClient("in-process", channel=local_state.channel) as local,
            AgentClient(agent_address) as agents,
            AgentClient(local_agent_address) as local_agents,
            AgentClient(minimal_address) as minimal_agents,
        ):
            primitives = await _primitives(
                state_address, client, local, args.primitive_calls, args.rounds
            )
            results: dict[int, dict[str, Samples]] = {}
            twenty = await _conversation(agent, config, 20)
            rates: dict[int, dict[str, float]] = {}
            for n in sizes:
                for path in (CHAT, CHAT_LOCAL, REDIS, OURS, OURS_LOCAL):
                    for k in range(POOL):
                        await _seed(client, redis, f"{PREFIX[path]}-{n}-{k}", n)
                ours = {
                    k: StateServiceSession(f"{PREFIX[OURS]}-{n}-{k}", client=client)
                    for k in range(POOL)
                }
                ours_local = {
                    k: StateServiceSession(f"{PREFIX[OURS_LOCAL]}-{n}-{k}", client=local)
                    for k in range(POOL)
                }

                async def chat(i: int, n: int = n) -> object:
                    return await agents.chat(f"{PREFIX[CHAT]}-{n}-{i % POOL}", f"Question {i}?")

                async def chat_local(i: int, n: int = n) -> object:
                    return await local_agents.chat(
                        f"{PREFIX[CHAT_LOCAL]}-{n}-{i % POOL}", f"Question {i}?"
                    )

                async def with_redis(i: int, n: int = n) -> object:
                    session = RedisSession(f"{PREFIX[REDIS]}-{n}-{i % POOL}", redis_client=redis)
                    return await Runner.run(
                        agent, f"Question {i}?", session=session, run_config=config
                    )

                async def with_ours(i: int, ours: dict[int, StateServiceSession] = ours) -> object:
                    return await Runner.run(
                        agent, f"Question {i}?", session=ours[i % POOL], run_config=config
                    )

                async def with_ours_local(
                    i: int, ours: dict[int, StateServiceSession] = ours_local
                ) -> object:
                    return await Runner.run(
                        agent, f"Question {i}?", session=ours[i % POOL], run_config=config
                    )

                async def bare_20(i: int) -> object:
                    conversation = [*twenty, {"role": "user", "content": f"Question {i}?"}]
                    return await Runner.run(agent, conversation, run_config=config)

                async def bare(i: int) -> object:
                    return await Runner.run(agent, f"Question {i}?", run_config=config)

                async def lower_bound(i: int, n: int = n) -> object:
                    return await minimal_agents.chat(f"min-{n}-{i % POOL}", f"Question {i}?")

                calls: dict[str, Callable[[int], Awaitable[object]]] = {
                    CHAT: chat,
                    CHAT_LOCAL: chat_local,
                    REDIS: with_redis,
                    OURS: with_ours,
                    OURS_LOCAL: with_ours_local,
                    BARE: bare,
                    BARE_20: bare_20,
                    LOWER_BOUND: lower_bound,
                }
                for call in calls.values():
                    for i in range(POOL):
                        await call(i)  # warm: connections, caches, the session copies
                pids = {
                    CHAT: [agent_process.pid],
                    CHAT_LOCAL: [local_agent_process.pid],
                    REDIS: [],
                    OURS: [],
                    OURS_LOCAL: [],
                    BARE: [],
                    BARE_20: [],
                    LOWER_BOUND: [minimal_process.pid],
                }
                state_pids = {CHAT: state_process.pid}
                results[n] = await _rounds(calls, pids, state_pids, args.turns, args.rounds)
                if n in (sizes[0], sizes[-1]) and args.seconds > 0:
                    rates[n] = {
                        name: await _throughput(calls[name], args.callers, args.seconds)
                        for name in (CHAT, CHAT_LOCAL, REDIS, OURS_LOCAL)
                    }
        await local_state.stop()
        await redis.aclose()
    _report(text, primitives, results, rates, sizes, args)
    print("\n".join(text))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")


def _report(
    text: list[str],
    primitives: dict[str, Stats],
    results: dict[int, dict[str, Samples]],
    rates: dict[int, dict[str, float]],
    sizes: list[int],
    args: argparse.Namespace,
) -> None:
    get_floor = primitives["GetContext floor (grpc.aio echo)"].p50
    append_floor = primitives["AppendItems floor (grpc.aio echo)"].p50
    rows = []
    for name, stats in primitives.items():
        floor = get_floor if name.startswith("GetContext") else append_floor
        rows.append([name, *stats.row(), f"{stats.p50 / floor:.2f}×"])
    text.append(
        f"Primitives, {args.primitive_calls} calls each, interleaved (ms):\n\n"
        + table(["path", "p50", "p90", "p99", "p50 vs floor"], rows)
    )
    rows = []
    for name in PATHS:
        p50s = [Stats.of(results[n][name].latencies).p50 for n in sizes]
        cpu = [results[n][name].cpu_ms() for n in sizes]
        rows.append([name, *(f"{p:.1f}" for p in p50s), *(f"{c:.1f}" for c in cpu)])
    rows.append(
        [
            "Chat: state-service CPU",
            *("" for _ in sizes),
            *(f"{results[n][CHAT].state_cpu_ms():.1f}" for n in sizes),
        ]  # fmt: skip
    )
    text.append(
        "\nTurns (p50 ms; CPU ms per turn of the process doing the turn):\n\n"
        + table(["path", *(f"p50 n={n}" for n in sizes), *(f"CPU n={n}" for n in sizes)], rows)
    )
    floor_cpu = {n: results[n][BARE].cpu_ms() for n in sizes}
    sdk_20_cpu = {n: results[n][BARE_20].cpu_ms() for n in sizes}
    rows = []
    for n in sizes:
        chat, local, redis, ours, ours_local = (
            Stats.of(results[n][p].latencies).p50
            for p in (CHAT, CHAT_LOCAL, REDIS, OURS, OURS_LOCAL)
        )
        rows.append(
            [
                str(n),
                f"{chat / redis:.2f}× ({local / redis:.2f}×)",
                f"{ours / redis:.2f}× ({ours_local / redis:.2f}×)",
                (
                    f"{results[n][CHAT].cpu_ms() / floor_cpu[n]:.2f}× "
                    f"({results[n][CHAT_LOCAL].cpu_ms() / floor_cpu[n]:.2f}×)"
                ),
                f"{results[n][REDIS].cpu_ms() / floor_cpu[n]:.2f}×",
                f"{sdk_20_cpu[n] / floor_cpu[n]:.2f}×",
                f"{results[n][LOWER_BOUND].cpu_ms() / floor_cpu[n]:.2f}×",
                _rates(rates[n], CHAT, CHAT_LOCAL) if n in rates else "–",
                _rates(rates[n], OURS_LOCAL, OURS_LOCAL) if n in rates else "–",
            ]
        )
    text.append(
        "\nRatios, gRPC state service (state in process) (targets: Chat ≤ 1.0× RedisSession "
        "at n=20, ≤ 0.3× at n=2000; StateServiceSession ≤ 1.0× at every n; Chat CPU ≤ 2× the "
        f"SDK floor; throughput with {args.callers} callers ≥ 1.3× at n=20):\n\n"
        + table(
            [
                "n",
                "Chat / RedisSession p50",
                "StateServiceSession / RedisSession p50",
                "Chat CPU / SDK floor CPU",
                "RedisSession CPU / SDK floor CPU",
                "SDK over 20 items CPU / SDK floor CPU",
                "lower bound CPU / SDK floor CPU",
                f"turns/s, {args.callers} callers, Chat / RedisSession",
                f"turns/s, {args.callers} callers, StateServiceSession (in process) / RedisSession",
            ],  # fmt: skip
            rows,
        )
    )


def _rates(rates: dict[str, float], path: str, local: str) -> str:
    """Turns/s of `path` (and `local`) against RedisSession's, as ratios."""
    redis = rates[REDIS]
    if path == local:
        return f"{rates[path]:.0f} / {redis:.0f} = {rates[path] / redis:.2f}×"
    return (
        f"{rates[path]:.0f} ({rates[local]:.0f}) / {redis:.0f} = "
        f"{rates[path] / redis:.2f}× ({rates[local] / redis:.2f}×)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,200,2000")
    parser.add_argument("--turns", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--primitive-calls", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--appendfsync",
        choices=("always", "everysec"),
        default="always",
        help="Redis AOF fsync policy: always (the embedded default: the fsync is part of every "
        "write on every path) or everysec (Redis' usual setting)",
    )
    parser.add_argument("--out", default="")
    return parser


async def run(report: Report) -> None:
    """`python -m bench.run turns`: the default sizes, written as section 8."""
    out = Path(tempfile.mkdtemp(prefix="bench-turns-")) / "turn_cost.txt"
    await main(_parser().parse_args(["--out", str(out)]))
    report.add("8. Turn cost (issue 17)", out.read_text())


if __name__ == "__main__":
    asyncio.run(main(_parser().parse_args()))
