"""Opaque page tokens: URL-safe base64 of a small JSON document bound to the
request that issued it. A token from another session, order or a bogus one is
refused as an invalid page_token."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from state_service.errors import InvalidField

_MAX_TOKEN_LENGTH = 2048


def encode(fields: dict[str, Any]) -> str:
    raw = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Decodes a token and checks that it was issued for `expected` fields."""
    if len(token) > _MAX_TOKEN_LENGTH:
        raise InvalidField("page_token", "is not a token this service issued")
    try:
        padded = token + "=" * (-len(token) % 4)
        fields = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidField("page_token", "is not a token this service issued") from None
    if not isinstance(fields, dict):
        raise InvalidField("page_token", "is not a token this service issued")
    for key, value in expected.items():
        if fields.get(key) != value:
            raise InvalidField(
                "page_token", "was issued for a different request; start from the first page"
            )
    return fields


def int_field(fields: dict[str, Any], key: str) -> int:
    value = fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise InvalidField("page_token", "is not a token this service issued")
    return value
