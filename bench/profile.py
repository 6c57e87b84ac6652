"""Where a GetContext cache hit spends its time, server side.

python -m bench.profile                       # tiered and token_window
python -m bench.profile token_window          # one strategy
python -m bench.profile --label before        # ..._<strategy>.before.*.txt

For each strategy it starts Redis and a state service (bench/profile_server.py,
the real server plus a pyinstrument switch), seeds the sidecar benchmark's
20-item session, warms the cache, then profiles CALLS sequential GetContext
calls twice: with pyinstrument inside the process (Python frames, call tree
and flat self-time list) and with py-spy from outside (--native: the C parts
of grpc and protobuf too; idle samples dropped, so shares are of busy time)
for PYSPY_SECONDS.
Summaries go to bench/results/profile_getcontext_<strategy>.*.txt.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import ROOT, Stats, redis_process, wait_ready
from bench.sidecar import MESSAGES
from state_service.client import StateClient
from state_service.storage.embedded import free_port
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

RESULTS = ROOT / "bench" / "results"
CALLS = 5000
PYSPY_SECONDS = 8
STRATEGIES = ("tiered", "token_window")


async def _calls(stub: pb_grpc.StateServiceStub, count: int) -> Stats:
    request = pb.GetContextRequest(session_id="bench")
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await stub.GetContext(request)  # type: ignore[misc]
        latencies.append(time.perf_counter() - started)
    return Stats.of(latencies)


IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (", "select (", "pthread_cond_wait",
               "pthread_cond_timedwait", "futex", "sem_wait")  # fmt: skip


def _python_frame(frame: str) -> bool:
    return ".py:" in frame


# Components, checked from the innermost frame outwards: a sample belongs to
# the innermost frame that names one (so a send() inside the Redis client is
# Redis client time, not event-loop time).
COMPONENTS = (
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    (
        "Redis client (storage/, redis-py, hiredis)",
        ("state_service/storage/", "redis/", "hiredis"),
    ),  # fmt: skip
    ("interceptors (serving/)", ("shared_runtime/",)),
    (
        "context and cache (sessions, cache, context, compression)",
        (
            "state_service/sessions.py",
            "state_service/cache.py",
            "state_service/context.py",
            "state_service/reader.py",
            "state_service/log.py",
            "state_service/window.py",
            "state_service/listing.py",
            "state_service/compression/",
            "cachetools/",
        ),
    ),  # fmt: skip
    (
        "servicer and validation",
        (
            "state_service/servicer.py",
            "state_service/grpc_convert.py",
            "state_service/grpc_errors.py",
            "state_service/validation.py",
            "state_service/identity.py",
        ),
    ),  # fmt: skip
)
GRPC = "gRPC (cygrpc: call handling, HTTP/2, serialization)"
LOOP = "asyncio event loop"


def component_of(thread: str, frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(needle in frame for needle in needles):
                return name
    if "_poll_wrapper" in thread or any("cygrpc" in f for f in frames):
        return GRPC
    if frames and frames[-1].startswith("Handle._run"):
        return GRPC  # Cython callbacks run by the loop, below Python frames
    return LOOP


def _summarize_pyspy(raw: Path, cpu_per_call_us: float, top: int = 25) -> str:
    """Busy samples (a leaf waiting in epoll/futex is idle) by component (µs
    per call: share of busy samples times the process's CPU per call measured
    without the profiler), by thread, by the deepest Python frame (native
    time charged to its Python caller), by native leaf, and by inclusive
    share."""
    components: collections.Counter[str] = collections.Counter()
    by_python: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        busy += count
        name = "grpc poller thread" if "_poll_wrapper" in thread else thread.split(": ")[-1]
        threads[name] += count
        components[component_of(thread, frames)] += count
        by_leaf[frames[-1]] += count
        python = [f for f in frames if _python_frame(f)]
        by_python[python[-1] if python else "(native only) " + frames[-1]] += count
        for frame in set(python):
            inclusive[frame] += count

    def rows(counter: collections.Counter[str]) -> list[str]:
        return [f"  {100 * c / busy:5.1f}%  {f}" for f, c in counter.most_common(top)]

    lines = [
        (
            f"py-spy record --native: {busy} busy samples ({idle} idle in epoll/futex "
            "dropped); shares are of busy samples"
        ),
        "",
        (
            f"by component (µs/call = share × {cpu_per_call_us:.0f} µs of process CPU per call, "
            "both threads, measured without the profiler):"
        ),
        *[
            f"  {100 * c / busy:5.1f}%  {c / busy * cpu_per_call_us:5.0f} µs  {name}"
            for name, c in components.most_common()
        ],
        "",
        "by thread:",
        *rows(threads),
        "",
        f"top {top} by deepest Python frame (native work charged to its caller):",
        *rows(by_python),
        "",
        f"top {top} native leaves:",
        *rows(by_leaf),
        "",
        f"top {top} Python frames by inclusive share:",
        *rows(inclusive),
    ]
    return "\n".join(lines) + "\n"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def profile(strategy: str, calls: int = CALLS, label: str = "") -> str:
    out = RESULTS / f"profile_getcontext_{strategy}{'.' + label if label else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    port = free_port()
    with redis_process() as redis_server:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "profile_server.py"), str(scratch / "pyi")],
            env={
                **os.environ,
                "STATE_SERVICE_LISTEN": f"127.0.0.1:{port}",
                "STATE_SERVICE_REDIS_URL": redis_server.url,
                "STATE_SERVICE_METRICS_PORT": "0",
                "STATE_SERVICE_LOG_LEVEL": "WARNING",
                "STATE_SERVICE_DEFAULT_CONTEXT_STRATEGY": strategy,
                # The state_service of this tree, whichever is installed.
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            },
            stdout=subprocess.DEVNULL,
        )
        try:
            address = f"127.0.0.1:{port}"
            wait_ready(address)
            async with StateClient(address) as client:
                await client.append_items("bench", MESSAGES)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.StateServiceStub(channel)
                await _calls(stub, 500)
                cpu_before = _cpu_seconds(process.pid)
                plain = await _calls(stub, calls)
                cpu_per_call_us = (_cpu_seconds(process.pid) - cpu_before) / calls * 1e6
                # pyinstrument, inside the process.
                process.send_signal(signal.SIGUSR1)
                await asyncio.sleep(0.2)
                profiled = await _calls(stub, calls)
                process.send_signal(signal.SIGUSR2)
                while not (scratch / "pyi.done").exists():
                    await asyncio.sleep(0.1)
                # py-spy, from outside (no overhead in the process).
                pyspy_raw = scratch / "pyspy.txt"
                pyspy = None
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                if Path(py_spy).exists():
                    pyspy = subprocess.Popen(
                        [
                            py_spy,
                            "record",
                            "--pid",
                            str(process.pid),
                            "--native",
                            "--threads",
                            "--rate",
                            "1000",
                            "--format",
                            "raw",
                            "--output",
                            str(pyspy_raw),
                            "--duration",
                            str(PYSPY_SECONDS),
                        ],  # fmt: skip
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    while pyspy.poll() is None:
                        await _calls(stub, 100)
        finally:
            process.terminate()
            process.wait(10)
    shutil.copy(scratch / "pyi.tree.txt", f"{out}.pyinstrument.tree.txt")
    shutil.copy(scratch / "pyi.flat.txt", f"{out}.pyinstrument.flat.txt")
    summary = (
        f"GetContext cache hit, strategy {strategy}, 20-item session, {calls} sequential calls.\n"
        f"client p50 {plain.p50:.3f} ms without profiler, {profiled.p50:.3f} ms under "
        f"pyinstrument; server process CPU {cpu_per_call_us:.0f} µs per call without profiler.\n"
    )
    if pyspy is not None and pyspy_raw.exists():
        summary += "\n" + _summarize_pyspy(pyspy_raw, cpu_per_call_us)
        Path(f"{out}.pyspy.txt").write_text(summary)
    if os.environ.get("BENCH_PROFILE_KEEP"):
        print(f"raw profiles kept in {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


async def main(args: list[str]) -> None:
    label = ""
    if "--label" in args:
        at = args.index("--label")
        label = args[at + 1]
        del args[at : at + 2]
    for strategy in args or STRATEGIES:
        print(await profile(strategy, label=label))
        print(f"wrote bench/results/profile_getcontext_{strategy}*.txt\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
