"""`python -m bench.fixed_reply_agent`: the agent service with its offline
model answering the newest item only, as in bench/turn_cost.py's in-process
paths. Issue 17 compares turns with the model excluded,
"a fixed-reply model on both sides"; the offline model's own walk over the
whole context (~0.5 ms at 20 items, bench/results/profile_agent_turn*.txt)
stands for a model, not for statecar."""

from __future__ import annotations

from typing import Any

from agent_service.__main__ import main
from agent_service.models.offline import OfflineModel


def use_fixed_replies() -> None:
    """Makes every OfflineModel in this process reply to the newest item only."""
    decide = OfflineModel._decide

    def newest_only(
        self: OfflineModel, system_instructions: Any, input: Any, tools: Any, handoffs: Any
    ) -> Any:
        newest = input[-1:] if isinstance(input, list) else input
        return decide(self, system_instructions, newest, tools, handoffs)

    OfflineModel._decide = newest_only  # type: ignore[method-assign]


if __name__ == "__main__":
    use_fixed_replies()
    main()
