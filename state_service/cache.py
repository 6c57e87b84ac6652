"""The local cache: the newest items of each session's log, held in process.

It is never the authority. What it holds is immutable (a log entry at a given
index never changes while the session's incarnation and pop count stay the
same), and every read first asks Redis, in one atomic step, whether the cached
tail is still current (see the ``read`` script). A compare-and-set is always
decided by Redis, never here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from state_service import metrics
from state_service.context import LogEntry
from state_service.storage.redis import CacheKnowledge, SessionHead

CACHE_NAME = "session_tail"


@dataclass(frozen=True, slots=True)
class CachedTail:
    """The entries at log indexes [start_index, head.item_count) at `head`."""

    head: SessionHead
    start_index: int
    entries: tuple[LogEntry, ...]

    def knowledge(self) -> CacheKnowledge:
        return CacheKnowledge(
            self.head.incarnation, self.head.trunc, self.head.version, self.head.item_count
        )


class _CountingTTLCache(TTLCache[Any, Any]):
    def popitem(self) -> tuple[Any, Any]:
        # Called only when an insert needs room, not on expiry.
        item = super().popitem()
        metrics.CACHE_EVICTIONS.labels(CACHE_NAME, "size").inc()
        return item

    def expire(self, time: Any = None) -> Any:
        # Every insert expires idle entries first; so does popitem().
        expired = super().expire(time)
        if expired:
            metrics.CACHE_EVICTIONS.labels(CACHE_NAME, "expired").inc(len(expired))
        return expired


@dataclass
class CacheStats:
    hits: int = 0
    partial: int = 0
    misses: int = 0


@dataclass
class SessionCache:
    max_sessions: int
    ttl_seconds: float
    max_items: int
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._tails: TTLCache[tuple[str, str], CachedTail] = _CountingTTLCache(
            maxsize=self.max_sessions, ttl=self.ttl_seconds
        )
        self._size = metrics.CACHE_SESSIONS.labels(CACHE_NAME)
        self._size.set(0)

    def get(self, tenant: str, session_id: str) -> CachedTail | None:
        return self._tails.get((tenant, session_id))

    def put(self, tenant: str, session_id: str, tail: CachedTail) -> None:
        if len(tail.entries) > self.max_items:
            cut = len(tail.entries) - self.max_items
            tail = CachedTail(tail.head, tail.start_index + cut, tail.entries[cut:])
        self._tails[(tenant, session_id)] = tail
        self._size.set(len(self._tails))

    def drop(self, tenant: str, session_id: str, reason: str = "deleted") -> None:
        """Forgets a session that was deleted or found invalid."""
        if self._tails.pop((tenant, session_id), None) is not None:
            metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, reason).inc()
            self._size.set(len(self._tails))

    def clear(self, reason: str = "redis_unreachable") -> None:
        flushed = len(self._tails)
        self._tails.clear()
        self._size.set(0)
        if flushed:
            metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, reason).inc(flushed)

    def invalidated(self, reason: str) -> None:
        """Counts a cached tail the version check found out of date."""
        metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, reason).inc()

    def record(self, result: str) -> None:
        metrics.CACHE_LOOKUPS.labels(CACHE_NAME, result).inc()
        if result == "hit":
            self.stats.hits += 1
        elif result == "partial":
            self.stats.partial += 1
        else:
            self.stats.misses += 1
