"""Models of the agents: the built-in offline model, or any OpenAI-compatible
endpoint through openai-agents' own OpenAI models (the real `openai` client)."""

from __future__ import annotations

import os

from agents.models.interface import Model
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from agent_service.config import OFFLINE_MODEL, OPENAI_MODEL, AgentSpec, ConfigError
from agent_service.models.offline import OfflineModel
from agent_service.settings import AgentServiceSettings

__all__ = ["ModelFactory", "OfflineModel"]


class ModelFactory:
    """Builds each agent's model; agents on one endpoint share its client."""

    def __init__(self, settings: AgentServiceSettings) -> None:
        self._settings = settings
        self._offline = OfflineModel()
        self._clients: dict[tuple[str, str], AsyncOpenAI] = {}

    def model_name(self, spec: AgentSpec) -> str:
        """The agent's model as configured, with the default resolved."""
        if spec.model is not None:
            return spec.model
        if spec.has_own_endpoint or self._settings.model_endpoint_configured:
            return OPENAI_MODEL
        return OFFLINE_MODEL

    def model_for(self, spec: AgentSpec) -> Model:
        name = self.model_name(spec)
        if name == OFFLINE_MODEL:
            return self._offline
        settings = self._settings
        if spec.has_own_endpoint:
            base_url = spec.base_url or ""
            api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
            if spec.api_key_env and not api_key:
                raise ConfigError(
                    f"agent {spec.name!r}: its API key variable {spec.api_key_env} is not set"
                )
        elif settings.model_endpoint_configured:
            base_url, api_key = settings.model_base_url, settings.model_api_key.get_secret_value()
        else:
            raise ConfigError(
                f"agent {spec.name!r} uses model {name!r} but no endpoint is configured "
                "(set AGENT_SERVICE_MODEL_BASE_URL and/or AGENT_SERVICE_MODEL_API_KEY, or the "
                "agent's base_url / api_key_env)"
            )
        model = name.partition(":")[2] or settings.model_name
        client = self._openai_client(base_url, api_key)
        if (spec.api or settings.model_api) == "chat_completions":
            return OpenAIChatCompletionsModel(model=model, openai_client=client)
        return OpenAIResponsesModel(model=model, openai_client=client)

    def _openai_client(self, base_url: str, api_key: str) -> AsyncOpenAI:
        """One client (connection pool) per endpoint and key."""
        key = (base_url, api_key)
        if key not in self._clients:
            self._clients[key] = AsyncOpenAI(
                base_url=base_url or None,
                # Local OpenAI-compatible servers often need no key; the client needs one.
                api_key=api_key or "unused",
                timeout=self._settings.model_timeout_seconds,
                # gRPC callers own the retry decision (a failed turn stores nothing).
                max_retries=0,
            )
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
