"""Models of the agents: the built-in offline model, or any OpenAI-compatible
endpoint through openai-agents' own OpenAI models (the real `openai` client)."""

from __future__ import annotations

from agents.models.interface import Model
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI

from agent_service.config import OFFLINE_MODEL, OPENAI_MODEL, AgentSpec, ConfigError
from agent_service.models.offline import OfflineModel
from agent_service.settings import AgentServiceSettings

__all__ = ["ModelFactory", "OfflineModel"]


class ModelFactory:
    """One shared OpenAI client (connection pool) for every agent on the endpoint."""

    def __init__(self, settings: AgentServiceSettings) -> None:
        self._settings = settings
        self._offline = OfflineModel()
        self._client: AsyncOpenAI | None = None

    def model_name(self, spec: AgentSpec) -> str:
        """The agent's model as configured, with the default resolved."""
        if spec.model is not None:
            return spec.model
        return OPENAI_MODEL if self._settings.model_endpoint_configured else OFFLINE_MODEL

    def model_for(self, spec: AgentSpec) -> Model:
        name = self.model_name(spec)
        if name == OFFLINE_MODEL:
            return self._offline
        if not self._settings.model_endpoint_configured:
            raise ConfigError(
                f"agent {spec.name!r} uses model {name!r} but no endpoint is configured "
                "(set AGENT_SERVICE_MODEL_BASE_URL and/or AGENT_SERVICE_MODEL_API_KEY)"
            )
        model = name.partition(":")[2] or self._settings.model_name
        client = self._openai_client()
        if self._settings.model_api == "chat_completions":
            return OpenAIChatCompletionsModel(model=model, openai_client=client)
        return OpenAIResponsesModel(model=model, openai_client=client)

    def _openai_client(self) -> AsyncOpenAI:
        if self._client is None:
            settings = self._settings
            self._client = AsyncOpenAI(
                base_url=settings.model_base_url or None,
                # Local OpenAI-compatible servers often need no key; the client needs one.
                api_key=settings.model_api_key.get_secret_value() or "unused",
                timeout=settings.model_timeout_seconds,
                # gRPC callers own the retry decision (a failed turn stores nothing).
                max_retries=0,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
