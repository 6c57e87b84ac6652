"""Compression parts as pure functions: BM25, the extractive summarizer, summary
fitting, every strategy's contract, and the token counters."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from state_service import tokens
from state_service.compression.bm25 import BM25Index
from state_service.compression.memory import SessionMemory
from state_service.compression.strategies import (
    ContextView,
    Shares,
    StoredSummary,
    Strategy,
    compose,
    sliding_window,
    token_window_view,
)
from state_service.compression.summarizer import (
    ExtractiveSummarizer,
    SummaryInput,
    fit_summary,
    is_filler,
)
from state_service.compression.text import item_text, terms
from state_service.log import Item, LogEntry, describe
from state_service.tokens import (
    EstimatingTokenCounter,
    TiktokenCounter,
    make_token_counter,
)

COUNTER = EstimatingTokenCounter()


def make_log(datas: list[dict[str, Any]]) -> list[LogEntry]:
    out = []
    for n, data in enumerate(datas):
        raw = json.dumps(data).encode()
        item = Item(seq=n + 1, json=raw, metadata={"n": str(n + 1)})
        out.append(describe(item, COUNTER.count(raw)))
    return out


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "output_text", "text": text}]}


def call(cid: str, args: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "call_id": cid, "name": "lookup", "arguments": args}


def output(cid: str, text: str = "ok") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": cid, "output": text}


def test_item_text_of_each_kind() -> None:
    assert item_text(user("hi there")) == "hi there"
    assert item_text(assistant("done")) == "done"
    assert item_text(call("c", '{"city":"Oslo"}')) == 'lookup({"city":"Oslo"})'
    assert item_text(output("c", "12 C")) == "12 C"
    assert item_text("not a dict") == ""


def test_bm25_ranks_the_document_with_rare_matching_terms_first() -> None:
    index = BM25Index()
    docs = [
        "the weather is nice today",
        "my passport number is X123 and it expires in March",
        "the weather tomorrow is rainy",
        "let's talk about the weather",
    ]
    for doc in docs:
        index.add(terms(doc))
    scores = index.scores(terms("when does my passport expire"))
    assert max(scores, key=lambda d: scores[d]) == 1
    assert set(index.scores(terms("weather"), below=2)) == {0}


def test_extractive_keeps_facts_and_drops_chitchat() -> None:
    summarizer = ExtractiveSummarizer(COUNTER)
    text = summarizer.fold_sync(
        "",
        [
            SummaryInput(1, "user", "Hi! How are you doing today?"),
            SummaryInput(2, "assistant", "Great, thanks for asking."),
            SummaryInput(3, "user", "My sister Priya arrives on March 14 at 9:30."),
            SummaryInput(4, "user", "lol that's funny"),
            SummaryInput(5, "user", "I prefer window seats and I am allergic to peanuts."),
            SummaryInput(6, "user", "We decided to use the blue logo."),
        ],
    )
    assert "Priya arrives on March 14" in text
    assert "allergic to peanuts" in text
    assert "decided to use the blue logo" in text
    assert "How are you" not in text and "funny" not in text
    assert text.splitlines()[0].startswith("#3 user: ")


def test_extractive_correction_follows_the_corrected_statement() -> None:
    summarizer = ExtractiveSummarizer(COUNTER)
    first = summarizer.fold_sync("", [SummaryInput(3, "user", "My flight to Lisbon is on June 3.")])
    second = summarizer.fold_sync(
        first,
        [SummaryInput(40, "user", "Actually, my flight to Lisbon moved: it is on June 5.")],
    )
    # Both stay, the correction after (and newer than) what it corrects: which
    # of two same-shaped statements corrects the other is the reader's call.
    assert second.splitlines() == [
        "#3 user: My flight to Lisbon is on June 3.",
        "#40 user: Actually, my flight to Lisbon moved: it is on June 5.",
    ]


def test_extractive_fold_is_incremental() -> None:
    """Folding in two steps gives what one fold over everything gives."""
    rng = random.Random(3)
    names = ["Ana", "Bo", "Chen", "Dara", "Eli"]
    items = [
        SummaryInput(
            n,
            rng.choice(["user", "assistant", "tool"]),
            rng.choice(
                [
                    f"{rng.choice(names)} booked room {n} for {rng.randint(1, 28)} May.",
                    "ok sounds good",
                    f"I prefer tea number {n} over coffee.",
                    f"The invoice {n} totals {rng.randint(10, 999)} dollars.",
                ]
            ),
        )
        for n in range(1, 120)
    ]
    summarizer = ExtractiveSummarizer(COUNTER, max_tokens=100_000)
    whole = summarizer.fold_sync("", items)
    for cut in (1, 17, 60, 118):
        stepwise = summarizer.fold_sync(summarizer.fold_sync("", items[:cut]), items[cut:])
        assert stepwise == whole


def test_extractive_summary_stays_within_its_cap() -> None:
    summarizer = ExtractiveSummarizer(COUNTER, max_tokens=200)
    items = [SummaryInput(n, "user", f"Order {n} ships on May {n % 28 + 1}.") for n in range(300)]
    text = summarizer.fold_sync("", items)
    assert COUNTER.count(text.encode()) <= 200
    assert text


def test_fit_summary_never_exceeds_its_budget() -> None:
    rng = random.Random(5)
    lines = [f"#{n} user: Meeting {n} with Kim on {rng.randint(1, 28)} June." for n in range(80)]
    summary = "\n".join(lines)
    for budget in [0, 1, 5, 20, 50, 100, 400, 10_000]:
        text, tokens = fit_summary(summary, budget, COUNTER)
        assert tokens <= budget
        assert tokens == (COUNTER.count(text.encode()) if text else 0)
        assert all(line in lines for line in text.splitlines())


def test_filler_has_too_few_content_words() -> None:
    assert is_filler("ok thanks")
    assert is_filler("lol that's funny")
    assert not is_filler("My number is 555 1234")


def random_log(rng: random.Random, turns: int) -> list[dict[str, Any]]:
    topics = ["weather", "invoice", "flight", "dentist", "garden", "budget", "laptop"]
    items: list[dict[str, Any]] = []
    for n in range(turns):
        topic = rng.choice(topics)
        items.append(user(f"turn {n} about {topic} " + "words " * rng.randint(0, 40)))
        for k in range(rng.choice([0, 0, 1, 2])):
            cid = f"c{n}-{k}"
            items.append(call(cid, json.dumps({"q": topic})))
            items.append(output(cid, f"{topic} result " * rng.randint(1, 20)))
        items.append(assistant(f"about {topic}: " + "reply " * rng.randint(0, 60)))
    return items


def check_contract(
    view: ContextView,
    log: list[LogEntry],
    budget: int,
    max_items: int | None = None,
    tail_start: int = 0,
) -> None:
    parts = [e for e, _ in view.retrieved] + list(view.recent)
    summary_tokens = view.summary.tokens if view.summary else 0
    assert view.tokens == summary_tokens + sum(e.tokens for e in parts) <= budget
    # Items are the stored ones: seq and metadata intact, no duplicates.
    by_seq = {e.seq: e for e in log}
    seqs = [e.seq for e in parts]
    assert len(seqs) == len(set(seqs))
    for entry in parts:
        assert by_seq[entry.seq].item == entry.item
        assert entry.item.metadata["n"] == str(entry.seq)
    # Retrieved items are all older than the recent ones, in log order.
    assert seqs == sorted(seqs)
    # Every tool output comes with its call and every call with its outputs.
    for part in ([e for e, _ in view.retrieved], list(view.recent)):
        calls = {e.call_id for e in part if e.call_id}
        outputs = {e.output_of for e in part if e.output_of}
        assert outputs <= calls
        answered = {e.output_of for e in log if e.output_of}
        assert (calls & answered) <= outputs
    if max_items is not None:
        assert len(view.recent) <= max_items
        return
    # The recent part starts a turn unless no whole turn fits its room.
    if view.recent and not view.recent[0].starts_turn and view.recent[0].seq != 1:
        starts = [i for i, e in enumerate(log) if e.starts_turn and i >= tail_start]
        if starts:
            room = budget - view.tokens + sum(e.tokens for e in view.recent)
            assert sum(e.tokens for e in log[starts[-1] :]) > room


@pytest.mark.parametrize("seed", range(12))
def test_every_strategy_keeps_its_contract(seed: int) -> None:
    rng = random.Random(seed)
    log = make_log(random_log(rng, rng.randint(1, 60)))
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    summarizer = ExtractiveSummarizer(COUNTER)
    lines = summarizer.fold_sync("", memory.inputs(range(len(log) // 2)))
    summary = StoredSummary(lines, 1, log[len(log) // 2].seq) if lines else None
    shares = Shares(rng.uniform(0, 0.6), rng.uniform(0, 0.2), rng.uniform(0, 0.2))
    for _ in range(6):
        budget = rng.randint(0, 3000)
        start = rng.randint(0, len(log) - 1)
        tail = log[start:]

        def retrieve(below: int, room: int) -> list[tuple[LogEntry, float]]:
            return memory.search("flight invoice", below_index=below, budget=room)

        n = rng.randint(1, 30)
        check_contract(sliding_window(tail, budget, n, at_log_start=start == 0), log, budget, n)
        views = [token_window_view(tail, budget, at_log_start=start == 0)]
        for strategy in (Strategy.SUMMARY, Strategy.RETRIEVAL, Strategy.TIERED):
            views.append(
                compose(
                    strategy,
                    tail,
                    start,
                    budget,
                    shares=shares,
                    counter=COUNTER,
                    summary=summary,
                    retrieve=retrieve,
                )
            )
        for view in views:
            check_contract(view, log, budget, tail_start=start)


def test_tiered_fills_parts_by_share() -> None:
    log = make_log(random_log(random.Random(9), 200))
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    summary = StoredSummary("\n".join(f"#{n} user: Fact {n} is 42." for n in range(1, 100)), 1, 300)
    view = compose(
        Strategy.TIERED,
        log[-300:],
        len(log) - 300,
        2000,
        shares=Shares(0.4, 0.2, 0.4),
        counter=COUNTER,
        summary=summary,
        retrieve=lambda below, room: memory.search("invoice", below_index=below, budget=room),
    )
    assert view.summary is not None and view.summary.tokens <= 400
    # Retrieval gets its share plus what the summary left of its own.
    retrieved = sum(e.tokens for e, _ in view.retrieved)
    assert view.retrieved and retrieved <= 800 + (400 - view.summary.tokens)
    assert sum(e.tokens for e in view.recent) >= 0.4 * 2000 - 400  # whole turns only
    assert view.tokens <= 2000


def test_whole_log_that_fits_is_sent_verbatim() -> None:
    log = make_log([user("a"), assistant("b"), user("c")])
    view = compose(Strategy.TIERED, log, 0, 1000, shares=Shares(0.4, 0.2, 0.4), counter=COUNTER)
    assert list(view.recent) == log and view.summary is None and not view.retrieved


def test_memory_search_keeps_calls_with_outputs() -> None:
    log = make_log([user("x"), call("c1", '{"city":"Oslo"}'), output("c1", "sunny"), user("y")])
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    found = memory.search("oslo", below_index=3, budget=1000)
    assert [e.seq for e, _ in found] == [2, 3]
    # The output is beyond the cut: the pair is not split.
    assert memory.search("oslo", below_index=2, budget=1000) == []


def test_shares_validation() -> None:
    assert Shares(0.4, 0.2, 0.4).problem() is None
    assert Shares(0.5, 0.5, 0.5).problem() is not None
    assert Shares(-0.1, 0.5, 0.5).problem() is not None
    assert Shares(0, 0, 0).problem() is not None
    assert Shares(float("nan"), 0, 0).problem() is not None
    assert Shares.decode(Shares(0.3, 0.3, 0.3).encode()) == Shares(0.3, 0.3, 0.3)


def byte_encoding() -> Any:
    """A real tiktoken Encoding whose tokens are single bytes (no download)."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )


def test_tiktoken_counter_counts_exactly() -> None:
    counter = TiktokenCounter(byte_encoding())
    assert counter.count(b'{"a":"hello"}') == len(b'{"a":"hello"}') + 4
    assert counter.count("日本".encode()) == 6 + 4


def test_auto_counter_falls_back_without_offline_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # The encoding file now ships with a dependency: "without" means without it.
    monkeypatch.setattr(tokens, "BUNDLED_ENCODINGS_PACKAGE", "no_such_package_here")
    assert isinstance(make_token_counter("auto"), EstimatingTokenCounter)
    with pytest.raises(RuntimeError):
        make_token_counter("tiktoken")


def test_a_memory_over_its_byte_bound_keeps_its_newest_items() -> None:
    log = make_log([user(f"message {i} about topic{i} " + "word " * 50) for i in range(100)])
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    assert memory.fitted(memory.size) is memory
    bound = memory.size // 4
    fitted = memory.fitted(bound)
    assert fitted.size <= bound // 2
    assert fitted.start_index > 0 and fitted.end_index == 100
    assert fitted.sizes == memory.sizes[fitted.start_index :]

    def found(m: SessionMemory) -> list[int]:
        return [e.seq for e, _ in m.search("topic98", below_index=100, budget=10_000)]

    # Scores differ (fewer documents), but what matches is found in both.
    assert 99 in found(fitted) and 99 in found(memory)
