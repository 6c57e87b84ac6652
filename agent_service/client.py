"""AgentClient: the async, typed client of the agent service for backend
services.

    async with AgentClient("agents.internal:50061") as agents:
        result = await agents.chat("session-1", "Hello", request_id="req-42")
        async for event in agents.stream_chat("session-1", "And then?"):
            ...

Chat retries are safe with the same request_id (the turn is stored once);
the client retries UNAVAILABLE itself only for calls that carry one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc

from shared_runtime.channels import reachable as channel_reachable
from shared_runtime.errors import error_info
from state_service.client import channel_target, service_config
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc

R = TypeVar("R")

SERVICE = "statecar.agent.v1.AgentService"

# Chat is safe to retry: the client always sends a request_id.
SERVICE_CONFIG = service_config(SERVICE, max_attempts=3, initial_backoff="0.1s")


class AgentServiceError(Exception):
    """A call to the agent service failed; `reason` is the ErrorInfo reason
    (CONCURRENT_TURN, MODEL_FAILED, TURN_DEADLINE, AGENT_NOT_FOUND, ...)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str]
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> AgentServiceError:
        info = error_info(error)
        return cls(
            error.code(),
            error.details() or "",
            info.reason if info is not None else "",
            dict(info.metadata) if info is not None else {},
        )


@dataclass(frozen=True, slots=True)
class TurnItem:
    seq: int
    agent: str
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type", "message"))


@dataclass(frozen=True, slots=True)
class Workflow:
    workflow_id: str
    current_stage: str
    results: dict[str, Any]
    agent_sessions: dict[str, str]
    etag: str
    create_time: datetime
    update_time: datetime
    # None when the workflow does not expire.
    expire_time: datetime | None = None

    @classmethod
    def from_proto(cls, message: pb.Workflow) -> Workflow:
        return cls(
            workflow_id=message.workflow_id,
            current_stage=message.current_stage,
            results=json.loads(message.results_json) if message.results_json else {},
            agent_sessions=dict(message.agent_sessions),
            etag=message.etag,
            create_time=message.create_time.ToDatetime(),
            update_time=message.update_time.ToDatetime(),
            expire_time=message.expire_time.ToDatetime()
            if message.HasField("expire_time")
            else None,
        )


@dataclass(frozen=True, slots=True)
class Approval:
    """A tool call waiting for a human decision."""

    approval_id: str
    tool_name: str
    arguments: dict[str, Any] | str  # the parsed JSON, or the raw text if it is not JSON
    agent: str
    expire_time: datetime

    @classmethod
    def from_proto(cls, message: pb.PendingApproval) -> Approval:
        try:
            arguments: dict[str, Any] | str = json.loads(message.arguments_json)
        except ValueError:
            arguments = message.arguments_json
        return cls(
            message.approval_id,
            message.tool_name,
            arguments,
            message.agent,
            message.expire_time.ToDatetime(),
        )


@dataclass(frozen=True, slots=True)
class ChatResult:
    reply: str
    agent: str
    session_id: str
    items: list[TurnItem]
    input_tokens: int
    output_tokens: int
    model_requests: int
    context_items: int
    context_tokens: int
    summary_used: bool
    retrieval_used: bool
    etag: str
    replayed: bool
    workflow: Workflow | None = None
    raw: pb.ChatResponse = field(default_factory=pb.ChatResponse, repr=False)
    # Non-empty when the turn paused on tools needing approval (nothing stored
    # yet): decide them with resolve_approvals.
    pending_approvals: list[Approval] = field(default_factory=list)

    @classmethod
    def from_proto(cls, response: pb.ChatResponse) -> ChatResult:
        return cls(
            reply=response.reply,
            agent=response.agent,
            session_id=response.session_id,
            items=[TurnItem(i.seq, i.agent, json.loads(i.json)) for i in response.items],
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            model_requests=response.usage.model_requests,
            context_items=response.context.items,
            context_tokens=response.context.tokens,
            summary_used=response.context.summary_used,
            retrieval_used=response.context.retrieval_used,
            etag=response.etag,
            replayed=response.replayed,
            workflow=Workflow.from_proto(response.workflow)
            if response.HasField("workflow")
            else None,
            raw=response,
            pending_approvals=[Approval.from_proto(a) for a in response.pending_approvals],
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallFinished:
    call_id: str
    output: str


@dataclass(frozen=True, slots=True)
class HandoffEvent:
    from_agent: str
    to_agent: str


ChatEvent = TextDelta | ToolCallStarted | ToolCallFinished | HandoffEvent | ChatResult


def _event(message: pb.StreamChatResponse) -> ChatEvent | None:
    kind = message.WhichOneof("event")
    if kind == "text_delta":
        return TextDelta(message.text_delta)
    if kind == "tool_call_started":
        started = message.tool_call_started
        return ToolCallStarted(started.call_id, started.name, started.arguments)
    if kind == "tool_call_finished":
        return ToolCallFinished(
            message.tool_call_finished.call_id, message.tool_call_finished.output
        )
    if kind == "handoff":
        return HandoffEvent(message.handoff.from_agent, message.handoff.to_agent)
    if kind == "final":
        return ChatResult.from_proto(message.final)
    return None  # an event kind newer than this client


@dataclass(frozen=True, slots=True)
class AgentInfo:
    name: str
    description: str
    model: str
    token_budget: int
    tools: list[str]
    handoffs: list[str]


@dataclass(frozen=True, slots=True)
class ForkedSession:
    """The session ForkSession created: chat in it to resend from the cut."""

    session_id: str
    copied_items: int
    last_seq: int
    etag: str
    replayed: bool


class AgentClient:
    """Async client of the agent service. `target` is host:port (all DNS
    records, round robin), a list of IP:port, or any gRPC target;
    `bearer_token` authenticates as a tenant (AGENT_SERVICE_AUTH=token)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 60.0,
        bearer_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.timeout = timeout
        self._metadata = tuple(metadata)
        if bearer_token is not None:
            self._metadata += (("authorization", f"Bearer {bearer_token}"),)
        channel_options = [
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            *options,
        ]
        resolved = channel_target(target)
        self._channel = (
            grpc.aio.insecure_channel(resolved, options=channel_options)
            if credentials is None
            else grpc.aio.secure_channel(resolved, credentials, options=channel_options)
        )
        self._stub = pb_grpc.AgentServiceStub(self._channel)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def reachable(self, timeout: float) -> bool:
        """Whether the service's address accepts a connection within `timeout`."""
        return await channel_reachable(self._channel, timeout)

    async def close(self) -> None:
        await self._channel.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def _call(
        self, method: Callable[..., Awaitable[R]], request: Any, timeout: float | None
    ) -> R:
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise AgentServiceError.from_rpc_error(error) from error

    @staticmethod
    def _turn_fields(
        session_id: str, message: str, agent: str, request_id: str | None, workflow_id: str
    ) -> dict[str, str]:
        """The fields of a ChatRequest or StreamChatRequest (the same in both)."""
        return {
            "session_id": session_id,
            "message": message,
            "agent": agent,
            "request_id": request_id if request_id is not None else uuid.uuid4().hex,
            "workflow_id": workflow_id,
        }

    async def chat(
        self,
        session_id: str,
        message: str,
        *,
        agent: str = "",
        request_id: str | None = None,
        workflow_id: str = "",
        timeout: float | None = None,
    ) -> ChatResult:
        """One turn. With workflow_id, leave session_id empty: each agent of
        the workflow has its own session."""
        request = pb.ChatRequest(
            **self._turn_fields(session_id, message, agent, request_id, workflow_id)
        )
        return ChatResult.from_proto(await self._call(self._stub.Chat, request, timeout))

    async def stream_chat(
        self,
        session_id: str,
        message: str,
        *,
        agent: str = "",
        request_id: str | None = None,
        workflow_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[ChatEvent]:
        """The turn's events; the last one is the ChatResult."""
        request = pb.StreamChatRequest(
            **self._turn_fields(session_id, message, agent, request_id, workflow_id)
        )
        call = self._stub.StreamChat(
            request, timeout=self._timeout(timeout), metadata=self._metadata
        )
        try:
            async for message_event in call:
                event = _event(message_event)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as error:
            raise AgentServiceError.from_rpc_error(error) from error
        finally:
            call.cancel()

    async def list_agents(self, *, timeout: float | None = None) -> tuple[list[AgentInfo], str]:
        """The configured agents and the name of the default one."""
        response = await self._call(self._stub.ListAgents, pb.ListAgentsRequest(), timeout)
        agents = [
            AgentInfo(
                a.name, a.description, a.model, a.token_budget, list(a.tools), list(a.handoffs)
            )
            for a in response.agents
        ]
        return agents, response.default_agent

    async def get_workflow(self, workflow_id: str, *, timeout: float | None = None) -> Workflow:
        request = pb.GetWorkflowRequest(workflow_id=workflow_id)
        response = await self._call(self._stub.GetWorkflow, request, timeout)
        return Workflow.from_proto(response.workflow)

    async def update_workflow(
        self,
        workflow_id: str,
        *,
        current_stage: str,
        results: Mapping[str, Any] | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> Workflow:
        request = pb.UpdateWorkflowRequest(
            workflow_id=workflow_id,
            current_stage=current_stage,
            results_json=json.dumps(results).encode() if results is not None else b"",
            etag=etag,
        )
        response = await self._call(self._stub.UpdateWorkflow, request, timeout)
        return Workflow.from_proto(response.workflow)

    async def fork_session(
        self,
        source_session_id: str,
        new_session_id: str,
        *,
        before_seq: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ForkedSession:
        """Copies the items of the source before `before_seq` (0: all) into a
        new session; the next chat there resends from that point."""
        request = pb.ForkSessionRequest(
            source_session_id=source_session_id,
            new_session_id=new_session_id,
            before_seq=before_seq,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        response = await self._call(self._stub.ForkSession, request, timeout)
        return ForkedSession(
            response.session_id,
            response.copied_items,
            response.last_seq,
            response.etag,
            response.replayed,
        )

    async def resolve_approvals(
        self,
        session_id: str,
        *,
        approve: Sequence[str] = (),
        reject: Sequence[str] = (),
        remaining: str | None = None,
        rejection_message: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> tuple[ChatResult, dict[str, str]]:
        """Approves and rejects the pending approvals of a paused turn and
        resumes it (on any replica, once). `remaining` ("approve" or "reject")
        decides the approvals not named. Returns the resumed turn as stored
        and the decision applied to each approval id. Retrying with the same
        request_id is safe: it returns the first response."""
        decisions = [pb.ApprovalDecision(approval_id=a, approve=True) for a in approve]
        decisions += [pb.ApprovalDecision(approval_id=a, approve=False) for a in reject]
        request = pb.ResolveApprovalsRequest(
            session_id=session_id,
            decisions=decisions,
            remaining={
                None: pb.REMAINING_DECISION_UNSPECIFIED,
                "approve": pb.REMAINING_DECISION_APPROVE,
                "reject": pb.REMAINING_DECISION_REJECT,
            }[remaining],
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            rejection_message=rejection_message,
        )
        response = await self._call(self._stub.ResolveApprovals, request, timeout)
        return ChatResult.from_proto(response.turn), dict(response.decisions)

    async def list_approvals(
        self, session_id: str, *, timeout: float | None = None
    ) -> list[Approval]:
        """The approvals waiting for a decision in a session, oldest first."""
        request = pb.ListApprovalsRequest(session_id=session_id)
        response = await self._call(self._stub.ListApprovals, request, timeout)
        return [Approval.from_proto(a) for a in response.approvals]
