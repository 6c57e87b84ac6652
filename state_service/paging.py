"""Opaque page tokens: URL-safe base64 of a small JSON document bound to the
request that issued it. A token from another session, order or a bogus one is
refused as an invalid page_token.

Tokens are not signed (replicas would need a shared secret), so every token
is validated in full before any field is used: a flat JSON object of short
strings and integers within int64, nothing nested (a crafted token of 1,500
nested brackets once raised RecursionError, a position of 2^63 a Redis range
error; both surfaced as INTERNAL)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from state_service.errors import InvalidField

_MAX_TOKEN_LENGTH = 2048
_MAX_POSITION = 2**62
_NOT_OURS = "is not a token this service issued"


def encode(fields: dict[str, Any]) -> str:
    raw = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Decodes a token and checks that it was issued for `expected` fields."""
    if len(token) > _MAX_TOKEN_LENGTH:
        raise InvalidField("page_token", _NOT_OURS)
    try:
        padded = token + "=" * (-len(token) % 4)
        fields = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        raise InvalidField("page_token", _NOT_OURS) from None
    if not isinstance(fields, dict) or not all(
        isinstance(value, str) or (type(value) is int and abs(value) <= _MAX_POSITION)
        for value in fields.values()
    ):
        raise InvalidField("page_token", _NOT_OURS)
    for key, value in expected.items():
        if fields.get(key) != value:
            raise InvalidField(
                "page_token", "was issued for a different request; start from the first page"
            )
    return fields


def int_field(fields: dict[str, Any], key: str) -> int:
    value = fields.get(key)
    if type(value) is not int or not -1 <= value <= _MAX_POSITION:
        raise InvalidField("page_token", _NOT_OURS)
    return value
