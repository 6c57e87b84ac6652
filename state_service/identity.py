"""Who is calling: the tenant every key is namespaced by.

Identity comes from the caller's credentials, never from request fields: the
AuthInterceptor (serving/auth.py) resolves it before the handler runs. With no
authentication configured every caller is the tenant "default".
"""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from shared_runtime.auth import DEFAULT_TENANT, current_tenant

__all__ = ["DEFAULT_TENANT", "tenant_of"]


def tenant_of(context: ServicerContext[Any, Any]) -> str:
    return current_tenant()
