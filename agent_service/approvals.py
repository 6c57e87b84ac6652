"""Tool approvals that survive replicas: pausing a turn, and resuming it once.

A turn whose model calls a tool marked `needs_approval` in the agents file
stops there (openai-agents returns the run's interruptions). Nothing goes to
the session log yet: the run, serialized by the SDK (RunState.to_string), is
stored as a paused run in the state service (PutPausedRun, conditional on the
etag of the context the turn read, as its append would have been), and the
turn answers with the pending approvals. Nothing stays in this process.

ResolveApprovals, on any replica, then:

    ListPausedRuns            find the run of the approval ids, check that
                              every approval of it is decided
    ClaimPausedRun(claim_id)  the one atomic step (a Lua script) that gives
                              the run to exactly one resume
    RunState.from_string -> approve / reject -> Runner.run
    AppendItems               the whole turn (user message, calls, outputs,
                              reply) as one turn, request_id = the turn's
    ResolvePausedRun(result)  the response, kept for retries

Exactly once: claim_id is derived from the caller's request_id, so a retry
of a finished resume gets the stored response (replayed) and runs nothing; a
retry while the first still runs, or a racing resume from another replica,
finds the run claimed (ABORTED, RESUME_CONFLICT); after it finished,
another request_id gets FAILED_PRECONDITION (ALREADY_RESOLVED).

If the replica dies after its claim, whether the tools ran is unknown, so
the claim is never released nor taken over: the run stays claimed until it
expires (STATE_SERVICE_PAUSED_RUN_TTL_SECONDS). Tools run at most once; the
turn is in the log only if the append happened. A retry with the same
request_id gets the run back marked held: if the first attempt's turn is in
the log it finishes the resume from there (resolves it with that turn),
otherwise it is RESUME_CONFLICT, since the first attempt may still be running
or may have run the tool. The same holds when the resumed run fails (model
error) after its claim.

The resumed turn is appended at the end of the log without an etag: turns
stored while it was paused stay before it (each turn stays contiguous, every
tool call with its output), and an approved tool that ran always has its
output stored. A retried Chat with the paused turn's request_id returns the
same pending approvals (the pause is keyed by the turn) or, once resumed,
the stored turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import openai
from agents import (
    AgentsException,
    RunConfig,
    RunContextWrapper,
    Runner,
    RunResult,
    RunResultStreaming,
)
from agents.items import ToolApprovalItem
from agents.run_state import RunState

from agent_service import metrics
from agent_service.catalog import AgentCatalog, CatalogEntry
from agent_service.settings import AgentServiceSettings
from agent_service.tools import TurnContext
from agent_service.turns import (
    AGENT_KEY,
    REPLAY_SCAN_ITEMS,
    REQUEST_ID_KEY,
    Deadline,
    TurnRequest,
    deadline_error,
    model_error,
    reply_of,
    state_error,
)
from shared_runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from state_service.client import (
    Context,
    NewItem,
    PausedRun,
    PendingApproval,
    StateClient,
    StateServiceError,
    StoredItem,
)
from statecar.agent.v1 import agent_service_pb2 as pb

ENVELOPE_VERSION = 1
MAX_REJECTION_CHARS = 2000
_DECISIONS = {
    pb.REMAINING_DECISION_APPROVE: "approve",
    pb.REMAINING_DECISION_REJECT: "reject",
}


def run_id_of(turn_id: str) -> str:
    """The paused run's id: one per turn, so a retried Chat that pauses again
    finds the run it stored (PutPausedRun replays)."""
    return "run-" + hashlib.sha256(turn_id.encode()).hexdigest()[:24]


def run_of_approval(approval_id: str) -> str:
    return approval_id.rpartition(".")[0]


def claim_id_of(request_id: str) -> str:
    """The claim of a resume: the caller's request_id (hashed to the claim
    charset) so its retries are recognised; random without one."""
    if not request_id:
        return "resume-" + uuid.uuid4().hex
    return "resume-" + hashlib.sha256(request_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Envelope:
    """What is stored as a paused run's state: the SDK's RunState and what
    the resume needs to store the turn as the turn would have been."""

    turn_id: str
    agent: str
    message: str
    run_state: str

    def encode(self) -> bytes:
        return json.dumps({"v": ENVELOPE_VERSION, **self.__dict__}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Envelope:
        data = json.loads(raw)
        return cls(data["turn_id"], data["agent"], data["message"], data["run_state"])


def _pending_message(approval: PendingApproval, run: PausedRun) -> pb.PendingApproval:
    message = pb.PendingApproval(
        approval_id=approval.approval_id,
        tool_name=approval.tool_name,
        arguments_json=approval.arguments_json,
        agent=approval.agent,
    )
    message.expire_time.FromDatetime(run.expire_time)
    return message


def _call_id(item: ToolApprovalItem) -> str:
    raw = item.raw_item
    value = raw.get("call_id") if isinstance(raw, dict) else getattr(raw, "call_id", None)
    return str(value or "")


def _arguments(item: ToolApprovalItem) -> str:
    raw = item.raw_item
    value = raw.get("arguments") if isinstance(raw, dict) else getattr(raw, "arguments", None)
    return str(value or "")


def _resume_error(error: StateServiceError) -> ServiceError:
    mapped = _resume_error_of(error.reason)
    if mapped is not None:
        return mapped
    if error.reason == "PAUSED_RUN_LIMIT":
        return ResourceExhausted(error.message, reason="PAUSED_RUN_LIMIT")
    return state_error(error)


def _resume_conflict() -> ServiceError:
    return Aborted(
        "another ResolveApprovals is resuming this paused run (or was, on a replica "
        "that stopped: it stays claimed until it expires); nothing ran now",
        reason="RESUME_CONFLICT",
    )


def _resume_error_of(reason: str) -> ServiceError | None:
    """The agent error of a paused-run reason (None: not one of these)."""
    if reason == "PAUSED_RUN_NOT_FOUND":
        return NotFound(
            "the paused run of these approvals does not exist or has expired "
            "(STATE_SERVICE_PAUSED_RUN_TTL_SECONDS); nothing ran",
            reason="APPROVAL_NOT_FOUND",
        )
    if reason == "PAUSED_RUN_CLAIMED":
        return _resume_conflict()
    if reason == "PAUSED_RUN_RESOLVED":
        return FailedPrecondition(
            "this paused run was already resumed by another request; its turn is in the "
            "session log",
            reason="ALREADY_RESOLVED",
        )
    return None


_RESUME_OUTCOME = {
    "APPROVAL_NOT_FOUND": "not_found",
    "RESUME_CONFLICT": "conflict",
    "ALREADY_RESOLVED": "resolved",
}


class Approvals:
    """Pauses turns (TurnRunner.pauser) and resumes them (ResolveApprovals)."""

    def __init__(
        self, catalog: AgentCatalog, state: StateClient, settings: AgentServiceSettings
    ) -> None:
        self._catalog = catalog
        self._state = state
        self._settings = settings
        self._run_config = RunConfig(
            tracing_disabled=not settings.tracing, workflow_name="statecar resume"
        )

    async def _state_call(self, deadline: Deadline, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(
                *args, timeout=deadline.bound(self._settings.state_timeout_seconds), **kwargs
            )
        except StateServiceError as error:
            if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and (deadline.remaining() or 1) <= 0:
                raise deadline_error() from error
            raise _resume_error(error) from error

    # -- pausing ---------------------------------------------------------------

    async def pause(
        self,
        entry: CatalogEntry,
        request: TurnRequest,
        turn_id: str,
        context: Context,
        result: RunResult | RunResultStreaming,
        stats: pb.ContextStats,
    ) -> pb.ChatResponse:
        response = await self._store_pause(
            entry.spec.name,
            request.session_id,
            turn_id,
            request.message,
            result,
            etag=context.etag,
            deadline=request.deadline,
        )
        response.context.CopyFrom(stats)
        return response

    async def _store_pause(
        self,
        agent: str,
        session_id: str,
        turn_id: str,
        message: str,
        result: RunResult | RunResultStreaming,
        *,
        etag: str,
        deadline: Deadline,
        run_id: str | None = None,
    ) -> pb.ChatResponse:
        run_id = run_id or run_id_of(turn_id)
        approvals = [
            PendingApproval(
                approval_id=f"{run_id}.{index}",
                tool_name=str(item.tool_name or ""),
                arguments_json=_arguments(item),
                agent=item.agent.name,
                call_id=_call_id(item),
            )
            for index, item in enumerate(result.interruptions, start=1)
        ]
        run_state = result.to_state().to_string(
            context_serializer=lambda turn: {"session_id": turn.session_id}
        )
        envelope = _Envelope(turn_id, agent, message, run_state)
        try:
            run, replayed = await self._state_call(
                deadline,
                self._state.put_paused_run,
                session_id,
                run_id,
                envelope.encode(),
                approvals,
                etag=etag,
            )
        except Aborted as error:
            if error.reason != "ETAG_MISMATCH":
                raise
            raise Aborted(
                f"another turn on session {session_id!r} was stored while this one ran; "
                "nothing was stored, retry on the fresh context",
                reason="CONCURRENT_TURN",
            ) from None
        if not replayed:
            metrics.APPROVAL_PAUSES.labels(agent).inc()
        usage = result.context_wrapper.usage
        return pb.ChatResponse(
            agent=result.last_agent.name,
            usage=pb.TokenUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                total_tokens=usage.total_tokens,
                model_requests=usage.requests,
            ),
            etag=etag,
            session_id=session_id,
            replayed=replayed,
            pending_approvals=[_pending_message(a, run) for a in run.approvals],
        )

    # -- listing ---------------------------------------------------------------

    async def pending(self, session_id: str, deadline: Deadline) -> list[pb.PendingApproval]:
        runs: list[PausedRun] = await self._state_call(
            deadline, self._state.list_paused_runs, session_id
        )
        return [
            _pending_message(approval, run)
            for run in runs
            if run.status == "paused"
            for approval in run.approvals
        ]

    # -- resuming --------------------------------------------------------------

    async def resolve(
        self, request: pb.ResolveApprovalsRequest, request_id: str, deadline: Deadline
    ) -> pb.ResolveApprovalsResponse:
        outcome = "error"
        try:
            response = await self._resolve(request, request_id, deadline)
            outcome = "replayed" if response.turn.replayed else "ok"
            if response.turn.pending_approvals and not response.turn.replayed:
                outcome = "paused_again"
            return response
        except ServiceError as error:
            outcome = _RESUME_OUTCOME.get(error.reason, "error")
            raise
        finally:
            metrics.RESUMES.labels(outcome).inc()

    def _decisions(
        self, request: pb.ResolveApprovalsRequest, runs: list[PausedRun], claim_id: str
    ) -> tuple[PausedRun, dict[str, tuple[str, str]]]:
        """The run to resume and, by call id, (decision, rejection message)."""
        named = {d.approval_id for d in request.decisions}
        if len(named) != len(request.decisions):
            raise InvalidArgument("decisions", "names an approval_id twice")
        if named:
            run_ids = {run_of_approval(a) for a in named}
            if len(run_ids) > 1:
                raise InvalidArgument(
                    "decisions", "names approvals of several paused turns; resolve one per call"
                )
            run = next((r for r in runs if r.run_id in run_ids), None)
        else:
            if request.remaining not in _DECISIONS:
                raise InvalidArgument(
                    "decisions", "is empty: name approvals, or set remaining to approve or reject"
                )
            # This request's own run first: a retry, also after it paused again.
            candidates = [r for r in runs if r.claim_id == claim_id] or [
                r for r in runs if r.status == "paused"
            ]
            if not candidates:
                # Taken by another resume: its claim says which error applies.
                candidates = runs[-1:]
            if len(candidates) > 1:
                raise InvalidArgument(
                    "decisions",
                    f"the session has {len(candidates)} paused turns; name the approval ids "
                    "of one (ListApprovals)",
                )
            run = candidates[0] if candidates else None
        if run is None:
            missing = sorted(named)[0] if named else ""
            raise NotFound(
                f"no pending approval {missing!r} in this session (unknown, or its paused "
                "turn expired)"
                if missing
                else "this session has no pending approvals",
                reason="APPROVAL_NOT_FOUND",
                metadata={"approval_id": missing} if missing else None,
            )
        known = {a.approval_id: a for a in run.approvals}
        unknown = sorted(named - known.keys())
        if unknown:
            raise NotFound(
                f"no pending approval {unknown[0]!r} in this session",
                reason="APPROVAL_NOT_FOUND",
                metadata={"approval_id": unknown[0]},
            )
        if len(request.rejection_message) > MAX_REJECTION_CHARS:
            raise InvalidArgument(
                "rejection_message", f"is longer than {MAX_REJECTION_CHARS} characters"
            )
        by_id = {d.approval_id: d for d in request.decisions}
        decisions: dict[str, tuple[str, str]] = {}
        for approval_id, approval in known.items():
            decision = by_id.get(approval_id)
            if decision is not None:
                if len(decision.rejection_message) > MAX_REJECTION_CHARS:
                    raise InvalidArgument(
                        "decisions.rejection_message",
                        f"is longer than {MAX_REJECTION_CHARS} characters",
                    )
                verdict = "approve" if decision.approve else "reject"
                message = decision.rejection_message or request.rejection_message
                decisions[approval.call_id] = (verdict, message)
            elif request.remaining in _DECISIONS:
                decisions[approval.call_id] = (
                    _DECISIONS[request.remaining],
                    request.rejection_message,
                )
            else:
                raise InvalidArgument(
                    "decisions",
                    f"approval {approval_id!r} of this paused turn is not decided: decide "
                    "every one, or set remaining",
                )
        return run, decisions

    async def _resolve(
        self, request: pb.ResolveApprovalsRequest, request_id: str, deadline: Deadline
    ) -> pb.ResolveApprovalsResponse:
        session_id = request.session_id
        claim_id = claim_id_of(request_id)
        runs: list[PausedRun] = await self._state_call(
            deadline, self._state.list_paused_runs, session_id
        )
        run, decisions = self._decisions(request, runs, claim_id)
        claimed = await self._state_call(
            deadline, self._state.claim_paused_run, session_id, run.run_id, claim_id
        )
        if claimed.resolved:
            replay = pb.ResolveApprovalsResponse.FromString(claimed.state)
            replay.turn.replayed = True
            replay.turn.usage.Clear()
            return replay
        envelope = _Envelope.decode(claimed.state)
        by_call = {a.call_id: a.approval_id for a in run.approvals}
        if claimed.held:
            # A retry of this request: its first attempt runs, or died. Only
            # if that attempt stored its turn can this one finish the resume.
            stored = await self._stored_turn(session_id, envelope.turn_id, deadline)
            if stored is None:
                raise _resume_conflict()
            decided = {by_call.get(call, call): verdict for call, (verdict, _) in decisions.items()}
            response = pb.ResolveApprovalsResponse(turn=stored, decisions=decided)
            await self._state_call(
                deadline,
                self._state.resolve_paused_run,
                session_id,
                run.run_id,
                claim_id,
                response.SerializeToString(),
            )
            response.turn.replayed = True
            return response
        entry = self._catalog.get(envelope.agent)
        if entry is None:
            raise NotFound(
                f"the paused turn's agent {envelope.agent!r} is no longer configured",
                reason="AGENT_NOT_FOUND",
            )
        turn_context = TurnContext(
            session_id,
            self._state,
            lambda: deadline.bound(self._settings.state_timeout_seconds),
        )
        try:
            state: RunState[Any, Any] = await RunState.from_string(
                entry.agent, envelope.run_state, context_override=RunContextWrapper(turn_context)
            )
            applied: dict[str, str] = {}
            for item in state.get_interruptions():
                verdict, rejection = decisions.get(_call_id(item), ("reject", ""))
                if verdict == "approve":
                    state.approve(item)
                else:
                    state.reject(item, rejection_message=rejection or None)
                applied[_call_id(item)] = verdict
                metrics.APPROVAL_DECISIONS.labels(verdict).inc()
            async with asyncio.timeout(deadline.remaining()):
                result = await Runner.run(
                    entry.agent,
                    state,
                    max_turns=self._settings.max_model_calls,
                    run_config=self._run_config,
                )
        except TimeoutError:
            raise deadline_error() from None
        except ServiceError:
            raise
        except (AgentsException, openai.APIError) as error:
            raise model_error(entry.spec.name, error) from error
        decided = {by_call.get(call, call): verdict for call, verdict in applied.items()}
        if result.interruptions:
            turn = await self._store_pause(
                envelope.agent,
                session_id,
                envelope.turn_id,
                envelope.message,
                result,
                etag="",
                deadline=deadline,
                run_id=f"{run.run_id}-{hashlib.sha256(claim_id.encode()).hexdigest()[:8]}",
            )
        else:
            turn = await self._store_turn(session_id, envelope, entry, result, deadline)
        response = pb.ResolveApprovalsResponse(turn=turn, decisions=decided)
        await self._state_call(
            deadline,
            self._state.resolve_paused_run,
            session_id,
            run.run_id,
            claim_id,
            response.SerializeToString(),
        )
        return response

    async def _stored_turn(
        self, session_id: str, turn_id: str, deadline: Deadline
    ) -> pb.ChatResponse | None:
        """The turn stored under turn_id, from the newest end of the log (a
        resumed turn is appended at the end); None if not within
        REPLAY_SCAN_ITEMS."""
        found: list[StoredItem] = []
        token = ""
        scanned = 0
        while scanned < REPLAY_SCAN_ITEMS:
            page = await self._state_call(
                deadline,
                self._state.list_items,
                session_id,
                page_size=200,
                page_token=token,
                newest_first=True,
            )
            for item in page.items:
                if item.metadata.get(REQUEST_ID_KEY) == turn_id:
                    found.append(item)
                elif found:  # a turn's items are contiguous
                    break
            else:
                scanned += len(page.items)
                token = page.next_page_token
                if token:
                    continue
            break
        if not found:
            return None
        found.reverse()
        pairs = [(item.data, item.metadata.get(AGENT_KEY, "")) for item in found]
        reply, agent = reply_of(pairs)
        return pb.ChatResponse(
            reply=reply,
            agent=agent,
            items=[
                pb.TurnItem(
                    type=item.data.get("type", "message"),
                    json=json.dumps(item.data, ensure_ascii=False, separators=(",", ":")),
                    seq=item.seq,
                    agent=item.metadata.get(AGENT_KEY, ""),
                )
                for item in found
            ],
            session_id=session_id,
        )

    async def _store_turn(
        self,
        session_id: str,
        envelope: _Envelope,
        entry: CatalogEntry,
        result: RunResult,
        deadline: Deadline,
    ) -> pb.ChatResponse:
        items: list[tuple[dict[str, Any], str]] = [
            ({"role": "user", "content": envelope.message}, entry.spec.name)
        ]
        items.extend(
            (dict(run_item.to_input_item()), run_item.agent.name)
            for run_item in result.new_items
            if not isinstance(run_item, ToolApprovalItem)
        )
        appended = await self._state_call(
            deadline,
            self._state.append_items,
            session_id,
            [
                NewItem(data, {REQUEST_ID_KEY: envelope.turn_id, AGENT_KEY: agent})
                for data, agent in items
            ],
            request_id=envelope.turn_id,
        )
        reply, _ = reply_of(items)
        usage = result.context_wrapper.usage
        return pb.ChatResponse(
            reply=str(result.final_output or reply),
            agent=result.last_agent.name,
            items=[
                pb.TurnItem(
                    type=data.get("type", "message"),
                    json=json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                    seq=appended.first_seq + index,
                    agent=agent,
                )
                for index, (data, agent) in enumerate(items)
            ],
            usage=pb.TokenUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                total_tokens=usage.total_tokens,
                model_requests=usage.requests,
            ),
            etag=appended.etag,
            session_id=session_id,
        )
