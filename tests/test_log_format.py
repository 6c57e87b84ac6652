"""The log's stored encoding (log.py): the current format round-trips, and
sessions written before it (items stored as the API's Item protobuf bytes)
stay readable through the service, encrypted or not, mixed with new items."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from state_service import encryption, log
from state_service.client import ItemRecord, StateClient
from state_service.client import NewItem as ClientNewItem
from state_service.encryption import KeyRing
from state_service.log import Item, NewItem
from state_service.storage.embedded import EmbeddedRedis
from statecar.state.v1 import state_service_pb2 as pb
from tests.conftest import StateServerFactory

CREATED_MS = 1_700_000_000_123


def format0(content: str, metadata: dict[str, str]) -> bytes:
    """An item's payload as statecar stored it before log.py had its own format."""
    created = timestamp_pb2.Timestamp()
    created.FromMilliseconds(CREATED_MS)
    data = json.dumps({"role": "user", "content": content}).encode()
    # Item.json was `bytes` then; the wire encoding of UTF-8 text is the same.
    return pb.Item(json=data.decode(), metadata=metadata, create_time=created).SerializeToString()


def test_current_format_round_trips() -> None:
    item = NewItem(b'{"role":"user","content":"h\xc3\xa9"}', {"k": "v\x00\u00e9", "": "x"})
    payload = log.encode(item, CREATED_MS)
    assert payload.startswith(log.FORMAT_1)
    decoded = log.decode(b"42:" + payload)
    assert decoded == Item(42, item.json, item.metadata, CREATED_MS)
    bare = log.decode(b"7:" + log.encode(NewItem(b"{}"), 5))
    assert (bare.seq, bare.json, dict(bare.metadata), bare.create_ms) == (7, b"{}", {}, 5)


def test_format0_is_read_and_formats_cannot_be_confused() -> None:
    decoded = log.decode(b"3:" + format0("old", {"request_id": "r"}))
    assert decoded.seq == 3
    assert json.loads(decoded.json)["content"] == "old"
    assert (dict(decoded.metadata), decoded.create_ms) == ({"request_id": "r"}, CREATED_MS)
    # The sealed envelope and the current format both start with a byte no
    # protobuf message starts with, and differ in the next one.
    assert encryption.MARKER[:1] == log.FORMAT_1[:1] == b"\x00"
    assert encryption.MARKER != log.FORMAT_1
    with pytest.raises(log.UnknownFormat):
        log.decode(b"1:\x00\x7fwritten by a newer statecar")


async def _store_format0(
    url: str, session_id: str, contents: list[str], keys: KeyRing | None
) -> None:
    """Rewrites the session's log entries in place as format 0 (what an older
    statecar wrote), keeping their seqs."""
    r = aioredis.from_url(url)
    key = f"statecar:{{default:{session_id}}}:l"
    try:
        stored = [cast(bytes, raw) for raw in await r.lrange(key, 0, -1)]
        assert len(stored) == len(contents)
        for index, (raw, content) in enumerate(zip(stored, contents, strict=True)):
            seq = raw.partition(b":")[0]
            payload = format0(content, {"n": str(index)})
            if keys is not None:
                payload = keys.seal("default", session_id, payload)
            await r.lset(key, index, seq + b":" + payload)  # type: ignore[arg-type]
    finally:
        await r.aclose()


@pytest.mark.parametrize("encrypted", [False, True])
async def test_sessions_stored_in_format0_are_served(
    state_server_factory: StateServerFactory,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    encrypted: bool,
) -> None:
    overrides: dict[str, object] = {}
    keys = None
    if encrypted:
        keys_file = tmp_path / "keys"
        keys_file.write_text(f"*:k1:{base64.b64encode(os.urandom(32)).decode()}\n")
        overrides["encryption_keys_file"] = keys_file
        keys = KeyRing(keys_file)
    old = ["first", "second", "third"]
    writer = await state_server_factory(**overrides)
    async with StateClient(writer.address) as client:
        await client.append_items("legacy", [{"role": "user", "content": "x"}] * len(old))
    await _store_format0(redis_server.url, "legacy", old, keys)

    # A server with nothing cached reads what the older version stored.
    server = await state_server_factory(**overrides)
    # The client's times are naive UTC (protobuf's ToDatetime).
    created = datetime.fromtimestamp(CREATED_MS / 1000, UTC).replace(tzinfo=None)
    async with StateClient(server.address) as client:
        context = await client.get_context("legacy")
        assert [i.data["content"] for i in context.items] == old
        assert [i.seq for i in context.items] == [1, 2, 3]
        assert [i.metadata for i in context.items] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
        assert all(i.create_time == created for i in context.items)
        # The session goes on: new items are stored in the current format and
        # both are served together.
        await client.append_items("legacy", [{"role": "user", "content": "fourth"}])
        items = await client.all_items("legacy")
        assert [i.data["content"] for i in items] == [*old, "fourth"]
        assert [i.seq for i in items] == [1, 2, 3, 4]
        popped = await client.pop_item("legacy")
        assert popped.item is not None and popped.item.data["content"] == "fourth"
        popped = await client.pop_item("legacy")
        assert popped.item is not None and popped.item.data["content"] == "third"
        assert popped.item.metadata == {"n": "2"} and popped.item.create_time == created
        # Format 2 (original time, speaker) and imported items (their own seq
        # and create time) are served beside format 0, sealed or not.
        said = datetime(2023, 5, 8, tzinfo=UTC)
        await client.append_items(
            "legacy", [ClientNewItem({"role": "user", "content": "annotated"}, {}, said, "Mel")]
        )
        await client.import_items(
            "legacy",
            [ItemRecord(9, '{"role":"user","content":"imported"}', create_ms=CREATED_MS)],
        )
        items = await client.all_items("legacy")
        assert [(i.seq, i.data["content"]) for i in items] == [
            (1, "first"),
            (2, "second"),
            (5, "annotated"),
            (9, "imported"),
        ]
        assert (items[2].speaker, items[2].original_time) == ("Mel", said.replace(tzinfo=None))
        assert items[3].create_time == created and items[0].create_time == created


def test_original_time_and_speaker_round_trip_in_format_2() -> None:
    item = NewItem(
        b'{"role":"user","content":"x"}', {"k": "v"}, original_ms=1_600_000_000_001, speaker="Mé"
    )
    payload = log.encode(item, CREATED_MS)
    assert payload.startswith(log.FORMAT_2)
    decoded = log.decode(b"9:" + payload)
    assert decoded == Item(9, item.json, {"k": "v"}, CREATED_MS, 1_600_000_000_001, "Mé")
    only_speaker = log.decode(b"1:" + log.encode(NewItem(b"{}", speaker="S"), 5))
    assert (only_speaker.json, only_speaker.speaker, only_speaker.original_ms) == (b"{}", "S", 0)
    # An item with neither stays format 1: older statecars read it.
    assert log.encode(NewItem(b"{}"), 5).startswith(log.FORMAT_1)
    assert log.FORMAT_2 not in (log.FORMAT_1, encryption.MARKER)
