"""Tokens the model is sent per turn under `Runner.run`: StateServiceSession
with the whole log (RedisSession's behaviour) against a budgeted one, on the
same state service, with a scripted model that records its input.

    python -m bench.budgeted_session [--turns 500] [--budget 4000]

Tokens are counted as the state service counts them (tiktoken's o200k_base
when its file is cached offline, else the estimate)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from agents import Agent, RunConfig, Runner
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message

from bench.common import closed_loop, ratio, redis_process, state_service, table
from state_service.client import StateClient, StateServiceSession
from state_service.tokens import make_token_counter

CHECKPOINTS = (10, 50, 100, 250, 500, 1000, 2000)


def user_text(n: int) -> str:
    return f"Turn {n}: a question about order A{n}, shipped to warehouse {n % 17}, please check."


def recording_model(turns: int, sent: list[list[Any]]) -> ScriptedModel:
    def respond(call: ModelCall) -> list[Any]:
        sent.append(json.loads(json.dumps(call.input)))
        n = len(sent)
        return [assistant_message(f"Order A{n} is on its way, arriving soon.", item_id=f"m{n}")]

    return ScriptedModel([ModelStep.respond(respond) for _ in range(turns)])


async def main(turns: int, budget: int) -> None:
    counter = make_token_counter("auto")

    def tokens(items: list[Any]) -> int:
        return sum(
            counter.count(json.dumps(i, ensure_ascii=False, separators=(",", ":")).encode())
            for i in items
        )

    config = RunConfig(tracing_disabled=True)
    with redis_process() as redis_server, state_service(redis_server.url) as (address, _):
        async with StateClient(address) as client:
            sessions = {
                "whole log": StateServiceSession("whole", client=client),
                f"budget {budget}": StateServiceSession(
                    "budgeted", client=client, token_budget=budget
                ),
            }
            sent: dict[str, list[list[Any]]] = {name: [] for name in sessions}
            for name, session in sessions.items():
                agent = Agent(
                    name="bench", instructions="Answer.", model=recording_model(turns, sent[name])
                )
                for n in range(turns):
                    await Runner.run(agent, user_text(n), session=session, run_config=config)
            rows = []
            whole, budgeted = (sent[name] for name in sessions)
            for turn in (t for t in CHECKPOINTS if t <= turns):
                a, b = tokens(whole[turn - 1]), tokens(budgeted[turn - 1])
                rows.append([str(turn), str(a), str(b), ratio(b, a)])
            print(f"tokens sent to the model per turn ({counter.name}):")
            print(table(["turn", "whole log", f"budget {budget}", "budgeted / whole"], rows))
            rows = []
            for name, session in sessions.items():
                stats = await closed_loop(session.get_items, 200, warmup=20)
                rows.append([name, *stats.row()])
            print(f"\nget_items() at {turns} turns ({2 * turns} items), ms:")
            print(table(["session", "p50", "p90", "p99"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--budget", type=int, default=4000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.turns, arguments.budget))
