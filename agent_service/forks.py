"""Rewinding a conversation into a new session (the agent API's ForkSession).

The copy is the state service's ForkSession (atomic, tenant-scoped, the
source untouched); this module adds what a conversation needs on top: the cut
is given as "before this seq" (the user message to resend), and it must not
leave a tool call without its output at the end of the new session, which the
model APIs refuse on the next turn. That is checked on the new session's last
turn right after the copy (one page read; the source's log around the cut is
not cheaper to reach), and a fork that fails it is deleted again, conditional
on the etag the fork returned, so nothing else is ever removed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

from agent_service import metrics
from agent_service.turns import STATE_REQUEST_ID_LIMIT, Deadline, state_error
from shared_runtime.errors import Aborted, AlreadyExists, InvalidArgument, ServiceError
from state_service.client import (
    EtagMismatchError,
    ForkResult,
    InvalidRequestError,
    SessionAlreadyExistsError,
    StateClient,
    StateServiceError,
    StoredItem,
)
from statecar.agent.v1 import agent_service_pb2 as pb

# Items of the new session read back to find its last turn's start.
TAIL_PAGE = 200


def fork_request_id(caller_request_id: str) -> str | None:
    """The state request_id of a fork, in its own namespace (as turns' are)."""
    if not caller_request_id:
        return None
    derived = f"fork:{caller_request_id}"
    if len(derived) <= STATE_REQUEST_ID_LIMIT:
        return derived
    return f"fork:sha256:{hashlib.sha256(caller_request_id.encode()).hexdigest()}"


def open_calls(newest_first: Sequence[StoredItem]) -> list[str]:
    """Call ids of tool calls without their output in the last turn (the items
    back to the newest user message)."""
    turn: list[dict[str, Any]] = []
    for item in newest_first:
        turn.append(item.data)
        if item.data.get("role") == "user" and item.data.get("type", "message") == "message":
            break
    pending: dict[str, None] = {}
    for data in reversed(turn):
        kind = data.get("type")
        call_id = data.get("call_id")
        if not isinstance(kind, str) or not isinstance(call_id, str):
            continue
        if kind.endswith("_call_output"):
            pending.pop(call_id, None)
        elif kind.endswith("_call"):
            pending[call_id] = None
    return list(pending)


class SessionForker:
    def __init__(self, state: StateClient, timeout_seconds: float) -> None:
        self._state = state
        self._timeout = timeout_seconds

    async def fork(
        self,
        source_id: str,
        new_id: str,
        *,
        before_seq: int,
        request_id: str,
        deadline: Deadline,
    ) -> pb.ForkSessionResponse:
        if before_seq < 0 or before_seq == 1:
            raise InvalidArgument(
                "before_seq",
                "must be 0 (keep every item) or above 1 (keep the items before it); to "
                "start from nothing, chat in a new session",
            )
        try:
            result = await self._state.fork_session(
                source_id,
                new_id,
                up_to_seq=before_seq - 1 if before_seq else 0,
                request_id=fork_request_id(request_id),
                timeout=deadline.bound(self._timeout),
            )
        except StateServiceError as error:
            raise _fork_error(error, before_seq) from error
        if not result.replayed and result.copied_item_count:
            await self._check_cut(result, before_seq, deadline)
        if not result.replayed:
            metrics.FORKS.inc()
        return pb.ForkSessionResponse(
            session_id=result.session.session_id,
            copied_items=result.copied_item_count,
            last_seq=result.session.last_seq,
            etag=result.session.etag,
            replayed=result.replayed,
        )

    async def _check_cut(self, result: ForkResult, before_seq: int, deadline: Deadline) -> None:
        new_id = result.session.session_id
        try:
            page = await self._state.list_items(
                new_id,
                page_size=TAIL_PAGE,
                newest_first=True,
                timeout=deadline.bound(self._timeout),
            )
        except StateServiceError as error:
            raise state_error(error) from error
        dangling = open_calls(page.items)
        if not dangling:
            return
        # Only the session this call created, as it created it.
        with contextlib.suppress(StateServiceError):
            await self._state.delete_session(
                new_id, etag=result.session.etag, timeout=deadline.bound(self._timeout)
            )
        raise InvalidArgument(
            "before_seq",
            f"{before_seq} cuts tool call {dangling[0]!r} from its output; fork before the "
            "seq of a user message (`statecar history` shows them)",
        )


def _fork_error(error: StateServiceError, before_seq: int) -> ServiceError:
    if isinstance(error, SessionAlreadyExistsError):
        return AlreadyExists(error.message, reason="SESSION_ALREADY_EXISTS")
    if isinstance(error, EtagMismatchError) and error.reason == "FORK_SOURCE_CHANGED":
        return Aborted(error.message, reason="FORK_SOURCE_CHANGED")
    if isinstance(error, InvalidRequestError) and error.metadata.get("field") == "up_to_seq":
        return InvalidArgument("before_seq", f"{before_seq} does not fit: {error.message}")
    return state_error(error)
