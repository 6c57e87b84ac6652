"""The context quality benchmark's LLM summarizer mode, against a fake
OpenAI-compatible endpoint replaying a fixed summary: the mode configures the
service's LLM summarizer, and evidence the summary quotes ("#<seq>") counts
as present. The conversation is synthetic: this checks the mechanism, not
quality (no live endpoint here; BENCHMARKS.md says "not measured live")."""

from __future__ import annotations

from bench.context_quality import llm_summarizer_settings, measure
from bench.conversations import Conversation, Question, Turn
from tests.fake_openai_compression import FakeOpenAI


def conversation() -> Conversation:
    lines = ["Ana: morning!", "Bo: morning, how was the weekend?"]
    lines.append("Ana: I adopted a cat named Miso from the shelter on Saturday.")
    for n in range(37):
        speaker = "Bo" if n % 2 == 0 else "Ana"
        lines.append(f"{speaker}: small talk number {n} about the weather and the traffic")
    turns = tuple(
        Turn(f"D1:{n + 1}", line.split(":")[0], line.split(": ", 1)[1], "8 May 2023", 1)
        for n, line in enumerate(lines)
    )
    questions = (
        Question("What is the cat called?", "single-hop", ("D1:3",)),
        Question("How was the weekend?", "single-hop", ("D1:2",)),
    )
    return Conversation("synthetic", "synthetic:one", ("Ana", "Bo"), turns, questions)


async def test_llm_summarizer_mode_counts_what_the_replayed_summary_quotes() -> None:
    # Turn D1:3 is the log's seq 3; the replayed summary quotes it alone.
    fake = await FakeOpenAI(replay_summary="#3 user: Ana adopted a cat named Miso.").start()
    try:
        results = await measure(
            [conversation()],
            budgets=[150],
            strategies=["summary"],
            settings={
                **llm_summarizer_settings(fake.base_url, "fake-model"),
                "summarizer_timeout_seconds": 10,
                # The conversation is far below the log size at which appends
                # schedule summaries by default.
                "summary_min_log_tokens": 0,
            },
        )
    finally:
        await fake.stop()
    assert any(path.endswith("/chat/completions") for path, _ in fake.requests)
    cell = results.cells[("summary", 150)]
    assert cell.recall == [1.0, 0.0]
    assert cell.over_budget == 0 and cell.newest_missing == 0


def test_no_url_no_llm_summarizer() -> None:
    assert llm_summarizer_settings("", "m") == {}
    assert llm_summarizer_settings("http://127.0.0.1:9/v1", "m")["summarizer"] == "llm"
