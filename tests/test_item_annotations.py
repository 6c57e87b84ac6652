"""Items' original time and speaker (issue #12 part 5): validated on append
with INVALID_ARGUMENT naming the field, returned by every read, stored in
the log's format 2 (readable beside older entries), visible to retrieval."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2

from shared_runtime.errors import error_info
from state_service.client import StateClient
from state_service.client.types import NewItem
from state_service.server import StateServer
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

SAID = datetime(2023, 5, 8, 13, 56, 0, 123000, tzinfo=UTC)


def message(text: str, role: str = "user") -> dict[str, str]:
    return {"role": role, "content": text}


def stamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def pb_item(**fields: object) -> pb.Item:
    return pb.Item(json='{"role":"user","content":"hi"}', **fields)  # type: ignore[arg-type]


NOW_MS = int(time.time() * 1000)
BAD = [
    ("future", [pb_item(original_time=stamp(NOW_MS + 3_600_000))], "items[0].original_time"),
    (
        "decreasing",
        [pb_item(original_time=stamp(2000)), pb_item(), pb_item(original_time=stamp(1000))],
        "items[2].original_time",
    ),
    ("before 1970", [pb_item(original_time=stamp(-5000))], "items[0].original_time"),
    ("long speaker", [pb_item(speaker="x" * 129)], "items[0].speaker"),
    ("control speaker", [pb_item(), pb_item(speaker="a\nb")], "items[1].speaker"),
    ("blank speaker", [pb_item(speaker="   ")], "items[0].speaker"),
]


@pytest.mark.parametrize(("items", "field"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_annotations_are_invalid_argument_and_write_nothing(
    state_server: StateServer, items: list[pb.Item], field: str
) -> None:
    async with grpc.aio.insecure_channel(state_server.address) as channel:
        stub = pb_grpc.StateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.AppendItems(pb.AppendItemsRequest(session_id="s", items=items))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(caught.value)
        assert info is not None
        assert (info.reason, info.metadata["field"]) == ("INVALID_FIELD", field)
        listed = await stub.ListItems(pb.ListItemsRequest(session_id="s"))
        assert listed.total_item_count == 0


async def test_annotations_round_trip_through_every_read(client: StateClient) -> None:
    await client.append_items(
        "s",
        [
            NewItem(message("plain")),
            NewItem(message("said then"), {"k": "v"}, original_time=SAID, speaker="Caroline"),
            NewItem(message("same instant"), original_time=SAID, speaker="Mel"),
            NewItem(message("skew is tolerated"), original_time=datetime.now(UTC)),
        ],
    )
    listed = (await client.list_items("s")).items
    naive = SAID.replace(tzinfo=None)
    assert [(i.original_time, i.speaker) for i in listed[:3]] == [
        (None, ""),
        (naive, "Caroline"),
        (naive, "Mel"),
    ]
    assert listed[1].metadata == {"k": "v"}
    assert listed[1].create_time is not None and listed[1].create_time > naive
    context = await client.get_context("s", strategy="token_window")
    assert [(i.original_time, i.speaker) for i in context.items[:3]] == [
        (i.original_time, i.speaker) for i in listed[:3]
    ]
    popped = await client.pop_item("s")
    assert popped.item is not None and popped.item.original_time is not None


async def test_retrieval_finds_an_item_by_its_speaker_and_date(client: StateClient) -> None:
    old = [
        NewItem(message(f"filler turn number {i} about nothing much"), speaker="Mel")
        for i in range(40)
    ]
    old[5] = NewItem(message("I went to the support group"), original_time=SAID, speaker="Zora")
    await client.append_items("s", old)
    await client.append_items("s", [NewItem(message(f"recent chat {i}")) for i in range(40)])
    context = await client.get_context(
        "s", query="what did Zora do on 2023-05-08?", strategy="retrieval", token_budget=300
    )
    assert any(r.item.speaker == "Zora" for r in context.retrieved)


def test_retrieval_and_summary_inputs_carry_speaker_and_date() -> None:
    from state_service import log
    from state_service.compression.memory import SessionMemory

    ms = int(SAID.timestamp() * 1000)
    items = [
        log.Item(1, b'{"role":"user","content":"I adopted a cat."}', {}, 5, ms, "Ana"),
        log.Item(2, b'{"role":"assistant","content":"Lovely."}', {}, 6),
    ]
    memory = SessionMemory("inc", 0, 0)
    memory.extend([log.describe(item, 5) for item in items])
    texts = [i.text for i in memory.inputs([0, 1])]
    assert texts == ["Ana: I adopted a cat.", "Lovely."]
    assert memory.speakers[0] == frozenset({"ana"})
