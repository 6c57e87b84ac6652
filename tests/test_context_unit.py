"""Context selection and paging tokens as pure functions (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from state_service import paging
from state_service.errors import InvalidField
from state_service.log import Item, describe
from state_service.tokens import EstimatingTokenCounter
from state_service.window import token_window


def entries(*items: dict[str, Any], tokens: int = 10) -> list[Any]:
    return [
        describe(Item(seq=n + 1, json=json.dumps(i).encode()), tokens) for n, i in enumerate(items)
    ]


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


def call(cid: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": cid, "name": "f", "arguments": "{}"}


def out(cid: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": cid, "output": "x"}


def test_whole_log_fits() -> None:
    log = entries(A, U, A)
    assert token_window(log, 100, at_log_start=True).start == 0
    # Not at the start of the log: the window must begin with a user turn.
    assert token_window(log, 100, at_log_start=False).start == 1


def test_cuts_at_turn_start_within_budget() -> None:
    log = entries(U, A, U, call("c"), out("c"), A, U, A)
    window = token_window(log, 45, at_log_start=True)
    assert window.start == 6 and window.tokens == 20
    window = token_window(log, 60, at_log_start=True)
    assert window.start == 2 and window.tokens == 60


def test_oversized_turn_falls_back_to_safe_cuts() -> None:
    log = entries(U, call("a"), call("b"), out("a"), out("b"), A)
    # No whole turn fits 35: the newest items that keep calls with outputs.
    window = token_window(log, 35, at_log_start=False)
    assert window.start == 5
    window = token_window(log, 55, at_log_start=False)
    assert window.start == 1  # a, b, out a, out b, A: 50 tokens


def test_output_whose_call_is_outside_the_window_never_leads() -> None:
    log = entries(out("old"), A, U, A)
    assert token_window(log, 1000, at_log_start=False).start == 2
    assert token_window(log, 15, at_log_start=False).start == 3


def test_orphan_output_never_leads_even_when_no_turn_fits() -> None:
    log = entries(out("old"), call("b"), out("b"), A)
    # No user turn at all: the newest safe cut, never the orphan output.
    assert token_window(log, 1000, at_log_start=False).start == 1


def test_nothing_fits() -> None:
    log = entries(U, A, tokens=500)
    window = token_window(log, 100, at_log_start=True)
    assert window.start == 2 and window.tokens == 0


def test_budget_never_exceeded_property() -> None:
    import random

    rng = random.Random(7)
    kinds = [U, A, "call"]
    for _ in range(300):
        items: list[dict[str, Any]] = []
        for n in range(rng.randint(1, 30)):
            kind = rng.choice(kinds)
            if kind == "call":
                items += [call(f"c{n}"), out(f"c{n}")]
            else:
                items.append(kind)  # type: ignore[arg-type]
        log = [
            describe(Item(seq=i + 1, json=json.dumps(d).encode()), rng.randint(1, 50))
            for i, d in enumerate(items)
        ]
        budget = rng.randint(0, 400)
        window = token_window(log, budget, at_log_start=rng.random() < 0.5)
        chosen = log[window.start :]
        assert window.tokens == sum(e.tokens for e in chosen) <= budget
        open_calls = {e.call_id for e in chosen if e.call_id}
        outputs = {e.output_of for e in chosen if e.output_of}
        assert outputs <= open_calls  # no output without its call


def test_token_estimate_errs_high() -> None:
    counter = EstimatingTokenCounter()
    text = json.dumps({"role": "user", "content": "The quick brown fox jumps over the dog."})
    # ~4 bytes per token in English: the estimate stays above len/4.
    assert counter.count(text.encode()) > len(text) / 4


def test_page_tokens_are_bound_to_their_request() -> None:
    token = paging.encode({"s": "a", "o": "oldest", "i": 5})
    assert paging.decode(token, {"s": "a", "o": "oldest"})["i"] == 5
    with pytest.raises(InvalidField):
        paging.decode(token, {"s": "b", "o": "oldest"})
    with pytest.raises(InvalidField):
        paging.decode("%%%", {})
    with pytest.raises(InvalidField):
        paging.int_field({"i": "5"}, "i")
