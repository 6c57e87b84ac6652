"""1. Sidecar overhead: GetContext of a 20-item session through the state
service, against (a) the gRPC-Python floor (an echo server returning the same
bytes) and (b) direct redis-py (GET + json.loads of the same 20 messages).

statecar is measured with the service's default strategy (tiered; the whole
session fits the default 4,000-token budget, so no summary or retrieval work
is due) and with token_window, on a server with default settings and no
deadline; and as a production caller sees it: token authentication (as every
Kubernetes overlay runs) and the client's 5 s deadline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from bench.common import (
    Stats,
    echo_server,
    interleaved,
    open_loop,
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
TOKEN = "bench-token"
FLOOR, DIRECT = "floor (grpc.aio echo)", "redis-py direct"
TIERED = "statecar tiered (default)"
TOKEN_WINDOW = "statecar token_window"
PRODUCTION = "statecar tiered, token auth + 5 s deadline"


async def run(report: Report, *, count: int = 3000, seconds: float = 5.0) -> None:
    tokens_file = Path(tempfile.mkdtemp()) / "tokens"
    tokens_file.write_text(f"default:{TOKEN}\n")
    with (
        redis_process() as redis_server,
        state_service(redis_server.url) as (address, _),
        state_service(
            redis_server.url,
            STATE_SERVICE_AUTH="token",
            STATE_SERVICE_AUTH_TOKENS_FILE=str(tokens_file),
        ) as (secured_address, _),
    ):
        async with StateClient(address) as client:
            await client.append_items("bench", MESSAGES)
            payload = (await _raw_context(address)).SerializeToString()
        raw = aioredis.from_url(redis_server.url)
        await raw.set("brief:bench", json.dumps(MESSAGES))
        with echo_server(payload) as (echo_address, _):
            async with (
                grpc.aio.insecure_channel(address) as state_channel,
                grpc.aio.insecure_channel(secured_address) as secured_channel,
                grpc.aio.insecure_channel(echo_address) as echo_channel,
            ):
                state = pb_grpc.StateServiceStub(state_channel)
                secured = pb_grpc.StateServiceStub(secured_channel)
                echo = pb_grpc.StateServiceStub(echo_channel)
                request = pb.GetContextRequest(session_id="bench")
                token_window = pb.GetContextRequest(
                    session_id="bench", strategy=pb.CONTEXT_STRATEGY_TOKEN_WINDOW
                )
                credentials = (("authorization", f"Bearer {TOKEN}"),)

                async def via_state() -> object:
                    return await state.GetContext(request)

                async def via_token_window() -> object:
                    return await state.GetContext(token_window)

                async def via_production() -> object:
                    return await secured.GetContext(request, timeout=5.0, metadata=credentials)

                async def via_echo() -> object:
                    return await echo.GetContext(request)

                async def via_redis() -> object:
                    return json.loads(await raw.get("brief:bench") or b"[]")

                calls = {FLOOR: via_echo, DIRECT: via_redis, TIERED: via_state,
                         TOKEN_WINDOW: via_token_window, PRODUCTION: via_production}  # fmt: skip
                sequential = await interleaved(calls, count)
                loaded = {
                    name: await open_loop(call, RATE, seconds) for name, call in calls.items()
                }
        await raw.aclose()
    floor, direct, ours = sequential[FLOOR], sequential[DIRECT], sequential[TIERED]
    rows = [[name, *stats.row(), ratio(stats.p50, floor.p50)] for name, stats in sequential.items()]
    text = (
        "Concurrency 1, %d calls each, the paths interleaved in 10 rounds (ms):\n\n" % count
        + table(["path", "p50", "p90", "p99", "p50 vs floor"], rows)
    )
    load_rows = [
        [name, *stats.row(), f"{achieved:.0f}/s"] for name, (stats, achieved) in loaded.items()
    ]
    text += f"\n\nOpen loop at {RATE:.0f} req/s for {seconds:.0f} s (ms, from scheduled send):\n\n"
    text += table(["path", "p50", "p90", "p99", "achieved"], load_rows)
    ldirect = loaded[DIRECT][0]
    added = []
    for name in (TIERED, TOKEN_WINDOW, PRODUCTION):
        seq, load = sequential[name], loaded[name][0]
        added.append(
            [
                name,
                f"{seq.p50 / floor.p50:.2f}×",
                f"+{seq.p90 - direct.p90:.2f}",
                f"+{seq.p99 - direct.p99:.2f}",
                f"+{load.p90 - ldirect.p90:.2f}",
                f"+{load.p99 - ldirect.p99:.2f}",
            ]
        )
    text += "\n\nAgainst the targets (p50 ≤ 1.3× the floor; added over direct redis-py p90 < 0.75 ms, p99 < 1.5 ms; ms):\n\n"
    text += table(
        [
            "path",
            "p50 vs floor",
            "added p90, c=1",
            "added p99, c=1",
            f"added p90, {RATE:.0f}/s",
            f"added p99, {RATE:.0f}/s",
        ],  # fmt: skip
        added,
    )
    text += (
        f"\n\nstatecar (default strategy) p50 = **{ours.p50 / floor.p50:.2f}× the gRPC floor** "
        "(target ≤ 1.3×). Dapr's published sidecar overhead, for comparison: +0.75 ms p90, "
        "+1.52 ms p99 at 1k qps."
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
    labels = [n.replace(" (", "\n(").replace(", ", ",\n") for n in names]
    ax.set_xticks([i + 0.25 for i in range(len(names))], labels, fontsize=7)  # type: ignore[attr-defined]
    ax.set_ylabel("ms")  # type: ignore[attr-defined]
    ax.set_title("GetContext latency, concurrency 1")  # type: ignore[attr-defined]
    ax.legend()  # type: ignore[attr-defined]
