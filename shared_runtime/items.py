"""The role and human-readable text of an openai-agents input item, as the
summarizers, the retrieval index, the offline model and the CLI see it."""

from __future__ import annotations

import json
from typing import Any


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text") or part.get("refusal") or ""
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(p for p in parts if p)
    return ""


def item_role(data: Any) -> str:
    """user, assistant, system, tool (a call or its output) or other."""
    if not isinstance(data, dict):
        return "other"
    kind = data.get("type")
    if isinstance(kind, str) and (kind.endswith("_call") or kind.endswith("_call_output")):
        return "tool"
    role = data.get("role")
    return role if isinstance(role, str) and role else "other"


def item_text(data: Any) -> str:
    """The human-readable text of one openai-agents input item ("" if none)."""
    if not isinstance(data, dict):
        return ""
    kind = data.get("type")
    if isinstance(kind, str) and kind.endswith("_call_output"):
        output = data.get("output")
        return output if isinstance(output, str) else _content_text(output)
    if isinstance(kind, str) and kind.endswith("_call"):
        name = data.get("name") if isinstance(data.get("name"), str) else kind
        arguments = data.get("arguments")
        return f"{name}({arguments if isinstance(arguments, str) else ''})"
    if kind == "reasoning":
        summary = data.get("summary")
        return _content_text(summary)
    return _content_text(data.get("content"))


def item_text_of_json(raw: bytes) -> tuple[str, str]:
    """(role, text) of an item's JSON."""
    try:
        data = json.loads(raw)
    except ValueError:
        return "other", ""
    return item_role(data), item_text(data)
