"""Who is calling: the tenant every key is namespaced by.

Identity comes from the caller's credentials, never from request fields. With
no authentication configured every caller is the tenant "default".
"""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

DEFAULT_TENANT = "default"


def tenant_of(context: ServicerContext[Any, Any]) -> str:
    return DEFAULT_TENANT
