"""Token counting for context budgets.

The v1 counter is a calibrated estimate that errs high: ceil(UTF-8 bytes / 3)
of the item's JSON plus a per-item overhead. o200k/cl100k average about four
bytes of English per token and JSON punctuation costs about one, so dividing by
three over-counts typical items by 20-35 %; CJK text (three bytes per
character, about one token each) lands close to exact. The budget is applied to
this count, so the count reported is never above the budget.
"""

from __future__ import annotations

from typing import Protocol

PER_ITEM_OVERHEAD_TOKENS = 4


class TokenCounter(Protocol):
    def count(self, item_json: bytes) -> int: ...


class EstimatingTokenCounter:
    def count(self, item_json: bytes) -> int:
        return -(-len(item_json) // 3) + PER_ITEM_OVERHEAD_TOKENS
