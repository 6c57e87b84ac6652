"""Every StateService RPC against a real state server, on a real redis-server
and on a real Redis Cluster."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from state_service.client import (
    EtagMismatchError,
    NewItem,
    SessionNotFoundError,
    StateClient,
)
from state_service.server import StateServer
from tests.conftest import StateServerFactory


@pytest.fixture(params=["single", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one redis-server and on a Redis Cluster."""
    return str(request.param)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


async def test_append_assigns_consecutive_seqs_and_bumps_etag(client: StateClient) -> None:
    first = await client.append_items("s", [user("a"), assistant("b")])
    second = await client.append_items("s", [user("c")])
    assert (first.first_seq, first.last_seq) == (1, 2)
    assert (second.first_seq, second.last_seq) == (3, 3)
    assert first.etag != second.etag
    items = await client.all_items("s")
    assert [i.seq for i in items] == [1, 2, 3]
    assert [i.data["content"] for i in items] == ["a", "b", "c"]


async def test_items_and_metadata_round_trip_unchanged(client: StateClient) -> None:
    tricky = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": 'héllo 你好 🚀 \u0000 \\ " \n\t'}],
        "nested": {"list": [1, 2.5, -3e10, True, None, {"deep": ["x"] * 3}]},
        "big": 12345678901234567890,
        "escaped_binary": "\udbff\udfff".encode("utf-16", "surrogatepass").hex(),
    }
    metadata = {"agent": "triage", "ключ": "значение", "empty": ""}
    await client.append_items("s", [NewItem(tricky, metadata)])
    (item,) = (await client.get_context("s")).items
    assert item.data == tricky
    assert item.metadata == metadata
    (listed,) = (await client.list_items("s")).items
    assert listed.data == tricky and listed.metadata == metadata
    popped = await client.pop_item("s")
    assert popped.item is not None
    assert popped.item.data == tricky and popped.item.metadata == metadata


async def test_exact_json_bytes_are_preserved(client: StateClient) -> None:
    from statecar.state.v1 import state_service_pb2 as pb
    from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

    raw = '{ "role" : "user",   "content":[ {"type":"input_text" , "text":"\\u00e9 é"} ] }'
    stub = pb_grpc.StateServiceStub(client._channel)
    await stub.AppendItems(pb.AppendItemsRequest(session_id="raw", items=[pb.Item(json=raw)]))
    response = await stub.ListItems(pb.ListItemsRequest(session_id="raw"))
    assert response.items[0].json == raw


async def test_empty_append_checks_etag_and_writes_nothing(client: StateClient) -> None:
    missing = await client.append_items("s", [])
    assert (missing.etag, missing.first_seq, missing.last_seq) == ("0", 0, 0)
    with pytest.raises(SessionNotFoundError):
        await client.get_session("s")
    written = await client.append_items("s", [user("a")])
    empty = await client.append_items("s", [], etag=written.etag)
    assert empty.etag == written.etag
    assert (empty.first_seq, empty.last_seq) == (0, 0)
    with pytest.raises(EtagMismatchError):
        await client.append_items("s", [], etag="0")
    assert (await client.get_session("s")).item_count == 1


async def test_stale_etag_is_aborted_and_writes_nothing(client: StateClient) -> None:
    first = await client.append_items("s", [user("a")], etag="0")
    second = await client.append_items("s", [user("b")], etag=first.etag)
    with pytest.raises(EtagMismatchError) as raised:
        await client.append_items("s", [user("stale")], etag=first.etag)
    assert raised.value.current_etag == second.etag
    assert raised.value.reason == "ETAG_MISMATCH"
    with pytest.raises(EtagMismatchError):
        await client.append_items("s", [user("not new")], etag="0")
    assert [i.data["content"] for i in await client.all_items("s")] == ["a", "b"]
    third = await client.append_items("s", [user("c")], etag=second.etag)
    assert third.last_seq == 3


async def test_request_id_replays_first_response(client: StateClient) -> None:
    first = await client.append_items("s", [user("a")], request_id="turn-1")
    again = await client.append_items("s", [user("different")], request_id="turn-1")
    assert not first.replayed
    assert again.replayed
    assert (again.etag, again.first_seq, again.last_seq) == (first.etag, 1, 1)
    assert len(await client.all_items("s")) == 1
    # A replay wins over a now-stale etag: the retry of a successful write succeeds.
    replay = await client.append_items("s", [user("a")], request_id="turn-1", etag="0")
    assert replay == again


async def test_get_context_on_missing_session_is_empty(client: StateClient) -> None:
    context = await client.get_context("nobody")
    assert context.items == [] and context.etag == "0" and context.total_item_count == 0


async def test_get_context_fits_budget_at_turn_boundaries(client: StateClient) -> None:
    for turn in range(20):
        await client.append_items(
            "s",
            [
                user(f"question {turn} " + "x" * 100),
                {"type": "function_call", "call_id": f"c{turn}", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": f"c{turn}", "output": "y" * 50},
                assistant(f"answer {turn} " + "z" * 100),
            ],
        )
    context = await client.get_context("s", token_budget=500, strategy="token_window")
    assert context.strategy == "token_window"
    assert 0 < context.token_count <= 500
    assert context.items[0].data["role"] == "user"
    seqs = [i.seq for i in context.items]
    assert seqs == list(range(seqs[0], 81))
    assert context.omitted_item_count == 80 - len(seqs)
    assert context.summary is None and context.retrieved == []
    whole = await client.get_context("s", token_budget=1_000_000)
    assert len(whole.items) == 80


async def test_context_never_splits_call_from_output(client: StateClient) -> None:
    big = "w" * 3000
    await client.append_items(
        "s",
        [
            user("do things"),
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": big},
            {"type": "function_call_output", "call_id": "b", "output": "small"},
            assistant("done"),
        ],
    )
    # The turn is larger than the budget: fall back to safe cuts inside it.
    context = await client.get_context("s", token_budget=200)
    kinds = [i.data.get("type") or i.data["role"] for i in context.items]
    assert kinds == ["assistant"]
    context = await client.get_context("s", token_budget=1200)
    assert context.token_count <= 1200
    first = context.items[0].data if context.items else {}
    assert first.get("type") != "function_call_output"


async def test_list_items_pages_both_orders(client: StateClient) -> None:
    await client.append_items("s", [user(str(i)) for i in range(25)])
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await client.list_items("s", page_size=10, page_token=token)
        seen.extend(i.seq for i in page.items)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(1, 26)) and pages == 3
    seen = []
    token = ""
    while True:
        page = await client.list_items("s", page_size=7, page_token=token, newest_first=True)
        seen.extend(i.seq for i in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(25, 0, -1))


async def test_list_items_exact_multiple_and_defaults(client: StateClient) -> None:
    await client.append_items("s", [user(str(i)) for i in range(10)])
    page = await client.list_items("s", page_size=10)
    assert len(page.items) == 10 and page.next_page_token == ""
    page = await client.list_items("s", page_size=10, newest_first=True)
    assert len(page.items) == 10 and page.next_page_token == ""
    assert len((await client.list_items("s")).items) == 10  # 0 = default 100
    empty = await client.list_items("nobody")
    assert empty.items == [] and empty.etag == "0"


async def test_list_items_page_size_is_clamped(state_server_factory: StateServerFactory) -> None:
    server = await state_server_factory(max_page_size=5)
    async with StateClient(server.address) as client:
        await client.append_items("s", [user(str(i)) for i in range(12)])
        page = await client.list_items("s", page_size=1000)
        assert len(page.items) == 5 and page.next_page_token


async def test_paging_survives_appends_between_pages(client: StateClient) -> None:
    await client.append_items("s", [user(str(i)) for i in range(6)])
    page = await client.list_items("s", page_size=4, newest_first=True)
    await client.append_items("s", [user("late")])
    rest = await client.list_items(
        "s", page_size=4, newest_first=True, page_token=page.next_page_token
    )
    assert [i.seq for i in page.items + rest.items] == [6, 5, 4, 3, 2, 1]


async def test_page_token_of_deleted_session_is_refused(client: StateClient) -> None:
    from state_service.client import InvalidRequestError

    await client.append_items("s", [user(str(i)) for i in range(6)])
    page = await client.list_items("s", page_size=2)
    await client.delete_session("s")
    await client.append_items("s", [user("new life")])
    with pytest.raises(InvalidRequestError):
        await client.list_items("s", page_size=2, page_token=page.next_page_token)


async def test_pop_removes_newest_and_never_reuses_seq(client: StateClient) -> None:
    await client.append_items("s", [user("a"), assistant("b")])
    popped = await client.pop_item("s")
    assert popped.item is not None and popped.item.seq == 2
    again = await client.append_items("s", [assistant("c")])
    assert again.first_seq == 3
    assert [i.seq for i in await client.all_items("s")] == [1, 3]
    context = await client.get_context("s")
    assert [i.seq for i in context.items] == [1, 3]


async def test_pop_on_empty_and_missing(client: StateClient) -> None:
    missing = await client.pop_item("nobody")
    assert missing.item is None and missing.etag == "0"
    await client.append_items("s", [user("a")])
    await client.pop_item("s")
    empty = await client.pop_item("s")
    assert empty.item is None


async def test_pop_with_request_id_is_idempotent_and_etag_checked(client: StateClient) -> None:
    written = await client.append_items("s", [user("a"), user("b")])
    with pytest.raises(EtagMismatchError):
        await client.pop_item("s", etag="0")
    first = await client.pop_item("s", request_id="pop-1", etag=written.etag)
    again = await client.pop_item("s", request_id="pop-1")
    assert first == again
    assert len(await client.all_items("s")) == 1


async def test_get_session_metadata(client: StateClient) -> None:
    written = await client.append_items("s", [user("a"), user("b")])
    info = await client.get_session("s")
    assert info.item_count == 2 and info.last_seq == 2 and info.etag == written.etag
    assert info.effective_ttl == timedelta(days=1) and info.ttl is None and not info.persist
    assert info.expire_time is not None and info.create_time <= info.update_time
    with pytest.raises(SessionNotFoundError):
        await client.get_session("nobody")


async def test_update_session_ttl_persist_and_etag(client: StateClient) -> None:
    written = await client.append_items("s", [user("a")])
    info = await client.update_session("s", ttl=timedelta(hours=2), etag=written.etag)
    assert info.ttl == timedelta(hours=2) and info.effective_ttl == timedelta(hours=2)
    assert info.etag != written.etag
    with pytest.raises(EtagMismatchError):
        await client.update_session("s", persist=True, etag=written.etag)
    persisted = await client.update_session("s", persist=True)
    assert persisted.persist and persisted.expire_time is None
    # Writes keep a persisted session persistent.
    await client.append_items("s", [user("b")])
    assert (await client.get_session("s")).expire_time is None
    back = await client.update_session("s")
    assert not back.persist and back.effective_ttl == timedelta(days=1)
    with pytest.raises(SessionNotFoundError):
        await client.update_session("nobody", persist=True)
    created = await client.update_session("fresh", persist=True, allow_missing=True)
    assert created.item_count == 0 and created.persist
    assert [s.session_id for s in (await client.list_sessions()).sessions] == ["fresh", "s"]


async def test_ttl_expiry_removes_session(
    state_server_factory: StateServerFactory,
) -> None:
    server = await state_server_factory(default_ttl_seconds=1)
    async with StateClient(server.address) as client:
        await client.append_items("short", [user("a")])
        await client.append_items("kept", [user("a")])
        await client.update_session("kept", persist=True)
        # Redis expires keys on its own clock; poll (bounded) instead of sleeping blindly.
        for _ in range(60):
            if (await client.get_context("short")).etag == "0":
                break
            await asyncio.sleep(0.1)
        assert (await client.get_context("short")).items == []
        with pytest.raises(SessionNotFoundError):
            await client.get_session("short")
        assert (await client.get_session("kept")).item_count == 1
        listed = [s.session_id for s in (await client.list_sessions()).sessions]
        assert listed == ["kept"]
        # A new incarnation starts cleanly: seq 1, nothing of the old log.
        again = await client.append_items("short", [user("new")])
        assert again.first_seq == 1


async def test_delete_session(client: StateClient) -> None:
    written = await client.append_items("s", [user("a")])
    with pytest.raises(EtagMismatchError):
        await client.delete_session("s", etag="0")
    await client.delete_session("s", etag=written.etag)
    with pytest.raises(SessionNotFoundError):
        await client.delete_session("s")
    await client.delete_session("s", allow_missing=True)
    assert (await client.get_context("s")).items == []
    assert (await client.list_sessions()).sessions == []
    # The next incarnation gets a new etag lineage.
    reborn = await client.append_items("s", [user("b")])
    assert reborn.etag != written.etag and reborn.first_seq == 1


async def test_list_sessions_pages_in_id_order(client: StateClient) -> None:
    ids = [f"sess-{i:02d}" for i in range(23)]
    for sid in reversed(ids):
        await client.append_items(sid, [user("x")])
    seen: list[str] = []
    token = ""
    while True:
        page = await client.list_sessions(page_size=10, page_token=token)
        seen.extend(s.session_id for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids


async def test_workflow_crud_with_etag(client: StateClient) -> None:
    from state_service.client import StateServiceError

    created = await client.update_workflow(
        "wf", current_stage="triage", results={}, agent_sessions={"triage": "wf-triage"}, etag="0"
    )
    assert created.current_stage == "triage" and created.etag
    updated = await client.update_workflow(
        "wf",
        current_stage="billing",
        results={"triage": "billing question"},
        agent_sessions={"triage": "wf-triage", "billing": "wf-billing"},
        etag=created.etag,
    )
    with pytest.raises(EtagMismatchError):
        await client.update_workflow(
            "wf", current_stage="x", results={}, agent_sessions={}, etag=created.etag
        )
    got = await client.get_workflow("wf")
    # expire_time is "now + remaining TTL" and moves with the clock.
    assert dataclasses.replace(got, expire_time=None) == dataclasses.replace(
        updated, expire_time=None
    )
    assert got.results == {"triage": "billing question"}
    with pytest.raises(StateServiceError):
        await client.update_workflow(
            "other", current_stage="x", results={}, agent_sessions={}, allow_missing=False
        )
    await client.delete_workflow("wf", etag=updated.etag)
    with pytest.raises(SessionNotFoundError):
        await client.get_workflow("wf")


async def test_health_reflection_and_liveness(state_server: StateServer) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from tests.helpers import SERVING, health_status

    for service in ("", "statecar.state.v1.StateService", "liveness"):
        assert await health_status(state_server.address, service) == SERVING
    async with grpc.aio.insecure_channel(state_server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]

        async def requests() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in reflection.ServerReflectionInfo(requests()):  # type: ignore[operator]
            names = {s.name for s in response.list_services_response.service}
            assert "statecar.state.v1.StateService" in names
            break


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_v1_and_v1alpha_describe_the_api(
    state_server: StateServer, version: str
) -> None:
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    async with grpc.aio.insecure_channel(state_server.address) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="statecar.state.v1.StateService"
            ),
        ]
        responses = [r async for r in call(iter(requests))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "statecar.state.v1.StateService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "statecar.state.v1" for f in files)
