"""Property-based fuzzing of every AgentService RPC (hypothesis): random,
oversized and malformed sessions, messages, agents, request ids, workflows,
results JSON and etags. Never INTERNAL/UNKNOWN, and a refused request leaves
Redis exactly as it was (DEBUG DIGEST of the whole dataset)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from hypothesis import strategies as st

from state_service.storage.embedded import EmbeddedRedis, free_port
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc
from tests.conftest import write_agents_file
from tests.fuzzing import fuzz
from tests.threaded import threaded_agent_server, threaded_state_server

pytestmark = pytest.mark.slow

EXAMPLES_PER_RPC = 1000  # 5 RPCs -> 5,000 cases

AGENTS = """
agents:
  - name: triage
    tools: [calculate, current_time, save_note, list_notes]
    handoffs: [billing]
  - name: billing
    tools: [calculate]
"""

ids = st.one_of(
    st.sampled_from(["s1", "wf1", "a.b:c@d=e-f_g"]),
    st.from_regex(r"[A-Za-z0-9._:@=-]{1,16}", fullmatch=True),
    st.text(max_size=20),
    st.text(min_size=250, max_size=300, alphabet="ab"),
)
messages = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["What is 2 + 3?", "billing please", "Remember: x", "list notes", "time?"]),
    st.just("x" * 40_000),
)
agent_names = st.one_of(st.just(""), st.sampled_from(["triage", "billing"]), st.text(max_size=20))
request_ids = st.one_of(st.just(""), st.text(max_size=140), st.uuids().map(str))
results = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3).map(
        lambda d: json.dumps(d).encode()
    ),
    st.sampled_from([b"[]", b"null", b"{" * 3000, b'{"a":"\xff"}']),
)
etags = st.one_of(st.just(""), st.text(max_size=40), st.from_regex(r"[0-9a-f]{4,16}\.[0-9]{1,3}"))

turn_fields: dict[str, Any] = {
    "session_id": st.one_of(st.just(""), ids),
    "message": messages,
    "agent": agent_names,
    "request_id": request_ids,
    "workflow_id": st.one_of(st.just(""), st.just(""), ids),
}
REQUESTS: dict[str, Any] = {
    "Chat": st.builds(pb.ChatRequest, **turn_fields),
    "StreamChat": st.builds(pb.StreamChatRequest, **turn_fields),
    "ListAgents": st.just(pb.ListAgentsRequest()),
    "GetWorkflow": st.builds(pb.GetWorkflowRequest, workflow_id=ids),
    "UpdateWorkflow": st.builds(
        pb.UpdateWorkflowRequest,
        workflow_id=ids,
        current_stage=agent_names,
        results_json=results,
        etag=etags,
    ),
}


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, redis.Redis]]:
    directory: Path = tmp_path_factory.mktemp("agent-fuzz")
    config = write_agents_file(directory, AGENTS)
    with (
        EmbeddedRedis(directory / "redis", port=free_port()) as server,
        # No background summarizer: its commits would change the digest
        # between "before" and "after" of a refused request.
        threaded_state_server(server.url, summarizer="none") as state,
        threaded_agent_server(state.address, agents_config=config) as agent,
        grpc.insecure_channel(agent.address) as channel,
    ):
        stub = pb_grpc.AgentServiceStub(channel)
        stub.Chat(pb.ChatRequest(workflow_id="wf1", message="billing please"))
        stub.Chat(pb.ChatRequest(session_id="s1", message="hello"))
        digest_client = redis.Redis.from_url(server.url)
        yield stub, digest_client
        digest_client.close()


@pytest.mark.parametrize("rpc", sorted(REQUESTS))
def test_fuzz_rpc(fuzz_target: tuple[Any, redis.Redis], rpc: str) -> None:
    stub, digest_client = fuzz_target
    fuzz(stub, digest_client, rpc, REQUESTS[rpc], EXAMPLES_PER_RPC)
