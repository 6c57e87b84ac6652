"""The business rules of sessions: append, read a context, page, pop, retention.

Requests arrive here validated (see servicer.py). Storage is Redis (the
authority); the local cache only spares fetching and decoding items that are
known to be current.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from shared_runtime.errors import EtagMismatch, InvalidArgument, NotFound
from state_service import metrics, paging
from state_service.cache import CachedTail, SessionCache
from state_service.compression import strategies
from state_service.compression.engine import PROTO_OF_STRATEGY, STRATEGY_OF_PROTO, Compression
from state_service.compression.memory import StaleMemory
from state_service.compression.strategies import ContextView, Shares, Strategy
from state_service.compression.text import item_text_of_json
from state_service.context import LogEntry, describe
from state_service.encryption import KeyRing
from state_service.storage.redis import (
    ABSENT_ETAG,
    TTL_DEFAULT,
    TTL_PERSIST,
    RedisStorage,
    SessionHead,
)
from state_service.tokens import TokenCounter
from statecar.state.v1 import state_service_pb2 as pb

# Upper bound on items one GetContext considers, whatever the budget.
MAX_CONTEXT_ITEMS = 20_000
_OLDER_CHUNK_MIN = 64


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def encode_item(item: pb.Item, now_ms: int) -> bytes:
    """The stored form of an item: its proto without seq (the log adds it)."""
    stored = pb.Item(json=item.json, metadata=item.metadata, create_time=_timestamp(now_ms))
    return stored.SerializeToString()


def decode_entry(raw: bytes, open_payload: Callable[[bytes], bytes] | None = None) -> pb.Item:
    """A stored log entry "<seq>:<payload>" as an Item; `open_payload` decrypts."""
    seq, _, payload = raw.partition(b":")
    item = pb.Item.FromString(open_payload(payload) if open_payload else payload)
    item.seq = int(seq)
    return item


class SessionStore:
    def __init__(
        self,
        storage: RedisStorage,
        *,
        cache: SessionCache | None,
        token_counter: TokenCounter,
        cache_window: int = 512,
        keys: KeyRing | None = None,
        compression: Compression | None = None,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._cache = cache
        self._tokens = token_counter
        self._cache_window = cache.max_items if cache is not None else cache_window
        self.compression = compression

    async def read_range(
        self, tenant: str, session_id: str, start: int, stop: int
    ) -> tuple[SessionHead | None, tuple[LogEntry, ...]]:
        """Log indexes start..stop (inclusive) decoded, with the head they were
        read at (for the retrieval memory's catch-up)."""
        result = await self._storage.read(tenant, session_id, index_range=(start, stop))
        return result.head, self._entries(tenant, session_id, result.entries)

    def _seal(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        return payload if self._keys is None else self._keys.seal(tenant, session_id, payload)

    def _decode(self, tenant: str, session_id: str, raw: bytes) -> pb.Item:
        if self._keys is None:
            return decode_entry(raw)
        keys = self._keys
        return decode_entry(raw, lambda payload: keys.open(tenant, session_id, payload))

    def _entries(self, tenant: str, session_id: str, raws: Sequence[bytes]) -> tuple[LogEntry, ...]:
        entries = []
        for raw in raws:
            item = self._decode(tenant, session_id, raw)
            entries.append(describe(item, self._tokens.count(item.json)))
        return tuple(entries)

    # -- writes ---------------------------------------------------------------

    async def append(
        self,
        tenant: str,
        session_id: str,
        items: Sequence[pb.Item],
        *,
        request_id: str,
        etag: str,
    ) -> pb.AppendItemsResponse:
        now = _now_ms()
        try:
            outcome = await self._storage.append(
                tenant,
                session_id,
                [self._seal(tenant, session_id, encode_item(item, now)) for item in items],
                request_id=request_id,
                expected_etag=etag,
                new_incarnation=uuid.uuid4().hex[:16],
                now_ms=now,
                tokens=sum(self._tokens.count(item.json) for item in items),
            )
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("append").inc()
            raise
        if outcome.replayed:
            metrics.IDEMPOTENT_REPLAYS.labels("append").inc()
        elif outcome.last_seq:
            metrics.APPENDS.inc()
            metrics.ITEMS_APPENDED.inc(len(items))
            if self.compression is not None and self.compression.compressor is not None:
                # Summaries and embeddings follow in the background, never here.
                self.compression.compressor.notify(tenant, session_id)
        return pb.AppendItemsResponse(
            etag=outcome.etag,
            first_seq=outcome.first_seq,
            last_seq=outcome.last_seq,
            replayed=outcome.replayed,
        )

    async def pop(
        self, tenant: str, session_id: str, *, request_id: str, etag: str
    ) -> pb.PopItemResponse:
        try:
            outcome = await self._storage.pop(
                tenant, session_id, request_id=request_id, expected_etag=etag, now_ms=_now_ms()
            )
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("pop").inc()
            raise
        if outcome.replayed:
            metrics.IDEMPOTENT_REPLAYS.labels("pop").inc()
        response = pb.PopItemResponse(etag=outcome.etag)
        if outcome.entry is not None:
            response.item.CopyFrom(self._decode(tenant, session_id, outcome.entry))
        return response

    async def update_session(
        self,
        tenant: str,
        session_id: str,
        *,
        ttl_setting: int | None,
        etag: str,
        allow_missing: bool,
        strategy: int | None = None,
        shares: Shares | None = None,
        reset_shares: bool = False,
    ) -> pb.UpdateSessionResponse:
        """None leaves a setting unchanged; strategy 0 and reset_shares go back
        to the service defaults."""
        try:
            head = await self._storage.update(
                tenant,
                session_id,
                ttl_setting=ttl_setting,
                expected_etag=etag,
                allow_missing=allow_missing,
                new_incarnation=uuid.uuid4().hex[:16],
                now_ms=_now_ms(),
                strategy=strategy,
                shares="" if reset_shares else (shares.encode() if shares else None),
            )
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("update").inc()
            raise
        if head is None:
            raise _not_found(session_id)
        return pb.UpdateSessionResponse(session=self._session_message(session_id, head))

    async def delete_session(
        self, tenant: str, session_id: str, *, etag: str, allow_missing: bool
    ) -> None:
        if self._cache is not None:
            self._cache.drop(tenant, session_id)
        if self.compression is not None:
            self.compression.memories.drop(tenant, session_id)
        try:
            existed = await self._storage.delete(tenant, session_id, expected_etag=etag)
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("delete").inc()
            raise
        if existed:
            metrics.SESSIONS_DELETED.inc()
        elif not allow_missing:
            raise _not_found(session_id)

    # -- reads ----------------------------------------------------------------

    async def _current_tail(self, tenant: str, session_id: str, window: int) -> CachedTail | None:
        """The newest items of the log, verified current against Redis in one
        round trip; None if the session does not exist."""
        cached = self._cache.get(tenant, session_id) if self._cache is not None else None
        result = await self._storage.read(
            tenant,
            session_id,
            known=cached.knowledge() if cached is not None else None,
            window=max(window, self._cache_window) if self._cache is not None else window,
        )
        if result.head is None:
            if self._cache is not None:
                # Deleted through another replica, or expired in Redis.
                self._cache.drop(tenant, session_id)
            return None
        head = result.head
        if result.mode == "hit" and cached is not None:
            tail = cached.at(head)
            if self._cache is not None:
                self._cache.record("hit")
                self._cache.touch(tenant, session_id, cached)
            return tail
        if result.mode == "delta" and cached is not None:
            tail = CachedTail.of(
                head,
                cached.start_index,
                cached.entries + self._entries(tenant, session_id, result.entries),
            )
            outcome = "partial"
        else:
            entries = self._entries(tenant, session_id, result.entries)
            tail = CachedTail.of(head, head.item_count - len(entries), entries)
            outcome = "miss"
            if (
                self._cache is not None
                and cached is not None
                and (head.incarnation, head.trunc) != (cached.head.incarnation, cached.head.trunc)
            ):
                # A pop, or a deleted and re-created session: the tail is stale.
                self._cache.invalidated("changed")
        if self._cache is not None:
            self._cache.record(outcome)
            self._cache.put(tenant, session_id, tail)
        return tail

    async def _extend_back(
        self, tenant: str, session_id: str, tail: CachedTail, want: int
    ) -> CachedTail | None:
        """Prepends up to `want` older entries; None if the log changed under us
        in a way that invalidates the tail (a pop, a delete)."""
        stop = tail.start_index - 1
        start = max(0, tail.start_index - want)
        result = await self._storage.read(tenant, session_id, index_range=(start, stop))
        head = result.head
        if (
            head is None
            or head.incarnation != tail.head.incarnation
            or head.trunc != tail.head.trunc
        ):
            return None
        older = self._entries(tenant, session_id, result.entries)
        return CachedTail.of(tail.head, start, older + tail.entries)

    async def get_context(
        self,
        tenant: str,
        session_id: str,
        *,
        token_budget: int,
        query: str = "",
        strategy: Strategy | None = None,
        shares: Shares | None = None,
        max_items: int = 0,
    ) -> pb.GetContextResponse:
        compression = self.compression
        window = max(32, token_budget // 16, max_items)
        tail = await self._current_tail(tenant, session_id, window)
        for _ in range(64):
            if tail is None:
                applied = strategy or (
                    compression.default_strategy if compression else Strategy.TOKEN_WINDOW
                )
                return pb.GetContextResponse(
                    etag=ABSENT_ETAG,
                    token_budget=token_budget,
                    strategy=PROTO_OF_STRATEGY[applied],
                )
            if (
                tail.start_index == 0
                or len(tail.entries) >= MAX_CONTEXT_ITEMS
                or tail.tokens > token_budget
            ):
                break
            extended = await self._extend_back(
                tenant, session_id, tail, max(_OLDER_CHUNK_MIN, len(tail.entries))
            )
            # A pop or delete raced with us: start over from a fresh tail.
            tail = extended or await self._current_tail(tenant, session_id, window)
        assert tail is not None
        head = tail.head
        if strategy is None:
            strategy = compression.strategy_of(head) if compression else Strategy.TOKEN_WINDOW
        # A view of the tail alone (no summary, no retrieval) depends only on
        # the entries, the head's etag and the request: prepared once per tail,
        # then copied (a copy costs a fraction of building the response).
        pure = (
            compression is None
            or strategy in (Strategy.SLIDING_WINDOW, Strategy.TOKEN_WINDOW)
            or (tail.start_index == 0 and tail.tokens <= token_budget)
        )
        key = (head.etag, strategy, token_budget, max_items, query) if pure else None
        prepared: pb.GetContextResponse | None = tail.memo.get(key) if pure else None
        if prepared is not None:
            response = pb.GetContextResponse()
            response.CopyFrom(prepared)
            _observe_context(head, STRATEGY_OF_PROTO[response.strategy], response.token_count)
            return response
        response = await self._context_response(
            tenant, session_id, tail, strategy, token_budget, query, shares, max_items
        )
        if key is not None:
            prepared = pb.GetContextResponse()
            prepared.CopyFrom(response)
            tail.remember(key, prepared)
        return response

    async def _context_response(
        self,
        tenant: str,
        session_id: str,
        tail: CachedTail,
        strategy: Strategy,
        token_budget: int,
        query: str,
        shares: Shares | None,
        max_items: int,
    ) -> pb.GetContextResponse:
        compression = self.compression
        head = tail.head
        entries = tail.entries
        at_log_start = tail.start_index == 0
        used_query = ""
        if strategy is Strategy.SLIDING_WINDOW:
            n = max_items or (compression.sliding_window_items if compression else 20)
            view = strategies.sliding_window(entries, token_budget, n, at_log_start=at_log_start)
        elif strategy is Strategy.TOKEN_WINDOW or compression is None:
            view = strategies.token_window_view(entries, token_budget, at_log_start=at_log_start)
        else:
            used_query = query or _newest_user_text(tail)
            view = await self._compressed(
                compression,
                tenant,
                session_id,
                tail,
                strategy,
                shares or compression.shares_of(head),
                token_budget,
                used_query,
            )
        _observe_context(head, view.strategy, view.tokens)
        response = pb.GetContextResponse(
            items=[e.item for e in view.recent],
            etag=head.etag,
            token_count=view.tokens,
            token_budget=token_budget,
            total_item_count=head.item_count,
            omitted_item_count=head.item_count - len(view.recent) - len(view.retrieved),
            strategy=PROTO_OF_STRATEGY[view.strategy],
            query=used_query,
            summary_lag=view.summary_lag,
            retrieved_items=[pb.RetrievedItem(item=e.item, score=s) for e, s in view.retrieved],
        )
        if view.summary is not None:
            response.summary.CopyFrom(
                pb.ContextSummary(
                    text=view.summary.text,
                    first_seq=view.summary.first_seq,
                    last_seq=view.summary.last_seq,
                    token_count=view.summary.tokens,
                )
            )
        return response

    async def _compressed(
        self,
        compression: Compression,
        tenant: str,
        session_id: str,
        tail: CachedTail,
        strategy: Strategy,
        shares: Shares,
        budget: int,
        query: str,
    ) -> ContextView:
        """summary / retrieval / tiered over a verified-current tail."""
        head = tail.head
        everything_fits = tail.start_index == 0 and tail.tokens <= budget
        summary = None
        if strategy.uses_summary and not everything_fits:
            summary = await compression.summaries.get(tenant, session_id, head)
        retrieve = None
        if strategy.uses_retrieval and not everything_fits:
            try:
                memory = await compression.memories.sync(
                    tenant, session_id, head, tail.start_index, tail.entries
                )
            except StaleMemory:
                memory = None  # the log changed meanwhile: serve without retrieval
            if memory is not None:
                vector = None
                if compression.embedder is not None and any(v is not None for v in memory.vectors):
                    vector = await compression.embed_query(query)
                if compression.compressor is not None and compression.embedder is not None:
                    if memory.unembedded(1):
                        compression.compressor.notify(tenant, session_id, force=True)
                found = memory

                def retrieve(below: int, room: int) -> list[tuple[LogEntry, float]]:
                    return found.search(query, below_index=below, budget=room, query_vector=vector)

        view = strategies.compose(
            strategy,
            tail.entries,
            tail.start_index,
            budget,
            shares=shares,
            counter=self._tokens,
            summary=summary,
            retrieve=retrieve,
        )
        if strategy.uses_summary and not everything_fits:
            compressor = compression.compressor
            if compressor is not None:
                compressor.record_lag(tenant, session_id, view.summary_lag)
                if view.summary_lag >= compressor.policy.min_batch_items:
                    compressor.notify(tenant, session_id, force=True)
        return view

    async def list_items(
        self,
        tenant: str,
        session_id: str,
        *,
        page_size: int,
        page_token: str,
        newest_first: bool,
    ) -> pb.ListItemsResponse:
        order = "newest" if newest_first else "oldest"
        start_at: int | None = None
        incarnation: str | None = None
        if page_token:
            fields = paging.decode(page_token, {"s": session_id, "o": order})
            start_at = paging.int_field(fields, "i")
            incarnation = str(fields.get("inc", ""))
        # The first page of newest-first is the cached tail's business.
        if newest_first and start_at is None and page_size <= self._cache_window:
            tail = await self._current_tail(tenant, session_id, page_size)
            if tail is None:
                return pb.ListItemsResponse(etag=ABSENT_ETAG)
            if len(tail.entries) >= page_size or tail.start_index == 0:
                page = tail.entries[-page_size:]
                first_index = tail.head.item_count - len(page)
                return self._items_page(session_id, order, tail.head, page, first_index - 1)
        if start_at == -1:
            return pb.ListItemsResponse(etag=ABSENT_ETAG)
        if newest_first:
            index_range = (
                (-page_size, -1)
                if start_at is None
                else (max(0, start_at - page_size + 1), start_at)
            )
        else:
            begin = start_at or 0
            index_range = (begin, begin + page_size - 1)
        result = await self._storage.read(tenant, session_id, index_range=index_range)
        head = result.head
        if head is None:
            if incarnation:
                raise InvalidArgument("page_token", "the session was deleted since")
            return pb.ListItemsResponse(etag=ABSENT_ETAG)
        if incarnation and incarnation != head.incarnation:
            raise InvalidArgument("page_token", "the session was deleted since")
        entries = self._entries(tenant, session_id, result.entries)
        if newest_first:
            first_index = head.item_count - len(entries) if start_at is None else index_range[0]
            return self._items_page(session_id, order, head, entries, first_index - 1)
        next_index = index_range[0] + len(entries)
        more = next_index < head.item_count and len(entries) == page_size
        return self._items_page(session_id, order, head, entries, next_index if more else None)

    def _items_page(
        self,
        session_id: str,
        order: str,
        head: SessionHead,
        entries: Sequence[LogEntry],
        next_index: int | None,
    ) -> pb.ListItemsResponse:
        items = [e.item for e in entries]
        if order == "newest":
            items.reverse()
            if next_index is not None and next_index < 0:
                next_index = None
        token = ""
        if next_index is not None:
            token = paging.encode(
                {"s": session_id, "o": order, "i": next_index, "inc": head.incarnation}
            )
        return pb.ListItemsResponse(
            items=items,
            next_page_token=token,
            etag=head.etag,
            total_item_count=head.item_count,
        )

    async def get_session(self, tenant: str, session_id: str) -> pb.GetSessionResponse:
        (head,) = await self._storage.heads(tenant, [session_id])
        if head is None:
            raise _not_found(session_id)
        return pb.GetSessionResponse(session=self._session_message(session_id, head))

    async def list_sessions(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> pb.ListSessionsResponse:
        after = ""
        if page_token:
            fields = paging.decode(page_token, {"k": "sessions"})
            after = str(fields.get("a", ""))
        sessions: list[pb.Session] = []
        exhausted = False
        for _ in range(8):
            want = page_size - len(sessions)
            ids = await self._storage.index_page(tenant, after, want)
            exhausted = len(ids) < want
            heads = await self._storage.heads(tenant, ids)
            expired = [sid for sid, head in zip(ids, heads, strict=True) if head is None]
            if expired:
                # Sessions leave the index lazily: Redis expired their keys.
                await self._storage.index_remove(tenant, expired)
                metrics.SESSIONS_EXPIRED.inc(len(expired))
            sessions.extend(
                self._session_message(sid, head)
                for sid, head in zip(ids, heads, strict=True)
                if head is not None
            )
            if ids:
                after = ids[-1]
            if exhausted or len(sessions) >= page_size:
                break
        token = "" if exhausted else paging.encode({"k": "sessions", "a": after})
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    def _session_message(self, session_id: str, head: SessionHead) -> pb.Session:
        session = pb.Session(
            session_id=session_id,
            item_count=head.item_count,
            last_seq=head.last_seq,
            etag=head.etag,
            create_time=_timestamp(head.create_ms),
            update_time=_timestamp(head.update_ms),
        )
        if head.ttl_setting == TTL_PERSIST:
            session.settings.persist = True
        else:
            if head.ttl_setting != TTL_DEFAULT:
                session.settings.ttl.CopyFrom(duration_pb2.Duration(seconds=head.ttl_setting))
            effective = head.ttl_setting or self._storage.default_ttl_seconds
            session.effective_ttl.CopyFrom(duration_pb2.Duration(seconds=effective))
        if head.pttl_ms >= 0:
            session.expire_time.CopyFrom(_timestamp(_now_ms() + head.pttl_ms))
        if head.strategy:
            session.settings.context_strategy = pb.ContextStrategy.ValueType(head.strategy)
        shares = Shares.decode(head.shares) if head.shares else None
        if shares is not None:
            session.settings.tier_shares.CopyFrom(
                pb.TierShares(
                    recent=shares.recent, summary=shares.summary, retrieval=shares.retrieval
                )
            )
        return session


_NEWEST_USER_TEXT = "newest_user_text"
_TOKENS_SAVED = {
    strategy: metrics.COMPRESSION_TOKENS_SAVED.labels(strategy.value) for strategy in Strategy
}


def _observe_context(head: SessionHead, strategy: Strategy, tokens: int) -> None:
    metrics.CONTEXT_TOKENS.observe(tokens)
    if head.log_tokens >= 0:
        _TOKENS_SAVED[strategy].inc(max(0, head.log_tokens - tokens))


def _newest_user_text(tail: CachedTail) -> str:
    """The text of the newest user message: the default retrieval query
    (remembered with the tail: it is a JSON parse)."""
    text: str | None = tail.memo.get(_NEWEST_USER_TEXT)
    if text is None:
        text = ""
        for entry in reversed(tail.entries):
            if entry.starts_turn:
                text = item_text_of_json(entry.item.json)[1]
                break
        tail.remember(_NEWEST_USER_TEXT, text)
    return text


def _not_found(session_id: str) -> NotFound:
    return NotFound(
        f"session {session_id!r} does not exist",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id},
    )
