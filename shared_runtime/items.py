"""openai-agents input items: their role and human-readable text (as the
summarizers, the retrieval index, the offline model and the CLI see them),
and whether a JSON object is one at all (checked when items are appended)."""

from __future__ import annotations

import functools
import json
from typing import Any, Union, get_args, get_type_hints


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


class _InputItemShapes:
    """The openai-agents input item shapes (the OpenAI Responses API's input
    item union, as the installed openai package defines it), one pydantic
    adapter per `type`, so checking an item costs one small validation, not
    one against every member of a 30-way union (measured: ~25-47 µs)."""

    def __init__(self) -> None:
        from openai.types.responses import ResponseInputItemParam
        from pydantic import TypeAdapter

        by_type: dict[str, list[Any]] = {}
        for shape in get_args(ResponseInputItemParam):
            hints = get_type_hints(shape, include_extras=False)
            kind = hints.get("type")
            for value in get_args(kind) if kind is not None else ():
                if isinstance(value, str):
                    by_type.setdefault(value, []).append(shape)
        self.by_type: dict[str, TypeAdapter[Any]] = {}
        for kind, shapes in by_type.items():
            member: Any = shapes[0] if len(shapes) == 1 else Union[tuple(shapes)]  # noqa: UP007
            self.by_type[kind] = TypeAdapter(member)


@functools.cache
def _shapes() -> _InputItemShapes:
    return _InputItemShapes()


def prepare_input_item_check() -> None:
    """Builds the validators (about a second of CPU: the openai types and 30
    pydantic adapters); services call it at start-up, not on a request."""
    _shapes()


def input_item_problem(data: dict[str, Any]) -> str | None:
    """Why `data` is not an openai-agents input item (None if it is): an item
    the SDK cannot send back to a model would break every later turn of the
    session, so it is refused when appended."""
    from pydantic import ValidationError

    kind = data.get("type", "message")
    if not isinstance(kind, str):
        return "its type must be a string"
    adapter = _shapes().by_type.get(kind)
    if adapter is None:
        if "type" not in data:
            return "has neither a type nor a role and content (not an input item)"
        return f"has an unknown item type {kind!r}"
    try:
        adapter.validate_python(data)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        return f"is not a valid {kind} item ({where or 'item'}: {first['msg']})"
    return None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_union_tag(part: Any) -> bool:
    # pydantic names union members in error locations ("ResponseInputTextParam",
    # "str", "list[...]"); they mean nothing to callers.
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in _TYPE_NAMES)
