"""A session's log entries: their domain type and their stored encoding.

The log (a Redis list, see storage/redis.py) holds one ``<seq>:<payload>``
string per item; the Lua scripts read and write the seq prefix only, and
encryption (encryption.py) may seal the payload. This module alone knows what
a payload is, and it is not the API's ``Item`` message, so the API can change
without migrating stored data.

Payload formats, told apart by their first bytes:

- ``00 02`` (format 1, what statecar writes): a 12-byte header (create
  time in ms, u64, then the metadata's length n, u32, both big-endian), n bytes
  of metadata as a JSON object (nothing when n is 0), then the item's JSON
  bytes as the client sent them. Decoding is two slices and, with metadata, one
  small JSON decode: it is on every cache miss.
- ``00 01``: encryption's sealed envelope (encryption.MARKER), opened before
  decoding.
- anything else: format 0, the protobuf bytes of the API's ``Item`` as
  statecar 0.1.0 stored them (without seq), read through a frozen copy of that
  layout. Sessions written before the upgrade stay readable; they are never
  rewritten, and leave through retention like any other.

A protobuf message never starts with a zero byte (field number 0 is invalid),
so the three can never be confused. An unknown ``00 xx`` (written by a newer
statecar) is refused, not misread.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from state_service.frozen_schema import message_class

FORMAT_1 = b"\x00\x02"
_HEADER = struct.Struct(">QI")
_BODY = len(FORMAT_1) + _HEADER.size
_JSON = json.JSONDecoder()

_Format0Item = message_class(
    "statecar.state.stored.v0",
    "Item",
    [
        ("seq", 1, "int64"),
        ("json", 2, "bytes"),
        ("metadata", 3, "map"),
        ("create_time", 4, "timestamp"),
    ],
)


class UnknownFormat(ValueError):
    """A payload in a format this version of statecar does not know."""


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to append: the log assigns its seq and create time."""

    json: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)
    original_ms: int = 0
    speaker: str = ""


@dataclass(slots=True)
class Item:
    """One item of a session's log; never changed once made.

    Not a frozen dataclass only because a frozen one costs several times more
    to make, and items are made on every read the cache cannot serve.
    `rendered` is where the gRPC layer keeps what it built from the item, so
    an item cached across requests is converted once.
    """

    seq: int
    json: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)
    create_ms: int = 0
    original_ms: int = 0
    speaker: str = ""
    rendered: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One log item plus what context selection needs to know of it."""

    item: Item
    tokens: int
    starts_turn: bool
    call_id: str | None
    output_of: str | None

    @property
    def seq(self) -> int:
        return self.item.seq


def describe(item: Item, tokens: int) -> LogEntry:
    """Classifies an item: a user message starts a turn; a *_call with a call_id
    opens a span its *_call_output closes."""
    try:
        data: Any = json.loads(item.json)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return LogEntry(item, tokens, False, None, None)
    kind = data.get("type")
    call_id = data.get("call_id") if isinstance(data.get("call_id"), str) else None
    starts_turn = data.get("role") == "user" and kind in (None, "message")
    is_output = isinstance(kind, str) and kind.endswith("_call_output")
    is_call = isinstance(kind, str) and kind.endswith("_call")
    return LogEntry(
        item,
        tokens,
        starts_turn,
        call_id if is_call else None,
        call_id if is_output else None,
    )


def encode(item: NewItem, create_ms: int) -> bytes:
    """The stored payload of an item (format 1; the log adds the seq)."""
    metadata = (
        json.dumps(dict(item.metadata), separators=(",", ":")).encode() if item.metadata else b""
    )
    return FORMAT_1 + _HEADER.pack(create_ms, len(metadata)) + metadata + item.json


def decode(raw: bytes, open_payload: Callable[[bytes], bytes] | None = None) -> Item:
    """A stored log entry "<seq>:<payload>" as an Item; `open_payload` unseals."""
    seq, _, payload = raw.partition(b":")
    return decode_payload(int(seq), open_payload(payload) if open_payload else payload)


def decode_payload(seq: int, payload: bytes) -> Item:
    if payload[:2] == FORMAT_1:
        create_ms, length = _HEADER.unpack_from(payload, len(FORMAT_1))
        # raw_decode skips json.loads' checks (whitespace, encoding) that
        # bytes written by encode() never need; it is most of the cost here.
        metadata = _JSON.raw_decode(payload[_BODY : _BODY + length].decode())[0] if length else {}
        return Item(seq, payload[_BODY + length :], metadata, create_ms)
    if payload[:1] == b"\x00":
        raise UnknownFormat(f"log entry {seq} has unknown format {payload[1:2].hex()}")
    stored = _Format0Item.FromString(payload)
    created = stored.create_time
    return Item(
        seq, stored.json, dict(stored.metadata), created.seconds * 1000 + created.nanos // 1_000_000
    )
