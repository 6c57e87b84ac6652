"""The context a replica's own last turn left a session in, so that its next
turn on that session can skip GetContext (issue 17).

At a few dozen items a Chat turn is three gRPC calls to the state service and
each costs about 0.5 ms before the service does any work (BENCHMARKS.md, turn
cost). When the last GetContext returned the whole log verbatim, the context
of the next turn is that log plus what the turn appended: the replica knows it
without asking, as long as nobody else wrote in between. Nobody else wrote
exactly when the session's etag is still the one our append returned, and the
turn's AppendItems checks that etag anyway: a stale entry is found out by an
ABORTED append, after the model ran (turns.py then redoes the turn on a fresh
context, model call included).

An entry is kept only while the next GetContext would certainly return the
same thing, whatever the query:
- the context it starts from was the whole log, verbatim: no summary, no
  retrieved items, nothing omitted, and not the sliding_window strategy (that
  one drops items by count, not by tokens);
- its token total stays within the budget. AppendItems answers with the
  service's own count of the whole log (`log_token_count`), which is exact;
  when it is missing (an older service) the items appended since the last
  count are counted here from above (UTF-8 bytes of their JSON plus a
  per-item allowance: every token is at least one byte of the text the
  service counts, and that text is part of the JSON). Either way a run of
  hits ends in a fresh GetContext, never in a context the service would have
  compressed;
- it holds at most `max_items` items (keep it at or below the state service's
  STATE_SERVICE_CONTEXT_MAX_ITEMS, which caps what one GetContext reads).

Entries are keyed by (tenant, session) and bounded by the bytes of their items'
JSON (Python objects take a few times that), least recently used first out.

A session whose turns alternate between replicas (a client balancing calls
round robin) would find every cached context stale and run every model call
twice. So once a cached context was stale, the session is "shared": this
replica keeps only the etag of its own last append, reads the context of each
turn, and caches again only when a read shows nobody else wrote since its own
last append.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from state_service.client import AppendResult, Context, StoredItem

# Tokens allowed per appended item on top of its bytes: above the state
# service's framing overhead (state_service/tokens.py, 4) with room to spare.
ITEM_TOKEN_ALLOWANCE = 8
# What the cache adds per item besides its JSON (an estimate used for the
# bound, not a measurement of the Python objects).
ITEM_BYTES_ALLOWANCE = 64
# Sessions remembered as shared (a few dozen bytes each).
SHARED_SESSIONS_LIMIT = 10_000
# The strategy that drops items by count: its context is not the whole log
# once the log grows by one turn, even within the budget.
COUNTED_STRATEGY = "sliding_window"


def item_bytes(data: dict[str, Any]) -> int:
    """The UTF-8 bytes of an item's compact JSON."""
    return len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())


def is_whole_log(context: Context) -> bool:
    """Whether `context` is the session's whole log, verbatim (nothing the
    query or the budget chose)."""
    return (
        context.summary is None
        and not context.retrieved
        and context.omitted_item_count == 0
        and len(context.items) == context.total_item_count
        and context.strategy is not None
        and context.strategy != COUNTED_STRATEGY
    )


@dataclass(frozen=True, slots=True)
class CachedContext:
    # The context the next turn runs on; its token_count is an upper bound
    # (exact when it came from GetContext).
    context: Context
    # The token budget the turn asked GetContext for (0: the service default).
    requested_budget: int
    size_bytes: int

    def holds(self, metadata_key: str, value: str) -> bool:
        return any(item.metadata.get(metadata_key) == value for item in self.context.items)


class ContextCache:
    """Bounded LRU of CachedContext by (tenant, session_id). Not thread-safe:
    used from the event loop only."""

    def __init__(self, max_bytes: int, max_items: int) -> None:
        self._max_bytes = max_bytes
        self._max_items = max_items
        self._entries: OrderedDict[tuple[str, str], CachedContext] = OrderedDict()
        self._bytes = 0
        # Sessions found written by others, with the etag of this replica's
        # last append to each ("" until it has appended again).
        self._shared: OrderedDict[tuple[str, str], str] = OrderedDict()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tenant: str, session_id: str, requested_budget: int) -> CachedContext | None:
        key = (tenant, session_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.requested_budget != requested_budget:
            # Another agent, another budget: what fits one may not fit the other.
            self.drop(tenant, session_id)
            return None
        self._entries.move_to_end(key)
        return entry

    def stale(self, tenant: str, session_id: str) -> None:
        """The entry was out of date: someone else writes to the session."""
        self.drop(tenant, session_id)
        self._shared[(tenant, session_id)] = ""
        self._shared.move_to_end((tenant, session_id))
        while len(self._shared) > SHARED_SESSIONS_LIMIT:
            self._shared.popitem(last=False)

    def drop(self, tenant: str, session_id: str) -> None:
        entry = self._entries.pop((tenant, session_id), None)
        if entry is not None:
            self._bytes -= entry.size_bytes

    def after_append(
        self,
        tenant: str,
        session_id: str,
        requested_budget: int,
        context: Context,
        previous_bytes: int | None,
        appended: Sequence[tuple[dict[str, Any], dict[str, str]]],
        result: AppendResult,
    ) -> None:
        """Remembers the session as the turn left it: `context` (what the turn
        ran on, at its etag) plus the `appended` (data, metadata) items, as
        the append's `result` stored them. `previous_bytes` is the size of
        `context`'s items when it came from this cache (None: measured here).
        Drops the entry instead when the result may not be the whole log, or
        when the session is shared and `context` shows someone else wrote
        since this replica's last append."""
        etag, first_seq = result.etag, result.first_seq
        self.drop(tenant, session_id)
        key = (tenant, session_id)
        own_etag = self._shared.get(key)
        if own_etag is not None:
            if own_etag != context.etag:
                self._shared[key] = etag
                return
            del self._shared[key]
        if not is_whole_log(context):
            return
        new_bytes = [item_bytes(data) for data, _ in appended]
        tokens = context.token_count + sum(b + ITEM_TOKEN_ALLOWANCE for b in new_bytes)
        if context.token_count < result.log_token_count <= tokens:
            # The service's own count of the log (a newer service sends it):
            # exact, where the bytes above only bound it.
            tokens = result.log_token_count
        count = len(context.items) + len(appended)
        if tokens > context.token_budget or count > self._max_items:
            return
        if previous_bytes is None:
            previous_bytes = sum(
                (len(item.raw_json.encode()) if item.raw_json else item_bytes(item.data))
                + ITEM_BYTES_ALLOWANCE
                for item in context.items
            )
        size = previous_bytes + sum(b + ITEM_BYTES_ALLOWANCE for b in new_bytes)
        if size > self._max_bytes:
            return
        now = datetime.now(UTC)
        items = [
            *context.items,
            *(
                StoredItem(seq=first_seq + index, data=data, metadata=metadata, create_time=now)
                for index, (data, metadata) in enumerate(appended)
            ),
        ]
        grown = replace(
            context,
            items=items,
            etag=etag,
            token_count=tokens,
            total_item_count=count,
            omitted_item_count=0,
        )
        self._entries[(tenant, session_id)] = CachedContext(grown, requested_budget, size)
        self._bytes += size
        while self._bytes > self._max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size_bytes
