"""The agent service process: agents, the state-service channel, the gRPC
server, health, metrics and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from agents import set_tracing_disabled
from grpc_reflection.v1alpha import reflection

from agent_service.catalog import AgentCatalog
from agent_service.config import load_config
from agent_service.models import ModelFactory
from agent_service.servicer import AgentServicer
from agent_service.settings import AgentServiceSettings
from agent_service.turns import TurnRunner, deadline_error
from agent_service.workflows import WorkflowRunner
from state_service.client import StateClient
from state_service.server import server_options
from state_service.serving.grpc_metrics import (
    ServerMetricsInterceptor,
    client_interceptors,
    server_metrics,
)
from state_service.serving.health import Readiness
from state_service.serving.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from state_service.serving.metrics_http import MetricsEndpoint
from state_service.serving.tls import ReloadingServerCredentials, channel_credentials
from statecar.agent.v1 import agent_service_pb2 as pb
from statecar.agent.v1 import agent_service_pb2_grpc as pb_grpc

logger = logging.getLogger("statecar.agent")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
ERROR_DOMAIN = "agent.statecar.dev"


def state_client(settings: AgentServiceSettings) -> StateClient:
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
        # grpc_client_* metrics of every call to the state service.
        interceptors=client_interceptors(),
    )


@dataclass
class AgentServer:
    settings: AgentServiceSettings
    server: grpc.aio.Server
    state: StateClient
    models: ModelFactory
    readiness: Readiness
    port: int
    metrics_endpoint: MetricsEndpoint | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        if host in ("::", "0.0.0.0"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @classmethod
    async def start(cls, settings: AgentServiceSettings) -> AgentServer:
        # openai-agents would export traces to OpenAI's servers by default.
        set_tracing_disabled(not settings.tracing)
        config = load_config(settings.agents_config)
        models = ModelFactory(settings)
        catalog = AgentCatalog(config, models)
        state = state_client(settings)
        turns = TurnRunner(catalog, state, settings)
        workflows = WorkflowRunner(catalog, turns, state, settings.state_timeout_seconds)
        readiness = Readiness(
            [SERVICE_NAME],
            lambda: state.check_ready(timeout=settings.health_interval_seconds),
            interval=settings.health_interval_seconds,
        )
        server_metrics().initialize(pb.DESCRIPTOR.services_by_name["AgentService"])
        server = grpc.aio.server(
            interceptors=[
                ServerMetricsInterceptor(),
                LoggingInterceptor(),
                ExceptionToStatusInterceptor(ERROR_DOMAIN, deadline_error),
            ],
            options=server_options(
                max_message_bytes=16 * 1024 * 1024,
                max_connection_age_seconds=settings.max_connection_age_seconds,
                drain_seconds=settings.drain_seconds,
                keepalive_seconds=settings.keepalive_seconds,
            ),
        )
        pb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(catalog, turns, workflows, settings), server
        )
        readiness.add_to_server(server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server
        )
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = ReloadingServerCredentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
            port = server.add_secure_port(settings.listen, tls.credentials)
        else:
            port = server.add_insecure_port(settings.listen)
        if port == 0:
            raise RuntimeError(f"could not bind {settings.listen}")
        endpoint = None
        if settings.metrics_port:
            endpoint = MetricsEndpoint.start(settings.metrics_host, settings.metrics_port)
        await server.start()
        await readiness.start()
        instance = cls(settings, server, state, models, readiness, port, endpoint)
        logger.info(
            "agent service listening on %s (agents: %s; state service: %s)",
            instance.address,
            ", ".join(f"{e.spec.name} [{e.model_name}]" for e in catalog),
            settings.state_target,
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
        await self.models.close()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        logger.info("agent service stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve(settings: AgentServiceSettings) -> None:
    app = await AgentServer.start(settings)
    print(f"agent service ready on {app.address}", flush=True)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(app.stop())))
    await app.wait_for_termination()
    if stopping:
        await asyncio.gather(*stopping)
