"""GetContext: what of a session's log a model is shown, top to bottom.

1. Read the tail: the newest entries, verified current against Redis in one
   round trip (reader.py; the local cache spares decoding what it holds), then
   extended back until it covers the budget or the start of the log.
2. Choose the strategy: the request's, else the session's setting, else the
   service default.
3. Select: a window of recent turns (window.py), or, for summary / retrieval /
   tiered, the stored summary and retrieved older items beside a window of
   recent items (compression/strategies.py composes them).
4. Pack within the budget: every strategy returns whole turns where it can,
   never separates a tool call from its output, and never exceeds the budget.

The log is never changed here; summaries and embeddings are computed in the
background (compression/worker.py), and a read that finds them lagging only
asks for them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from state_service import metrics
from state_service.cache import CachedTail
from state_service.compression import strategies
from state_service.compression.engine import Compression
from state_service.compression.memory import StaleMemory
from state_service.compression.strategies import ContextView, Shares, Strategy, SummaryPart
from state_service.compression.text import item_text_of_json
from state_service.heavy_work import HeavyWork, Share
from state_service.log import LogEntry
from state_service.reader import LogReader
from state_service.storage.redis import ABSENT_ETAG, SessionHead
from state_service.tokens import TokenCounter

_OLDER_CHUNK_MIN = 64
# The query a response echoes is cut to this many characters: it is there to
# say which query was used (the newest user message by default), and echoing a
# long one whole would make every reply as large as the query.
QUERY_ECHO_CHARS = 256
_EMPTY_VIEW = ContextView(Strategy.TOKEN_WINDOW, (), (), None, 0)


@dataclass(frozen=True, slots=True)
class ContextResult:
    """The context of a session as of `etag` (ABSENT_ETAG: no session).

    `rendered` is set on a result that is shared by every request of the same
    shape (see ContextPipeline.get_context): the gRPC layer keeps its built
    response there, so serving the result again costs a copy, not a build.
    """

    etag: str
    token_budget: int
    strategy: Strategy
    view: ContextView = _EMPTY_VIEW
    total_item_count: int = 0
    query: str = ""
    rendered: dict[str, Any] | None = None

    @property
    def recent(self) -> Sequence[LogEntry]:
        return self.view.recent

    @property
    def retrieved(self) -> Sequence[tuple[LogEntry, float]]:
        return self.view.retrieved

    @property
    def summary(self) -> SummaryPart | None:
        return self.view.summary

    @property
    def token_count(self) -> int:
        return self.view.tokens

    @property
    def omitted_item_count(self) -> int:
        return self.total_item_count - len(self.view.recent) - len(self.view.retrieved)


@dataclass(frozen=True, slots=True)
class ContextLimits:
    """What one GetContext may read, whatever the session's size: at most
    `max_items` log items and `max_bytes` of them (past the newest one)."""

    max_items: int = 10_000
    max_bytes: int = 8 * 1024 * 1024
    max_query_bytes: int = 4096


class ContextPipeline:
    def __init__(
        self,
        reader: LogReader,
        compression: Compression | None,
        token_counter: TokenCounter,
        limits: ContextLimits,
        heavy: HeavyWork,
    ) -> None:
        self._reader = reader
        self._compression = compression
        self._tokens = token_counter
        self.limits = limits
        self._heavy = heavy

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
    ) -> ContextResult:
        """The context (see the module docstring). Work beyond the cached fast
        path (decoding many bytes, retrieval) takes one of the tenant's
        heavy-work slots (TenantBusy when it has none left) and runs off the
        event loop, abandoned at the caller's deadline."""
        async with self._heavy.share(tenant) as share:
            return await self._get_context(
                share, tenant, session_id, token_budget, query, strategy, shares, max_items
            )

    async def _get_context(
        self,
        share: Share,
        tenant: str,
        session_id: str,
        token_budget: int,
        query: str,
        strategy: Strategy | None,
        shares: Shares | None,
        max_items: int,
    ) -> ContextResult:
        compression = self._compression
        # 1. The tail.
        tail = await self._tail_for(share, tenant, session_id, token_budget, max_items)
        # 2. The strategy.
        if tail is None:
            applied = strategy or (
                compression.default_strategy if compression else Strategy.TOKEN_WINDOW
            )
            return ContextResult(ABSENT_ETAG, token_budget, applied)
        head = tail.head
        if strategy is None:
            strategy = compression.strategy_of(head) if compression else Strategy.TOKEN_WINDOW
        # A view of the tail alone (no summary, no retrieval) depends only on
        # the entries, the head's etag and the request: computed once per
        # tail and shared (with its rendering, see ContextResult).
        pure = (
            compression is None
            or strategy in (Strategy.SLIDING_WINDOW, Strategy.TOKEN_WINDOW)
            or (tail.start_index == 0 and tail.tokens <= token_budget)
        )
        key = (head.etag, strategy, token_budget, max_items, query) if pure else None
        if key is not None:
            shared: ContextResult | None = tail.memo.get(key)
            if shared is not None:
                _observe_context(head, shared.view.strategy, shared.token_count)
                return shared
        # 3 and 4. Select and pack.
        used_query = ""
        if strategy is Strategy.SLIDING_WINDOW:
            n = max_items or (compression.sliding_window_items if compression else 20)
            view = strategies.sliding_window(
                tail.entries, token_budget, n, at_log_start=tail.start_index == 0
            )
        elif strategy is Strategy.TOKEN_WINDOW or compression is None:
            view = strategies.token_window_view(
                tail.entries, token_budget, at_log_start=tail.start_index == 0
            )
        else:
            used_query = query or _newest_user_text(tail, self.limits.max_query_bytes)
            view = await self._compressed(
                share,
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
        result = ContextResult(
            head.etag,
            token_budget,
            view.strategy,
            view,
            head.item_count,
            used_query[:QUERY_ECHO_CHARS],
            rendered={} if key is not None else None,
        )
        if key is not None:
            tail.remember(key, result, _item_bytes(view))
        return result

    async def _tail_for(
        self, share: Share, tenant: str, session_id: str, token_budget: int, max_items: int
    ) -> CachedTail | None:
        """The current tail, extended back until it holds more than the budget,
        the whole log, or the limits' items or bytes; None if the session does
        not exist. Each read is one bounded step (see RedisStorage.read)."""
        reader = self._reader
        limits = self.limits
        window = min(max(32, token_budget // 16, max_items), limits.max_items)
        tail = await reader.current_tail(tenant, session_id, window, share.run)
        for _ in range(64):
            if (
                tail is None
                or tail.start_index == 0
                or len(tail.entries) >= limits.max_items
                or tail.size >= limits.max_bytes
                or tail.tokens > token_budget
            ):
                break
            want = min(
                max(_OLDER_CHUNK_MIN, len(tail.entries)), limits.max_items - len(tail.entries)
            )
            # Reading further back is heavy work: it takes the tenant's slot.
            await share.take()
            extended = await reader.extend_back(tenant, session_id, tail, want, share.run)
            # A pop or delete raced with us: start over from a fresh tail.
            tail = extended or await reader.current_tail(tenant, session_id, window, share.run)
        return tail

    async def _compressed(
        self,
        share: Share,
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
            await share.take()  # indexing and scoring are heavy work
            # The memory indexes what it lacks of the tail in one job, so it is
            # handed only the tail's newest part (it reads anything older in
            # bounded steps, each its own job): no job long enough to make
            # other tenants' jobs miss their deadlines.
            start, newest = _newest_part(tail, self._reader.step_bytes)
            try:
                memory = await compression.memories.sync(tenant, session_id, head, start, newest)
            except StaleMemory:
                memory = None  # the log changed meanwhile: serve without retrieval
            if memory is not None:
                vector = None
                if compression.embedder is not None and memory.has_vectors:
                    vector = await compression.embed_query(query)
                if compression.compressor is not None and compression.embedder is not None:
                    if memory.unembedded(1):
                        compression.compressor.notify(tenant, session_id, force=True)
                found = memory

                def retrieve(below: int, room: int) -> list[tuple[LogEntry, float]]:
                    return found.search(query, below_index=below, budget=room, query_vector=vector)

        compose = functools.partial(
            strategies.compose,
            strategy,
            tail.entries,
            tail.start_index,
            budget,
            shares=shares,
            counter=self._tokens,
            summary=summary,
            retrieve=retrieve,
        )
        # Retrieval scores the query against the whole memory: off the loop.
        view = await share.run(compose) if retrieve is not None else compose()
        if strategy.uses_summary and not everything_fits:
            compressor = compression.compressor
            if compressor is not None:
                compressor.record_lag(tenant, session_id, view.summary_lag)
                if view.summary_lag >= compressor.policy.min_batch_items:
                    compressor.notify(tenant, session_id, force=True)
        return view


_NEWEST_USER_TEXT = "newest_user_text"
_TOKENS_SAVED = {
    strategy: metrics.COMPRESSION_TOKENS_SAVED.labels(strategy.value) for strategy in Strategy
}


def _observe_context(head: SessionHead, strategy: Strategy, tokens: int) -> None:
    metrics.CONTEXT_TOKENS.observe(tokens)
    if head.log_tokens >= 0:
        _TOKENS_SAVED[strategy].inc(max(0, head.log_tokens - tokens))


def _newest_part(tail: CachedTail, max_bytes: int) -> tuple[int, Sequence[LogEntry]]:
    """The log index and entries of the tail's newest entries within `max_bytes`."""
    size = 0
    cut = len(tail.entries)
    while cut > 0 and size + len(tail.entries[cut - 1].item.json) <= max_bytes:
        cut -= 1
        size += len(tail.entries[cut].item.json)
    return tail.start_index + cut, tail.entries[cut:]


def _item_bytes(view: ContextView) -> int:
    """The item JSON a prepared result carries (its rendered response holds
    a copy of each)."""
    size = sum(len(entry.item.json) for entry in view.recent)
    size += sum(len(entry.item.json) for entry, _ in view.retrieved)
    return size + (len(view.summary.text) if view.summary is not None else 0)


def _newest_user_text(tail: CachedTail, max_bytes: int) -> str:
    """The text of the newest user message, cut to `max_bytes` as a request's
    query would be: the default retrieval query (remembered with the tail: it
    is a JSON parse)."""
    text: str | None = tail.memo.get(_NEWEST_USER_TEXT)
    if text is None:
        text = ""
        for entry in reversed(tail.entries):
            if entry.starts_turn:
                text = item_text_of_json(entry.item.json)[1]
                break
        text = text.encode()[:max_bytes].decode(errors="ignore")
        tail.remember(_NEWEST_USER_TEXT, text, len(text))
    return text
