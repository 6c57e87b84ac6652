"""Which items of a session's log go to the model: the newest items that fit a
token budget, cut only at turn boundaries, never separating a tool call from
its output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from state_service.log import LogEntry


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    tokens: int


def _safe_cuts(entries: Sequence[LogEntry]) -> list[bool]:
    """safe[i]: a context starting at entries[i] separates no call from its output."""
    output_at = {e.output_of: i for i, e in enumerate(entries) if e.output_of}
    open_calls: set[str] = set()
    unsafe_through = -1
    safe = []
    for i, entry in enumerate(entries):
        orphan = entry.output_of is not None and entry.output_of not in open_calls
        if orphan:
            # Its call is older than `entries`: nothing up to here (itself
            # included) may lead.
            unsafe_through = i
        safe.append(not open_calls and i > unsafe_through)
        if entry.call_id and output_at.get(entry.call_id, -1) > i:
            open_calls.add(entry.call_id)
        if entry.output_of and not orphan:
            open_calls.discard(entry.output_of)
    return safe


def token_window(entries: Sequence[LogEntry], budget: int, *, at_log_start: bool) -> Window:
    """The longest suffix of `entries` within `budget` that starts a turn; if even
    the newest turn is too big, the longest suffix at any safe cut.

    `at_log_start`: entries[0] is the first item of the log (a natural turn start).
    """
    n = len(entries)
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + entries[i].tokens
    safe = _safe_cuts(entries)
    fitting = [i for i in range(n) if safe[i] and suffix[i] <= budget]
    turn_starts = [i for i in fitting if entries[i].starts_turn or (i == 0 and at_log_start)]
    if turn_starts:
        start = turn_starts[0]
    elif fitting:
        start = fitting[0]
    else:
        start = n
    return Window(start, suffix[start])
