"""The state service's application metrics (prefix statecar_state_).

Labels never carry session or tenant ids (bounded cardinality); values are in
base units (seconds, bytes); counters end in _total. gRPC metrics
(grpc_server_*) come from serving/grpc_metrics.py. The README's "Metrics"
section lists every series; monitoring/ holds the rules and the dashboard.

Compression (state_service/compression/) reports
statecar_state_compression_lag_items (gauge), statecar_state_compression_runs_total
{outcome}, statecar_state_compression_duration_seconds{summarizer} (histogram),
statecar_state_compression_tokens_saved_total{strategy} and
statecar_state_embedding_failures_total; the rules and dashboard in
monitoring/ use these names.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from shared_runtime.build_info import register_build_info

CACHE_LOOKUPS = Counter(
    "statecar_state_cache_lookups_total",
    "Local cache lookups of a session's log tail, by result: hit (served without "
    "fetching items), partial (only new items fetched), miss (fetched from Redis).",
    ["cache", "result"],
)
CACHE_EVICTIONS = Counter(
    "statecar_state_cache_evictions_total",
    "Sessions removed from the local cache to make room (reason=size) or after "
    "idling past the cache TTL (reason=expired).",
    ["cache", "reason"],
)
CACHE_INVALIDATIONS = Counter(
    "statecar_state_cache_invalidations_total",
    "Cached sessions found or made invalid: the version check saw a pop or a "
    "re-created session (reason=changed), the session was deleted or expired "
    "(reason=deleted), or Redis became unreachable and the cache was flushed "
    "(reason=redis_unreachable; counts the sessions flushed).",
    ["cache", "reason"],
)
CACHE_SESSIONS = Gauge(
    "statecar_state_cache_sessions", "Sessions held in the local cache.", ["cache"]
)
HEAVY_WORK_QUEUED = Gauge(
    "statecar_state_heavy_work_queued",
    "Jobs queued or running in the heavy-work thread (decoding large items, retrieval, "
    "extractive summaries).",
)
HEAVY_REQUESTS = Gauge(
    "statecar_state_heavy_requests",
    "Requests holding a tenant's heavy-work slot on this replica.",
)
TENANT_BUSY = Counter(
    "statecar_state_tenant_busy_total",
    "Requests refused with RESOURCE_EXHAUSTED (TENANT_BUSY): their tenant had its share of "
    "heavy work in flight.",
)
WORK_ABANDONED = Counter(
    "statecar_state_heavy_work_abandoned_total",
    "Requests whose deadline passed while their heavy work ran (DEADLINE_EXCEEDED).",
)
INDEX_SWEEPS = Counter(
    "statecar_state_index_sweeps_total",
    "Background sweeps of the tenant session indexes, by outcome (done, skipped: another "
    "replica held the lock, failed: Redis unreachable). Entries removed count in "
    "statecar_state_sessions_expired_total.",
    ["outcome"],
)
CACHE_BYTES = Gauge(
    "statecar_state_cache_bytes",
    "Bytes (stored item JSON) held in the local cache; bounded by STATE_SERVICE_CACHE_MAX_BYTES.",
    ["cache"],
)
RETRIEVAL_MEMORY_BYTES = Gauge(
    "statecar_state_retrieval_memory_bytes",
    "Bytes (item JSON, text and vectors) held in the retrieval memories of this replica's "
    "sessions; bounded by STATE_SERVICE_RETRIEVAL_MAX_BYTES.",
)
REDIS_SECONDS = Histogram(
    "statecar_state_redis_command_seconds",
    "Latency of one Redis round trip, by operation.",
    ["operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
)
REDIS_ERRORS = Counter(
    "statecar_state_redis_errors_total",
    "Redis round trips that failed, by operation.",
    ["operation"],
)
APPENDS = Counter("statecar_state_appends_total", "AppendItems that wrote items.")
ITEMS_APPENDED = Counter("statecar_state_items_appended_total", "Items appended.")
ETAG_CONFLICTS = Counter(
    "statecar_state_etag_conflicts_total", "Writes refused for a stale etag.", ["operation"]
)
IDEMPOTENT_REPLAYS = Counter(
    "statecar_state_idempotent_replays_total",
    "Writes answered from the request_id record instead of being applied again.",
    ["operation"],
)
FORKS = Counter(
    "statecar_state_forks_total",
    "ForkSession calls that created a session (replays and refusals not counted).",
)
FORK_ITEMS_COPIED = Counter(
    "statecar_state_fork_items_copied_total",
    "Items copied into new sessions by ForkSession.",
)
COMPACTIONS = Counter(
    "statecar_state_compactions_total",
    "CompactSession calls that stored a compacted view (the log is kept).",
)
PAUSED_RUN_STEPS = ("put", "claim", "claim_conflict", "resolve")
PAUSED_RUNS = Counter(
    "statecar_state_paused_runs_total",
    "Steps of paused agent runs (tool approvals): put (a run paused), claim (a resume "
    "took it), claim_conflict (a resume found it claimed or resolved by another), resolve "
    "(a resume finished).",
    ["step"],
)
SESSIONS_DELETED = Counter("statecar_state_sessions_deleted_total", "Sessions deleted.")
ITEMS_IMPORTED = Counter(
    "statecar_state_items_imported_total", "Items written by ImportItems (replays not counted)."
)
ERASURE_SCOPES = ("session", "tenant")
ERASURES = Counter(
    "statecar_state_erasures_total",
    "EraseSession and EraseTenant calls completed (a repeated erase counts again).",
    ["scope"],
)
ERASED_KEYS = Counter(
    "statecar_state_erased_keys_total", "Redis keys deleted by erasures.", ["scope"]
)
SESSIONS_EXPIRED = Counter(
    "statecar_state_sessions_expired_total",
    "Expired sessions pruned from the session index.",
)
CONTEXT_TOKENS = Histogram(
    "statecar_state_context_tokens",
    "Tokens of the context returned by GetContext.",
    buckets=(64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)
COMPRESSION_TOKENS_SAVED = Counter(
    "statecar_state_compression_tokens_saved_total",
    "Tokens of the whole log minus tokens of the context returned, summed over GetContext "
    "calls, by strategy applied (what compression kept from being sent; the whole log is "
    "counted at append, pops not subtracted).",
    ["strategy"],
)
COMPRESSION_OUTCOMES = ("ok", "conflict", "stale", "failed", "dropped")
COMPRESSION_RUNS = Counter(
    "statecar_state_compression_runs_total",
    "Background summarizer runs that folded new items into a summary, by outcome: ok "
    "(committed), conflict (another replica moved the summary first), stale (the log "
    "changed), failed (the summarizer failed; reads fall back to a window), dropped "
    "(queue full).",
    ["outcome"],
)
COMPRESSION_SECONDS = Histogram(
    "statecar_state_compression_duration_seconds",
    "Duration of one summarizer call (folding new items into a summary).",
    ["summarizer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SUMMARY_LAG = Gauge(
    "statecar_state_compression_lag_items",
    "Items not yet covered by a summary, summed over the sessions this replica's background "
    "summarizer has looked at recently (older than the verbatim window it leaves alone).",
)
EMBEDDING_FAILURES = Counter(
    "statecar_state_embedding_failures_total",
    "Calls to the embeddings endpoint that failed (retrieval stayed lexical).",
)


REDIS_UP = Gauge(
    "statecar_state_redis_up",
    "1 when the last readiness probe reached Redis, else 0.",
)
SERVING = Gauge(
    "statecar_state_serving",
    "1 when gRPC health reports SERVING (Redis reachable, not draining), else 0.",
)

CACHE_RESULTS = ("hit", "partial", "miss")
EVICTION_REASONS = ("size", "expired")
INVALIDATION_REASONS = ("changed", "deleted", "redis_unreachable")
WRITE_OPERATIONS = (
    "append",
    "pop",
    "update",
    "delete",
    "update_workflow",
    "delete_workflow",
    "compact",
)
REPLAYED_OPERATIONS = ("append", "pop", "fork", "compact", "import")


def initialize(cache_name: str) -> None:
    """Creates the bounded label sets at zero, so rate() and ratios count
    from the first scrape and dashboards show every series."""
    for result in CACHE_RESULTS:
        CACHE_LOOKUPS.labels(cache_name, result)
    for reason in EVICTION_REASONS:
        CACHE_EVICTIONS.labels(cache_name, reason)
    for reason in INVALIDATION_REASONS:
        CACHE_INVALIDATIONS.labels(cache_name, reason)
    CACHE_SESSIONS.labels(cache_name)
    CACHE_BYTES.labels(cache_name)
    for outcome in ("done", "skipped", "failed"):
        INDEX_SWEEPS.labels(outcome)
    for operation in WRITE_OPERATIONS:
        ETAG_CONFLICTS.labels(operation)
    for operation in REPLAYED_OPERATIONS:
        IDEMPOTENT_REPLAYS.labels(operation)
    for outcome in COMPRESSION_OUTCOMES:
        COMPRESSION_RUNS.labels(outcome)
    for step in PAUSED_RUN_STEPS:
        PAUSED_RUNS.labels(step)
    for scope in ERASURE_SCOPES:
        ERASURES.labels(scope)
        ERASED_KEYS.labels(scope)


@functools.cache
def build_info() -> Gauge:
    """statecar_state_build_info{version,git_sha} 1 (registered once per process)."""
    return register_build_info("statecar_state")


_REDIS_SECONDS_OF: dict[str, Histogram] = {}


def observe_redis(operation: str, seconds: float, failed: bool) -> None:
    # The labelled child is looked up once per operation (labels() takes a
    # lock and builds a key on every call; this runs on every request).
    child = _REDIS_SECONDS_OF.get(operation)
    if child is None:
        child = _REDIS_SECONDS_OF[operation] = REDIS_SECONDS.labels(operation)
    child.observe(seconds)
    if failed:
        REDIS_ERRORS.labels(operation).inc()


# -- the durable tier (PostgreSQL; only with STATE_SERVICE_POSTGRES_URL) --------
ARCHIVE_BACKLOG = Gauge(
    "statecar_state_archive_backlog_sessions",
    "Sessions with writes not yet copied to the durable tier (PostgreSQL), as last "
    "read from Redis; writes are refused (ARCHIVE_BACKLOG) at "
    "STATE_SERVICE_POSTGRES_MAX_BACKLOG_SESSIONS.",
)
ARCHIVE_PASSES = Counter(
    "statecar_state_archive_sessions_total",
    "Sessions an archive pass handled, by outcome (clean: copied and given their TTL "
    "back, pending: written again meanwhile, copied next pass, failed: PostgreSQL or "
    "Redis unreachable).",
    ["outcome"],
)
ARCHIVE_REFUSALS = Counter(
    "statecar_state_archive_backlog_refusals_total",
    "Writes refused with RESOURCE_EXHAUSTED (ARCHIVE_BACKLOG) because the archive "
    "backlog was full.",
)
REHYDRATIONS = Counter(
    "statecar_state_rehydrations_total",
    "Sessions not found in Redis looked up in the durable tier, by outcome (loaded, "
    "absent: not archived either, failed: PostgreSQL unreachable).",
    ["outcome"],
)
REHYDRATION_SECONDS = Histogram(
    "statecar_state_rehydration_seconds",
    "Time to load one archived session back into Redis.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def initialize_durable_tier() -> None:
    """The durable tier's label sets at zero (called only when it is on)."""
    for outcome in ("clean", "pending", "failed"):
        ARCHIVE_PASSES.labels(outcome)
    for outcome in ("loaded", "absent", "failed"):
        REHYDRATIONS.labels(outcome)
