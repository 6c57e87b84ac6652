"""State-service CPU per call on the two hottest primitives (issue 17).

python -m bench.server_path [--calls 2000] [--rounds 3] [--deadline]
                            [--redis-unix] [--appendfsync always] [--profile]
python -m bench.server_path --chain

Starts Redis and a real state service (``python -m state_service``), and
bench/echo_server.py (the gRPC floor); then, interleaved over `rounds`, sends
`calls` sequential raw-stub calls to each as bench/turn_cost.py's primitives
do (AppendItems of one item to one of 300 sessions; GetContext of one cached
20-item session), and reports client p50 and each server's CPU per call from
/proc, medians over the rounds. The state service's CPU beyond the echo's is
what our code, its Redis round trip and its interceptors cost.

--baseline DIR adds a second state service run from the source tree DIR
(e.g. ``git archive main | tar -x -C DIR``), measured interleaved with this
one: a before/after on the same Redis and the same noisy machine;
--deadline gives each call a 30 s deadline, as StateClient does;
--redis-unix talks to Redis over a unix socket instead of loopback TCP;
--appendfsync sets Redis's (the default, always, is what the bench's Redis
and a durable deployment use); --profile runs the calls again against a
self-profiling server (bench/turn_profile.py's) and prints cProfile's top
functions by self time.

--chain instead measures, in process and without gRPC, the CPU of the
server interceptor chain around a handler that returns at once: the
interceptors nested one by one against ServerChain (fused), without and
with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from bench.common import closed_loop, echo_server, state_service
from bench.turn_cost import _cpu
from bench.turn_profile import _profiled, summarize
from shared_runtime.grpc_metrics import GrpcMetrics, ServerMetricsInterceptor
from shared_runtime.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from shared_runtime.server_chain import ServerChain
from state_service.storage.embedded import EmbeddedRedis, free_port
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

MESSAGE = {"role": "user", "content": "hello there " * 16}
ITEM = pb.Item(json=json.dumps(MESSAGE, separators=(",", ":")))
PRIMITIVES = ("AppendItems", "GetContext")


def _calls(
    stub: pb_grpc.StateServiceStub, timeout: float | None, prefix: str = ""
) -> dict[str, Callable[[], Awaitable[object]]]:
    sequence = [0]
    request = pb.GetContextRequest(session_id="prim")

    async def append() -> object:
        sequence[0] += 1
        return await stub.AppendItems(  # type: ignore[misc]
            pb.AppendItemsRequest(
                session_id=f"append-{prefix}{sequence[0] % 300}",
                items=[ITEM],
                request_id=f"r{sequence[0]}",
            ),
            timeout=timeout,
        )

    async def get() -> object:
        return await stub.GetContext(request, timeout=timeout)  # type: ignore[misc]

    return {"AppendItems": append, "GetContext": get}


@contextlib.contextmanager
def _redis(args: argparse.Namespace) -> Iterator[EmbeddedRedis]:
    scratch = Path(tempfile.mkdtemp(prefix="srv-"))  # short: unix socket paths are limited
    port = None if args.redis_unix else free_port()
    with EmbeddedRedis(scratch, port=port, appendfsync=args.appendfsync) as redis:
        yield redis


@contextlib.contextmanager
def _baseline_service(tree: Path, redis_url: str) -> Iterator[tuple[str, int]]:
    """``python -m state_service`` run from another source tree (say a ``git
    archive`` of main), with this venv's packages; its address and pid."""
    with state_service(redis_url, cwd=tree, PYTHONPATH=str(tree)) as (address, process):
        yield address, process.pid


async def _measure(args: argparse.Namespace, redis_url: str) -> list[str]:
    timeout = 30.0 if args.deadline else None
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, tuple[str, int]] = {}
        address, process = stack.enter_context(state_service(redis_url))
        servers["state"] = (address, process.pid)
        if args.baseline is not None:
            servers["baseline"] = stack.enter_context(_baseline_service(args.baseline, redis_url))
        targets: dict[str, tuple[int, dict[str, Callable[[], Awaitable[object]]]]] = {}
        for target, (address, pid) in servers.items():
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            stub = pb_grpc.StateServiceStub(channel)
            seed = pb.AppendItemsRequest(session_id="prim", items=[ITEM] * 20)
            await stub.AppendItems(seed)
            targets[target] = (pid, _calls(stub, timeout, prefix=target))
        response = await stub.GetContext(pb.GetContextRequest(session_id="prim"))
        echo_address, echo = stack.enter_context(echo_server(response.SerializeToString()))
        echo_channel = await stack.enter_async_context(grpc.aio.insecure_channel(echo_address))
        targets["echo"] = (echo.pid, _calls(pb_grpc.StateServiceStub(echo_channel), timeout))
        measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
        order = list(targets)
        for _ in range(args.rounds):
            for name in PRIMITIVES:
                for target in order:
                    pid, calls = targets[target]
                    await closed_loop(calls[name], 200, warmup=0)
                    before = _cpu(pid)
                    stats = await closed_loop(calls[name], args.calls, warmup=0)
                    cpu_ms = (_cpu(pid) - before) / args.calls * 1000
                    measured.setdefault((name, target), []).append((stats.p50, cpu_ms))
            order.reverse()  # no target always first (or always after the same one)
    lines = []
    for name in PRIMITIVES:

        def median(target: str, which: int) -> float:
            values = sorted(run[which] for run in measured[(name, target)])
            return values[len(values) // 2]

        echo_p50, echo_cpu = median("echo", 0), median("echo", 1)
        for target in servers:
            p50, cpu = median(target, 0), median(target, 1)
            lines.append(
                f"{name:12} {target:8} p50 {p50:.3f} ms ({p50 / echo_p50:.2f}x echo's "
                f"{echo_p50:.3f}); server CPU per call {cpu:.3f} ms (echo {echo_cpu:.3f}, "
                f"+{cpu - echo_cpu:.3f})"
            )
    return lines


async def _profile(args: argparse.Namespace, redis_url: str) -> list[str]:
    timeout = 30.0 if args.deadline else None
    scratch = Path(tempfile.mkdtemp(prefix="bench-server-path-"))
    lines = []
    for name in PRIMITIVES:
        stats_file = scratch / f"{name}.prof"
        env = {"STATE_SERVICE_REDIS_URL": redis_url}
        with _profiled("state", stats_file, env) as (address, pid):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.StateServiceStub(channel)
                await stub.AppendItems(pb.AppendItemsRequest(session_id="prim", items=[ITEM] * 20))
                call = _calls(stub, timeout)[name]
                await closed_loop(call, 300, warmup=0)
                before = _cpu(pid)
                await closed_loop(call, args.calls, warmup=0)
                cpu_ms = (_cpu(pid) - before) / args.calls * 1000
                os.kill(pid, signal.SIGUSR1)
                await asyncio.sleep(0.2)
                await closed_loop(call, args.calls, warmup=0)
                os.kill(pid, signal.SIGUSR2)
                while not stats_file.with_suffix(".done").exists():
                    await asyncio.sleep(0.1)
        lines += [f"{name} (profiled):", summarize(stats_file, cpu_ms, args.calls, "state")]
    return lines


class _Context:
    """The two context methods the chain calls on a successful unary RPC."""

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def code(self) -> None:
        return None

    def time_remaining(self) -> float | None:
        return self._remaining


async def _chain() -> list[str]:
    method = "/statecar.state.v1.StateService/AppendItems"

    async def behavior(request: object, context: object) -> object:
        return request

    def layers() -> tuple[
        ServerMetricsInterceptor, LoggingInterceptor, ExceptionToStatusInterceptor
    ]:
        metrics = ServerMetricsInterceptor(GrpcMetrics("server", registry=CollectorRegistry()))
        return metrics, LoggingInterceptor(), ExceptionToStatusInterceptor("bench")

    nested: Any = grpc.unary_unary_rpc_method_handler(behavior)
    for layer in reversed(layers()):
        nested = layer._wrap(nested, method)
    fused: Any = ServerChain(*layers())._wrap(grpc.unary_unary_rpc_method_handler(behavior), method)
    runs: dict[tuple[str, float | None], list[float]] = {}
    calls = 100_000
    for _ in range(5):
        for name, handler in (("nested", nested), ("ServerChain", fused)):
            for remaining in (None, 30.0):
                context = _Context(remaining)
                started = time.process_time()
                for _ in range(calls):
                    await handler.unary_unary(b"", context)
                elapsed = time.process_time() - started
                runs.setdefault((name, remaining), []).append(elapsed / calls * 1e6)
    return [
        f"{name:12} {'deadline' if remaining else 'no deadline':12} "
        f"median {sorted(times)[2]:.2f} µs per call (5 runs of {calls})"
        for (name, remaining), times in runs.items()
    ]


async def main(args: argparse.Namespace) -> None:
    if args.chain:
        print("\n".join(await _chain()))
        return
    with _redis(args) as redis:
        lines = [
            f"python -m bench.server_path --calls {args.calls} --rounds {args.rounds}"
            + (" --deadline" if args.deadline else "")
            + (" --redis-unix" if args.redis_unix else "")
            + f" --appendfsync {args.appendfsync}"
            + (f" --baseline {args.baseline}" if args.baseline else ""),
            *await _measure(args, redis.url),
        ]
        print("\n".join(lines), flush=True)
        if args.profile:
            print("\n".join(await _profile(args, redis.url)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", action="store_true")
    parser.add_argument("--redis-unix", action="store_true")
    parser.add_argument("--appendfsync", default="always", choices=("always", "everysec", "no"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--chain", action="store_true")
    parser.add_argument("--baseline", type=Path, default=None)
    asyncio.run(main(parser.parse_args()))
