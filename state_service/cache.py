"""The local cache: the newest items of each session's log, held in process.

It is never the authority. What it holds is immutable (a log entry at a given
index never changes while the session's incarnation and pop count stay the
same), and every read first asks Redis, in one atomic step, whether the cached
tail is still current (see the ``read`` script). A compare-and-set is always
decided by Redis, never here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cachetools import TTLCache

from state_service import metrics
from state_service.log import LogEntry
from state_service.storage.redis import CacheKnowledge, SessionHead

CACHE_NAME = "session_tail"


# Entries of a tail's memo before it is emptied (it holds a few prepared
# results per distinct request shape; see context.py).
MEMO_MAX = 16


class TailMemo(dict[Any, Any]):
    """What is computed from a tail's entries alone, bounded in count and in
    bytes: the prepared results it holds never carry more item bytes than
    the tail itself, so a cached tail costs at most twice its JSON (what
    _size_of charges the cache for)."""

    __slots__ = ("item_bytes",)

    def __init__(self) -> None:
        super().__init__()
        self.item_bytes = 0

    def clear(self) -> None:
        super().clear()
        self.item_bytes = 0


class Lookup(StrEnum):
    """How a read used the cached tail (the values are the metric's labels)."""

    HIT = "hit"  # current as cached
    PARTIAL = "partial"  # current once the newer entries were added
    MISS = "miss"  # nothing usable cached


class Invalidation(StrEnum):
    """Why cached tails were dropped (the values are the metric's labels)."""

    CHANGED = "changed"  # the version check found the log popped or re-created
    DELETED = "deleted"  # the session was deleted or has expired
    REDIS_UNREACHABLE = "redis_unreachable"  # nothing can be vouched for


@dataclass(frozen=True, slots=True)
class CachedTail:
    """The entries at log indexes [start_index, head.item_count) at `head`.

    `tokens` is the entries' token total, `size` their stored JSON bytes
    (what the cache is bounded by). `memo` holds what is computed from
    the entries alone (so it stays valid while they do): a tail with the same
    entries and a fresher head shares it (see `at`), a tail with other
    entries starts a new one. `stored_at` is when the cache stored it.
    """

    head: SessionHead
    start_index: int
    entries: tuple[LogEntry, ...]
    tokens: int
    size: int = 0
    memo: TailMemo = field(default_factory=TailMemo, compare=False, repr=False)
    stored_at: float = 0.0

    @classmethod
    def of(cls, head: SessionHead, start_index: int, entries: tuple[LogEntry, ...]) -> CachedTail:
        return cls(
            head,
            start_index,
            entries,
            sum(e.tokens for e in entries),
            sum(len(e.item.json) for e in entries),
        )

    def extended(self, head: SessionHead, newer: tuple[LogEntry, ...]) -> CachedTail:
        """This tail with the `newer` entries after it, as of `head`: totals
        grow by what was added (a read that finds two new items costs two
        items, not the tail)."""
        return CachedTail(
            head,
            self.start_index,
            self.entries + newer,
            self.tokens + sum(e.tokens for e in newer),
            self.size + sum(len(e.item.json) for e in newer),
        )

    def at(self, head: SessionHead) -> CachedTail:
        """The same entries (and memo) as of a fresher head of the same log."""
        return CachedTail(
            head, self.start_index, self.entries, self.tokens, self.size, self.memo, self.stored_at
        )

    def newest(self, max_items: int, max_bytes: int) -> CachedTail:
        """The newest entries within both bounds (at least one), as a new tail."""
        if len(self.entries) <= max_items and self.size <= max_bytes:
            return self  # the common case, without a walk over the tail
        keep, size = 0, 0
        for entry in reversed(self.entries):
            if keep >= max_items or (keep and size + len(entry.item.json) > max_bytes):
                break
            keep += 1
            size += len(entry.item.json)
        if keep == len(self.entries):
            return self
        cut = len(self.entries) - keep
        return CachedTail.of(self.head, self.start_index + cut, self.entries[cut:])

    def remember(self, key: Any, value: Any, item_bytes: int = 0) -> None:
        """Keeps `value` (holding `item_bytes` of item JSON) for requests of
        the same shape; one larger than the tail is not kept."""
        if item_bytes > self.size:
            return
        memo = self.memo
        if len(memo) >= MEMO_MAX or memo.item_bytes + item_bytes > self.size:
            memo.clear()
        memo[key] = value
        memo.item_bytes += item_bytes

    def knowledge(self) -> CacheKnowledge:
        return CacheKnowledge(
            self.head.incarnation, self.head.trunc, self.head.version, self.head.item_count
        )


def _size_of(tail: CachedTail) -> int:
    # The tail's JSON plus as much again for its memo (TailMemo's bound). The
    # decoded entries cost about twice their JSON in Python objects; the
    # bound is on the JSON, the figure operators can compare with item sizes.
    return max(1, 2 * tail.size)


class CountingTTLCache(TTLCache[Any, Any]):
    """A TTLCache that counts what it evicts, as statecar_state_cache_evictions_total
    with cache=`name` (the series exist at zero from the start)."""

    def __init__(
        self,
        name: str,
        maxsize: float,
        ttl: float,
        getsizeof: Callable[[Any], float] | None = None,
    ) -> None:
        super().__init__(maxsize=maxsize, ttl=ttl, getsizeof=getsizeof)
        self._for_room = metrics.CACHE_EVICTIONS.labels(name, "size")
        self._idle = metrics.CACHE_EVICTIONS.labels(name, "expired")

    def popitem(self) -> tuple[Any, Any]:
        # Called only when an insert needs room, not on expiry.
        item = super().popitem()
        self._for_room.inc()
        return item

    def expire(self, time: Any = None) -> Any:
        # Every insert expires idle entries first; so does popitem().
        expired = super().expire(time)
        if expired:
            self._idle.inc(len(expired))
        return expired


@dataclass
class CacheStats:
    hits: int = 0
    partial: int = 0
    misses: int = 0


@dataclass
class SessionCache:
    """Tails of recently read sessions, bounded by sessions, by items per
    session and by bytes in all (`max_bytes`: item JSON, each tail charged
    twice its own for the prepared responses of its memo; one session holds
    at most a quarter of it): an item count alone let a few sessions of
    200 KB items hold hundreds of MB."""

    max_sessions: int
    ttl_seconds: float
    max_items: int
    max_bytes: int = 256 * 1024 * 1024
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._tails: TTLCache[tuple[str, str], CachedTail] = CountingTTLCache(
            CACHE_NAME, maxsize=self.max_bytes, ttl=self.ttl_seconds, getsizeof=_size_of
        )
        self._size = metrics.CACHE_SESSIONS.labels(CACHE_NAME)
        self._size.set(0)
        self._bytes = metrics.CACHE_BYTES.labels(CACHE_NAME)
        self._bytes.set(0)
        # A tail is charged twice its JSON (its memo's share, _size_of): a
        # quarter of the bound per session, memo included.
        self.max_bytes_per_session = max(1, self.max_bytes // 8)
        self._lookups = {
            result: metrics.CACHE_LOOKUPS.labels(CACHE_NAME, result.value) for result in Lookup
        }

    def get(self, tenant: str, session_id: str) -> CachedTail | None:
        return self._tails.get((tenant, session_id))

    def put(self, tenant: str, session_id: str, tail: CachedTail) -> None:
        tail = tail.newest(self.max_items, self.max_bytes_per_session)
        tails = self._tails
        key = (tenant, session_id)
        if tail.size > self.max_bytes_per_session:
            # One entry alone exceeds a session's share: not worth caching.
            tails.pop(key, None)
        else:
            tails[key] = CachedTail(
                tail.head,
                tail.start_index,
                tail.entries,
                tail.tokens,
                tail.size,
                tail.memo,
                time.monotonic(),
            )
            while len(tails) > self.max_sessions:
                tails.popitem()
        self._observe()

    def _observe(self) -> None:
        self._size.set(len(self._tails))
        self._bytes.set(self._tails.currsize)

    def touch(self, tenant: str, session_id: str, tail: CachedTail) -> None:
        """After a hit: the stored tail is still current (its entries and
        version are), so it is stored again, which restarts its TTL, only once
        a quarter of the TTL has passed, not on every read."""
        if time.monotonic() - tail.stored_at > self.ttl_seconds / 4:
            self.put(tenant, session_id, tail)

    def drop(self, tenant: str, session_id: str) -> None:
        """Forgets a session that was deleted or found gone."""
        if self._tails.pop((tenant, session_id), None) is not None:
            metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, Invalidation.DELETED).inc()
            self._observe()

    def sessions_of(self, tenant: str) -> list[str]:
        """The sessions of `tenant` with a cached tail (erasure)."""
        return [session for owner, session in list(self._tails) if owner == tenant]

    def clear(self) -> None:
        """Forgets everything: Redis is unreachable, so invalidations may be lost."""
        flushed = len(self._tails)
        self._tails.clear()
        self._observe()
        if flushed:
            metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, Invalidation.REDIS_UNREACHABLE).inc(
                flushed
            )

    def invalidated(self) -> None:
        """Counts a cached tail the version check found out of date."""
        metrics.CACHE_INVALIDATIONS.labels(CACHE_NAME, Invalidation.CHANGED).inc()

    def record(self, result: Lookup) -> None:
        self._lookups[result].inc()
        if result is Lookup.HIT:
            self.stats.hits += 1
        elif result is Lookup.PARTIAL:
            self.stats.partial += 1
        else:
            self.stats.misses += 1
