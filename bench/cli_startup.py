"""7. What the `statecar` command costs beyond the work it asks for.

`statecar --help` against the interpreter's own start (`python -c pass`), and
`statecar chat` against the same turn sent by an `AgentClient` that is already
running (so the difference is the CLI: interpreter, imports, channel set-up,
printing). Runs are interleaved, medians reported, so a noisy neighbour hits
every path alike.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_service.client import AgentClient
from bench.common import table
from bench.report import Report

ROUNDS = 7


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


async def run(report: Report) -> None:
    from agent_service.server import AgentServer
    from agent_service.settings import AgentServiceSettings
    from state_service.server import StateServer
    from state_service.settings import StateServiceSettings

    directory = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    state_values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "data_dir": directory,
        "metrics_port": 0,
    }
    state = await StateServer.start(StateServiceSettings(**state_values))
    agent_values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state_target": state.address,
        "metrics_port": 0,
    }
    agent = await AgentServer.start(AgentServiceSettings(**agent_values))
    cli = [sys.executable, "-m", "agent_service.cli"]
    samples: dict[str, list[float]] = {k: [] for k in ("python", "help", "chat", "client")}
    try:
        async with AgentClient(agent.address) as client:
            await client.chat("warm", "hello")
            for n in range(ROUNDS):
                samples["python"].append(
                    await asyncio.to_thread(_wall, [sys.executable, "-c", "pass"])
                )
                samples["help"].append(await asyncio.to_thread(_wall, [*cli, "--help"]))
                message = f"What is {n} + 1?"
                chat = [*cli, "chat", "--agent-target", agent.address, "--session", f"c{n}"]
                samples["chat"].append(await asyncio.to_thread(_wall, [*chat, message]))
                started = time.perf_counter()
                await client.chat(f"k{n}", message)
                samples["client"].append(time.perf_counter() - started)
    finally:
        await agent.stop(grace=0)
        await state.stop(grace=0)
    median = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    rows = [
        ["python -c pass (interpreter floor)", f"{median['python']:.0f}", "–"],
        ["statecar --help", f"{median['help']:.0f}", f"+{median['help'] - median['python']:.0f}"],
        ["one turn, AgentClient already running", f"{median['client']:.0f}", "–"],
        [
            "statecar chat (same turn)",
            f"{median['chat']:.0f}",
            f"+{median['chat'] - median['client']:.0f}",
        ],
    ]
    overhead = median["chat"] - median["client"]
    text = (
        f"Medians of {ROUNDS} interleaved rounds (ms); the offline model, an in-process stack:\n\n"
        + table(["path", "wall ms", "CLI overhead ms"], rows)
        + f"\n\n`statecar chat` adds **{overhead:.0f} ms** to a turn (target < 1,000 ms): "
        "the interpreter, the client imports and one connection; only `statecar up` imports "
        "the servers and openai-agents."
    )
    report.add("7. Command-line start-up", text)


if __name__ == "__main__":
    asyncio.run(run(Report()))
