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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, Literal, cast

from agents.items import TResponseInputItem
from agents.memory.session_settings import SessionSettings, resolve_session_limit
from pydantic.dataclasses import dataclass

from state_service.client._client import StateClient
from state_service.client.types import Context, ContextSummary, RetrievedItem, TierShares

StrategyName = Literal["sliding_window", "token_window", "summary", "retrieval", "tiered"]
MarkerRole = Literal["user", "developer", "system"]

SUMMARY_HEADER = "Summary of the earlier conversation (items {first}-{last}):\n"
RETRIEVED_HEADER = "Possibly relevant earlier messages from this conversation (quoted):\n"

# The strategies whose view is the newest items only: no marker, so nothing to
# reserve for one.
_WINDOW_STRATEGIES = ("sliding_window", "token_window")


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
        self._client = client if client is not None else StateClient(cast(str, target))

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """With a budget and no limit: the budgeted context. Otherwise the newest
        `limit` items (all when None), oldest first."""
        settings = self.session_settings
        if (
            limit is None
            and isinstance(settings, BudgetedSessionSettings)
            and settings.token_budget is not None
            and settings.limit is None
        ):
            return await self._budgeted_items(settings, settings.token_budget)
        limit = resolve_session_limit(limit, settings)
        if limit is None:
            items = await self._client.all_items(self.session_id)
            return [cast(TResponseInputItem, item.data) for item in items]
        if limit <= 0:
            return []
        collected: list[dict[str, Any]] = []
        token = ""
        while len(collected) < limit:
            page = await self._client.list_items(
                self.session_id,
                page_size=min(limit - len(collected), 1000),
                page_token=token,
                newest_first=True,
            )
            collected.extend(item.data for item in page.items)
            token = page.next_page_token
            if not token:
                break
        collected.reverse()
        return [cast(TResponseInputItem, item) for item in collected]

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
        if items:
            await self._client.append_items(
                self.session_id, [cast(dict[str, Any], item) for item in items]
            )

    async def pop_item(self) -> TResponseInputItem | None:
        result = await self._client.pop_item(self.session_id)
        return cast(TResponseInputItem, result.item.data) if result.item is not None else None

    async def clear_session(self) -> None:
        await self._client.delete_session(self.session_id, allow_missing=True)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()


# -- rendering the budgeted context ---------------------------------------------


def estimate_tokens(data: Mapping[str, Any] | str) -> int:
    """The state service's estimate of one item (or one text): ceil(UTF-8 bytes
    of its compact JSON / 3) + 4 (see state_service/tokens.py)."""
    raw = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return -(-len(raw.encode()) // 3) + 4


def marker_reserve() -> int:
    """Tokens asked of the server below the budget for the markers' framing:
    both headers as empty messages, with seq ranges of the widest plausible
    width (the retrieved items' own framing, which rendering drops, usually
    pays for the rest)."""
    wide = 10**9
    summary = {"role": "developer", "content": SUMMARY_HEADER.format(first=wide, last=wide)}
    retrieved = {"role": "developer", "content": RETRIEVED_HEADER}
    return estimate_tokens(summary) + estimate_tokens(retrieved)


def budgeted_input_items(
    context: Context, *, token_budget: int, marker_role: MarkerRole = "user"
) -> list[dict[str, Any]]:
    """`context` as model input within `token_budget`: the summary marker, the
    retrieval marker, then the recent items verbatim.

    The server's `token_count` covers the summary text and the retrieved
    items' JSON; the markers replace those. The client cannot count in the
    server's units (tiktoken or the estimate, the server's choice), so it
    estimates the markers and what they replace, and converts the difference
    with the ratio of the server's count to the estimate of everything the
    server counted (exactly 1 when the server estimates too). While the result
    exceeds the budget, the lowest-scoring retrieved item, then the summary,
    is left out; the recent items are the server's choice and stay.
    """
    recent = [item.data for item in context.items]
    summary = context.summary
    retrieved = sorted(context.retrieved, key=lambda r: r.item.seq)
    replaced = sum(estimate_tokens(r.item.data) for r in retrieved)
    if summary is not None:
        replaced += estimate_tokens(summary.text)
    estimated = replaced + sum(estimate_tokens(item) for item in recent)
    ratio = context.token_count / estimated if estimated else 1.0
    while True:
        markers = _markers(summary, retrieved, marker_role)
        framing = sum(estimate_tokens(m) for m in markers) - replaced
        if context.token_count + ratio * framing <= token_budget or not markers:
            return markers + recent
        if retrieved:
            weakest = min(retrieved, key=lambda r: (r.score, -r.item.seq))
            retrieved = [r for r in retrieved if r is not weakest]
        else:
            summary = None


def _markers(
    summary: ContextSummary | None, retrieved: Sequence[RetrievedItem], role: MarkerRole
) -> list[dict[str, Any]]:
    markers: list[dict[str, Any]] = []
    if summary is not None:
        header = SUMMARY_HEADER.format(first=summary.first_seq, last=summary.last_seq)
        markers.append({"role": role, "content": header + summary.text})
    if retrieved:
        names = {
            r.item.data.get("call_id"): r.item.data.get("name")
            for r in retrieved
            if str(r.item.data.get("type")).endswith("_call")
        }
        lines = [f"#{r.item.seq} {item_text(r.item.data, names)}" for r in retrieved]
        markers.append({"role": role, "content": RETRIEVED_HEADER + "\n".join(lines)})
    return markers


def item_text(data: Mapping[str, Any], call_names: Mapping[Any, Any] | None = None) -> str:
    """One log item as a line of plain text: `user: ...`, `called add({"a":2})`,
    `add returned: 5` (`call_names`: call_id -> tool name, for outputs whose
    call is not at hand); images and files as `[image]`, `[file a.pdf]`; other
    item types as their JSON without ids, cut at _MAX_OTHER_CHARS (a base64
    result is no use to a model as text, and shorter never breaks the budget)."""
    kind = data.get("type")
    role = data.get("role")
    if role is not None and kind in (None, "message"):
        return f"{role}: {_content_text(data.get('content'))}"
    if isinstance(kind, str) and kind.endswith("_call") and isinstance(data.get("name"), str):
        return f"called {data['name']}({data.get('arguments', data.get('input', ''))})"
    if isinstance(kind, str) and kind.endswith("_call_output"):
        name = (call_names or {}).get(data.get("call_id")) or "a tool"
        return f"{name} returned: {_content_text(data.get('output'))}"
    if kind == "reasoning":
        parts = data.get("summary") or []
        text = " ".join(p.get("text", "") for p in parts if isinstance(p, Mapping))
        return f"(reasoning) {text}".rstrip()
    rest = {k: v for k, v in data.items() if k not in ("id", "status", "type")}
    text = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))
    if len(text) > _MAX_OTHER_CHARS:
        text = text[:_MAX_OTHER_CHARS] + "…"
    return f"({kind}) {text}"


_MAX_OTHER_CHARS = 1000


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if not isinstance(content, list):
        return "" if content is None else json.dumps(content, ensure_ascii=False)
    texts = []
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(f"(refused: {part.get('refusal', '')})")
        elif kind == "input_file":
            texts.append(f"[file {part.get('filename') or ''}]".replace(" ]", "]"))
        elif kind in ("input_image", "computer_screenshot", "output_image"):
            texts.append("[image]")
        elif isinstance(kind, str):
            texts.append(f"[{kind.removeprefix('input_')}]")
    return " ".join(texts)
