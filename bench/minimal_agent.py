"""The least a Python turn server can do per turn: bench/turn_cost.py's lower
bound for issue 17's "agent-service CPU per turn at most twice the SDK floor".

    MINIMAL_AGENT_LISTEN=... MINIMAL_AGENT_REDIS_URL=... python -m bench.minimal_agent

(MINIMAL_AGENT_REDIS_URL empty: no write, to see gRPC's part alone.)

A grpc.aio server with one method, AgentService.Chat, that per call:

- takes the conversation from its own memory (no state read: the most a
  context cache can save), the newest 20 items, as an n=20 turn hands the SDK;
- runs `Runner.run` on them with the fixed-reply model (fixed_reply_agent.py);
- stores the turn's items with one Redis command (RPUSH, no pipeline, no
  script, no idempotency or concurrency check), as durable as statecar's
  writes (the same redis-server);
- answers a ChatResponse with the reply.

No validation, metrics, logging, tenants, deadlines, retries, compression or
conflict detection: everything statecar's turn does beyond this is what the
agent service costs over the bound. What this server costs is what any
Python design pays before it does anything of its own: the SDK on the
conversation, gRPC-Python and redis-py.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import grpc
import redis.asyncio as aioredis
from agents import Agent, RunConfig, Runner

from agent_service.models.offline import OfflineModel
from bench.fixed_reply_agent import use_fixed_replies
from bench.turn_cost import _history as history
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc

INPUT_ITEMS = 20


class MinimalAgent(pb_grpc.AgentServiceServicer):  # only Chat is called
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._agent = Agent(name="bench", instructions="Answer briefly.", model=OfflineModel())
        self._config = RunConfig(tracing_disabled=True)
        self._sessions: dict[str, list[Any]] = {}

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        items = self._sessions.setdefault(request.session_id, history(INPUT_ITEMS))
        user: Any = {"role": "user", "content": request.message}
        result = await Runner.run(
            self._agent, [*items[-INPUT_ITEMS:], user], run_config=self._config
        )
        new = [user, *(item.to_input_item() for item in result.new_items)]
        if self._redis is not None:
            await self._redis.rpush(
                f"minimal:{request.session_id}", *(json.dumps(item) for item in new)
            )
        items.extend(new)
        del items[:-INPUT_ITEMS]
        return pb.ChatResponse(reply=str(result.final_output or ""), agent=self._agent.name)


async def main() -> None:
    address, redis_url = os.environ["MINIMAL_AGENT_LISTEN"], os.environ["MINIMAL_AGENT_REDIS_URL"]
    use_fixed_replies()
    redis = aioredis.from_url(redis_url) if redis_url else None
    server = grpc.aio.server()
    pb_grpc.add_AgentServiceServicer_to_server(MinimalAgent(redis), server)  # type: ignore[abstract]
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
