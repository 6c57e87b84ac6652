"""The agent service process: agents, the state-service channel, the gRPC
server, health, metrics and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from agents import set_tracing_disabled
from pydantic_settings import CliApp

from agent_service.approvals import Approvals
from agent_service.catalog import AgentCatalog
from agent_service.config import load_config
from agent_service.forks import SessionForker
from agent_service.models import ModelFactory
from agent_service.servicer import AgentServicer
from agent_service.settings import AgentServiceSettings
from agent_service.turns import TurnRunner, deadline_error
from agent_service.workflows import WorkflowRunner
from shared_runtime.auth import auth_interceptor, current_tenant
from shared_runtime.grpc_metrics import (
    ServerMetricsInterceptor,
    client_interceptors,
    server_metrics,
)
from shared_runtime.health import Readiness
from shared_runtime.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from shared_runtime.metrics_http import MetricsEndpoint
from shared_runtime.process import (
    add_health_reflection_and_bind,
    create_server,
    reachable_address,
    serve_until_terminated,
)
from shared_runtime.server_chain import ServerChain
from shared_runtime.tls import channel_credentials
from state_service.client import StateClient, StateServiceError
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from state_service.in_process import InProcessState
    from state_service.settings import StateServiceSettings

logger = logging.getLogger("statecar.agent")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
ERROR_DOMAIN = "agent.statecar.dev"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def state_client(
    settings: AgentServiceSettings, channel: grpc.aio.Channel | None = None
) -> StateClient:
    """The client of the state service: over gRPC to settings.state_target,
    or over `channel` (the in-process state service's)."""
    if channel is not None:
        return StateClient(
            "in-process",
            channel=channel,
            timeout=settings.state_timeout_seconds,
            acting_for=current_tenant if settings.auth != "none" else None,
        )
    credentials = None
    if settings.state_tls_ca_file is not None or settings.state_tls_cert_file is not None:
        credentials = channel_credentials(
            settings.state_tls_ca_file, settings.state_tls_cert_file, settings.state_tls_key_file
        )
    token = settings.state_bearer_token.get_secret_value()
    return StateClient(
        settings.state_target,
        timeout=settings.state_timeout_seconds,
        bearer_token=token or None,
        credentials=credentials,
        # Callers authenticated here are tenants at the state service too.
        acting_for=current_tenant if settings.auth != "none" else None,
        # grpc_client_* metrics of every call to the state service.
        interceptors=client_interceptors(),
    )


class StateReadiness:
    """The agent is ready while the state service is; with caller
    authentication on, only once the state service has shown that it honours
    the tenant the agent acts for (checked until it has, then trusted)."""

    def __init__(self, state: StateClient, settings: AgentServiceSettings) -> None:
        self._state = state
        self._timeout = settings.health_interval_seconds
        self._delegation_checked = settings.auth == "none"
        self._reported: str | None = None

    async def check(self) -> None:
        await self._state.check_ready(timeout=self._timeout)
        if self._delegation_checked:
            return
        try:
            await self._state.check_delegation(timeout=self._timeout)
        except StateServiceError as error:
            if error.message != self._reported:  # once, not every probe
                self._reported = error.message
                logger.error("not ready: %s", error.message)
            raise
        self._delegation_checked = True


@dataclass
class AgentServer:
    settings: AgentServiceSettings
    server: grpc.aio.Server
    state: StateClient
    models: ModelFactory
    readiness: Readiness
    port: int
    metrics_endpoint: MetricsEndpoint | None = None
    in_process_state: InProcessState | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def address(self) -> str:
        return reachable_address(self.settings.listen, self.port)

    @classmethod
    async def start(
        cls,
        settings: AgentServiceSettings,
        *,
        state_settings: StateServiceSettings | None = None,
    ) -> AgentServer:
        """Starts the service; with settings.state_in_process, the state service
        too, inside this process (configured by `state_settings`, by default
        the STATE_SERVICE_* environment). A failed start leaves nothing running."""
        async with contextlib.AsyncExitStack() as undo:
            instance = await cls._start(settings, state_settings, undo)
            undo.pop_all()  # started: from now on stop() owns the cleanup
            return instance
        raise AssertionError("unreachable")

    @classmethod
    async def _start(
        cls,
        settings: AgentServiceSettings,
        state_settings: StateServiceSettings | None,
        undo: contextlib.AsyncExitStack,
    ) -> AgentServer:
        # openai-agents would export traces to OpenAI's servers by default.
        set_tracing_disabled(not settings.tracing)
        config = load_config(settings.agents_config)
        in_process = None
        if settings.state_in_process:
            # Only then: an agent with a remote state service never loads it.
            from state_service.in_process import InProcessState
            from state_service.settings import StateServiceSettings

            in_process = await InProcessState.start(
                state_settings or CliApp.run(StateServiceSettings, cli_args=[])
            )
            undo.push_async_callback(in_process.stop)
        models = ModelFactory(settings)
        undo.push_async_callback(models.close)
        catalog = AgentCatalog(config, models)
        state = state_client(settings, in_process.channel if in_process is not None else None)
        undo.push_async_callback(state.close)
        turns = TurnRunner(catalog, state, settings)
        approvals = Approvals(catalog, state, settings)
        turns.pauser = approvals
        workflows = WorkflowRunner(catalog, turns, state, settings.state_timeout_seconds)
        readiness = Readiness(
            [SERVICE_NAME],
            StateReadiness(state, settings).check,
            interval=settings.health_interval_seconds,
            failure_threshold=settings.health_failure_threshold,
        )
        server_metrics().initialize(pb.DESCRIPTOR.services_by_name["AgentService"])
        # metrics -> logging -> errors to statuses -> auth, fused into one
        # wrapper per unary method (shared_runtime/server_chain.py).
        chain = ServerChain(
            ServerMetricsInterceptor(),
            LoggingInterceptor(),
            ExceptionToStatusInterceptor(ERROR_DOMAIN, deadline_error),
            auth_interceptor(settings.auth, settings.auth_tokens_file),
        )
        server = create_server(settings, [chain], MAX_MESSAGE_BYTES)
        pb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                catalog,
                turns,
                workflows,
                settings,
                SessionForker(state, settings.state_timeout_seconds),
                approvals,
            ),
            server,
        )
        port = add_health_reflection_and_bind(server, settings, readiness, SERVICE_NAME)
        endpoint = MetricsEndpoint.configured(settings, undo)
        await server.start()
        undo.push_async_callback(server.stop, 0)
        await readiness.start()
        instance = cls(settings, server, state, models, readiness, port, endpoint, in_process)
        logger.info(
            "agent service listening on %s (agents: %s; state service: %s)",
            instance.address,
            ", ".join(f"{e.spec.name} [{e.model_name}]" for e in catalog),
            "in this process" if in_process is not None else settings.state_target,
        )
        return instance

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, let in-flight turns finish, then close channels."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.readiness.drain()
        await self.server.stop(self.settings.drain_seconds if grace is None else grace)
        await self.readiness.stop()
        await self.state.close()
        if self.in_process_state is not None:
            await self.in_process_state.stop()
        await self.models.close()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        logger.info("agent service stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve(settings: AgentServiceSettings) -> None:
    await serve_until_terminated(lambda: AgentServer.start(settings), "agent service")
