"""Where requests enter the agent service: validation, then the turn or
workflow runner. Errors leave as ServiceErrors (see the proto for reasons)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from agent_service.approvals import Approvals
from agent_service.catalog import AgentCatalog
from agent_service.forks import SessionForker
from agent_service.settings import AgentServiceSettings
from agent_service.turns import Deadline, TurnRequest, TurnRunner
from agent_service.workflows import WorkflowRunner, workflow_message
from shared_runtime import identifiers
from shared_runtime.errors import InvalidArgument
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        catalog: AgentCatalog,
        turns: TurnRunner,
        workflows: WorkflowRunner,
        settings: AgentServiceSettings,
        forks: SessionForker,
        approvals: Approvals,
    ) -> None:
        self._catalog = catalog
        self._turns = turns
        self._workflows = workflows
        self._settings = settings
        self._forks = forks
        self._approvals = approvals

    def _turn_request(
        self, request: pb.ChatRequest | pb.StreamChatRequest, context: Context
    ) -> TurnRequest:
        if request.workflow_id:
            identifiers.session_id(request.workflow_id, "workflow_id")
            if request.session_id:
                raise InvalidArgument(
                    "session_id", "must be empty with workflow_id (each agent has its own)"
                )
        else:
            identifiers.session_id(request.session_id)
        if not request.message.strip():
            raise InvalidArgument("message", "is required")
        if len(request.message) > self._settings.max_message_chars:
            raise InvalidArgument(
                "message",
                f"is {len(request.message)} characters; the limit is "
                f"{self._settings.max_message_chars}",
            )
        if request.agent:
            self._turns.entry(request.agent)
        return TurnRequest(
            session_id=request.session_id,
            message=request.message,
            agent=request.agent,
            request_id=identifiers.request_id(request.request_id),
            deadline=Deadline(context.time_remaining()),
        )

    async def Chat(self, request: pb.ChatRequest, context: Context) -> pb.ChatResponse:
        turn = self._turn_request(request, context)
        if request.workflow_id:
            return await self._workflows.chat(request.workflow_id, turn)
        return await self._turns.chat(turn)

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: Context
    ) -> AsyncIterator[pb.StreamChatResponse]:
        turn = self._turn_request(request, context)
        events = (
            self._workflows.stream(request.workflow_id, turn)
            if request.workflow_id
            else self._turns.stream(turn)
        )
        async for event in events:
            yield event

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        return pb.ListAgentsResponse(
            agents=[
                pb.AgentInfo(
                    name=entry.spec.name,
                    description=entry.spec.description,
                    model=entry.model_name,
                    token_budget=entry.spec.token_budget,
                    tools=entry.spec.tools,
                    handoffs=entry.spec.handoffs,
                )
                for entry in self._catalog
            ],
            default_agent=self._catalog.default,
        )

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        workflow_id = identifiers.session_id(request.workflow_id, "workflow_id")
        info = await self._workflows.require(workflow_id, Deadline(context.time_remaining()))
        return pb.GetWorkflowResponse(workflow=workflow_message(info))

    async def UpdateWorkflow(
        self, request: pb.UpdateWorkflowRequest, context: Context
    ) -> pb.UpdateWorkflowResponse:
        workflow_id = identifiers.session_id(request.workflow_id, "workflow_id")
        if not request.current_stage:
            raise InvalidArgument("current_stage", "is required")
        info = await self._workflows.update(
            workflow_id,
            stage=request.current_stage,
            results_json=request.results_json,
            etag=identifiers.etag(request.etag),
            deadline=Deadline(context.time_remaining()),
        )
        return pb.UpdateWorkflowResponse(workflow=workflow_message(info))

    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Context
    ) -> pb.ForkSessionResponse:
        source_id = identifiers.session_id(request.source_session_id, "source_session_id")
        new_id = identifiers.session_id(request.new_session_id, "new_session_id")
        return await self._forks.fork(
            source_id,
            new_id,
            before_seq=request.before_seq,
            request_id=identifiers.request_id(request.request_id),
            deadline=Deadline(context.time_remaining()),
        )

    async def ResolveApprovals(
        self, request: pb.ResolveApprovalsRequest, context: Context
    ) -> pb.ResolveApprovalsResponse:
        identifiers.session_id(request.session_id)
        for decision in request.decisions:
            if not decision.approval_id:
                raise InvalidArgument("decisions.approval_id", "is required")
        if request.remaining not in pb.RemainingDecision.values():
            raise InvalidArgument("remaining", "is not a RemainingDecision value")
        return await self._approvals.resolve(
            request,
            identifiers.request_id(request.request_id),
            Deadline(context.time_remaining()),
        )

    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: Context
    ) -> pb.ListApprovalsResponse:
        session_id = identifiers.session_id(request.session_id)
        approvals = await self._approvals.pending(session_id, Deadline(context.time_remaining()))
        return pb.ListApprovalsResponse(approvals=approvals)
