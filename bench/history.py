"""2. Append cost vs history length, and 3. per-turn state cost (context +
append), statecar against openai-agents' RedisSession and the design brief's
GET-JSON / SETEX-JSON pattern, all on the same Redis."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from agents.extensions.memory.redis_session import RedisSession

from bench.common import closed_loop, ratio, redis_process, state_service, table
from bench.report import Report
from state_service.client import StateClient

LENGTHS = (10, 100, 1_000, 10_000)
TURN_LENGTHS = (20, 1_000, 10_000)


def message(n: int) -> dict[str, Any]:
    role = "user" if n % 2 == 0 else "assistant"
    return {"role": role, "content": f"message {n}: " + "some words of a conversation " * 6}


async def _prefill(
    client: StateClient, redis_session: RedisSession, raw: Any, sid: str, n: int
) -> None:
    history = [message(i) for i in range(n)]
    for start in range(0, n, 1000):
        await client.append_items(sid, history[start : start + 1000])
    await redis_session.add_items(history)  # type: ignore[arg-type]
    await raw.set(f"brief:{sid}", json.dumps(history))


async def run(report: Report, *, count: int = 300) -> None:
    appends: dict[str, dict[int, float]] = {
        "statecar": {},
        "RedisSession": {},
        "brief GET/SETEX": {},
    }
    turns: dict[str, dict[int, float]] = {
        "statecar": {},
        "statecar token_window": {},
        "RedisSession": {},
    }
    with redis_process() as redis_server, state_service(redis_server.url) as (address, _):
        raw = aioredis.from_url(redis_server.url)
        async with StateClient(address) as client:
            for n in sorted(set(LENGTHS) | set(TURN_LENGTHS)):
                sid = f"h{n}"
                redis_session = RedisSession(sid, redis_client=raw, key_prefix="bench")
                await _prefill(client, redis_session, raw, sid, n)
                turn = [message(n), message(n + 1)]

                async def ours_append() -> object:
                    return await client.append_items(sid, turn[:1])

                async def theirs_append() -> None:
                    await redis_session.add_items(turn[:1])  # type: ignore[arg-type]

                async def brief_append() -> None:
                    # The brief's stateless sketch: read, append, trim to 40, rewrite.
                    history = json.loads(await raw.get(f"brief:{sid}") or b"[]")
                    history.append(turn[0])
                    await raw.setex(f"brief:{sid}", 3600, json.dumps(history))

                async def ours_turn() -> object:
                    context = await client.get_context(sid, token_budget=4000)
                    return await client.append_items(sid, turn, etag=context.etag)

                async def ours_window_turn() -> object:
                    context = await client.get_context(
                        sid, token_budget=4000, strategy="token_window"
                    )
                    return await client.append_items(sid, turn, etag=context.etag)

                async def theirs_turn() -> None:
                    await redis_session.get_items()
                    await redis_session.add_items(turn)  # type: ignore[arg-type]

                # The brief's pattern rewrites all n items per call: fewer calls at 10k.
                brief_count = count if n <= 1000 else max(30, count // 10)
                if n in LENGTHS:
                    appends["statecar"][n] = (await closed_loop(ours_append, count, 20)).p50
                    appends["RedisSession"][n] = (await closed_loop(theirs_append, count, 20)).p50
                    appends["brief GET/SETEX"][n] = (
                        await closed_loop(brief_append, brief_count, 5)
                    ).p50
                if n in TURN_LENGTHS:
                    turns["statecar"][n] = (await closed_loop(ours_turn, count // 2, 20)).p50
                    turns["statecar token_window"][n] = (
                        await closed_loop(ours_window_turn, count // 2, 20)
                    ).p50
                    turn_count = count // 2 if n <= 1000 else max(30, count // 10)
                    turns["RedisSession"][n] = (await closed_loop(theirs_turn, turn_count, 5)).p50
        await raw.aclose()

    rows = [
        [
            name,
            *(f"{values[n]:.3f}" for n in LENGTHS),
            ratio(values[LENGTHS[-1]], values[LENGTHS[0]]),
        ]
        for name, values in appends.items()
    ]
    text = "p50 ms of appending one item to a session of n items:\n\n" + table(
        ["store", *(f"n={n:,}" for n in LENGTHS), "10k vs 10"], rows
    )
    ours = appends["statecar"]
    text += (
        f"\n\nstatecar at 10,000 items = **{ours[10_000] / ours[10]:.2f}× its cost at 10** "
        "(target ≤ 1.2×): the append is one Lua step over RPUSH, O(items appended)."
    )
    text += "\n\n" + report.plot(
        "append_cost", lambda ax: _lines(ax, appends, LENGTHS, "append p50 (ms)")
    )
    report.add("2. Append cost vs history length", text)

    rows = [[name, *(f"{values[n]:.3f}" for n in TURN_LENGTHS)] for name, values in turns.items()]
    for name in ("statecar", "statecar token_window"):
        rows.append(
            [
                f"{name} / RedisSession",
                *(ratio(turns[name][n], turns["RedisSession"][n]) for n in TURN_LENGTHS),
            ]
        )
    text = (
        "p50 ms of one turn's state work: statecar GetContext(4k tokens) + AppendItems(etag) vs "
        "RedisSession get_items() + add_items(). `statecar` uses the default strategy (tiered: "
        "summary and BM25 retrieval of older items once the log exceeds the budget), "
        "`statecar token_window` asks for the newest items that fit:\n\n"
        + table(["", *(f"n={n:,}" for n in TURN_LENGTHS)], rows)
    )
    ratio_10k = turns["statecar"][10_000] / turns["RedisSession"][10_000]
    window_10k = turns["statecar token_window"][10_000] / turns["RedisSession"][10_000]
    text += (
        f"\n\nAt 10,000 items statecar costs **{ratio_10k:.2f}× RedisSession** with tiered and "
        f"**{window_10k:.2f}×** with token_window (target ≤ 0.25×)."
    )
    text += "\n\n" + report.plot(
        "turn_cost", lambda ax: _lines(ax, turns, TURN_LENGTHS, "turn p50 (ms)")
    )
    report.add("3. Per-turn state cost (context + append)", text)


def _lines(ax: Any, series: dict[str, dict[int, float]], xs: tuple[int, ...], ylabel: str) -> None:
    for name, values in series.items():
        ax.plot(list(xs), [values[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items in the session")
    ax.set_ylabel(ylabel)
    ax.legend()
