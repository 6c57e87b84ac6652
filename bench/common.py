"""Shared benchmark machinery: real processes on loopback, latency statistics,
closed- and open-loop load, and the tables BENCHMARKS.md is made of.

Every comparison is measured side by side in the same run; tables report
ratios against a baseline measured moments before, because this machine is
shared and noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from state_service.storage.embedded import EmbeddedRedis, free_port
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stats:
    n: int
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ordered = sorted(seconds)
        n = len(ordered)

        def pick(q: float) -> float:
            return ordered[min(n - 1, int(q * n))] * 1000

        return cls(n, pick(0.5), pick(0.9), pick(0.99), statistics.fmean(ordered) * 1000)

    def row(self) -> list[str]:
        return [f"{self.p50:.3f}", f"{self.p90:.3f}", f"{self.p99:.3f}"]


async def closed_loop(
    call: Callable[[], Awaitable[object]], count: int, warmup: int = 200
) -> Stats:
    for _ in range(warmup):
        await call()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return Stats.of(latencies)


async def interleaved(
    calls: Mapping[str, Callable[[], Awaitable[object]]],
    count: int,
    rounds: int = 10,
    warmup: int = 200,
) -> dict[str, Stats]:
    """closed_loop for several paths at once, in rounds of count/rounds calls
    each, so a noisy neighbour or a drifting clock hits every path alike."""
    for call in calls.values():
        for _ in range(warmup):
            await call()
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, count // rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            kept = latencies[name]
            for _ in range(per_round):
                started = time.perf_counter()
                await call()
                kept.append(time.perf_counter() - started)
    return {name: Stats.of(kept) for name, kept in latencies.items()}


async def open_loop(
    call: Callable[[], Awaitable[object]], rate: float, seconds: float
) -> tuple[Stats, float]:
    """Sends at a fixed rate regardless of responses; latency is measured from
    the scheduled send time, so queueing shows (no coordinated omission).
    Returns the stats and the achieved completion rate."""
    latencies: list[float] = []
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        await call()
        latencies.append(time.perf_counter() - scheduled)

    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    return Stats.of(latencies), total / elapsed


async def throughput(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


@contextlib.contextmanager
def redis_process(appendfsync: str = "always") -> Iterator[EmbeddedRedis]:
    """A redis-server as the state service embeds it (AOF, fsync per write by
    default: an acknowledged write survives a crash)."""
    with EmbeddedRedis(
        Path(tempfile.mkdtemp(prefix="bench-redis-")), port=free_port(), appendfsync=appendfsync
    ) as r:
        yield r


@contextlib.contextmanager
def service_process(
    module: str, address: str, env: dict[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m <module>` with `env` on top of this one's, once it serves
    gRPC at `address`; stopped (SIGTERM, then SIGKILL) on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(address)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def state_service(
    redis_url: str, *, port: int | None = None, cwd: Path | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `state-service` process (run in `cwd`, say another source tree
    with PYTHONPATH set to it); yields its address."""
    port = port or free_port()
    # A STATE_SERVICE_LISTEN in `env` (a unix: socket, say) is the address.
    address = env.get("STATE_SERVICE_LISTEN", f"127.0.0.1:{port}")
    settings = {
        "STATE_SERVICE_LISTEN": address,
        "STATE_SERVICE_REDIS_URL": redis_url,
        "STATE_SERVICE_METRICS_PORT": "0",
        "STATE_SERVICE_LOG_LEVEL": "WARNING",
        **env,
    }
    with service_process("state_service", address, settings, cwd) as process:
        yield address, process


@contextlib.contextmanager
def python_server(script: str, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), f"127.0.0.1:{port}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", process
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def echo_server(payload: bytes) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """bench/echo_server.py answering GetContext with `payload` (a serialized
    GetContextResponse): the gRPC floor the primitives are measured against."""
    payload_file = Path(tempfile.mkdtemp(prefix="bench-echo-")) / "payload.bin"
    payload_file.write_bytes(payload)
    with python_server("echo_server.py", str(payload_file)) as server:
        yield server


@contextlib.asynccontextmanager
async def state_and_echo(
    address: str, session_id: str
) -> AsyncIterator[tuple[pb_grpc.StateServiceAsyncStub, pb_grpc.StateServiceAsyncStub]]:
    """Stubs of the state service at `address` and of an echo server answering
    GetContext with the bytes the service returns for `session_id` now: the
    primitives and their floor, carrying the same payload."""
    async with grpc.aio.insecure_channel(address) as state_channel:
        state = pb_grpc.StateServiceStub(state_channel)
        response = await state.GetContext(pb.GetContextRequest(session_id=session_id))
        with echo_server(response.SerializeToString()) as (echo_address, _):
            async with grpc.aio.insecure_channel(echo_address) as echo_channel:
                yield state, pb_grpc.StateServiceStub(echo_channel)


def wait_ready(address: str, timeout: float = 20.0) -> None:
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    finally:
        channel.close()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}×" if baseline else "n/a"
