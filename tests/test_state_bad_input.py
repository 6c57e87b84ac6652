"""Every RPC with missing, oversized or invalid fields: the documented status
with an ErrorInfo detail, never INTERNAL, and Redis byte-for-byte unchanged."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, field_mask_pb2

from shared_runtime.errors import error_info
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ABORTED = grpc.StatusCode.ABORTED


def item(raw: str, **metadata: str) -> pb.Item:
    return pb.Item(json=raw, metadata=metadata)


GOOD = item('{"role":"user","content":"ok"}')


def crafted_token(raw: bytes) -> str:
    """A well-formed token (base64 of JSON) this service never issued."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


DEEP_TOKEN = crafted_token(b"[" * 1500)
ITEMS_AT = '{{"i":{},"o":"oldest","s":"s"}}'

NESTED = '{"a":' + "[" * 50_000 + "]" * 50_000 + "}"

CASES: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
    # (name, rpc, request, code, ErrorInfo metadata "field" or reason)
    ("no session", "AppendItems", pb.AppendItemsRequest(items=[GOOD]), INVALID, "session_id"),
    ("long session", "AppendItems", pb.AppendItemsRequest(session_id="a" * 257, items=[GOOD]),
     INVALID, "session_id"),
    ("slash", "AppendItems", pb.AppendItemsRequest(session_id="a/b", items=[GOOD]),
     INVALID, "session_id"),
    ("hash tag", "AppendItems", pb.AppendItemsRequest(session_id="{x}", items=[GOOD]),
     INVALID, "session_id"),
    ("unicode id", "AppendItems", pb.AppendItemsRequest(session_id="séssion", items=[GOOD]),
     INVALID, "session_id"),
    ("empty json", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[item("")]),
     INVALID, "items[0].json"),
    ("broken json", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[GOOD, item('{"a":')]),
     INVALID, "items[1].json"),
    ("json array", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[item("[1]")]),
     INVALID, "items[0].json"),
    ("empty object", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[item("{}")]),
     INVALID, "items[0].json"),
    ("not an item", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[GOOD, item('{"foo":"bar"}')]),
     INVALID, "items[1].json"),
    ("unknown type", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[item('{"type":"bogus"}')]),
     INVALID, "items[0].json"),
    ("call without name", "AppendItems",
     pb.AppendItemsRequest(
         session_id="s", items=[item('{"type":"function_call","call_id":"c","arguments":""}')]
     ),
     INVALID, "items[0].json"),
    ("NaN", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[item('{"a":NaN}')]),
     INVALID, "items[0].json"),
    ("deep nesting", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[item(NESTED)]),
     INVALID, "items[0].json"),
    ("huge item", "AppendItems",
     pb.AppendItemsRequest(
         session_id="s", items=[item('{"a":"' + "x" * (300 * 1024) + '"}')]
     ),
     INVALID, "items[0].json"),
    ("too many items", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[GOOD] * 1001), INVALID, "items"),
    ("metadata entries", "AppendItems",
     pb.AppendItemsRequest(
         session_id="s", items=[item(GOOD.json, **{f"k{i}": "v" for i in range(65)})]
     ),
     INVALID, "items[0].metadata"),
    ("metadata size", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[item(GOOD.json, k="v" * 9000)]),
     INVALID, "items[0].metadata"),
    ("metadata empty key", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[pb.Item(json=GOOD.json, metadata={"": "v"})]),
     INVALID, "items[0].metadata"),
    ("bad request id", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[GOOD], request_id="a b"),
     INVALID, "request_id"),
    ("long request id", "AppendItems",
     pb.AppendItemsRequest(session_id="s", items=[GOOD], request_id="r" * 129),
     INVALID, "request_id"),
    ("bogus etag", "AppendItems", pb.AppendItemsRequest(session_id="s", items=[GOOD], etag="x"),
     INVALID, "etag"),
    ("stale etag", "AppendItems",
     pb.AppendItemsRequest(session_id="exists", items=[GOOD], etag="0"),
     ABORTED, "ETAG_MISMATCH"),
    ("etag of missing", "AppendItems",
     pb.AppendItemsRequest(session_id="nobody", items=[GOOD], etag="abcd.1"),
     ABORTED, "ETAG_MISMATCH"),
    ("negative budget", "GetContext", pb.GetContextRequest(session_id="s", token_budget=-1),
     INVALID, "token_budget"),
    ("context bad id", "GetContext", pb.GetContextRequest(session_id=""), INVALID, "session_id"),
    ("negative page", "ListItems", pb.ListItemsRequest(session_id="s", page_size=-5),
     INVALID, "page_size"),
    ("bogus page token", "ListItems", pb.ListItemsRequest(session_id="s", page_token="!!"),
     INVALID, "page_token"),
    ("base64 garbage token", "ListItems",
     pb.ListItemsRequest(session_id="s", page_token="e30"), INVALID, "page_token"),
    ("nested token", "ListItems", pb.ListItemsRequest(session_id="s", page_token=DEEP_TOKEN),
     INVALID, "page_token"),
    ("position 2^63", "ListItems",
     pb.ListItemsRequest(
         session_id="s", page_token=crafted_token(ITEMS_AT.format(2**63).encode())
     ),
     INVALID, "page_token"),
    ("float position", "ListItems",
     pb.ListItemsRequest(session_id="s", page_token=crafted_token(ITEMS_AT.format(1.5).encode())),
     INVALID, "page_token"),
    ("nested sessions token", "ListSessions",
     pb.ListSessionsRequest(page_token=crafted_token(b'{"k":"sessions","a":{"x":[1]}}')),
     INVALID, "page_token"),
    ("deep sessions token", "ListSessions", pb.ListSessionsRequest(page_token=DEEP_TOKEN),
     INVALID, "page_token"),
    ("unknown order", "ListItems", pb.ListItemsRequest(session_id="s", order=99),  # type: ignore[arg-type]
     INVALID, "order"),
    ("pop bogus etag", "PopItem", pb.PopItemRequest(session_id="s", etag="1.x"),
     INVALID, "etag"),
    ("pop stale etag", "PopItem", pb.PopItemRequest(session_id="exists", etag="0"),
     ABORTED, "ETAG_MISMATCH"),
    ("get missing", "GetSession", pb.GetSessionRequest(session_id="nobody"),
     NOT_FOUND, "SESSION_NOT_FOUND"),
    ("get bad id", "GetSession", pb.GetSessionRequest(session_id="a b"), INVALID, "session_id"),
    ("update missing", "UpdateSession", pb.UpdateSessionRequest(session_id="nobody"),
     NOT_FOUND, "SESSION_NOT_FOUND"),
    ("update mask", "UpdateSession",
     pb.UpdateSessionRequest(
         session_id="exists", update_mask=field_mask_pb2.FieldMask(paths=["color"])
     ),
     INVALID, "update_mask"),
    ("negative ttl", "UpdateSession",
     pb.UpdateSessionRequest(
         session_id="exists",
         settings=pb.SessionSettings(ttl=duration_pb2.Duration(seconds=-5)),
     ),
     INVALID, "settings.ttl"),
    ("ttl and persist", "UpdateSession",
     pb.UpdateSessionRequest(
         session_id="exists",
         settings=pb.SessionSettings(ttl=duration_pb2.Duration(seconds=5), persist=True),
     ),
     INVALID, "settings"),
    ("delete missing", "DeleteSession", pb.DeleteSessionRequest(session_id="nobody"),
     NOT_FOUND, "SESSION_NOT_FOUND"),
    ("delete stale", "DeleteSession", pb.DeleteSessionRequest(session_id="exists", etag="0"),
     ABORTED, "ETAG_MISMATCH"),
    ("sessions negative page", "ListSessions", pb.ListSessionsRequest(page_size=-1),
     INVALID, "page_size"),
    ("sessions token", "ListSessions", pb.ListSessionsRequest(page_token="nope"),
     INVALID, "page_token"),
    ("workflow missing", "GetWorkflow", pb.GetWorkflowRequest(workflow_id="nobody"),
     NOT_FOUND, "WORKFLOW_NOT_FOUND"),
    ("workflow bad id", "UpdateWorkflow",
     pb.UpdateWorkflowRequest(workflow=pb.Workflow(workflow_id="")),
     INVALID, "workflow.workflow_id"),
    ("workflow results", "UpdateWorkflow",
     pb.UpdateWorkflowRequest(workflow=pb.Workflow(workflow_id="w", results_json=b"[]")),
     INVALID, "workflow.results_json"),
    ("workflow sessions", "UpdateWorkflow",
     pb.UpdateWorkflowRequest(
         workflow=pb.Workflow(workflow_id="w", agent_sessions={"a": "not ok"}),
         allow_missing=True,
     ),
     INVALID, "workflow.agent_sessions['a']"),
    ("unknown strategy", "GetContext",
     pb.GetContextRequest(session_id="exists", strategy=99),  # type: ignore[arg-type]
     INVALID, "strategy"),
    ("shares above one", "GetContext",
     pb.GetContextRequest(
         session_id="exists", tier_shares=pb.TierShares(recent=0.6, summary=0.3, retrieval=0.3)
     ),
     INVALID, "tier_shares"),
    ("negative share", "GetContext",
     pb.GetContextRequest(session_id="exists", tier_shares=pb.TierShares(recent=-0.1, summary=0.5)),
     INVALID, "tier_shares"),
    ("NaN share", "GetContext",
     pb.GetContextRequest(session_id="exists", tier_shares=pb.TierShares(recent=float("nan"))),
     INVALID, "tier_shares"),
    ("zero shares", "GetContext",
     pb.GetContextRequest(session_id="exists", tier_shares=pb.TierShares()),
     INVALID, "tier_shares"),
    ("negative max_items", "GetContext", pb.GetContextRequest(session_id="exists", max_items=-1),
     INVALID, "max_items"),
    ("update unknown strategy", "UpdateSession",
     pb.UpdateSessionRequest(
         session_id="exists",
         settings=pb.SessionSettings(context_strategy=42),  # type: ignore[arg-type]
         update_mask=field_mask_pb2.FieldMask(paths=["context_strategy"]),
     ),
     INVALID, "settings.context_strategy"),
    ("update bad shares", "UpdateSession",
     pb.UpdateSessionRequest(
         session_id="exists",
         settings=pb.SessionSettings(tier_shares=pb.TierShares(recent=2.0)),
         update_mask=field_mask_pb2.FieldMask(paths=["tier_shares"]),
     ),
     INVALID, "settings.tier_shares"),
    ("long speaker", "AppendItems",
     pb.AppendItemsRequest(session_id="exists", items=[pb.Item(json=GOOD.json, speaker="x" * 200)]),
     INVALID, "items[0].speaker"),
    ("import seq zero", "ImportItems",
     pb.ImportItemsRequest(session_id="new", items=[pb.Item(seq=0, json=GOOD.json)]),
     INVALID, "items[0].seq"),
    ("import below last seq", "ImportItems",
     pb.ImportItemsRequest(session_id="exists", items=[pb.Item(seq=1, json=GOOD.json)]),
     ABORTED, "SEQ_CONFLICT"),
    ("import stale etag", "ImportItems",
     pb.ImportItemsRequest(session_id="exists", etag="0",
                           items=[pb.Item(seq=5, json=GOOD.json)]),
     ABORTED, "ETAG_MISMATCH"),
    ("erase bad id", "EraseSession", pb.EraseSessionRequest(session_id="a/b"),
     INVALID, "session_id"),
    ("erase tenant unconfirmed", "EraseTenant", pb.EraseTenantRequest(confirm_tenant="other"),
     INVALID, "confirm_tenant"),
]  # fmt: skip


async def _snapshot(url: str) -> dict[bytes, bytes | None]:
    r = aioredis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(count=1000)]
        return {k: await r.dump(k) for k in keys}
    finally:
        await r.aclose()


@pytest.fixture
async def stub(state_server: StateServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(state_server.address) as channel:
        stub = pb_grpc.StateServiceStub(channel)
        await stub.AppendItems(pb.AppendItemsRequest(session_id="exists", items=[GOOD]))
        yield stub


@pytest.mark.parametrize(("name", "rpc", "request_message", "code", "detail"), CASES)
async def test_bad_input_is_refused_cleanly(
    stub: Any,
    redis_server: EmbeddedRedis,
    name: str,
    rpc: str,
    request_message: Any,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    before = await _snapshot(redis_server.url)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, rpc)(request_message, timeout=10)
    error = raised.value
    assert error.code() == code, (name, error.details())
    info = error_info(error)
    assert info is not None, name
    assert info.domain == "state.statecar.dev"
    assert detail in (info.metadata.get("field"), info.reason), (name, info)
    assert await _snapshot(redis_server.url) == before, name


async def test_any_json_object_is_accepted_when_items_are_not_checked(
    state_server_factory: Any, redis_server: EmbeddedRedis
) -> None:
    server = await state_server_factory(redis_url=redis_server.url, item_schema="json-object")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.StateServiceStub(channel)
        await stub.AppendItems(
            pb.AppendItemsRequest(session_id="any", items=[item("{}"), item('{"foo":"bar"}')])
        )
        listed = await stub.ListItems(pb.ListItemsRequest(session_id="any"))
    assert [i.json for i in listed.items] == ["{}", '{"foo":"bar"}']
