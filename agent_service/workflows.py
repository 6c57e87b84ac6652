"""Multi-agent workflows: one session per agent plus a shared workflow state
(current stage, results, each agent's session) kept by the state service.

A workflow turn runs the current stage's agent on that agent's own session.
When the agent hands off, the turn is stored in the handing agent's session
(handoff call and all), the user's message and the new agent's answer are
appended to the new agent's session, and the workflow moves to the new agent.
Every step is idempotent under the turn's request_id, so a Chat retried after
a crash between the steps completes the handoff instead of repeating the turn.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from agent_service.catalog import AgentCatalog
from agent_service.turns import (
    AGENT_KEY,
    REQUEST_ID_KEY,
    Deadline,
    TurnRequest,
    TurnRunner,
    final_response,
    state_error,
    state_request_id,
)
from shared_runtime.errors import Aborted, InvalidArgument, NotFound
from state_service.client import (
    EtagMismatchError,
    NewItem,
    SessionNotFoundError,
    StateClient,
    StateServiceError,
    WorkflowInfo,
)
from statecar.agent.v1 import agent_service_pb2 as pb

SESSION_ID_LIMIT = 256
# Concurrent turns of one workflow race only on the small workflow document;
# a few read-modify-write rounds settle it.
UPDATE_ATTEMPTS = 5


def agent_session_id(workflow_id: str, agent: str) -> str:
    session = f"{workflow_id}.{agent}"
    if len(session) <= SESSION_ID_LIMIT:
        return session
    return f"wf-{hashlib.sha256(workflow_id.encode()).hexdigest()}.{agent}"


def workflow_message(info: WorkflowInfo) -> pb.Workflow:
    workflow = pb.Workflow(
        workflow_id=info.workflow_id,
        current_stage=info.current_stage,
        results_json=json.dumps(info.results, ensure_ascii=False).encode(),
        agent_sessions=info.agent_sessions,
        etag=info.etag,
    )
    workflow.create_time.FromDatetime(info.create_time)
    workflow.update_time.FromDatetime(info.update_time)
    if info.expire_time is not None:
        workflow.expire_time.FromDatetime(info.expire_time)
    return workflow


class WorkflowRunner:
    def __init__(
        self, catalog: AgentCatalog, turns: TurnRunner, state: StateClient, state_timeout: float
    ) -> None:
        self._catalog = catalog
        self._turns = turns
        self._state = state
        self._state_timeout = state_timeout

    async def get(self, workflow_id: str, deadline: Deadline) -> WorkflowInfo | None:
        try:
            return await self._state.get_workflow(
                workflow_id, timeout=deadline.bound(self._state_timeout)
            )
        except SessionNotFoundError:
            return None
        except StateServiceError as error:
            raise state_error(error) from error

    async def require(self, workflow_id: str, deadline: Deadline) -> WorkflowInfo:
        info = await self.get(workflow_id, deadline)
        if info is None:
            raise NotFound(f"no workflow {workflow_id!r}", reason="WORKFLOW_NOT_FOUND")
        return info

    async def chat(self, workflow_id: str, request: TurnRequest) -> pb.ChatResponse:
        return await final_response(self.stream(workflow_id, request, streamed=False))

    async def stream(
        self, workflow_id: str, request: TurnRequest, *, streamed: bool = True
    ) -> AsyncIterator[pb.StreamChatResponse]:
        """The stage agent's events as it produces them; the final event comes
        once the turn, the handoff seed and the workflow update are stored."""
        info = await self.get(workflow_id, request.deadline)
        stage = request.agent or (info.current_stage if info else self._catalog.default)
        self._turns.entry(stage)  # NOT_FOUND for an unknown agent, before any work
        sessions = dict(info.agent_sessions) if info else {}
        session = sessions.setdefault(stage, agent_session_id(workflow_id, stage))
        # The handing agent's turn and the seed of the next agent's session are
        # stored under one request_id, so a retry is recognised in either.
        request_id = request.request_id or uuid.uuid4().hex
        turn = TurnRequest(session, request.message, stage, request_id, request.deadline)
        response: pb.ChatResponse | None = None
        # The handoff seed appends to agent sessions without the turn's
        # etag: a cached context of them would often be stale.
        async for event in self._turns.stream(turn, streamed=streamed, cacheable=False):
            if event.HasField("final"):
                response = event.final
            else:
                yield event
        assert response is not None
        if response.pending_approvals:
            # Paused on tool approvals: nothing was stored, so the workflow
            # stays where it is (ResolveApprovals resumes the turn in the
            # stage agent's session; the workflow is not advanced by it).
            yield pb.StreamChatResponse(final=response)
            return
        if response.agent != stage:
            sessions.setdefault(response.agent, agent_session_id(workflow_id, response.agent))
            await self._seed(sessions[response.agent], request_id, request, response)
        updated = await self._advance(
            workflow_id, info, response.agent, {response.agent: response.reply}, sessions, request
        )
        response.workflow.CopyFrom(workflow_message(updated))
        yield pb.StreamChatResponse(final=response)

    async def _seed(
        self, session: str, request_id: str, request: TurnRequest, response: pb.ChatResponse
    ) -> None:
        """Gives the agent taking over the user's message and its own answer."""
        taken_over = [
            json.loads(item.json) for item in response.items if item.agent == response.agent
        ]
        seed_id = state_request_id(request_id)
        metadata = {REQUEST_ID_KEY: seed_id, AGENT_KEY: response.agent}
        items = [
            NewItem({"role": "user", "content": request.message}, metadata),
            *(NewItem(data, metadata) for data in taken_over),
        ]
        try:
            await self._state.append_items(
                session,
                items,
                request_id=seed_id,
                timeout=request.deadline.bound(self._state_timeout),
            )
        except StateServiceError as error:
            raise state_error(error) from error

    async def _advance(
        self,
        workflow_id: str,
        current: WorkflowInfo | None,
        stage: str,
        results: dict[str, Any],
        sessions: dict[str, str],
        request: TurnRequest,
    ) -> WorkflowInfo:
        """Records the turn in the workflow, starting from `current` (read at the
        start of the turn) and re-reading it only when someone changed it since."""
        for _ in range(UPDATE_ATTEMPTS):
            merged_results = {**(current.results if current else {}), **results}
            merged_sessions = {**(current.agent_sessions if current else {}), **sessions}
            try:
                return await self._state.update_workflow(
                    workflow_id,
                    current_stage=stage,
                    results=merged_results,
                    agent_sessions=merged_sessions,
                    etag=current.etag if current else "0",
                    allow_missing=current is None,
                    timeout=request.deadline.bound(self._state_timeout),
                )
            except EtagMismatchError:
                current = await self.get(workflow_id, request.deadline)
                continue
            except StateServiceError as error:
                raise state_error(error) from error
        raise Aborted(
            f"workflow {workflow_id!r} kept changing while this turn tried to record it; "
            "the turn is stored, retry with the same request_id to record it",
            reason="WORKFLOW_CONTENDED",
        )

    async def update(
        self,
        workflow_id: str,
        *,
        stage: str,
        results_json: bytes,
        etag: str,
        deadline: Deadline,
    ) -> WorkflowInfo:
        if self._catalog.get(stage) is None:
            raise InvalidArgument("current_stage", f"{stage!r} is not a configured agent")
        current = await self.require(workflow_id, deadline)
        if etag and etag != current.etag:
            raise Aborted(
                f"workflow {workflow_id!r} changed since etag {etag!r}",
                reason="ETAG_MISMATCH",
                metadata={"current_etag": current.etag},
            )
        results = _results(results_json) if results_json else current.results
        sessions = dict(current.agent_sessions)
        sessions.setdefault(stage, agent_session_id(workflow_id, stage))
        try:
            return await self._state.update_workflow(
                workflow_id,
                current_stage=stage,
                results=results,
                agent_sessions=sessions,
                etag=current.etag,
                allow_missing=False,
                timeout=deadline.bound(self._state_timeout),
            )
        except StateServiceError as error:
            raise state_error(error) from error


def _results(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument("results_json", "is not valid UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument("results_json", "must be a JSON object")
    return value
