"""Property-based fuzzing of every StateService RPC (hypothesis): random,
oversized, deeply nested, invalid UTF-8, huge metadata, bogus sizes, tokens and
etags. Whatever comes in: never INTERNAL/UNKNOWN, and a refused request leaves
Redis exactly as it was (DEBUG DIGEST of the whole dataset)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, field_mask_pb2
from hypothesis import strategies as st

from state_service.storage.embedded import EmbeddedRedis
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc
from tests.fuzzing import fuzz
from tests.threaded import threaded_state_server

pytestmark = pytest.mark.slow

EXAMPLES_PER_RPC = 1000  # 11 RPCs -> 11,000 cases

session_ids = st.one_of(
    st.sampled_from(["s1", "s2", "wf", "a.b:c@d=e-f_g"]),
    st.from_regex(r"[A-Za-z0-9._:@=-]{1,16}", fullmatch=True),
    st.text(max_size=20),
    st.text(min_size=250, max_size=300, alphabet="ab"),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
item_json = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(json.dumps),
    st.text(max_size=64),
    st.sampled_from(["", "[]", "null", '{"a":NaN}', "{" * 5000, '{"x":1}']),
    st.integers(min_value=1, max_value=3).map(lambda n: '{"a":' + "[" * (n * 4000) + "}"),
    st.just('{"big":"' + "x" * 300_000 + '"}'),
)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
    st.just({f"k{i}": "v" for i in range(100)}),
    st.just({"k": "v" * 10_000}),
)
items = st.lists(st.builds(pb.Item, json=item_json, metadata=metadata), max_size=4) | st.just(
    [pb.Item(json='{"a":1}')] * 1001
)
etags = st.one_of(
    st.just(""), st.just("0"), st.text(max_size=40), st.from_regex(r"[0-9a-f]{4,16}\.[0-9]{1,3}")
)
request_ids = st.one_of(st.just(""), st.text(max_size=140), st.uuids().map(str))
page_sizes = st.integers(min_value=-(2**31), max_value=2**31 - 1)
tokens = st.one_of(st.just(""), st.text(max_size=60), st.binary(max_size=40).map(bytes.hex))
durations = st.builds(
    duration_pb2.Duration,
    seconds=st.integers(min_value=-(10**12), max_value=10**12),
    nanos=st.integers(min_value=0, max_value=999_999_999),
)

REQUESTS: dict[str, Any] = {
    "AppendItems": st.builds(
        pb.AppendItemsRequest,
        session_id=session_ids,
        items=items,
        request_id=request_ids,
        etag=etags,
    ),
    "GetContext": st.builds(
        pb.GetContextRequest,
        session_id=session_ids,
        query=st.text(max_size=50),
        token_budget=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    ),
    "ListItems": st.builds(
        pb.ListItemsRequest,
        session_id=session_ids,
        page_size=page_sizes,
        page_token=tokens,
        order=st.integers(min_value=-3, max_value=5),
    ),
    "PopItem": st.builds(
        pb.PopItemRequest, session_id=session_ids, etag=etags, request_id=request_ids
    ),
    "GetSession": st.builds(pb.GetSessionRequest, session_id=session_ids),
    "UpdateSession": st.builds(
        pb.UpdateSessionRequest,
        session_id=session_ids,
        settings=st.builds(pb.SessionSettings, ttl=durations, persist=st.booleans()),
        update_mask=st.builds(
            field_mask_pb2.FieldMask,
            paths=st.lists(st.sampled_from(["ttl", "persist", "settings.ttl", "x"]), max_size=2),
        ),
        etag=etags,
        allow_missing=st.booleans(),
    ),
    "DeleteSession": st.builds(
        pb.DeleteSessionRequest, session_id=session_ids, etag=etags, allow_missing=st.booleans()
    ),
    "ListSessions": st.builds(pb.ListSessionsRequest, page_size=page_sizes, page_token=tokens),
    "GetWorkflow": st.builds(pb.GetWorkflowRequest, workflow_id=session_ids),
    "UpdateWorkflow": st.builds(
        pb.UpdateWorkflowRequest,
        workflow=st.builds(
            pb.Workflow,
            workflow_id=session_ids,
            current_stage=st.text(max_size=300),
            results_json=item_json.map(str.encode) | st.binary(max_size=64),
            agent_sessions=st.dictionaries(st.text(max_size=10), session_ids, max_size=3),
        ),
        etag=etags,
        allow_missing=st.booleans(),
    ),
    "DeleteWorkflow": st.builds(
        pb.DeleteWorkflowRequest,
        workflow_id=session_ids,
        etag=etags,
        allow_missing=st.booleans(),
    ),
}


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, redis.Redis]]:
    from state_service.storage.embedded import free_port

    with EmbeddedRedis(tmp_path_factory.mktemp("fuzz-redis"), port=free_port()) as server:
        with (
            # No background summarizer: its commits would change the digest
            # between "before" and "after" of a refused request.
            threaded_state_server(
                server.url, max_message_bytes=2 * 1024 * 1024, summarizer="none"
            ) as state,
            grpc.insecure_channel(state.address) as channel,
        ):
            digest_client = redis.Redis.from_url(server.url)
            stub = pb_grpc.StateServiceStub(channel)
            # Some state worth protecting.
            for sid in ("s1", "s2"):
                stub.AppendItems(
                    pb.AppendItemsRequest(
                        session_id=sid, items=[pb.Item(json='{"role":"user","content":"hi"}')]
                    )
                )
            yield stub, digest_client
            digest_client.close()


@pytest.mark.parametrize("rpc", sorted(REQUESTS))
def test_fuzz_rpc(fuzz_target: tuple[Any, redis.Redis], rpc: str) -> None:
    stub, digest_client = fuzz_target
    fuzz(stub, digest_client, rpc, REQUESTS[rpc], EXAMPLES_PER_RPC)
