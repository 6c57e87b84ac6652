"""What can go wrong in the state service, in its own terms.

Storage and business code raise these; they carry facts (the current etag,
how many replicas confirmed) and a message that is safe to show, but no
transport types. The gRPC layer alone decides what a client sees: the status
code, the ErrorInfo reason and its metadata (see grpc_errors.py). Anything not
listed here that escapes a handler is an internal error.
"""

from __future__ import annotations


class StateError(Exception):
    """A failure a client is told about; `message` is safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EtagMismatch(StateError):
    """A conditional write found another version than the one it was based on;
    nothing was written."""

    def __init__(self, current_etag: str) -> None:
        super().__init__("the etag does not match the current one; re-read and retry")
        self.current_etag = current_etag


class SessionNotFound(StateError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist")
        self.session_id = session_id


class SessionAlreadyExists(StateError):
    """A session that must not exist yet (a fork's new session) does."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")
        self.session_id = session_id


class ForkSourceChanged(StateError):
    """A fork's source lost items (a pop, a delete) while they were copied;
    nothing was written."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} changed (an item was popped or the session deleted) "
            "while it was being forked; nothing was written, retry the fork"
        )
        self.session_id = session_id


class PausedRunNotFound(StateError):
    """A paused run that does not exist or has expired."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"paused run {run_id!r} does not exist or has expired")
        self.run_id = run_id


class PausedRunClaimed(StateError):
    """Another resume holds the paused run (or held it and died); nothing was done."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"paused run {run_id!r} is being resumed by another request (or was, by a "
            "replica that died: it stays claimed until it expires, so its tools run at most "
            "once); nothing was done"
        )
        self.run_id = run_id


class PausedRunResolved(StateError):
    """The paused run was resumed by another claim; nothing was done."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"paused run {run_id!r} was already resumed by another request")
        self.run_id = run_id


class PausedRunLimit(StateError):
    """A session's paused runs would exceed a limit; nothing was written."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class SeqConflict(StateError):
    """An import's first seq is not above the session's last seq; nothing
    was written."""

    def __init__(self, session_id: str, last_seq: int, current_etag: str) -> None:
        super().__init__(
            f"session {session_id!r} already has items up to seq {last_seq}; an import "
            "must start above it (skip the items it has, or import into another session)"
        )
        self.session_id = session_id
        self.last_seq = last_seq
        self.current_etag = current_etag


class WorkflowNotFound(StateError):
    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} does not exist")
        self.workflow_id = workflow_id


class InvalidField(StateError):
    """A request value only business rules can refuse (a page token that no
    longer fits the session); request validation refuses the rest earlier."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class TenantBusy(StateError):
    """The caller's tenant already has its share of heavy work in flight on
    this replica; nothing was done. Retry after `retry_after_seconds`."""

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(
            "this tenant has its share of heavy requests (large contexts, retrieval, "
            "summaries) in flight on this replica; retry later"
        )
        self.retry_after_seconds = retry_after_seconds


class WorkDeadline(StateError):
    """The request's CPU work did not finish within its deadline and was abandoned."""

    def __init__(self) -> None:
        super().__init__(
            "the context could not be computed within the call's deadline (retrieval, "
            "summary or token counting over large items); nothing was written"
        )


class StoreError(StateError):
    """The state store (Redis) could not do what was asked."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or did not answer; retrying may succeed."""


class StoreAuthRefused(StoreUnavailable):
    """Redis refused statecar's credentials (a configuration error)."""


class StorePermissionDenied(StoreUnavailable):
    """Redis's ACL user lacks a permission statecar needs."""


class StoreFailover(StoreUnavailable):
    """A Redis Cluster slot is moving or its primary is being replaced."""


class ReplicationTimeout(StoreUnavailable):
    """A write the primary applied but fewer replicas than required confirmed."""

    def __init__(self, message: str, *, acknowledged: int, required: int) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged
        self.required = required


class IndexPending(StoreUnavailable):
    """A write that created a session was applied, but the session could not
    be added to the tenant's index; retrying with the same request_id
    completes it."""


class DurableTierUnavailable(StoreUnavailable):
    """The durable tier (PostgreSQL) could not be reached or refused a
    request that needs it: a session not in Redis (to find or load it), a
    delete. Hot sessions do not need it."""


class ArchiveBacklogFull(StoreError):
    """Too many sessions wait to be archived to the durable tier (it is down
    or slow); the write was refused and nothing was written."""

    def __init__(self, backlog: int, limit: int) -> None:
        super().__init__(
            f"{backlog} sessions wait to be archived to the durable tier (limit {limit}); "
            "nothing was written, retry later"
        )
        self.backlog = backlog
        self.limit = limit


class StoreFull(StoreError):
    """Redis is at maxmemory and refused a write; nothing was written."""


class EncryptionKeyUnavailable(StateError):
    """A stored item is sealed with a key that is no longer configured."""


class EncryptionIntegrity(StateError):
    """A stored item failed authentication (wrong key or tampered data)."""
