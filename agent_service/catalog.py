"""The configured agents as openai-agents `Agent` objects, built once at
start-up (they are immutable descriptions; all turn state travels in the
request and the state service)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from agents import Agent
from agents.models.interface import Model

from agent_service import metrics
from agent_service.config import AgentsConfig, AgentSpec
from agent_service.models import ModelFactory
from agent_service.tools import BUILTIN_TOOLS, TurnContext, approval_gated


class TimedModel(Model):
    """Observes the latency and outcome of every call of the wrapped model."""

    def __init__(self, inner: Model, name: str) -> None:
        self._inner = inner
        self._name = name

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = "error"
        try:
            response = await self._inner.get_response(*args, **kwargs)
            result = "ok"
            return response
        finally:
            metrics.MODEL_SECONDS.labels(self._name, result).observe(time.perf_counter() - started)

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        started = time.perf_counter()
        result = "error"
        try:
            async for event in self._inner.stream_response(*args, **kwargs):
                yield event
            result = "ok"
        finally:
            metrics.MODEL_SECONDS.labels(self._name, result).observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True)
class CatalogEntry:
    spec: AgentSpec
    agent: Agent[TurnContext]
    model_name: str


class AgentCatalog:
    def __init__(self, config: AgentsConfig, models: ModelFactory) -> None:
        self.config = config
        self._entries: dict[str, CatalogEntry] = {}
        for spec in config.agents:
            model_name = models.model_name(spec)
            agent: Agent[TurnContext] = Agent(
                name=spec.name,
                handoff_description=spec.description or None,
                instructions=spec.instructions,
                model=TimedModel(models.model_for(spec), model_name),
                tools=[
                    approval_gated(BUILTIN_TOOLS[t])
                    if t in spec.needs_approval
                    else BUILTIN_TOOLS[t]
                    for t in spec.tools
                ],
            )
            self._entries[spec.name] = CatalogEntry(spec, agent, model_name)
        # Handoffs point at Agent objects, so wire them once all exist.
        for spec in config.agents:
            self._entries[spec.name].agent.handoffs = [
                self._entries[target].agent for target in spec.handoffs
            ]
        metrics.initialize(
            [e.spec.name for e in self._entries.values()],
            sorted({e.model_name for e in self._entries.values()}),
            sorted({tool for e in self._entries.values() for tool in e.spec.tools}),
            sorted({tool for e in self._entries.values() for tool in e.spec.needs_approval}),
        )

    @property
    def default(self) -> str:
        return self.config.default

    def get(self, name: str) -> CatalogEntry | None:
        return self._entries.get(name)

    def __iter__(self) -> Any:
        return iter(self._entries.values())
