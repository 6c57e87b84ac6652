"""What the context quality work added, unit by unit: retrieval that reaches a
hit's neighbouring turns and reads who-and-when metadata, a summary chosen by
what is informative in this conversation (both speakers alike), and a budget
split that adapts to the log's size while keeping the newest turn."""

from __future__ import annotations

import json
import random
from typing import Any

from state_service.compression.memory import SessionMemory
from state_service.compression.strategies import (
    MIN_RECENT_SHARE,
    Shares,
    StoredSummary,
    Strategy,
    adaptive_shares,
    compose,
)
from state_service.compression.summarizer import ExtractiveSummarizer, SummaryInput, fit_summary
from state_service.log import Item, LogEntry, describe
from state_service.tokens import EstimatingTokenCounter

COUNTER = EstimatingTokenCounter()


def message(seq: int, role: str, text: str, **metadata: str) -> LogEntry:
    raw = json.dumps({"role": role, "content": text}).encode()
    return describe(Item(seq=seq, json=raw, metadata=dict(metadata)), COUNTER.count(raw))


def dialogue(turns: list[tuple[str, str]], **metadata: str) -> list[LogEntry]:
    return [
        message(n + 1, "user" if n % 2 == 0 else "assistant", text, **metadata)
        for n, (_, text) in enumerate(turns)
    ]


def memory_of(log: list[LogEntry]) -> SessionMemory:
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    return memory


def test_the_turn_after_a_hit_comes_with_it() -> None:
    log = dialogue(
        [
            ("a", "What did you end up painting last weekend?"),
            ("b", "A sunrise over the lake, all in orange and violet."),
            ("a", "Nice. Work has been busy."),
            ("b", "Same here, lots of meetings."),
        ]
    )
    found = memory_of(log).search("what painting", below_index=4, budget=10_000)
    seqs = [e.seq for e, _ in found]
    # The answer shares no word with the query; its question does.
    assert seqs[:2] == [1, 2]
    scores = {e.seq: s for e, s in found}
    assert scores[2] < scores[1]


def test_tool_calls_lend_no_score_to_neighbours() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "oslo"}
    out = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
    log = [message(1, "user", "hello there")]
    for seq, data in ((2, call), (3, out)):
        raw = json.dumps(data).encode()
        log.append(describe(Item(seq=seq, json=raw), COUNTER.count(raw)))
    found = memory_of(log).search("oslo", below_index=3, budget=1000)
    assert [e.seq for e, _ in found] == [2, 3]


def test_speaker_and_time_metadata_are_searchable() -> None:
    log = [
        message(1, "user", "I finally finished the quilt.", speaker="Ingrid", time="3 May 2023"),
        message(2, "assistant", "Congrats on the quilt!", speaker="Tomasz", time="3 May 2023"),
        message(3, "user", "Another quilt is planned.", speaker="Ingrid", time="9 June 2023"),
        message(4, "assistant", "Unrelated words here.", speaker="Tomasz", time="9 June 2023"),
    ]
    memory = memory_of(log)
    by_date = {e.seq: s for e, s in memory.search("june", below_index=4, budget=10_000)}
    assert by_date[3] > by_date.get(1, 0.0)
    # A query naming a speaker prefers what that speaker said.
    named = memory.search("Tomasz quilt", below_index=4, budget=10_000)
    scores = {e.seq: s for e, s in named}
    plain = {e.seq: s for e, s in memory.search("quilt", below_index=4, budget=10_000)}
    assert scores[2] / plain[2] > scores[1] / plain[1]


def test_both_speakers_facts_are_summarized_alike() -> None:
    summarizer = ExtractiveSummarizer(COUNTER)
    text = summarizer.fold_sync(
        "",
        [
            SummaryInput(1, "user", "My brother Anselm moved to Tallinn in 2021."),
            SummaryInput(2, "assistant", "My daughter Ilse starts violin lessons on Tuesday."),
        ],
    )
    assert "Anselm moved to Tallinn" in text and "Ilse starts violin" in text


def test_repeated_small_talk_loses_to_what_is_said_once() -> None:
    rng = random.Random(4)
    chat = [
        "Totally agree with you, Mel!",
        "That sounds really great, Mel!",
        "Really great to hear!",
    ]
    items = [
        SummaryInput(n, "user" if n % 2 else "assistant", rng.choice(chat) + " Really great stuff.")
        for n in range(1, 80)
    ]
    facts = [
        SummaryInput(80, "assistant", "Mel adopted a greyhound named Biscuit from the shelter."),
        SummaryInput(81, "user", "The pottery class meets Thursdays at the community centre."),
    ]
    # The stored summary's cap decides what survives a long conversation:
    # room for about two lines.
    summarizer = ExtractiveSummarizer(COUNTER, max_tokens=60)
    text = summarizer.fold_sync("", items + facts)
    assert "greyhound named Biscuit" in text and "pottery class" in text
    assert "agree" not in text and "great" not in text
    # The read-time cut keeps the most informative of what was stored.
    cut, _ = fit_summary(text, 40, COUNTER)
    assert cut and cut in text


def test_a_correction_comes_after_what_it_corrects_and_facts_stay_distinct() -> None:
    summarizer = ExtractiveSummarizer(COUNTER)
    first = summarizer.fold_sync(
        "", [SummaryInput(3, "assistant", "The piano recital is on 4 March at the town hall.")]
    )
    second = summarizer.fold_sync(
        first,
        [SummaryInput(9, "user", "The piano recital moved to 11 March, still at the town hall.")],
    )
    assert second.index("4 March") < second.index("#9 user: The piano recital moved to 11 March")
    # Statements of the same shape are distinct facts: none replaces another.
    bookings = [SummaryInput(n, "user", f"Ana booked room {n} for {n + 1} May.") for n in range(9)]
    assert summarizer.fold_sync("", bookings).count("booked room") == 9


def test_adaptive_shares_move_toward_retrieval_as_the_log_grows() -> None:
    small, large = adaptive_shares(1_500, 1_000), adaptive_shares(40_000, 1_000)
    assert small.recent > large.recent == MIN_RECENT_SHARE
    assert small.retrieval < large.retrieval
    assert small.summary < large.summary
    for shares in (small, large, adaptive_shares(10**9, 1), adaptive_shares(1, 10**9)):
        assert shares.problem() is None


def long_log(turns: int) -> list[LogEntry]:
    rng = random.Random(turns)
    topics = ["invoice", "garden", "flight", "dentist", "laptop", "quilt"]
    datas: list[dict[str, Any]] = []
    for n in range(turns):
        datas.append({"role": "user", "content": f"turn {n} {rng.choice(topics)} " * 5})
        datas.append({"role": "assistant", "content": "reply words " * rng.randint(5, 30)})
    return [
        describe(
            Item(seq=n + 1, json=json.dumps(d).encode()), COUNTER.count(json.dumps(d).encode())
        )
        for n, d in enumerate(datas)
    ]


def test_default_shares_adapt_but_chosen_shares_are_kept() -> None:
    log = long_log(400)
    memory = memory_of(log)

    def retrieve(below: int, room: int) -> list[tuple[LogEntry, float]]:
        return memory.search("invoice quilt", below_index=below, budget=room)

    def view(shares: Shares) -> int:
        found = compose(
            Strategy.TIERED, log[-300:], len(log) - 300, 1000, shares=shares, counter=COUNTER,
            retrieve=retrieve,
        )  # fmt: skip
        assert found.tokens <= 1000 and found.recent[-1].seq == log[-1].seq
        return sum(e.tokens for e, _ in found.retrieved)

    chosen = view(Shares(0.4, 0.2, 0.4))
    adaptive = view(Shares(0.4, 0.2, 0.4, adaptive=True))
    assert chosen <= 400 + 200 < adaptive


def test_the_newest_turn_survives_a_summary_that_would_fill_the_budget() -> None:
    log = long_log(200)
    summary = StoredSummary(
        "\n".join(f"#{n} user: Fact {n} is {n * 7}." for n in range(1, 300)), 1, 200
    )
    for strategy in (Strategy.SUMMARY, Strategy.TIERED):
        for shares in (Shares(0.4, 0.2, 0.4, adaptive=True), Shares(0.0, 1.0, 0.0)):
            found = compose(
                strategy, log[-100:], len(log) - 100, 400, shares=shares, counter=COUNTER,
                summary=summary,
            )  # fmt: skip
            assert found.tokens <= 400
            assert found.recent and found.recent[-1].seq == log[-1].seq


def test_feedback_finds_a_turn_about_the_same_thing_in_other_words() -> None:
    filler = [("x", f"Small talk number {n} about nothing much.") for n in range(12)]
    log = dialogue(
        [
            ("a", "How was the marathon?"),
            ("b", "The marathon in Rotterdam was flat and fast, a personal best."),
            *filler,
            ("a", "Rotterdam again next spring, I already registered."),
            ("b", "Fingers crossed."),
        ]
    )
    found = memory_of(log).search("marathon", below_index=len(log), budget=10_000)
    # "Rotterdam", learnt from the best matches, finds turn 15.
    assert 15 in [e.seq for e, _ in found]
