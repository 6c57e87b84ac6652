"""Every domain error of the state service leaves the gRPC layer as the status
clients rely on (grpc_errors.py), and none falls through to INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from state_service import errors
from state_service.grpc_errors import to_service_error


def _instance(kind: type[errors.StateError]) -> errors.StateError:
    if kind is errors.EtagMismatch:
        return errors.EtagMismatch("abc.3")
    if kind is errors.SessionNotFound:
        return errors.SessionNotFound("s")
    if kind is errors.WorkflowNotFound:
        return errors.WorkflowNotFound("w")
    if kind is errors.SessionAlreadyExists:
        return errors.SessionAlreadyExists("n")
    if kind is errors.ForkSourceChanged:
        return errors.ForkSourceChanged("s")
    if kind is errors.SeqConflict:
        return errors.SeqConflict("s", 7, "abc.3")
    if kind is errors.InvalidField:
        return errors.InvalidField("page_token", "is not a token this service issued")
    if kind is errors.ReplicationTimeout:
        return errors.ReplicationTimeout("too few replicas", acknowledged=0, required=1)
    if kind is errors.TenantBusy:
        return errors.TenantBusy(0.5)
    if kind is errors.WorkDeadline:
        return errors.WorkDeadline()
    if kind in (errors.PausedRunNotFound, errors.PausedRunClaimed, errors.PausedRunResolved):
        return kind("run-1")
    if kind is errors.PausedRunLimit:
        return errors.PausedRunLimit("too many paused runs", 16)
    if kind is errors.ArchiveBacklogFull:
        return errors.ArchiveBacklogFull(7, 5)
    return kind("something happened")


def _all_kinds(kind: type[errors.StateError]) -> list[type[errors.StateError]]:
    return [kind, *(k for sub in kind.__subclasses__() for k in _all_kinds(sub))]


EXPECTED = {
    errors.EtagMismatch: (grpc.StatusCode.ABORTED, "ETAG_MISMATCH", {"current_etag": "abc.3"}),
    errors.SessionNotFound: (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", {"session_id": "s"}),
    errors.SessionAlreadyExists: (
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_ALREADY_EXISTS",
        {"session_id": "n"},
    ),
    errors.ForkSourceChanged: (
        grpc.StatusCode.ABORTED,
        "FORK_SOURCE_CHANGED",
        {"session_id": "s"},
    ),
    errors.SeqConflict: (
        grpc.StatusCode.ABORTED,
        "SEQ_CONFLICT",
        {"last_seq": "7", "current_etag": "abc.3"},
    ),
    errors.WorkflowNotFound: (
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
        {"workflow_id": "w"},
    ),
    errors.InvalidField: (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        {"field": "page_token"},
    ),
    errors.StoreUnavailable: (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", {}),
    errors.StoreAuthRefused: (grpc.StatusCode.UNAVAILABLE, "BACKEND_AUTH", {}),
    errors.StorePermissionDenied: (grpc.StatusCode.UNAVAILABLE, "BACKEND_PERMISSION", {}),
    errors.StoreFailover: (grpc.StatusCode.UNAVAILABLE, "BACKEND_FAILOVER", {}),
    errors.ReplicationTimeout: (
        grpc.StatusCode.UNAVAILABLE,
        "REPLICATION_TIMEOUT",
        {"replicas_acknowledged": "0", "replicas_required": "1"},
    ),
    errors.IndexPending: (grpc.StatusCode.UNAVAILABLE, "INDEX_PENDING", {}),
    errors.StoreFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "BACKEND_FULL", {}),
    errors.DurableTierUnavailable: (grpc.StatusCode.UNAVAILABLE, "DURABLE_TIER_UNAVAILABLE", {}),
    errors.ArchiveBacklogFull: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ARCHIVE_BACKLOG",
        {"backlog_sessions": "7", "limit": "5"},
    ),
    errors.TenantBusy: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TENANT_BUSY",
        {"retry_after_seconds": "0.5"},
    ),
    errors.WorkDeadline: (grpc.StatusCode.DEADLINE_EXCEEDED, "COMPUTE_TIMEOUT", {}),
    errors.PausedRunNotFound: (
        grpc.StatusCode.NOT_FOUND,
        "PAUSED_RUN_NOT_FOUND",
        {"run_id": "run-1"},
    ),
    errors.PausedRunClaimed: (grpc.StatusCode.ABORTED, "PAUSED_RUN_CLAIMED", {"run_id": "run-1"}),
    errors.PausedRunResolved: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAUSED_RUN_RESOLVED",
        {"run_id": "run-1"},
    ),
    errors.PausedRunLimit: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PAUSED_RUN_LIMIT",
        {"limit": "16"},
    ),
    errors.EncryptionKeyUnavailable: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENCRYPTION_KEY_UNAVAILABLE",
        {},
    ),
    errors.EncryptionIntegrity: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENCRYPTION_INTEGRITY",
        {},
    ),
}


def test_every_domain_error_is_mapped() -> None:
    # StoreError only groups the store's errors; it is never raised itself.
    kinds = set(_all_kinds(errors.StateError)) - {errors.StateError, errors.StoreError}
    assert kinds == set(EXPECTED)


@pytest.mark.parametrize("kind", list(EXPECTED), ids=lambda kind: kind.__name__)
def test_status_code_reason_message_and_metadata(kind: type[errors.StateError]) -> None:
    error = _instance(kind)
    status = to_service_error(error)
    assert (status.code, status.reason, status.metadata) == EXPECTED[kind]
    assert status.message == error.message
