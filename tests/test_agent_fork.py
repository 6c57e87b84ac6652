"""Rewinding a conversation through the agent API and the CLI: real agent and
state servers on loopback, real Redis, the offline model."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest

from agent_service.client import AgentClient, AgentServiceError
from agent_service.server import AgentServer
from state_service.client import SessionNotFoundError, StateClient


async def test_resend_from_an_earlier_turn_in_a_fork(
    agents: AgentClient, client: StateClient
) -> None:
    await agents.chat("s", "My name is Ada and I live in London.")
    second = await agents.chat("s", "I live in Paris now.")
    resend_at = second.items[0].seq  # the user message to say differently
    original = await client.all_items("s")

    forked = await agents.fork_session("s", "s-alt", before_seq=resend_at, request_id="r1")
    assert (forked.session_id, forked.copied_items, forked.replayed) == ("s-alt", 2, False)
    assert forked.last_seq == resend_at - 1
    again = await agents.fork_session("s", "s-alt", before_seq=resend_at, request_id="r1")
    assert again.replayed and again.etag == forked.etag

    reply = await agents.chat("s-alt", "Where do I live?")
    assert "London" in reply.reply  # the fork never saw the Paris turn
    assert reply.items[0].seq == resend_at
    assert await client.all_items("s") == original
    copied = await client.all_items("s-alt")
    assert [i.data for i in copied[:2]] == [i.data for i in original[:2]]


async def test_a_cut_between_a_tool_call_and_its_output_is_refused(
    agents: AgentClient, client: StateClient
) -> None:
    result = await agents.chat("s", "What is (17 + 5) * 3?")
    output = next(i for i in result.items if i.type == "function_call_output")
    with pytest.raises(AgentServiceError) as refused:
        await agents.fork_session("s", "cut", before_seq=output.seq)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.metadata["field"] == "before_seq"
    with pytest.raises(SessionNotFoundError):
        await client.get_session("cut")  # the refused fork was removed again
    # Cutting after the whole turn is fine.
    whole = await agents.fork_session("s", "whole")
    assert whole.copied_items == len(result.items)


async def test_fork_errors(agents: AgentClient, client: StateClient) -> None:
    await agents.chat("s", "Hello.")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[str, str, int, grpc.StatusCode, str | None]] = [
        ("nope", "n", 0, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
        ("s", "s", 0, grpc.StatusCode.ALREADY_EXISTS, "SESSION_ALREADY_EXISTS"),
        ("s", "n", 1, invalid, "INVALID_FIELD"),
        ("s", "n", 9, invalid, "INVALID_FIELD"),
        ("s", "n", -2, invalid, "INVALID_FIELD"),
        ("s", "bad id", 0, invalid, "INVALID_FIELD"),
    ]
    for source, new, before, code, reason in cases:
        with pytest.raises(AgentServiceError) as raised:
            await agents.fork_session(source, new, before_seq=before)
        assert (raised.value.code, raised.value.reason) == (code, reason), (source, new, before)
    assert {s.session_id for s in (await client.list_sessions()).sessions} == {"s"}


async def test_cli_fork_then_resend(agent_server: AgentServer, client: StateClient) -> None:
    async with AgentClient(agent_server.address) as agents:
        await agents.chat("s", "My name is Ada and I live in London.")
        await agents.chat("s", "I live in Paris now.")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_service.cli",
        "fork",
        "--session",
        "s",
        "--before-seq",
        "3",
        "--new-session",
        "t",
        "--agent-target",
        agent_server.address,
        "Where do I live?",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "forked s into t: 2 items up to seq 2" in text
    assert "London" in text
    stored = await client.all_items("t")
    assert [i.seq for i in stored] == [1, 2, 3, 4]
    assert stored[2].data == {"role": "user", "content": "Where do I live?"}
