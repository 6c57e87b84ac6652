"""The agent service's metrics: its gRPC server and its calls to the state
service (grpc_server_* / grpc_client_*), turns by outcome, tokens, tools,
handoffs; promtool-clean, no session ids or content."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_service.client import AgentClient, AgentServiceError
from state_service.storage.embedded import free_port
from tests.conftest import AgentServerFactory, write_agents_file
from tests.helpers import metric, scrape
from tests.prometheus import promtool

AGENTS = """
agents:
  - name: triage
    tools: [calculate]
    handoffs: [billing]
  - name: billing
"""


async def test_turns_tools_handoffs_and_state_calls_are_counted(
    agent_server_factory: AgentServerFactory, tmp_path: Path
) -> None:
    server = await agent_server_factory(agents_config=write_agents_file(tmp_path, AGENTS))
    before = {
        "ok": metric("statecar_agent_turns_total", agent="triage", outcome="ok"),
        "replayed": metric("statecar_agent_turns_total", agent="triage", outcome="replayed"),
        "calculate": metric("statecar_agent_tool_calls_total", tool="calculate"),
        "handoffs": metric(
            "statecar_agent_handoffs_total", from_agent="triage", to_agent="billing"
        ),
        "appends": metric(
            "grpc_client_handled_total",
            grpc_type="unary",
            grpc_service="statecar.state.v1.StateService",
            grpc_method="AppendItems",
            grpc_code="OK",
        ),
        "chats": metric(
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="statecar.agent.v1.AgentService",
            grpc_method="Chat",
            grpc_code="InvalidArgument",
        ),
        "input": metric("statecar_agent_tokens_total", kind="input"),
    }
    async with AgentClient(server.address) as agents:
        await agents.chat("m1", "What is 2 + 2?", request_id="q1")
        await agents.chat("m1", "What is 2 + 2?", request_id="q1")  # replayed
        await agents.chat("m2", "a billing question")
        with pytest.raises(AgentServiceError):
            await agents.chat("bad id!", "hi")
    assert metric("statecar_agent_turns_total", agent="triage", outcome="ok") - before["ok"] == 2
    replayed = metric("statecar_agent_turns_total", agent="triage", outcome="replayed")
    assert replayed - before["replayed"] == 1
    assert metric("statecar_agent_tool_calls_total", tool="calculate") - before["calculate"] == 1
    handoffs = metric("statecar_agent_handoffs_total", from_agent="triage", to_agent="billing")
    assert handoffs - before["handoffs"] == 1
    appends = metric(
        "grpc_client_handled_total",
        grpc_type="unary",
        grpc_service="statecar.state.v1.StateService",
        grpc_method="AppendItems",
        grpc_code="OK",
    )
    assert appends - before["appends"] == 2  # the replayed turn was found in the context
    invalid = metric(
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service="statecar.agent.v1.AgentService",
        grpc_method="Chat",
        grpc_code="InvalidArgument",
    )
    assert invalid - before["chats"] == 1
    assert metric("statecar_agent_tokens_total", kind="input") > before["input"]


async def test_agent_metrics_endpoint_is_promtool_clean_and_carries_no_ids(
    agent_server_factory: AgentServerFactory,
) -> None:
    port = free_port()
    server = await agent_server_factory(metrics_port=port)
    assert server.metrics_port == port
    async with AgentClient(server.address) as agents:
        await agents.chat("private-session-42", "my secret is swordfish", request_id="rq-77")
    text = await scrape(port)
    for name in (
        "statecar_agent_turns_total",
        "statecar_agent_model_latency_seconds",
        "statecar_agent_tokens_total",
        "statecar_agent_build_info",
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Chat"',
        'grpc_client_handled_total{grpc_code="OK",grpc_method="AppendItems"',
    ):
        assert name in text, name
    for secret in ("private-session-42", "swordfish", "rq-77"):
        assert secret not in text, secret
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""
    await server.stop(grace=0.5)
