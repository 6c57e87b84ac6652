"""Two-agent handoff workflows: one session per agent plus the shared
workflow state in the state service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agent_service.client import (
    AgentClient,
    AgentServiceError,
    ChatResult,
    HandoffEvent,
    TextDelta,
)
from state_service.client import StateClient
from tests.conftest import AgentServerFactory, write_agents_file

AGENTS = """
default_agent: triage
agents:
  - name: triage
    description: Answers general questions and routes billing questions.
    instructions: Route billing questions to the billing agent.
    handoffs: [billing]
  - name: billing
    description: Invoices, refunds and payments.
    instructions: You handle billing.
    tools: [calculate]
    handoffs: [triage]
"""


@pytest.fixture
async def agents(agent_server_factory: AgentServerFactory, tmp_path: Path) -> AgentClient:
    server = await agent_server_factory(agents_config=write_agents_file(tmp_path, AGENTS))
    return AgentClient(server.address, timeout=10)


async def test_handoff_moves_the_workflow_and_seeds_the_next_agent(
    agents: AgentClient, client: StateClient
) -> None:
    async with agents:
        first = await agents.chat("", "Hello, I have a question.", workflow_id="wf1")
        assert first.agent == "triage"
        assert first.workflow is not None
        assert first.workflow.current_stage == "triage"
        assert first.workflow.agent_sessions == {"triage": "wf1.triage"}

        handed = await agents.chat("", "My billing address is wrong", workflow_id="wf1")
        assert handed.agent == "billing"
        assert handed.session_id == "wf1.triage"
        workflow = handed.workflow
        assert workflow is not None
        assert workflow.current_stage == "billing"
        assert workflow.agent_sessions == {"triage": "wf1.triage", "billing": "wf1.billing"}
        assert workflow.results["billing"] == handed.reply
        assert [i.agent for i in handed.items] == ["triage", "triage", "triage", "billing"]

        # The triage session holds the whole turn, handoff included.
        triage_log = [i.data for i in await client.all_items("wf1.triage")]
        assert [d.get("type", "message") for d in triage_log[2:]] == [
            "message",
            "function_call",
            "function_call_output",
            "message",
        ]
        assert triage_log[3]["name"] == "transfer_to_billing"
        # The billing session starts with the question it was handed and its answer.
        billing_log = [i.data for i in await client.all_items("wf1.billing")]
        assert billing_log[0] == {"role": "user", "content": "My billing address is wrong"}
        assert billing_log[1]["role"] == "assistant"

        # The next turn goes to billing, on its own session.
        follow_up = await agents.chat("", "What is 120 * 0.2?", workflow_id="wf1")
        assert follow_up.agent == "billing"
        assert follow_up.session_id == "wf1.billing"
        assert "24" in follow_up.reply
        assert len(await client.all_items("wf1.billing")) == 6

        state = await agents.get_workflow("wf1")
        assert state.current_stage == "billing"
        assert state.etag == follow_up.workflow.etag if follow_up.workflow else False


async def test_a_streamed_workflow_turn_streams_the_handoff_as_it_happens(
    agents: AgentClient, client: StateClient
) -> None:
    async with agents:
        events = [
            e
            async for e in agents.stream_chat("", "My billing address is wrong", workflow_id="wf5")
        ]
    *streamed, final = events
    assert isinstance(final, ChatResult)
    assert HandoffEvent("triage", "billing") in streamed
    deltas = [e.text for e in streamed if isinstance(e, TextDelta)]
    assert len(deltas) > 1  # word by word, not the reply in one piece
    assert "".join(deltas) == final.reply
    assert final.workflow is not None and final.workflow.current_stage == "billing"
    assert len(await client.all_items("wf5.billing")) == 2  # seeded, as in Chat


async def test_a_retried_handoff_turn_is_stored_once(
    agents: AgentClient, client: StateClient
) -> None:
    async with agents:
        first = await agents.chat("", "billing help please", workflow_id="wf2", request_id="x")
        again = await agents.chat("", "billing help please", workflow_id="wf2", request_id="x")
    assert again.replayed
    assert again.agent == first.agent == "billing"
    assert len(await client.all_items("wf2.triage")) == 4
    assert len(await client.all_items("wf2.billing")) == 2


async def test_update_workflow_is_etag_checked(agents: AgentClient) -> None:
    async with agents:
        await agents.chat("", "hello", workflow_id="wf3")
        current = await agents.get_workflow("wf3")
        moved = await agents.update_workflow(
            "wf3", current_stage="billing", results={"note": "escalated"}, etag=current.etag
        )
        assert moved.current_stage == "billing"
        assert moved.results == {"note": "escalated"}
        assert moved.agent_sessions["billing"] == "wf3.billing"
        with pytest.raises(AgentServiceError) as stale:
            await agents.update_workflow("wf3", current_stage="triage", etag=current.etag)
        assert stale.value.code == grpc.StatusCode.ABORTED
        with pytest.raises(AgentServiceError) as unknown:
            await agents.update_workflow("wf3", current_stage="nobody")
        assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(AgentServiceError) as missing:
            await agents.get_workflow("never")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(AgentServiceError) as both:
            await agents.chat("s", "hello", workflow_id="wf3")
        assert both.value.code == grpc.StatusCode.INVALID_ARGUMENT
