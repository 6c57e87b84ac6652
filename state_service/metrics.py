"""The state service's application metrics (prefix statecar_state_). Labels never
carry session or tenant ids."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CACHE_LOOKUPS = Counter(
    "statecar_state_cache_lookups_total",
    "Local cache lookups of a session's log tail, by result: hit (served without "
    "fetching items), partial (only new items fetched), miss (fetched from Redis).",
    ["cache", "result"],
)
CACHE_EVICTIONS = Counter(
    "statecar_state_cache_evictions_total",
    "Sessions evicted from the local cache for size (not expiry).",
    ["cache"],
)
CACHE_SESSIONS = Gauge(
    "statecar_state_cache_sessions", "Sessions held in the local cache.", ["cache"]
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
SESSIONS_DELETED = Counter("statecar_state_sessions_deleted_total", "Sessions deleted.")
SESSIONS_EXPIRED = Counter(
    "statecar_state_sessions_expired_total",
    "Expired sessions pruned from the session index.",
)
CONTEXT_TOKENS = Histogram(
    "statecar_state_context_tokens",
    "Tokens of the context returned by GetContext.",
    buckets=(64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
)


def observe_redis(operation: str, seconds: float, failed: bool) -> None:
    REDIS_SECONDS.labels(operation).observe(seconds)
    if failed:
        REDIS_ERRORS.labels(operation).inc()
