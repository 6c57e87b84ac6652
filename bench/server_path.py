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

from bench.common import Stats, python_server, state_service
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


async def _run(call: Callable[[], Awaitable[object]], calls: int) -> Stats:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return Stats.of(latencies)


def _calls(
    stub: pb_grpc.StateServiceStub, timeout: float | None
) -> dict[str, Callable[[], Awaitable[object]]]:
    sequence = [0]
    request = pb.GetContextRequest(session_id="prim")

    async def append() -> object:
        sequence[0] += 1
        return await stub.AppendItems(  # type: ignore[misc]
            pb.AppendItemsRequest(
                session_id=f"append-{sequence[0] % 300}", items=[ITEM], request_id=f"r{sequence[0]}"
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


async def _measure(args: argparse.Namespace, redis_url: str) -> list[str]:
    timeout = 30.0 if args.deadline else None
    scratch = Path(tempfile.mkdtemp(prefix="bench-server-path-"))
    with state_service(redis_url) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.StateServiceStub(channel)
            await stub.AppendItems(pb.AppendItemsRequest(session_id="prim", items=[ITEM] * 20))
            payload = scratch / "payload.bin"
            response = await stub.GetContext(pb.GetContextRequest(session_id="prim"))
            payload.write_bytes(response.SerializeToString())
            with python_server("echo_server.py", str(payload)) as (echo_address, echo):
                async with grpc.aio.insecure_channel(echo_address) as echo_channel:
                    targets = {
                        "state": (process.pid, _calls(stub, timeout)),
                        "echo": (echo.pid, _calls(pb_grpc.StateServiceStub(echo_channel), timeout)),
                    }
                    measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
                    for _ in range(args.rounds):
                        for name in PRIMITIVES:
                            for target, (pid, calls) in targets.items():
                                await _run(calls[name], 200)
                                before = _cpu(pid)
                                stats = await _run(calls[name], args.calls)
                                cpu_ms = (_cpu(pid) - before) / args.calls * 1000
                                measured.setdefault((name, target), []).append((stats.p50, cpu_ms))
    lines = []
    for name in PRIMITIVES:
        row = {}
        for target in ("echo", "state"):
            runs = measured[(name, target)]
            row[target] = (
                sorted(p for p, _ in runs)[len(runs) // 2],
                sorted(c for _, c in runs)[len(runs) // 2],
            )
        (echo_p50, echo_cpu), (state_p50, state_cpu) = row["echo"], row["state"]
        lines.append(
            f"{name:12} p50 echo {echo_p50:.3f} ms, state {state_p50:.3f} ms "
            f"({state_p50 / echo_p50:.2f}x); server CPU per call echo {echo_cpu:.3f} ms, "
            f"state {state_cpu:.3f} ms (+{state_cpu - echo_cpu:.3f} ms)"
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
                await _run(call, 300)
                before = _cpu(pid)
                await _run(call, args.calls)
                cpu_ms = (_cpu(pid) - before) / args.calls * 1000
                os.kill(pid, signal.SIGUSR1)
                await asyncio.sleep(0.2)
                await _run(call, args.calls)
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
            + f" --appendfsync {args.appendfsync}",
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
    asyncio.run(main(parser.parse_args()))
