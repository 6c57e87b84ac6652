"""The agents file (YAML or TOML): which agents exist, their instructions,
model, token budget, tools and handoffs.

    default_agent: assistant
    agents:
      - name: assistant
        description: General help; hands billing questions to the billing agent.
        instructions: You are a concise, friendly assistant.
        model: offline            # or "openai" / "openai:gpt-4.1-mini"
        token_budget: 4000
        # base_url: http://llm.internal/v1   # this agent's own endpoint, and
        # api_key_env: LLM_API_KEY           # the env var holding its key
        # api: chat_completions              # or responses
        tools: [current_time, calculate, save_note, list_notes]
        needs_approval: [save_note]        # paused until a human approves
        handoffs: [billing]
      - name: billing
        ...

A model is "offline" (the built-in model), "openai" (the endpoint of
AGENT_SERVICE_MODEL_BASE_URL with AGENT_SERVICE_MODEL_NAME) or
"openai:<model name>". Unset = "openai" when an endpoint is configured (the
service's or the agent's own), "offline" otherwise.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent_service.tools import BUILTIN_TOOLS

AGENT_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
OFFLINE_MODEL = "offline"
OPENAI_MODEL = "openai"

DEFAULT_INSTRUCTIONS = (
    "You are a helpful, concise assistant. Use the conversation so far to answer; "
    "use your tools when they help."
)


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=AGENT_NAME_PATTERN)
    description: str = ""
    instructions: str = DEFAULT_INSTRUCTIONS
    model: str | None = None
    token_budget: int = Field(default=4000, ge=100, le=1_000_000)
    tools: list[str] = Field(default_factory=list)
    # Tools (of `tools`) whose calls pause the turn until a human approves or
    # rejects them (ResolveApprovals, `statecar approve`).
    needs_approval: list[str] = Field(default_factory=list)
    handoffs: list[str] = Field(default_factory=list)
    # This agent's own OpenAI-compatible endpoint, instead of the service's
    # AGENT_SERVICE_MODEL_* one: base URL, the environment variable holding its
    # API key (keys never go in this file), and the API it speaks.
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    api: Literal["responses", "chat_completions"] | None = None

    @model_validator(mode="after")
    def _check(self) -> AgentSpec:
        unknown = [t for t in self.tools if t not in BUILTIN_TOOLS]
        if unknown:
            raise ValueError(
                f"agent {self.name!r}: unknown tools {unknown}; built-in tools are "
                f"{sorted(BUILTIN_TOOLS)}"
            )
        ungated = [t for t in self.needs_approval if t not in self.tools]
        if ungated:
            raise ValueError(
                f"agent {self.name!r}: needs_approval names tools it does not have: {ungated}"
            )
        if self.model is not None and not re.fullmatch(r"offline|openai(:[\w.:/-]+)?", self.model):
            raise ValueError(
                f"agent {self.name!r}: model {self.model!r} is not offline, openai or openai:<name>"
            )
        if self.model == OFFLINE_MODEL and (self.base_url or self.api_key_env or self.api):
            raise ValueError(f"agent {self.name!r}: the offline model takes no endpoint settings")
        return self

    @property
    def has_own_endpoint(self) -> bool:
        return bool(self.base_url or self.api_key_env)


class AgentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_agent: str | None = None
    agents: list[AgentSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> AgentsConfig:
        names = [a.name for a in self.agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"agents defined twice: {duplicates}")
        for agent in self.agents:
            missing = [h for h in agent.handoffs if h not in names]
            if missing:
                raise ValueError(f"agent {agent.name!r} hands off to unknown agents {missing}")
        if self.default_agent is None:
            self.default_agent = names[0]
        elif self.default_agent not in names:
            raise ValueError(f"default_agent {self.default_agent!r} is not defined")
        return self

    @property
    def default(self) -> str:
        assert self.default_agent is not None
        return self.default_agent

    def get(self, name: str) -> AgentSpec | None:
        return next((a for a in self.agents if a.name == name), None)


class ConfigError(Exception):
    """The agents file is missing, unreadable or invalid; the message says where."""


def default_config() -> AgentsConfig:
    return AgentsConfig(
        agents=[
            AgentSpec(
                name="assistant",
                description="A general assistant with the built-in tools.",
                tools=sorted(BUILTIN_TOOLS),
            )
        ]
    )


def load_config(path: Path | None) -> AgentsConfig:
    if path is None:
        return default_config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read agents config {path}: {exc.strerror}") from None
    try:
        raw: Any = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from None
    try:
        return AgentsConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
