"""The state service's errors as a client sees them: each domain error
(errors.py) becomes a status code with an ErrorInfo reason and metadata.

This is the one place that chooses them; the reasons are part of the API
(clients branch on them), so a new domain error needs a line here, and an
existing line never changes its code or reason.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from shared_runtime import errors as rpc
from state_service import errors

P = ParamSpec("P")
R = TypeVar("R")


def to_service_error(error: errors.StateError) -> rpc.ServiceError:
    """The status (as a ServiceError) a client sees for a domain error."""
    message = error.message
    if isinstance(error, errors.EtagMismatch):
        return rpc.Aborted(
            message, reason="ETAG_MISMATCH", metadata={"current_etag": error.current_etag}
        )
    if isinstance(error, errors.SessionNotFound):
        return rpc.NotFound(
            message, reason="SESSION_NOT_FOUND", metadata={"session_id": error.session_id}
        )
    if isinstance(error, errors.SessionAlreadyExists):
        return rpc.AlreadyExists(
            message, reason="SESSION_ALREADY_EXISTS", metadata={"session_id": error.session_id}
        )
    if isinstance(error, errors.ForkSourceChanged):
        return rpc.Aborted(
            message, reason="FORK_SOURCE_CHANGED", metadata={"session_id": error.session_id}
        )
    if isinstance(error, errors.SeqConflict):
        return rpc.Aborted(
            message,
            reason="SEQ_CONFLICT",
            metadata={"last_seq": str(error.last_seq), "current_etag": error.current_etag},
        )
    if isinstance(error, errors.WorkflowNotFound):
        return rpc.NotFound(
            message, reason="WORKFLOW_NOT_FOUND", metadata={"workflow_id": error.workflow_id}
        )
    if isinstance(error, errors.PausedRunNotFound):
        return rpc.NotFound(
            message, reason="PAUSED_RUN_NOT_FOUND", metadata={"run_id": error.run_id}
        )
    if isinstance(error, errors.PausedRunClaimed):
        return rpc.Aborted(message, reason="PAUSED_RUN_CLAIMED", metadata={"run_id": error.run_id})
    if isinstance(error, errors.PausedRunResolved):
        return rpc.FailedPrecondition(
            message, reason="PAUSED_RUN_RESOLVED", metadata={"run_id": error.run_id}
        )
    if isinstance(error, errors.PausedRunLimit):
        return rpc.ResourceExhausted(
            message, reason="PAUSED_RUN_LIMIT", metadata={"limit": str(error.limit)}
        )
    if isinstance(error, errors.InvalidField):
        return rpc.InvalidArgument(error.field, error.problem)
    if isinstance(error, errors.ReplicationTimeout):
        return rpc.Unavailable(
            message,
            reason="REPLICATION_TIMEOUT",
            metadata={
                "replicas_acknowledged": str(error.acknowledged),
                "replicas_required": str(error.required),
            },
        )
    if isinstance(error, errors.StoreAuthRefused):
        return rpc.Unavailable(message, reason="BACKEND_AUTH")
    if isinstance(error, errors.StorePermissionDenied):
        return rpc.Unavailable(message, reason="BACKEND_PERMISSION")
    if isinstance(error, errors.StoreFailover):
        return rpc.Unavailable(message, reason="BACKEND_FAILOVER")
    if isinstance(error, errors.IndexPending):
        return rpc.Unavailable(message, reason="INDEX_PENDING")
    if isinstance(error, errors.DurableTierUnavailable):
        return rpc.Unavailable(message, reason="DURABLE_TIER_UNAVAILABLE")
    if isinstance(error, errors.StoreUnavailable):
        return rpc.Unavailable(message, reason="BACKEND_UNAVAILABLE")
    if isinstance(error, errors.StoreFull):
        return rpc.ResourceExhausted(message, reason="BACKEND_FULL")
    if isinstance(error, errors.ArchiveBacklogFull):
        return rpc.ResourceExhausted(
            message,
            reason="ARCHIVE_BACKLOG",
            metadata={"backlog_sessions": str(error.backlog), "limit": str(error.limit)},
            retry_delay_seconds=1.0,
        )
    if isinstance(error, errors.TenantBusy):
        return rpc.ResourceExhausted(
            message,
            reason="TENANT_BUSY",
            metadata={"retry_after_seconds": f"{error.retry_after_seconds:g}"},
            retry_delay_seconds=error.retry_after_seconds,
        )
    if isinstance(error, errors.WorkDeadline):
        return rpc.DeadlineExceeded(message, reason="COMPUTE_TIMEOUT")
    if isinstance(error, errors.EncryptionKeyUnavailable):
        return rpc.FailedPrecondition(message, reason="ENCRYPTION_KEY_UNAVAILABLE")
    if isinstance(error, errors.EncryptionIntegrity):
        return rpc.FailedPrecondition(message, reason="ENCRYPTION_INTEGRITY")
    # A domain error without a line above is a bug here, not the client's:
    # the exception interceptor answers INTERNAL with its fixed message.
    raise error


def maps_domain_errors(
    handler: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Wraps a servicer method so domain errors leave it as their status."""

    @functools.wraps(handler)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except errors.StateError as error:
            raise to_service_error(error) from error

    return wrapped
