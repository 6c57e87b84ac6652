"""Export and import (issue #15 part 2): JSON Lines out of one stack and
into a fresh one (its own Redis and state service) with byte-identical items,
idempotent re-imports, seq conflicts refused, tenant scoping, and memory
bounded by the page and chunk sizes whatever the session's size."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agent_service import cli
from shared_runtime.errors import error_info
from state_service.client import EtagMismatchError, StateClient, TierShares
from state_service.client.portability import (
    ExportedItem,
    ImportConflict,
    Record,
    SessionHeader,
    export_sessions,
    import_records,
    parse,
    parse_lines,
)
from state_service.client.types import ItemRecord, NewItem
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis, free_port
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc
from tests.conftest import StateServerFactory

SAID = datetime(2023, 5, 8, 13, 56, 0, 123000, tzinfo=UTC)


def message(text: str, role: str = "user") -> dict[str, str]:
    return {"role": role, "content": text}


@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh Redis for the stack an export is imported into."""
    server = EmbeddedRedis(tmp_path / "redis-b", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.close()


async def export_lines(client: StateClient, **options: object) -> list[str]:
    lines: list[str] = []
    await export_sessions(client, lines.append, **options)  # type: ignore[arg-type]
    return lines


async def records_of(lines: list[str]) -> AsyncIterator[Record]:
    async def source() -> AsyncIterator[str]:
        for line in lines:
            yield line

    async for record in parse_lines(source()):
        yield record


async def populate(client: StateClient) -> None:
    await client.update_session(
        "alpha",
        ttl=timedelta(hours=5),
        context_strategy="retrieval",
        tier_shares=TierShares(0.5, 0.2, 0.3),
        allow_missing=True,
    )
    await client.append_items(
        "alpha",
        [
            NewItem(message('héllo, "quoted" \u2603'), {"k": "v"}, SAID, "Caroline"),
            NewItem(message("plain")),
            NewItem({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
            NewItem({"type": "function_call_output", "call_id": "c1", "output": "42"}),
        ],
    )
    await client.pop_item("alpha")
    # A gap in the seqs (4 was popped): an import must keep 5 as 5.
    await client.append_items("alpha", [NewItem(message("after the pop", "assistant"))])
    await client.update_session("empty", persist=True, allow_missing=True)
    for i in range(3):
        await client.append_items("beta", [NewItem(message(f"b{i}"), speaker="Mel")])


def item_lines(lines: list[str]) -> list[str]:
    return [line.rstrip("\n") for line in lines if json.loads(line)["type"] == "item"]


async def test_export_then_import_into_a_fresh_stack_is_byte_identical(
    client: StateClient, state_server_factory: StateServerFactory, second_redis: EmbeddedRedis
) -> None:
    await populate(client)
    exported = await export_lines(client)
    assert [json.loads(line)["session_id"] for line in exported if '"session"' in line] == [
        "alpha",
        "beta",
        "empty",
    ]
    other = await state_server_factory(redis_url=second_redis.url)
    async with StateClient(other.address) as fresh:
        stats = await import_records(fresh, records_of(exported))
        assert (stats.sessions, stats.created, stats.imported, stats.skipped) == (3, 3, 7, 0)
        again = await export_lines(fresh)
        assert item_lines(again) == item_lines(exported)
        seqs = [json.loads(line)["seq"] for line in item_lines(again)[:4]]
        assert seqs == [1, 2, 3, 5]
        info = await fresh.get_session("alpha")
        source = await client.get_session("alpha")
        assert (info.ttl, info.context_strategy, info.tier_shares) == (
            timedelta(hours=5),
            "retrieval",
            source.tier_shares,
        )
        assert (await fresh.get_session("empty")).persist
        first = (await fresh.list_items("alpha")).items[0]
        assert (first.speaker, first.original_time) == ("Caroline", SAID.replace(tzinfo=None))


async def test_importing_twice_changes_nothing(client: StateClient) -> None:
    await populate(client)
    exported = await export_lines(client)
    await client.erase_session("alpha")
    await client.erase_session("beta")
    await client.erase_session("empty")
    await import_records(client, records_of(exported))
    etags = {s: (await client.get_session(s)).etag for s in ("alpha", "beta", "empty")}
    stats = await import_records(client, records_of(exported))
    assert (stats.created, stats.imported, stats.skipped, stats.calls) == (0, 0, 7, 0)
    assert {s: (await client.get_session(s)).etag for s in etags} == etags
    assert item_lines(await export_lines(client)) == item_lines(exported)


async def test_an_import_resumes_after_the_items_already_there(client: StateClient) -> None:
    await client.append_items("s", [NewItem(message(f"m{i}")) for i in range(10)])
    exported = await export_lines(client)
    await client.erase_session("s")
    # Half of it got in before an interruption.
    await import_records(client, records_of(exported[:6]))
    assert (await client.get_session("s")).last_seq == 5
    stats = await import_records(client, records_of(exported))
    assert (stats.skipped, stats.imported) == (5, 5)
    assert item_lines(await export_lines(client)) == item_lines(exported)


async def test_a_target_with_other_items_is_a_conflict_and_gets_nothing(
    client: StateClient,
) -> None:
    await client.append_items("s", [NewItem(message("mine")), NewItem(message("also mine"))])
    before = await export_lines(client)
    incoming: list[Record] = [
        SessionHeader("s"),
        ExportedItem("s", ItemRecord(1, json.dumps(message("theirs")))),
        ExportedItem("s", ItemRecord(3, json.dumps(message("theirs too")))),
    ]

    async def source() -> AsyncIterator[Record]:
        for record in incoming:
            yield record

    with pytest.raises(ImportConflict, match="different item at seq 1"):
        await import_records(client, source())
    assert await export_lines(client) == before


async def test_import_items_rpc_refuses_bad_seqs_with_error_info(
    state_server: StateServer,
) -> None:
    item = '{"role":"user","content":"x"}'
    async with grpc.aio.insecure_channel(state_server.address) as channel:
        stub = pb_grpc.StateServiceStub(channel)
        done = await stub.ImportItems(
            pb.ImportItemsRequest(session_id="s", items=[pb.Item(seq=7, json=item)])
        )
        assert (done.first_seq, done.last_seq) == (7, 7)
        cases = [
            ([pb.Item(seq=9, json=item), pb.Item(seq=9, json=item)], "items[1].seq"),
            ([pb.Item(seq=0, json=item)], "items[0].seq"),
            (
                [pb.Item(seq=9, json=item, create_time=Timestamp(seconds=4_000_000_000))],
                "items[0].create_time",
            ),
            ([pb.Item(seq=9, json="[]")], "items[0].json"),
        ]
        for items, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ImportItems(pb.ImportItemsRequest(session_id="s", items=items))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            info = error_info(caught.value)
            assert info is not None and info.metadata["field"] == field
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ImportItems(
                pb.ImportItemsRequest(session_id="s", items=[pb.Item(seq=7, json=item)])
            )
        assert caught.value.code() == grpc.StatusCode.ABORTED
        info = error_info(caught.value)
        assert info is not None
        assert (info.reason, info.metadata["last_seq"]) == ("SEQ_CONFLICT", "7")
        listed = await stub.ListItems(pb.ListItemsRequest(session_id="s"))
        assert [i.seq for i in listed.items] == [7]
        # The next append continues after the imported seqs.
        appended = await stub.AppendItems(
            pb.AppendItemsRequest(session_id="s", items=[pb.Item(json=item)])
        )
        assert appended.first_seq == 8


async def test_import_replays_a_retried_call(client: StateClient) -> None:
    records = [ItemRecord(1, json.dumps(message("a"))), ItemRecord(2, json.dumps(message("b")))]
    first = await client.import_items("s", records, request_id="import-1")
    again = await client.import_items("s", records, request_id="import-1")
    assert again.replayed and (again.etag, again.last_seq) == (first.etag, 2)
    with pytest.raises(EtagMismatchError) as caught:
        await client.import_items("s", records, request_id="import-2")
    assert caught.value.reason == "SEQ_CONFLICT"


async def test_exports_and_imports_stay_in_the_callers_tenant(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha:token-alpha\nbeta:token-beta\n")
    server = await state_server_factory(auth="token", auth_tokens_file=tokens)
    async with (
        StateClient(server.address, bearer_token="token-alpha") as alpha,
        StateClient(server.address, bearer_token="token-beta") as beta,
    ):
        await alpha.append_items("shared-name", [NewItem(message("alpha's"))])
        await beta.append_items("beta-only", [NewItem(message("beta's"))])
        exported = await export_lines(alpha)
        assert "beta" not in "".join(exported)
        assert len(item_lines(exported)) == 1
        await import_records(beta, records_of(exported))
        theirs = await beta.list_items("shared-name")
        assert theirs.items[0].data == message("alpha's")
        # alpha's own session is untouched by beta's import, and beta's
        # sessions never appear in alpha's export.
        assert len(item_lines(await export_lines(alpha))) == 1
        assert {json.loads(line)["session_id"] for line in await export_lines(beta)} == {
            "beta-only",
            "shared-name",
        }


async def test_memory_is_bounded_by_page_and_chunk_sizes(client: StateClient) -> None:
    total = 1000
    for start in range(0, total, 250):
        await client.append_items(
            "big", [NewItem(message(f"item {i} " + "x" * 50)) for i in range(start, start + 250)]
        )
    lines: list[str] = []
    stats = await export_sessions(client, lines.append, page_size=37)
    assert stats.items == total
    assert stats.largest_page <= 37
    assert math.ceil(total / 37) <= stats.pages <= math.ceil(total / 37) + 1
    await client.erase_session("big")
    imported = await import_records(client, records_of(lines), chunk_items=64, page_size=37)
    assert imported.imported == total
    assert imported.calls == math.ceil(total / 64)
    # A second import compares against the target a page at a time.
    again = await import_records(client, records_of(lines), chunk_items=64, page_size=37)
    assert (again.skipped, again.calls) == (total, 0)


def test_the_line_format_round_trips_and_refuses_garbage() -> None:
    header = SessionHeader("s", 60, False, "tiered", TierShares(0.4, 0.2, 0.4), 1, 2, 3)
    item = ExportedItem("s", ItemRecord(3, '{"a": 1}', {"k": "v"}, 1_700_000_000_123, 5, "S"))
    from state_service.client.portability import render

    assert parse(render(header)) == header
    assert parse(render(item)) == item
    for bad in ("[]", "{}", '{"session_id":"s","type":"x"}', '{"session_id":"s","type":"item"}'):
        with pytest.raises(ValueError, match="line 7"):
            parse(bad, 7)


async def test_cli_export_and_import_files(
    client: StateClient, state_server: StateServer, tmp_path: Path
) -> None:
    await populate(client)
    path = tmp_path / "export.jsonl"
    target = ["--state-target", state_server.address]
    args = cli.parser().parse_args(["export", "--output", str(path), *target])
    assert await args.handler(args) == 0
    exported = path.read_text().splitlines()
    assert len(item_lines(exported)) == 7
    args = cli.parser().parse_args(["import", str(path), *target])
    assert await args.handler(args) == 0  # everything already there: skipped
    args = cli.parser().parse_args(["erase", "--session", "alpha", *target])
    assert await args.handler(args) == 0
    args = cli.parser().parse_args(["import", str(path), *target])
    assert await args.handler(args) == 0
    assert item_lines(await export_lines(client)) == item_lines(exported)


async def test_a_large_import_round_trips(client: StateClient) -> None:
    # Over heavy_work.OFFLOAD_MIN_BYTES per call: encoded off the event loop.
    big = [ItemRecord(i, json.dumps(message("y" * 2000 + str(i)))) for i in range(1, 81)]
    await client.import_items("large", big)
    records, token = await client.list_item_records("large", page_size=100)
    assert token == "" and [(r.seq, r.json) for r in records] == [(r.seq, r.json) for r in big]
