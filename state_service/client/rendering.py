"""The budgeted context as model input: the summary and retrieved items as
quoted marker messages ahead of the recent items, within the token budget.

Shared by the openai-agents Session (session.py) and `Context.input_items()`
(what the agent service sends its model). No openai-agents import here: the
clients load without it. The invariants are stated in session.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from state_service.client.types import Context, ContextSummary, RetrievedItem

MarkerRole = Literal["user", "developer", "system"]

SUMMARY_HEADER = "Summary of the earlier conversation (items {first}-{last}):\n"
RETRIEVED_HEADER = "Possibly relevant earlier messages from this conversation (quoted):\n"


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
        shown = markers(summary, retrieved, marker_role)
        framing = sum(estimate_tokens(m) for m in shown) - replaced
        if context.token_count + ratio * framing <= token_budget or not shown:
            return shown + recent
        if retrieved:
            weakest = min(retrieved, key=lambda r: (r.score, -r.item.seq))
            retrieved = [r for r in retrieved if r is not weakest]
        else:
            summary = None


def markers(
    summary: ContextSummary | None, retrieved: Sequence[RetrievedItem], role: MarkerRole
) -> list[dict[str, Any]]:
    """The summary and the retrieved items as (at most two) marker messages;
    retrieved items as quoted lines, never raw items (see session.py)."""
    out: list[dict[str, Any]] = []
    if summary is not None:
        header = SUMMARY_HEADER.format(first=summary.first_seq, last=summary.last_seq)
        out.append({"role": role, "content": header + summary.text})
    if retrieved:
        names = {
            r.item.data.get("call_id"): r.item.data.get("name")
            for r in retrieved
            if str(r.item.data.get("type")).endswith("_call")
        }
        lines = [f"#{r.item.seq} {item_text(r.item.data, names)}" for r in retrieved]
        out.append({"role": role, "content": RETRIEVED_HEADER + "\n".join(lines)})
    return out


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
