"""StateServiceSession: an openai-agents `Session` backed by the state service,
a drop-in replacement for openai-agents' RedisSession in
`Runner.run(agent, input, session=...)`.

Budgeted sessions. With a `token_budget` (constructor argument or
`BudgetedSessionSettings`), `get_items()` returns the state service's
GetContext view instead of the whole log: a summary of older items, older
items retrieved as relevant to the query, then the newest items verbatim, cut
at turn boundaries by the server. The log itself is untouched; `ListItems`
still returns every item.

Invariants of what `get_items()` returns with a budget:

- The summary and the retrieved items become at most two marker messages
  ahead of the recent items. Retrieved items are rendered as quoted text
  inside their marker, never as raw items: a retrieved `function_call`
  without its output (or an output without its call) is refused by the model
  APIs, and the Runner drops orphan calls but keeps orphan outputs unless a
  `limit` is set.
- The markers default to the `user` role. Their text comes from users and
  tool outputs (a fetched web page, say); as a `developer` or `system` message
  it would be promoted to instruction authority. `marker_role` changes it.
- The result fits the budget in the server's token units. The server counts
  the summary text and the retrieved items' JSON; the markers' framing is
  estimated with the server's documented estimate (ceil(UTF-8 bytes / 3) + 4
  per item) and converted to the server's units (see budgeted_input_items).
  The server is asked for the budget less the markers' framing, and when the
  framing would still overflow, the least relevant retrieved items, then the
  summary, are left out.
- An explicit `limit` (an argument, or `SessionSettings.limit`, which the
  Runner passes as the argument) returns the newest `limit` items verbatim,
  exactly as every SDK session does: the Runner itself reads session tails
  with `limit` to verify and rewind its writes, and a marker in such a tail
  would defeat that check.

Compaction. Wrapped in openai-agents' OpenAIResponsesCompactionSession, the
session replaces history through the SDK's atomic hooks (see "openai-agents'
compaction hooks" below), never by clear_session() + add_items(): a
compaction is one etag-checked CompactSession that stores a view beside the
log. Unbudgeted `get_items()` (and any `limit` read) returns that view when
the session has one: its stored items, then the items appended since.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass as plain_dataclass
from dataclasses import field, fields, replace
from typing import Any, Literal, cast

from agents.items import TResponseInputItem
from agents.memory.session import _CompactionSnapshot
from agents.memory.session_settings import SessionSettings, resolve_session_limit
from pydantic.dataclasses import dataclass

from state_service.client._client import StateClient
from state_service.client.errors import EtagMismatchError
from state_service.client.rendering import MarkerRole, budgeted_input_items, marker_reserve
from state_service.client.types import Context, NewItem, TierShares

StrategyName = Literal["sliding_window", "token_window", "summary", "retrieval", "tiered"]


# GetCompactedView's max_items is an int32; larger limits read everything.
_MAX_VIEW_ITEMS = 2**31 - 1

# The strategies whose view is the newest items only: no marker, so nothing to
# reserve for one.
_WINDOW_STRATEGIES = ("sliding_window", "token_window")

# The most item JSON bytes a session keeps of its log between calls.
_CACHE_MAX_BYTES = 16 * 1024 * 1024


@plain_dataclass(slots=True)
class _LogCache:
    """The session's whole log (no compacted view) as of `etag`, as JSON.

    Why: the Runner reads the whole history every turn; without this, every
    turn moved the whole log through gRPC and decoded it twice. With it a turn
    sends one small read (the newest item, for the etag) and moves only what
    changed. It is only ever served after that read shows the etag unchanged;
    this session's own appends extend it when their result shows nothing else
    was written in between (the version moved by exactly one)."""

    etag: str
    last_seq: int
    items: list[str] = field(default_factory=list)
    size: int = 0

    def follows(self, etag: str, first_seq: int) -> bool:
        """Whether a write answered with `etag` and `first_seq` came right after this state."""
        incarnation, _, version = self.etag.partition(".")
        return first_seq == self.last_seq + 1 and etag == f"{incarnation}.{int(version or 0) + 1}"


@dataclass
class BudgetedSessionSettings(SessionSettings):
    """openai-agents `SessionSettings` plus the budget of `get_items()`.

    `token_budget`: tokens `get_items()` may return (the server's count); None
    returns the whole log, as before. `strategy`: a GetContext strategy (None:
    the session's own, set with UpdateSession, else the service default).
    `tier_shares`: the budget split of summary / retrieval / recent (None: the
    session's or the service's). `query`: what retrieval looks for (None: the
    newest user message in the log; under `Runner.run` that is the previous
    turn's, since the Runner reads the history before it stores the new input).
    `marker_role`: the role of the summary and retrieval messages (None: "user").
    """

    token_budget: int | None = None
    strategy: StrategyName | None = None
    tier_shares: TierShares | None = None
    query: str | None = None
    marker_role: MarkerRole | None = None

    def __post_init__(self) -> None:
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError("token_budget must be positive (None: no budget)")

    def resolve(self, override: SessionSettings | dict[str, Any] | None) -> BudgetedSessionSettings:
        # The Runner overlays RunConfig.session_settings, usually a plain
        # SessionSettings, on these; the SDK's resolve only accepts our own type.
        if isinstance(override, SessionSettings) and not isinstance(
            override, BudgetedSessionSettings
        ):
            override = {f.name: getattr(override, f.name) for f in fields(override)}
        return cast(BudgetedSessionSettings, super().resolve(override))


class StateServiceSession:
    """The conversation history of one session, kept by the state service.

    Give it either a `client` (shared, not closed here) or a `target` (a client
    of its own, closed by `close()`). `token_budget`, `strategy`, `tier_shares`,
    `query` and `marker_role` make `get_items()` budgeted (see the module
    docstring and BudgetedSessionSettings); they override the same fields of
    `session_settings`.
    """

    def __init__(
        self,
        session_id: str,
        *,
        target: str | Sequence[str] | None = None,
        client: StateClient | None = None,
        session_settings: SessionSettings | None = None,
        token_budget: int | None = None,
        strategy: StrategyName | None = None,
        tier_shares: TierShares | None = None,
        query: str | None = None,
        marker_role: MarkerRole | None = None,
    ) -> None:
        if (client is None) == (target is None):
            raise ValueError("give exactly one of target or client")
        if (token_budget, strategy, tier_shares, query, marker_role) != (None,) * 5:
            base = (
                session_settings
                if isinstance(session_settings, BudgetedSessionSettings)
                else BudgetedSessionSettings(
                    limit=session_settings.limit if session_settings is not None else None
                )
            )
            session_settings = replace(
                base,
                token_budget=base.token_budget if token_budget is None else token_budget,
                strategy=base.strategy if strategy is None else strategy,
                tier_shares=base.tier_shares if tier_shares is None else tier_shares,
                query=base.query if query is None else query,
                marker_role=base.marker_role if marker_role is None else marker_role,
            )
        if (
            isinstance(session_settings, BudgetedSessionSettings)
            and session_settings.token_budget is not None
            and session_settings.limit is not None
        ):
            raise ValueError(
                "give either a limit (the newest N items verbatim) or a token_budget: "
                "a limit always wins, so the budget would never apply"
            )
        self.session_id = session_id
        self.session_settings = session_settings
        self._owns_client = client is None
        # The etag of the newest raw read for a compaction (see the hooks below).
        self._compaction_etag = ""
        self._cache: _LogCache | None = None
        self._client = client if client is not None else StateClient(cast(str, target))

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """With a budget and no limit: the budgeted context. Otherwise the newest
        `limit` items (all when None), oldest first, of the compacted view when
        the session has one, else of the log."""
        settings = self.session_settings
        if (
            limit is None
            and isinstance(settings, BudgetedSessionSettings)
            and settings.token_budget is not None
            and settings.limit is None
        ):
            return await self._budgeted_items(settings, settings.token_budget)
        limit = resolve_session_limit(limit, settings)
        if limit is not None and limit <= 0:
            return []
        cached = await self._cached_items(limit)
        if cached is not None:
            return cached
        items, _, _ = await self._raw_items(limit, remember=True)
        return items

    async def _cached_items(self, limit: int | None) -> list[TResponseInputItem] | None:
        """The newest `limit` items from the local copy of the log, if one
        small read shows the session unchanged since it; else None."""
        cache = self._cache
        if cache is None:
            return None
        newest = await self._client.list_items(self.session_id, page_size=1, newest_first=True)
        if newest.etag != cache.etag or self._cache is not cache:
            self._cache = None
            return None
        kept = cache.items if limit is None else cache.items[-limit:]
        # One json.loads of the whole copy: a quarter of the cost of one per item.
        return cast(list[TResponseInputItem], json.loads("[" + ",".join(kept) + "]"))

    async def _raw_items(
        self, limit: int | None, *, remember: bool = False
    ) -> tuple[list[TResponseInputItem], int, str]:
        """The newest `limit` items (all when None) of the session's history:
        its compacted view when it has one, else its log; with the history's
        total length and the etag they were read at ("" when the log's pages
        were read at different etags). `remember` keeps a whole log read as
        the local copy get_items serves from."""
        max_items = min(limit, _MAX_VIEW_ITEMS) if limit is not None else 0
        view = await self._client.get_compacted_view(self.session_id, max_items=max_items)
        if view.compacted:
            items = [cast(TResponseInputItem, item.data) for item in view.items]
            return items, view.total_item_count, view.etag
        if limit is None:
            page_items: list[dict[str, Any]] = []
            raw: list[str] = []
            etags = set()
            token = ""
            last_seq = 0
            while True:
                page = await self._client.list_items(
                    self.session_id, page_size=1000, page_token=token
                )
                page_items.extend(item.data for item in page.items)
                if remember:
                    raw.extend(item.raw_json for item in page.items)
                if page.items:
                    last_seq = page.items[-1].seq
                etags.add(page.etag)
                token = page.next_page_token
                if not token:
                    break
            etag = etags.pop() if len(etags) == 1 else ""
            size = sum(len(r) for r in raw)
            if remember and etag and size <= _CACHE_MAX_BYTES:
                self._cache = _LogCache(etag, last_seq, raw, size)
            return [cast(TResponseInputItem, i) for i in page_items], len(page_items), etag
        collected: list[dict[str, Any]] = []
        etags = set()
        total = 0
        token = ""
        while len(collected) < limit:
            page = await self._client.list_items(
                self.session_id,
                page_size=min(limit - len(collected), 1000),
                page_token=token,
                newest_first=True,
            )
            collected.extend(item.data for item in page.items)
            etags.add(page.etag)
            total = page.total_item_count
            token = page.next_page_token
            if not token:
                break
        collected.reverse()
        etag = etags.pop() if len(etags) == 1 else ""
        return [cast(TResponseInputItem, item) for item in collected], total, etag

    # -- openai-agents' compaction hooks ---------------------------------------
    # OpenAIResponsesCompactionSession looks these up on the session it wraps
    # (private names of the SDK, see agents/memory/openai_responses_compaction_
    # session.py). Without them it replaces history by clear_session() then
    # add_items(): the log deleted, and not atomically. With them a compaction
    # is one etag-checked CompactSession: a view stored beside the log, which
    # stays whole. They read the raw history (never the budgeted view), so a
    # budgeted session compacts what it stores, not what it sends.

    async def _read_compaction_items(
        self, limit: int | None
    ) -> tuple[list[TResponseInputItem], bool]:
        """The newest `limit` items of the history and whether they are all of it."""
        items, total, etag = await self._raw_items(limit)
        self._compaction_etag = etag
        return items, len(items) >= total

    async def _get_compaction_snapshot(self, limit: int) -> _CompactionSnapshot | None:
        """The newest `limit` items, with a replacement of their suffix that
        applies only if the session is unchanged since this read."""
        items, total, etag = await self._raw_items(limit)
        if not etag:
            return None  # read across a concurrent write: no consistent snapshot

        async def replace_suffix(start: int, output: list[TResponseInputItem]) -> bool:
            if start >= len(items):
                return False
            try:
                await self._client.compact_session(
                    self.session_id,
                    [cast(dict[str, Any], item) for item in output],
                    etag=etag,
                    keep_items=total - len(items) + start,
                )
            except EtagMismatchError:
                return False  # the SDK then keeps the history as it is
            return True

        return _CompactionSnapshot(items, len(items) >= total, replace_suffix)

    async def _atomic_replace_items(self, items: list[TResponseInputItem]) -> bool:
        """Replaces the whole history (as get_items sees it) with `items`, if
        it is unchanged since the compaction read it. Raises on a concurrent
        write rather than returning False: the SDK answers False by clearing
        the session and adding the items again."""
        etag = self._compaction_etag
        if not etag:
            _, _, etag = await self._raw_items(1)
        await self._client.compact_session(
            self.session_id, [cast(dict[str, Any], item) for item in items], etag=etag
        )
        return True

    async def get_context(self) -> Context:
        """The GetContext view behind a budgeted `get_items()` (what the server
        chose, before the markers are rendered); raises without a budget."""
        settings = self.session_settings
        if not isinstance(settings, BudgetedSessionSettings) or settings.token_budget is None:
            raise ValueError("this session has no token_budget")
        return await self._context(settings, settings.token_budget)

    async def _context(self, settings: BudgetedSessionSettings, budget: int) -> Context:
        # A budget too small for the framing still gets most of itself for the
        # recent items; the markers are then trimmed away.
        reserve = 0 if settings.strategy in _WINDOW_STRATEGIES else marker_reserve()
        reserve = min(reserve, budget // 4)
        return await self._client.get_context(
            self.session_id,
            query=settings.query or "",
            token_budget=budget - reserve,
            strategy=settings.strategy,
            tier_shares=settings.tier_shares,
        )

    async def _budgeted_items(
        self, settings: BudgetedSessionSettings, budget: int
    ) -> list[TResponseInputItem]:
        context = await self._context(settings, budget)
        items = budgeted_input_items(
            context, token_budget=budget, marker_role=settings.marker_role or "user"
        )
        return [cast(TResponseInputItem, item) for item in items]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        if not items:
            return
        cache, self._cache = self._cache, None
        protos = [NewItem(cast(dict[str, Any], item)).to_proto() for item in items]
        result = await self._client.append_items(self.session_id, protos)
        if cache is not None and cache.follows(result.etag, result.first_seq):
            added = [p.json for p in protos]
            cache.size += sum(len(a) for a in added)
            if cache.size <= _CACHE_MAX_BYTES:
                cache.items.extend(added)
                cache.etag, cache.last_seq = result.etag, result.last_seq
                self._cache = cache

    async def pop_item(self) -> TResponseInputItem | None:
        self._cache = None
        result = await self._client.pop_item(self.session_id)
        return cast(TResponseInputItem, result.item.data) if result.item is not None else None

    async def clear_session(self) -> None:
        self._cache = None
        await self._client.delete_session(self.session_id, allow_missing=True)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()
