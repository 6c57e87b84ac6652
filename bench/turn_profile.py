"""Where an agent-service turn's CPU goes: the SDK, gRPC, protobuf, our code.

python -m bench.turn_profile [--turns 300] [--size 20] [--label after] [--state-in-process]

Starts Redis, a state service and an agent service (bench/turn_cost.py's
tool-less offline agent, budget 4,000), seeds sessions of `size` items, then:
measures the agent process's CPU per Chat turn without a profiler, and runs
the same turns again under cProfile inside the agent process (this module
re-run as its server: SIGUSR1 starts the profiler, SIGUSR2 writes it). Self
time is grouped by component and scaled to the CPU per turn measured without
the profiler. The summary goes to bench/results/profile_agent_turn[.label].txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_service.client import AgentClient
from bench.common import ROOT, Stats, redis_process, state_service, wait_ready
from bench.turn_cost import AGENTS_YAML, _cpu, _history, agent_service
from state_service.client import StateClient
from state_service.storage.embedded import free_port

RESULTS = ROOT / "bench" / "results"
SESSIONS = 16

# Checked in order against a function's file name; the first match names it.
COMPONENTS = (
    ("openai-agents SDK (agents/)", ("/agents/",)),
    ("openai types + pydantic (the SDK's models)", ("/openai/", "/pydantic", "pydantic_core")),
    ("gRPC (grpc/, cygrpc)", ("/grpc/", "cygrpc", "grpc._cython")),
    ("protobuf", ("/google/protobuf/", "upb", "_message")),
    ("our code: agent_service/", ("agent_service/",)),
    (
        "Redis client (state_service/storage/, redis-py, hiredis)",
        ("state_service/storage/", "/redis/", "hiredis"),
    ),
    (
        "our code: state_service/ (servicer, context, sessions, cache...)",
        (
            "state_service/server",
            "state_service/servicer",
            "state_service/context",
            "state_service/sessions",
            "state_service/cache",
            "state_service/reader",
            "state_service/log",
            "state_service/window",
            "state_service/validation",
            "state_service/grpc_",
            "state_service/tokens",
            "state_service/compression",
            "state_service/heavy",
            "state_service/metrics",
            "state_service/identity",
            "state_service/paging",
            "tiktoken",
            "cachetools",
        ),
    ),
    ("our code: state client (state_service/client/)", ("state_service/client/",)),
    ("our code: shared_runtime/", ("shared_runtime/",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("asyncio event loop", ("/asyncio/", "selectors.py", "_asyncio", "select.epoll")),
    ("json", ("/json/", "_json")),
)


def component(filename: str, name: str) -> str:
    where = f"{filename}:{name}"
    for label, needles in COMPONENTS:
        if any(needle in where for needle in needles):
            return label
    return "other (stdlib, builtins)"


def summarize(stats_file: Path, cpu_per_turn_ms: float, turns: int, target: str) -> str:
    stats = pstats.Stats(str(stats_file))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, dict[object, object]]]
    raw = stats.stats  # type: ignore[attr-defined]
    by_component: collections.defaultdict[str, float] = collections.defaultdict(float)
    by_function: collections.defaultdict[str, float] = collections.defaultdict(float)
    total = 0.0

    def charge(key: tuple[str, int, str], seconds: float, depth: int = 0) -> None:
        """Stdlib and builtin time goes to whoever called it (split by the
        time each caller spent in it), up to a few levels up."""
        label = component(key[0], key[2])
        callers = raw[key][4] if key in raw else {}
        if label != "other (stdlib, builtins)" or depth >= 6 or not callers:
            by_component[label] += seconds
            return
        shares = {c: float(v[2]) for c, v in callers.items() if isinstance(v, tuple)}
        whole = sum(shares.values())
        if whole <= 0:
            by_component[label] += seconds
            return
        for caller, share in shares.items():
            charge(caller, seconds * share / whole, depth + 1)  # type: ignore[arg-type]

    for key, (_, _, tottime, _, _) in raw.items():
        filename, line, name = key
        if name == "<method 'poll' of 'select.epoll' objects>":
            continue  # idle: waiting for the network
        total += tottime
        charge(key, tottime)
        short = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        by_function[f"{short}:{line}({name})"] += tottime

    def most(counts: dict[str, float], top: int) -> list[tuple[str, float]]:
        return sorted(counts.items(), key=lambda kv: -kv[1])[:top]

    lines = [
        (
            f"cProfile self time, idle (epoll) dropped: {1000 * total / turns:.2f} ms per turn "
            f"under the profiler; {cpu_per_turn_ms:.2f} ms of {target}-process CPU per turn "
            "without it (ms below = share x that)"
        ),
        "",
        "by component (stdlib and builtin time charged to its callers' component):",
        *[
            f"  {100 * t / total:5.1f}%  {t / total * cpu_per_turn_ms:6.2f} ms  {label}"
            for label, t in most(by_component, 99)
        ],
        "",
        "top 30 functions by self time:",
        *[f"  {100 * t / total:5.1f}%  {name}" for name, t in most(by_function, 30)],
    ]
    return "\n".join(lines) + "\n"


async def _serve_profiled(out: Path, target: str) -> None:
    """The agent (or state) server, profiling itself between SIGUSR1 and SIGUSR2."""
    server: Any
    if target == "state":
        from state_service.server import StateServer
        from state_service.settings import StateServiceSettings

        server = await StateServer.start(StateServiceSettings.model_validate({}))
    else:
        from agent_service.server import AgentServer
        from agent_service.settings import AgentServiceSettings
        from bench.fixed_reply_agent import use_fixed_replies

        use_fixed_replies()  # as bench/turn_cost.py's agent services

        server = await AgentServer.start(AgentServiceSettings.model_validate({}))
    loop = asyncio.get_running_loop()
    profiler = cProfile.Profile()
    stopped = asyncio.Event()

    def dump() -> None:
        profiler.disable()
        profiler.dump_stats(str(out))
        out.with_suffix(".done").write_text("")

    loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
    loop.add_signal_handler(signal.SIGUSR2, dump)
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await server.stop(grace=0)


async def _turns(client: AgentClient, turns: int, start: int) -> Stats:
    latencies = []
    for i in range(start, start + turns):
        started = time.perf_counter()
        await client.chat(f"p-{i % SESSIONS}", f"Question {i}?")
        latencies.append(time.perf_counter() - started)
    return Stats.of(latencies)


@contextlib.contextmanager
def _profiled(target: str, out: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """This module as the `target` server, profiling on signal; its address and pid."""
    port = free_port()
    prefix = "STATE_SERVICE" if target == "state" else "AGENT_SERVICE"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.turn_profile", "--serve", str(out), "--target", target],
        env={
            **os.environ,
            **env,
            f"{prefix}_LISTEN": f"127.0.0.1:{port}",
            f"{prefix}_METRICS_PORT": "0",
            f"{prefix}_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(10)


async def main(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-turn-profile-"))
    agents_yaml = scratch / "agents.yaml"
    agents_yaml.write_text(AGENTS_YAML)
    stats_file = scratch / "server.prof"
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(redis_process())
        if args.target == "state":
            env = {"STATE_SERVICE_REDIS_URL": redis_server.url}
            state_address, pid = stack.enter_context(_profiled("state", stats_file, env))
            agent_address, _ = stack.enter_context(agent_service(state_address))
        else:
            state_address, _ = stack.enter_context(state_service(redis_server.url))
            env = {
                "AGENT_SERVICE_STATE_TARGET": state_address,
                "AGENT_SERVICE_AGENTS_CONFIG": str(agents_yaml),
            }
            if args.state_in_process:
                env |= {
                    "AGENT_SERVICE_STATE_IN_PROCESS": "true",
                    "STATE_SERVICE_REDIS_URL": redis_server.url,
                    "STATE_SERVICE_LOG_LEVEL": "WARNING",
                }
            agent_address, pid = stack.enter_context(_profiled("agent", stats_file, env))
        async with StateClient(state_address) as state:
            for k in range(SESSIONS):
                await state.append_items(f"p-{k}", _history(args.size))
        async with AgentClient(agent_address) as client:
            await _turns(client, 50, 0)
            before = _cpu(pid)
            plain = await _turns(client, args.turns, 100)
            cpu_ms = (_cpu(pid) - before) / args.turns * 1000
            os.kill(pid, signal.SIGUSR1)
            await asyncio.sleep(0.2)
            profiled = await _turns(client, args.turns, 100 + args.turns)
            os.kill(pid, signal.SIGUSR2)
            while not stats_file.with_suffix(".done").exists():
                await asyncio.sleep(0.1)
    text = (
        f"{args.target.capitalize()}-service CPU of an agent-service Chat turn, "
        f"{args.size}-item sessions, {args.turns} sequential turns (tool-less offline agent, "
        f"budget 4,000{'; state service in the agent process' if args.state_in_process else ''})."
        "\n"
        f"client p50 {plain.p50:.2f} ms without profiler, {profiled.p50:.2f} ms under cProfile.\n\n"
        + summarize(stats_file, cpu_ms, args.turns, args.target)
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "profile_agent_turn" if args.target == "agent" else "profile_agent_turn_state_side"
    out = RESULTS / f"{name}{'.' + args.label if args.label else ''}.txt"
    out.write_text(text)
    print(text)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--size", type=int, default=20)
    parser.add_argument("--label", default="")
    parser.add_argument("--target", choices=("agent", "state"), default="agent")
    parser.add_argument(
        "--state-in-process",
        action="store_true",
        help="profile an agent service running its state service in process",
    )
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        asyncio.run(_serve_profiled(Path(arguments.serve), arguments.target))
    else:
        asyncio.run(main(arguments))
