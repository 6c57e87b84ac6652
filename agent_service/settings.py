"""Agent service configuration: environment variables AGENT_SERVICE_<NAME>, or
the matching command-line flags (--listen, --state-target, --agents-config,
--metrics-port, ...). The agents themselves are defined in --agents-config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared_runtime.auth import check_caller_auth


class AgentServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENT_SERVICE_",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_prog_name="agent-service",
        extra="ignore",
    )

    listen: str = Field(
        "127.0.0.1:50061", description="gRPC address to bind; use [::]:PORT in containers"
    )
    state_target: str = Field(
        "127.0.0.1:50051",
        description="state service: host:port (DNS, all replicas round robin), "
        "a comma-separated list of IP:port, or any gRPC target",
    )
    state_in_process: bool = Field(
        False,
        description="run the state service inside this process (no second container, no "
        "gRPC hop): configured by the STATE_SERVICE_* variables except those of a listener "
        "(listen, TLS, auth, metrics: nothing listens; its metrics are on this service's "
        "port); state_target and the state_tls_* and state_bearer_token settings do not apply",
    )
    agents_config: Path | None = Field(
        None, description="YAML or TOML file defining the agents; unset = one default agent"
    )

    model_base_url: str = Field(
        "",
        description="OpenAI-compatible endpoint of agents that use the `openai` model "
        "provider; empty with no API key = the built-in offline model",
    )
    model_api_key: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices("AGENT_SERVICE_MODEL_API_KEY", "OPENAI_API_KEY"),
        description="API key of that endpoint (also read from OPENAI_API_KEY)",
    )
    model_name: str = Field("gpt-4.1-mini", description="model of agents that name none")
    model_api: Literal["responses", "chat_completions"] = Field(
        "responses", description="which OpenAI API the endpoint speaks"
    )
    model_timeout_seconds: float = Field(
        60.0, gt=0, description="upper bound of one model call (the caller's deadline also applies)"
    )
    tracing: bool = Field(
        False, description="export openai-agents traces (to OpenAI; off by default)"
    )

    max_model_calls: int = Field(
        8, ge=1, description="model calls in one turn (tool round trips, handoffs) before failing"
    )
    on_conflict: Literal["abort", "retry"] = Field(
        "abort",
        description="when another turn on the session was stored first: abort (ABORTED) "
        "or retry once on the fresh context",
    )
    max_message_chars: int = Field(32_000, ge=1, description="longest user message accepted")

    context_cache: bool = Field(
        True,
        description="skip GetContext when this replica's own last append left the session's "
        "whole log within the budget (the append's etag check finds any other write; the "
        "turn is then redone on a fresh context, model call included)",
    )
    context_cache_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="bound of the context cache, in bytes of the cached items' JSON (the "
        "Python objects take a few times that); 0 disables the cache",
    )
    context_cache_max_items: int = Field(
        1000,
        ge=1,
        description="most items of one cached context; keep it at or below the state "
        "service's STATE_SERVICE_CONTEXT_MAX_ITEMS",
    )
    state_timeout_seconds: float = Field(
        5.0, gt=0, description="deadline of one state-service call (capped by the caller's)"
    )
    state_bearer_token: SecretStr = Field(
        SecretStr(""), description="bearer token presented to the state service"
    )
    state_tls_ca_file: Path | None = Field(
        None, description="CA of the state service's certificate; set = TLS to the state service"
    )
    state_tls_cert_file: Path | None = Field(
        None, description="client certificate for mTLS to the state service"
    )
    state_tls_key_file: Path | None = Field(None, description="client key for mTLS")

    auth: Literal["none", "token", "mtls"] = Field(
        "none",
        description="caller identity: none (the agent acts as one tenant at the state "
        "service), token (bearer tokens file) or mtls (client certificate CN); "
        "token or mtls make each caller its own tenant, which the state service "
        "must list in STATE_SERVICE_AUTH_DELEGATES under the agent's identity",
    )
    auth_tokens_file: Path | None = Field(
        None, description="tenant:token lines of callers, re-read on change (auth=token)"
    )

    tls_cert_file: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA for client certificates; set = clients must present one (mTLS)"
    )

    metrics_port: int = Field(9465, ge=0, description="Prometheus /metrics port; 0 disables")
    metrics_host: str = Field("127.0.0.1", description="bind address of /metrics")
    drain_seconds: float = Field(
        30.0, ge=0, description="SIGTERM grace for in-flight turns before exit"
    )
    max_connection_age_seconds: float = Field(
        300.0, gt=0, description="servers close connections this old so clients rebalance"
    )
    keepalive_seconds: float = Field(30.0, gt=0, description="HTTP/2 keepalive ping interval")
    health_interval_seconds: float = Field(
        1.0, gt=0, description="how often readiness re-checks the state service"
    )
    health_failure_threshold: int = Field(
        3,
        ge=1,
        description="failed readiness checks in a row before NOT_SERVING (one slow check under "
        "CPU load is not an outage)",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @property
    def model_endpoint_configured(self) -> bool:
        return bool(self.model_base_url or self.model_api_key.get_secret_value())

    @model_validator(mode="after")
    def _check_tls(self) -> AgentServiceSettings:
        check_caller_auth(self.auth, self.auth_tokens_file, self.tls_client_ca_file)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if (self.state_tls_cert_file is None) != (self.state_tls_key_file is None):
            raise ValueError("state_tls_cert_file and state_tls_key_file go together")
        if self.state_in_process and (
            self.state_tls_ca_file is not None
            or self.state_tls_cert_file is not None
            or self.state_bearer_token.get_secret_value()
        ):
            raise ValueError(
                "state_in_process runs the state service in this process: unset the "
                "state_tls_* files and state_bearer_token, which only apply to a remote one"
            )
        return self
