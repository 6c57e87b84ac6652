"""Built-in function tools an agent can be given by name in the agents file.

Tools get the turn's TurnContext (session, state client) through
openai-agents' RunContextWrapper; they keep nothing in the process.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agents import FunctionTool, RunContextWrapper, function_tool
from agents.tool_context import ToolContext

from agent_service import metrics
from state_service.client import StateClient

SAVE_NOTE = "save_note"
# list_notes reads the log back to this many items: bounded work per call.
NOTES_SCAN_LIMIT = 5000


@dataclass
class TurnContext:
    """What a tool may use during one turn."""

    session_id: str
    state: StateClient
    state_timeout: Callable[[], float]


@function_tool
def current_time(timezone: str = "UTC") -> str:
    """The current date and time.

    Args:
        timezone: An IANA time zone name such as "Europe/Paris"; UTC if omitted.
    """
    try:
        zone = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {timezone!r}; use an IANA name such as Europe/Paris"
    return datetime.now(UTC).astimezone(zone).isoformat(timespec="seconds")


_OPERATORS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return float(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return float(_OPERATORS[type(node.op)](_evaluate(node.operand)))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


def calculate_expression(expression: str) -> str:
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"cannot calculate {expression!r}: {exc}"
    return str(int(value)) if value.is_integer() else repr(value)


@function_tool
def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression exactly, e.g. "(17 + 5) * 3 / 4".

    Args:
        expression: Numbers with + - * / // % ** and parentheses.
    """
    return calculate_expression(expression)


@function_tool(name_override=SAVE_NOTE)
def save_note(note: str) -> str:
    """Saves a note in this conversation so it can be listed later with list_notes.

    Args:
        note: The text to remember.
    """
    # The note is the call itself: it is stored in the session log with the
    # turn, so a failed turn saves nothing and any replica can list it.
    return f"saved note: {note}"


@function_tool
async def list_notes(context: RunContextWrapper[TurnContext]) -> str:
    """Lists the notes saved earlier in this conversation with save_note, oldest first."""
    turn = context.context
    notes: list[str] = []
    scanned = 0
    page_token = ""
    while scanned < NOTES_SCAN_LIMIT:
        page = await turn.state.list_items(
            turn.session_id,
            page_size=500,
            page_token=page_token,
            newest_first=True,
            timeout=turn.state_timeout(),
        )
        for item in page.items:
            data = item.data
            if data.get("type") == "function_call" and data.get("name") == SAVE_NOTE:
                try:
                    notes.append(str(json.loads(data.get("arguments", "{}"))["note"]))
                except (ValueError, KeyError, TypeError):
                    continue
        scanned += len(page.items)
        page_token = page.next_page_token
        if not page_token:
            break
    if not notes:
        return "no notes saved in this conversation yet"
    return "\n".join(f"- {note}" for note in reversed(notes))


BUILTIN_TOOLS: dict[str, FunctionTool] = {
    tool.name: tool for tool in (current_time, calculate, save_note, list_notes)
}


def approval_gated(tool: FunctionTool) -> FunctionTool:
    """`tool` pausing the run until its call is approved (openai-agents'
    needs_approval), and counting the calls it actually runs: the count a
    resume across replicas must keep at one per approved call."""
    invoke = tool.on_invoke_tool

    async def counted(context: ToolContext[Any], arguments: str) -> Any:
        metrics.APPROVED_TOOL_RUNS.labels(tool.name).inc()
        return await invoke(context, arguments)

    return dataclasses.replace(tool, needs_approval=True, on_invoke_tool=counted)
