"""Request validation: everything a client can get wrong is refused here with
INVALID_ARGUMENT naming the field, before anything touches storage.

Identifiers (session ids, request ids, etags) follow the rules in
shared_runtime.identifiers, which the agent service applies too."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from shared_runtime.errors import InvalidArgument
from shared_runtime.identifiers import etag as etag
from shared_runtime.identifiers import request_id as request_id
from shared_runtime.identifiers import session_id as session_id
from shared_runtime.items import input_item_problem
from state_service.compression.strategies import Shares, Strategy
from state_service.grpc_convert import STRATEGY_OF_PROTO
from state_service.log import NewItem
from state_service.settings import StateServiceSettings
from statecar.state.v1 import state_service_pb2 as pb

MAX_TTL_SECONDS = 10 * 365 * 86400
# How far past the service's clock an item's original_time may be: clocks of
# importing clients drift, a time from the future is a bug.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
MAX_SPEAKER_CHARS = 128


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.=-]{1,128}")


def run_id(value: str, field: str) -> str:
    """A paused run's id or claim id: request-id characters without ':' or '@'
    (they separate a run's fields in storage)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not RUN_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 128 characters from A-Z a-z 0-9 and _ . = -")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every request: json.loads with a keyword argument builds a
# new JSONDecoder per call (seen in the append profile).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def json_object(raw: bytes, field: str, max_bytes: int) -> dict[str, Any]:
    if not raw:
        raise InvalidArgument(field, "is required")
    if len(raw) > max_bytes:
        raise InvalidArgument(field, f"is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidArgument(field, "is not valid UTF-8") from None
    except RecursionError:
        raise InvalidArgument(field, "is nested too deeply") from None
    except ValueError as exc:
        raise InvalidArgument(field, f"is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def metadata(value: Mapping[str, str], field: str, settings: StateServiceSettings) -> None:
    if len(value) > settings.max_metadata_entries:
        raise InvalidArgument(
            field, f"has {len(value)} entries; the limit is {settings.max_metadata_entries}"
        )
    size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
    if size > settings.max_metadata_bytes:
        raise InvalidArgument(field, f"is {size} bytes; the limit is {settings.max_metadata_bytes}")
    if any(not k for k in value):
        raise InvalidArgument(field, "keys must not be empty")


def items(values: Sequence[NewItem], settings: StateServiceSettings) -> None:
    """Validates items to append (as the gRPC layer converted them: UTF-8 JSON
    bytes, so sizes are checked in the bytes that will be stored)."""
    if len(values) > settings.max_items_per_append:
        raise InvalidArgument(
            "items",
            f"has {len(values)} items; the limit is {settings.max_items_per_append} per append",
        )
    check_shape = settings.item_schema == "openai-agents"
    for i, item in enumerate(values):
        data = json_object(item.json, f"items[{i}].json", settings.max_item_bytes)
        if check_shape and (problem := input_item_problem(data)) is not None:
            raise InvalidArgument(f"items[{i}].json", problem)
        metadata(item.metadata, f"items[{i}].metadata", settings)
    item_annotations(values, now_ms())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def item_annotations(values: Sequence[NewItem], now: int) -> None:
    """Checks the items' original times and speakers (see the Item message).

    Original times are non-decreasing within one request only: across
    requests the seq order is the log's order and the time just annotates it
    (checking against the stored newest item would cost a read per append)."""
    latest = 0
    latest_index = -1
    for i, item in enumerate(values):
        if item.original_ms:
            field = f"items[{i}].original_time"
            if item.original_ms < 0:
                raise InvalidArgument(field, "must be after 1970-01-01T00:00:00Z")
            if item.original_ms > now + MAX_CLOCK_SKEW_MS:
                raise InvalidArgument(
                    field,
                    f"is in the future (more than {MAX_CLOCK_SKEW_MS // 1000} s after "
                    "the service's clock)",
                )
            if item.original_ms < latest:
                raise InvalidArgument(
                    field,
                    f"is before items[{latest_index}].original_time; original times must "
                    "not decrease within a request",
                )
            latest, latest_index = item.original_ms, i
        if item.speaker:
            speaker(item.speaker, f"items[{i}].speaker")


def speaker(value: str, field: str) -> None:
    if len(value) > MAX_SPEAKER_CHARS:
        raise InvalidArgument(
            field, f"is {len(value)} characters; the limit is {MAX_SPEAKER_CHARS}"
        )
    if not value.strip():
        raise InvalidArgument(field, "must not be only whitespace")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidArgument(field, "must not contain control characters")


def page_size(value: int, settings: StateServiceSettings) -> int:
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    if value == 0:
        return settings.default_page_size
    return min(value, settings.max_page_size)


def token_budget(value: int, settings: StateServiceSettings) -> int:
    if value < 0:
        raise InvalidArgument("token_budget", "must not be negative")
    if value == 0:
        return settings.default_token_budget
    return min(value, settings.max_token_budget)


def ttl_seconds(settings_msg: pb.SessionSettings, field: str) -> int:
    """The stored TTL setting: -1 persist, 0 service default, else seconds."""
    if settings_msg.persist:
        return -1
    ttl = settings_msg.ttl
    if ttl.seconds < 0 or ttl.nanos < 0:
        raise InvalidArgument(f"{field}.ttl", "must not be negative")
    if ttl.seconds > MAX_TTL_SECONDS:
        raise InvalidArgument(f"{field}.ttl", "must be at most ten years")
    seconds = ttl.seconds + (1 if ttl.nanos else 0)
    return seconds


def strategy(value: int, field: str) -> Strategy | None:
    """A ContextStrategy number as a Strategy; None for UNSPECIFIED."""
    if value == pb.CONTEXT_STRATEGY_UNSPECIFIED:
        return None
    found = STRATEGY_OF_PROTO.get(pb.ContextStrategy.ValueType(value))
    if found is None:
        raise InvalidArgument(field, f"{value} is not a known ContextStrategy")
    return found


def shares(value: pb.TierShares, field: str) -> Shares:
    result = Shares(value.recent, value.summary, value.retrieval)
    problem = result.problem()
    if problem is not None:
        raise InvalidArgument(field, problem)
    return result


def max_items(value: int) -> int:
    if value < 0:
        raise InvalidArgument("max_items", "must not be negative")
    return value


def query(value: str, settings: StateServiceSettings) -> str:
    size = len(value.encode())
    if size > settings.max_query_bytes:
        raise InvalidArgument("query", f"is {size} bytes; the limit is {settings.max_query_bytes}")
    return value
