"""Caller identity → tenant, enforced by one interceptor.

Two ways to authenticate, each mapping a credential to a tenant:

- bearer tokens: ``authorization: Bearer <token>`` metadata, checked against a
  tokens file (mounted from a Secret) of ``tenant:token`` lines. The file is
  re-read when it changes, so tokens rotate without a restart.
- mTLS: the tenant is the Common Name of the verified client certificate.

Health and reflection stay reachable without credentials (probes need them).
With authentication off, every caller is the tenant "default".

Delegation: a caller whose identity is listed as a delegate may act for
another tenant by sending ``statecar-tenant: <tenant>`` metadata. The agent
service does this once it authenticates its own callers, so each of its
callers is a tenant here while only the agent holds a state-service
credential. Anyone else sending the header is refused (PERMISSION_DENIED).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from grpc.aio import ServicerContext

from shared_runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from shared_runtime.handlers import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    responses,
)

logger = logging.getLogger("statecar.auth")

DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
EXEMPT_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Metadata a delegate sends to act for a tenant (lower case: gRPC metadata keys).
TENANT_METADATA_KEY = "statecar-tenant"

_current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar(
    "statecar_tenant", default=DEFAULT_TENANT
)


def current_tenant() -> str:
    """The tenant of the RPC being handled (set by AuthInterceptor)."""
    return _current_tenant.get()


# The call's metadata (a tuple at run time), read once per call by AuthInterceptor.
Metadata = Iterable[tuple[str, str | bytes]]
# Resolves the tenant of a call from its context and metadata; each
# authenticator reads only what it needs (building the auth context costs more
# than the bearer check).
Authenticator = Callable[[ServicerContext[Any, Any], Metadata], str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenFile:
    """tenant:token lines (# comments allowed), reloaded when the file changes."""

    def __init__(self, path: Path, *, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self._recheck = recheck_seconds
        self._checked = 0.0
        self._signature: tuple[float, int] | None = None
        self._tenants: dict[bytes, str] = {}
        # Tokens already matched, so a known caller costs a dict lookup, not a
        # SHA-256 per call (about 10 µs in the server, far more than in a
        # tight loop). Only valid tokens enter; a reload empties it. Lookups
        # by the presented string leak nothing useful: str hashes are keyed
        # per process, and a miss falls back to the constant-time compare.
        self._matched: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        stat = os.stat(self.path)
        signature = (stat.st_mtime, stat.st_size)
        if signature == self._signature:
            return
        tenants: dict[bytes, str] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, token = line.partition(":")
            tenant, token = tenant.strip(), token.strip()
            if not sep or not token or not TENANT_PATTERN.fullmatch(tenant):
                raise ValueError(f"{self.path}:{number}: expected 'tenant:token'")
            tenants[_digest(token)] = tenant
        self._tenants = tenants
        self._matched = {}
        self._signature = signature
        logger.info("loaded %d tokens from %s", len(tenants), self.path)

    def tenant_for(self, token: str) -> str | None:
        now = time.monotonic()
        if now - self._checked > self._recheck:
            self._checked = now
            try:
                self._load()
            except (OSError, ValueError):
                # Keep serving with the last good tokens; a broken rotation must
                # not lock every caller out.
                logger.exception("could not reload %s; keeping previous tokens", self.path)
        matched = self._matched.get(token)
        if matched is not None:
            return matched
        digest = _digest(token)
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):
                self._matched[token] = tenant
                return tenant
        return None


def bearer_authenticator(tokens: TokenFile) -> Authenticator:
    def authenticate(context: ServicerContext[Any, Any], metadata: Metadata) -> str:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        tenant = tokens.tenant_for(token.strip())
        if tenant is None:
            raise Unauthenticated("the bearer token is not valid", reason="INVALID_TOKEN")
        return tenant

    return authenticate


def mtls_authenticator(context: ServicerContext[Any, Any], metadata: Metadata) -> str:
    auth_context: Mapping[str, Iterable[bytes]] = context.auth_context() or {}
    names = list(auth_context.get("x509_common_name") or [])
    if not names:
        raise Unauthenticated("a verified client certificate is required")
    tenant = names[0].decode(errors="replace")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise Unauthenticated(
            "the client certificate's CN is not a valid tenant id", reason="INVALID_IDENTITY"
        )
    return tenant


def anonymous_authenticator(context: ServicerContext[Any, Any], metadata: Metadata) -> str:
    """Authentication off: every caller is the default tenant."""
    return DEFAULT_TENANT


def parse_delegates(value: str) -> frozenset[str]:
    """A comma-separated list of caller identities (tenant ids) allowed to act
    for other tenants; refuses anything that is not a tenant id."""
    delegates = frozenset(name.strip() for name in value.split(",") if name.strip())
    for name in delegates:
        if not TENANT_PATTERN.fullmatch(name):
            raise ValueError(f"delegate {name!r} is not a tenant id ({TENANT_PATTERN.pattern})")
    return delegates


class AuthInterceptor(WrappingInterceptor):
    """Resolves the tenant before any handler code runs; UNAUTHENTICATED otherwise.

    The tenant is the caller's own identity, or, for a delegate, the tenant
    named in its ``statecar-tenant`` metadata. Sits inside
    ExceptionToStatusInterceptor so its refusals carry ErrorInfo.
    """

    def __init__(
        self, authenticate: Authenticator, delegates: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self._authenticate = authenticate
        self._delegates = delegates

    def _applies_to(self, method: str) -> bool:
        return not method.startswith(EXEMPT_SERVICES)

    def _enter(self, context: ServicerContext[Any, Any]) -> None:
        metadata: Metadata = context.invocation_metadata() or ()
        identity = self._authenticate(context, metadata)
        acting_for = [v for k, v in metadata if k == TENANT_METADATA_KEY]
        if not acting_for:
            _current_tenant.set(identity)
            return
        if identity not in self._delegates:
            raise PermissionDenied(
                f"'{identity}' may not act for another tenant ({TENANT_METADATA_KEY} metadata)",
                reason="NOT_A_DELEGATE",
            )
        tenant = str(acting_for[0])
        if len(acting_for) > 1 or not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidArgument(f"{TENANT_METADATA_KEY} metadata", "must be one tenant id")
        _current_tenant.set(tenant)

    def _unary(self, behavior: UnaryBehavior, method: str) -> UnaryBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
            self._enter(context)
            return await behavior(request, context)

        return wrapped

    def _stream(self, behavior: StreamBehavior, method: str) -> StreamBehavior:
        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            self._enter(context)
            async for response in responses(behavior(request, context)):
                yield response

        return wrapped


def authenticator_for(mode: str, tokens_file: Path | None) -> Authenticator | None:
    """The authenticator a service's settings ask for (None: auth off)."""
    if mode == "token":
        assert tokens_file is not None
        return bearer_authenticator(TokenFile(tokens_file))
    if mode == "mtls":
        return mtls_authenticator
    return None


def auth_interceptor(
    mode: str, tokens_file: Path | None, delegates: frozenset[str] = frozenset()
) -> AuthInterceptor | None:
    """The interceptor a service's settings ask for; None when nothing is to
    be checked (auth off and no delegates), which keeps the layer off the
    request path."""
    authenticate = authenticator_for(mode, tokens_file)
    if authenticate is None:
        if not delegates:
            return None
        authenticate = anonymous_authenticator
    return AuthInterceptor(authenticate, delegates)


def check_caller_auth(mode: str, tokens_file: Path | None, client_ca_file: Path | None) -> None:
    """Settings validation shared by both services."""
    if mode == "token" and tokens_file is None:
        raise ValueError("auth=token needs auth_tokens_file")
    if mode == "mtls" and client_ca_file is None:
        raise ValueError("auth=mtls needs tls_client_ca_file (and tls_cert_file, tls_key_file)")
