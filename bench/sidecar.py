"""1. Sidecar overhead: GetContext of a 20-item session through the state
service, against (a) the gRPC-Python floor (an echo server returning the same
bytes) and (b) direct redis-py (GET + json.loads of the same 20 messages)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from bench.common import (
    Stats,
    closed_loop,
    open_loop,
    python_server,
    ratio,
    redis_process,
    state_service,
    table,
)
from bench.report import Report
from state_service.client import StateClient
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

MESSAGES = [
    {
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"message {i} " + "lorem ipsum " * 12,
    }
    for i in range(20)
]
RATE = 1000.0


async def run(report: Report, *, count: int = 3000, seconds: float = 5.0) -> None:
    with redis_process() as redis_server, state_service(redis_server.url) as (address, _):
        async with StateClient(address) as client:
            await client.append_items("bench", MESSAGES)
            payload = (await _raw_context(address)).SerializeToString()
        raw = aioredis.from_url(redis_server.url)
        await raw.set("brief:bench", json.dumps(MESSAGES))
        payload_file = Path(tempfile.mkdtemp()) / "payload.bin"
        payload_file.write_bytes(payload)
        with python_server("echo_server.py", str(payload_file)) as (echo_address, _):
            async with (
                grpc.aio.insecure_channel(address) as state_channel,
                grpc.aio.insecure_channel(echo_address) as echo_channel,
            ):
                state = pb_grpc.StateServiceStub(state_channel)
                echo = pb_grpc.StateServiceStub(echo_channel)
                request = pb.GetContextRequest(session_id="bench")

                async def via_state() -> object:
                    return await state.GetContext(request)

                async def via_echo() -> object:
                    return await echo.GetContext(request)

                async def via_redis() -> object:
                    return json.loads(await raw.get("brief:bench") or b"[]")

                calls = {"floor (grpc.aio echo)": via_echo, "redis-py direct": via_redis,
                         "statecar (cache hit)": via_state}  # fmt: skip
                sequential = {name: await closed_loop(call, count) for name, call in calls.items()}
                loaded = {
                    name: await open_loop(call, RATE, seconds) for name, call in calls.items()
                }
        await raw.aclose()
    floor, direct, ours = (sequential[k] for k in calls)
    rows = [[name, *stats.row(), ratio(stats.p50, floor.p50)] for name, stats in sequential.items()]
    text = "Concurrency 1, %d calls each (ms):\n\n" % count + table(
        ["path", "p50", "p90", "p99", "p50 vs floor"], rows
    )
    load_rows = [
        [name, *stats.row(), f"{achieved:.0f}/s"] for name, (stats, achieved) in loaded.items()
    ]
    text += f"\n\nOpen loop at {RATE:.0f} req/s for {seconds:.0f} s (ms, from scheduled send):\n\n"
    text += table(["path", "p50", "p90", "p99", "achieved"], load_rows)
    lstate, ldirect = loaded["statecar (cache hit)"][0], loaded["redis-py direct"][0]
    text += (
        f"\n\nstatecar p50 = **{ours.p50 / floor.p50:.2f}× the gRPC floor** (target ≤ 1.3×). "
        f"Added over direct redis-py at concurrency 1: p90 +{ours.p90 - direct.p90:.2f} ms, "
        f"p99 +{ours.p99 - direct.p99:.2f} ms; at {RATE:.0f} req/s: "
        f"p90 +{lstate.p90 - ldirect.p90:.2f} ms, p99 +{lstate.p99 - ldirect.p99:.2f} ms "
        "(Dapr's published sidecar overhead: +0.75 ms p90, +1.52 ms p99 at 1k qps; "
        "targets < 0.75 / < 1.5 ms)."
    )
    text += "\n\n" + report.plot(
        "sidecar_latency",
        lambda ax: _bars(ax, sequential),
    )
    report.add("1. Sidecar overhead (GetContext, 20 items)", text)


async def _raw_context(address: str) -> pb.GetContextResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: pb.GetContextResponse = await pb_grpc.StateServiceStub(channel).GetContext(
            pb.GetContextRequest(session_id="bench")
        )
        return response


def _bars(ax: object, stats: dict[str, Stats]) -> None:
    names = list(stats)
    for offset, (label, attr) in enumerate((("p50", "p50"), ("p90", "p90"), ("p99", "p99"))):
        ax.bar(  # type: ignore[attr-defined]
            [i + offset * 0.25 for i in range(len(names))],
            [getattr(stats[n], attr) for n in names],
            width=0.25,
            label=label,
        )
    ax.set_xticks([i + 0.25 for i in range(len(names))], names)  # type: ignore[attr-defined]
    ax.set_ylabel("ms")  # type: ignore[attr-defined]
    ax.set_title("GetContext latency, concurrency 1")  # type: ignore[attr-defined]
    ax.legend()  # type: ignore[attr-defined]
