"""The identifiers both services accept from callers: session and workflow
ids, request ids (idempotency keys) and etags. A malformed one is refused
with INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re

from shared_runtime.errors import InvalidArgument

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@=-]{1,256}")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@=-]{1,128}")
ETAG_PATTERN = re.compile(r"0|[0-9a-f]{1,32}\.[0-9]{1,19}")


def session_id(value: str, field: str = "session_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not SESSION_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 256 characters from A-Z a-z 0-9 and . _ : @ = -")
    return value


def request_id(value: str) -> str:
    if value and not REQUEST_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "request_id", "must be at most 128 characters from A-Z a-z 0-9 and . _ : @ = -"
        )
    return value


def etag(value: str) -> str:
    if value and not ETAG_PATTERN.fullmatch(value):
        raise InvalidArgument("etag", "is not an etag this service issued")
    return value
