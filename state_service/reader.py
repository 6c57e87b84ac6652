"""Reading the log: decoded entries, and the newest ones kept current.

Storage is Redis (the authority); the local cache (cache.py) only spares
fetching and decoding entries that are known to be current. Every tail this
module hands out was verified against Redis in the same read (one round trip,
see the ``read`` script), so callers never decide anything from stale data.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from state_service import log
from state_service.cache import CachedTail, Lookup, SessionCache
from state_service.encryption import KeyRing
from state_service.heavy_work import OFFLOAD_MIN_BYTES, Offload, inline
from state_service.log import Item, LogEntry
from state_service.storage.redis import ReadMode, RedisStorage, SessionHead
from state_service.tokens import TokenCounter


class LogReader:
    def __init__(
        self,
        storage: RedisStorage,
        *,
        cache: SessionCache | None,
        token_counter: TokenCounter,
        cache_window: int = 512,
        keys: KeyRing | None = None,
        offload: Offload = inline,
    ) -> None:
        self._storage = storage
        self._cache = cache
        self._tokens = token_counter
        self._keys = keys
        # Where large batches are decoded and counted (heavy_work.py).
        self._offload = offload
        # How many newest entries a read fetches at least, so the cache holds
        # enough for the next request.
        self.cache_window = cache.max_items if cache is not None else cache_window

    @property
    def step_bytes(self) -> int:
        """The bytes one read step returns at most (past its first entry)."""
        return self._storage.read_step_bytes

    def item(self, tenant: str, session_id: str, raw: bytes) -> Item:
        """A stored "<seq>:<payload>" entry, unsealed and decoded."""
        if self._keys is None:
            return log.decode(raw)
        keys = self._keys
        return log.decode(raw, lambda payload: keys.open(tenant, session_id, payload))

    def entries(self, tenant: str, session_id: str, raws: Sequence[bytes]) -> tuple[LogEntry, ...]:
        entries = []
        for raw in raws:
            item = self.item(tenant, session_id, raw)
            entries.append(log.describe(item, self._tokens.count(item.json)))
        return tuple(entries)

    async def decoded(
        self,
        tenant: str,
        session_id: str,
        raws: Sequence[bytes],
        offload: Offload | None = None,
    ) -> tuple[LogEntry, ...]:
        """`entries`, off the event loop when the batch is large (decoding and
        token counting cost time proportional to its bytes)."""
        if sum(len(raw) for raw in raws) < OFFLOAD_MIN_BYTES:
            return self.entries(tenant, session_id, raws)
        run = offload or self._offload
        return await run(functools.partial(self.entries, tenant, session_id, raws))

    async def read_range(
        self, tenant: str, session_id: str, start: int, stop: int
    ) -> tuple[SessionHead | None, tuple[LogEntry, ...]]:
        """Log indexes start..stop (inclusive) decoded, with the head they were
        read at (for the retrieval memory's catch-up); fewer if the read step's
        bounds cut the range (the first entries of it)."""
        result = await self._storage.read(tenant, session_id, index_range=(start, stop))
        return result.head, await self.decoded(tenant, session_id, result.entries)

    def forget(self, tenant: str, session_id: str) -> None:
        """Drops the cached tail of a session being deleted."""
        if self._cache is not None:
            self._cache.drop(tenant, session_id)

    def cached_sessions(self, tenant: str) -> list[str]:
        """The sessions of `tenant` with a cached tail on this replica."""
        return self._cache.sessions_of(tenant) if self._cache is not None else []

    async def current_tail(
        self, tenant: str, session_id: str, window: int, offload: Offload | None = None
    ) -> CachedTail | None:
        """The newest items of the log, verified current against Redis in one
        round trip; None if the session does not exist. Large batches are
        decoded through `offload` (default: the reader's)."""
        cache = self._cache
        cached = cache.get(tenant, session_id) if cache is not None else None
        result = await self._storage.read(
            tenant,
            session_id,
            known=cached.knowledge() if cached is not None else None,
            window=max(window, self.cache_window) if cache is not None else window,
        )
        if result.head is None:
            if cache is not None:
                # Deleted through another replica, or expired in Redis.
                cache.drop(tenant, session_id)
            return None
        head = result.head
        if result.mode is ReadMode.HIT and cached is not None:
            tail = cached.at(head)
            if cache is not None:
                cache.record(Lookup.HIT)
                cache.touch(tenant, session_id, cached)
            return tail
        if result.mode is ReadMode.DELTA and cached is not None:
            tail = cached.extended(
                head, await self.decoded(tenant, session_id, result.entries, offload)
            )
            outcome = Lookup.PARTIAL
        else:
            entries = await self.decoded(tenant, session_id, result.entries, offload)
            tail = CachedTail.of(head, head.item_count - len(entries), entries)
            outcome = Lookup.MISS
            if (
                cache is not None
                and cached is not None
                and (head.incarnation, head.trunc) != (cached.head.incarnation, cached.head.trunc)
            ):
                # A pop, or a deleted and re-created session: the tail is stale.
                cache.invalidated()
        if cache is not None:
            cache.record(outcome)
            cache.put(tenant, session_id, tail)
        return tail

    async def extend_back(
        self,
        tenant: str,
        session_id: str,
        tail: CachedTail,
        want: int,
        offload: Offload | None = None,
    ) -> CachedTail | None:
        """Prepends up to `want` older entries; None if the log changed under us
        in a way that invalidates the tail (a pop, a delete)."""
        stop = tail.start_index - 1
        result = await self._storage.read(
            tenant,
            session_id,
            index_range=(max(0, tail.start_index - want), stop),
            newest_first=True,
        )
        head = result.head
        if (
            head is None
            or head.incarnation != tail.head.incarnation
            or head.trunc != tail.head.trunc
        ):
            return None
        older = await self.decoded(tenant, session_id, result.entries, offload)
        # A read step may return less than asked (its byte bound): the newest part.
        return CachedTail.of(tail.head, stop + 1 - len(older), older + tail.entries)
