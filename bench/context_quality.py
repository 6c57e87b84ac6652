"""7. Context quality on real conversations: how much of the evidence a
question needs is in the context GetContext builds.

Data nobody here wrote (bench/conversations.py says where it comes from, its
licences, where the benchmark expects it and how to get it): LoCoMo's and
REALTALK's long multi-session conversations between two people, with
question → evidence-turn labels. Tried as a new user would: each conversation
is appended to a real state service (in process, real redis-server, real gRPC
on loopback) as plain messages, the first speaker as `user` and the other as
`assistant`, the speaker's name kept in the text ("Name: ...") and speaker and
session time in the item's metadata; one AppendItems per session. Then one
GetContext per question with the question as `query`, nothing else
configured (default strategy, default settings); the background summarizer
has caught up before the questions (as it would between sessions).

Evidence recall of a question: the share of its labelled evidence turns that
are in the context, verbatim (recent or retrieved) or quoted by a summary line
(its "#<seq>" names the turn). Reported as the mean over questions, per
question category, per strategy and budget. Also checked on every call: the
newest turn is in the context and the token count is within the budget; and
the real tokens of what is sent (o200k_base, exact: text plus 4 per item of
framing), against the budget.

The data is split by conversation (bench/conversations.py: DEV): tune on
`--split dev`, report `--split held-out` (the default).

python -m bench.context_quality [--split held-out|dev|all] [--questions N] ...
python -m bench.run quality        # held-out split + the synthetic check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import context_synthetic, minilm
from bench.common import Stats, table
from bench.conversations import CATEGORIES, Conversation, data_dir, load_all
from bench.report import Report
from state_service.client import Context, NewItem, StateClient
from state_service.server import StateServer
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import EmbeddedRedis, free_port
from state_service.tokens import TiktokenCounter, load_tiktoken, make_token_counter

BUDGETS = (1000, 2000, 4000)
# None: the service's default strategy, as a request that names none gets it.
STRATEGIES: tuple[str | None, ...] = (
    None,
    "sliding_window",
    "token_window",
    "summary",
    "retrieval",
)
_SUMMARY_SEQ = re.compile(r"^#(\d+) ", re.MULTILINE)


def strategy_label(strategy: str | None, default: str) -> str:
    return f"{default} (default)" if strategy is None else strategy


@dataclass
class Cell:
    """Outcomes of one (strategy, budget) over many questions."""

    recall: list[float] = field(default_factory=list)
    by_category: dict[str, list[float]] = field(default_factory=dict)
    by_source: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    over_budget: int = 0
    newest_missing: int = 0
    latency: list[float] = field(default_factory=list)


@dataclass
class Results:
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    conversations: list[str] = field(default_factory=list)
    questions: int = 0
    log_tokens: list[int] = field(default_factory=list)
    default_strategy: str = ""
    counter: str = ""

    def cell(self, strategy: str, budget: int) -> Cell:
        return self.cells.setdefault((strategy, budget), Cell())


def _sent_text(context: Context) -> list[str]:
    texts = []
    if context.summary is not None:
        texts.append(context.summary.text)
    for stored in [r.item for r in context.retrieved] + context.items:
        content = stored.data.get("content")
        texts.append(content if isinstance(content, str) else json.dumps(stored.data))
    return texts


def _present(context: Context) -> set[int]:
    seqs = {i.seq for i in context.items} | {r.item.seq for r in context.retrieved}
    if context.summary is not None:
        seqs |= {int(m) for m in _SUMMARY_SEQ.findall(context.summary.text)}
    return seqs


def pick_questions(conversation: Conversation, limit: int) -> list[int]:
    """Indexes of at most `limit` questions, spread evenly (deterministic)."""
    n = len(conversation.questions)
    if limit <= 0 or limit >= n:
        return list(range(n))
    return sorted({round(i * n / limit) for i in range(limit)} - {n})


async def _one(
    client: StateClient,
    server: StateServer,
    conversation: Conversation,
    *,
    questions: int,
    budgets: Sequence[int],
    strategies: Sequence[str | None],
    exact: TiktokenCounter,
    out: Results,
) -> None:
    sid = re.sub(r"[^A-Za-z0-9_-]", "-", conversation.id)
    user = conversation.speakers[0]
    seq_of: dict[str, int] = {}
    log_tokens = 0
    by_session: dict[int, list[Any]] = {}
    for turn in conversation.turns:
        by_session.setdefault(turn.session, []).append(turn)
    for session in sorted(by_session):
        turns = by_session[session]
        items = [
            NewItem(
                {
                    "role": "user" if t.speaker == user else "assistant",
                    "content": f"{t.speaker}: {t.text}",
                },
                {"speaker": t.speaker, "time": t.time},
            )
            for t in turns
        ]
        result = await client.append_items(sid, items)
        for offset, t in enumerate(turns):
            seq_of[t.dia_id] = result.first_seq + offset
            log_tokens += exact.count(f"{t.speaker}: {t.text}".encode())
    newest = max(seq_of.values())
    out.log_tokens.append(log_tokens)
    compressor = server.compression.compressor
    if compressor is not None:
        await compressor.idle()
    default = server.compression.default_strategy.value
    out.default_strategy = default
    for index in pick_questions(conversation, questions):
        question = conversation.questions[index]
        evidence = {seq_of[d] for d in question.evidence}
        out.questions += 1
        for strategy in strategies:
            label = strategy_label(strategy, default)
            for budget in budgets:
                started = time.perf_counter()
                context = await client.get_context(
                    sid, query=question.text, token_budget=budget, strategy=strategy
                )
                elapsed = time.perf_counter() - started
                present = _present(context)
                recall = len(evidence & present) / len(evidence)
                cell = out.cell(label, budget)
                cell.recall.append(recall)
                cell.by_category.setdefault(question.category, []).append(recall)
                cell.by_source.setdefault(conversation.source, []).append(recall)
                cell.tokens.append(context.token_count)
                cell.sent_tokens.append(sum(exact.count(t.encode()) for t in _sent_text(context)))
                cell.over_budget += context.token_count > budget
                cell.newest_missing += newest not in {i.seq for i in context.items}
                cell.latency.append(elapsed)


async def measure(
    conversations: Sequence[Conversation],
    *,
    questions: int = 0,
    budgets: Sequence[int] = BUDGETS,
    strategies: Sequence[str | None] = STRATEGIES,
    settings: dict[str, Any] | None = None,
) -> Results:
    exact = load_tiktoken("o200k_base")
    if exact is None:
        raise RuntimeError("the o200k_base encoding is not available offline (pip install -e .)")
    out = Results()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        redis = EmbeddedRedis(Path(scratch), port=free_port())
        redis.start()
        try:
            values: dict[str, Any] = {
                "listen": "127.0.0.1:0",
                "redis_url": redis.url,
                "metrics_port": 0,
                "log_level": "WARNING",
                **(settings or {}),
            }
            chosen = StateServiceSettings(**values)
            out.counter = make_token_counter(chosen.token_counter, chosen.tiktoken_encoding).name
            server = await StateServer.start(chosen)
            try:
                async with StateClient(server.address, timeout=60) as client:
                    for conversation in conversations:
                        out.conversations.append(conversation.id)
                        await _one(
                            client,
                            server,
                            conversation,
                            questions=questions,
                            budgets=budgets,
                            strategies=strategies,
                            exact=exact,
                            out=out,
                        )
            finally:
                await server.stop(grace=1)
        finally:
            redis.close()
    return out


def _pct(values: Sequence[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f}%" if values else "—"


def render(results: Results) -> str:
    categories = [c for c in CATEGORIES.values() if any(
        c in cell.by_category for cell in results.cells.values()
    )]  # fmt: skip
    sources = sorted({s for cell in results.cells.values() for s in cell.by_source})
    rows = []
    for (strategy, budget), cell in results.cells.items():
        rows.append(
            [
                strategy,
                f"{budget:,}",
                f"**{_pct(cell.recall)}**",
                *(_pct(cell.by_source.get(s, [])) for s in sources),
                *(_pct(cell.by_category.get(c, [])) for c in categories),
                f"{statistics.fmean(cell.tokens):,.0f} / {max(cell.tokens):,}",
                f"{statistics.fmean(cell.sent_tokens):,.0f}",
                f"{cell.over_budget}",
                f"{cell.newest_missing}",
                f"{Stats.of(cell.latency).p50:.1f}",
            ]
        )
    rows.sort(key=lambda r: (r[0], int(r[1].replace(",", ""))))
    mean_log = statistics.fmean(results.log_tokens) if results.log_tokens else 0
    return (
        f"{len(results.conversations)} conversations ({', '.join(results.conversations)}), "
        f"{results.questions} questions; a conversation averages {mean_log:,.0f} o200k tokens. "
        f"The service counts tokens with: {results.counter}. Tokens: the service's count, "
        "mean / max; sent: exact o200k tokens of the text sent plus 4 per item. "
        "Over budget / newest missing: calls where the count exceeded the budget / the newest "
        "turn was not in the context.\n\n"
        + table(
            [
                "strategy",
                "budget",
                "evidence recall",
                *sources,
                *categories,
                "tokens mean / max",
                "sent (exact)",
                "over budget",
                "newest missing",
                "p50 ms",
            ],
            rows,
        )
    )


def _args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.context_quality")
    parser.add_argument("--split", choices=("held-out", "dev", "all"), default="held-out")
    parser.add_argument("--questions", type=int, default=0, help="at most N per conversation")
    parser.add_argument("--sources", default="locomo,realtalk")
    parser.add_argument("--conversations", default="", help="comma-separated ids (subset)")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument(
        "--strategies", default="default,sliding_window,token_window,summary,retrieval"
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="hybrid retrieval with a real local model (all-MiniLM-L6-v2, bench/minilm.py)",
    )
    parser.add_argument(
        "--embed-only",
        action="store_true",
        help="only fill the embedding cache (bench/data/.cache) for the chosen conversations",
    )
    parser.add_argument(
        "--summarizer-url",
        default="",
        help="the LLM summarizer against this OpenAI-compatible base URL (…/v1)",
    )
    parser.add_argument("--summarizer-model", default="gpt-4o-mini")
    parser.add_argument("--token-counter", default="", help="STATE_SERVICE_TOKEN_COUNTER")
    parser.add_argument("--set", action="append", default=[], help="setting=value (repeatable)")
    return parser.parse_args(argv)


def llm_summarizer_settings(base_url: str, model: str) -> dict[str, Any]:
    """Settings that make the service summarize with an LLM endpoint (none
    when `base_url` is empty). Nothing here has a live endpoint: the mode is
    tested against a fake replaying fixed summaries, and its figure is "not
    measured live" until someone runs it against a real one."""
    if not base_url:
        return {}
    return {
        "summarizer": "llm",
        "summarizer_base_url": base_url,
        "summarizer_model": model,
        "summarizer_api_key": os.environ.get("STATECAR_BENCH_SUMMARIZER_API_KEY", "none"),
        # A real model takes seconds per fold.
        "summarizer_timeout_seconds": 120,
    }


def _embed_only(model: minilm.MiniLM, conversations: Sequence[Conversation]) -> None:
    """Embeds every turn (as the service's memory holds its text) and question."""
    for conversation in conversations:
        started = time.perf_counter()
        texts = [f"{t.speaker}: {t.text}" for t in conversation.turns]
        model.embed(texts + [q.text for q in conversation.questions])
        model.save()
        print(f"{conversation.id}: {len(texts)} turns, {time.perf_counter() - started:.0f} s")


def select(args: argparse.Namespace) -> tuple[list[Conversation], list[str]]:
    conversations, missing = load_all()
    sources = set(args.sources.split(","))
    wanted = set(filter(None, args.conversations.split(",")))
    chosen = [
        c
        for c in conversations
        if c.source in sources
        and (args.split == "all" or c.split == args.split)
        and (not wanted or c.id in wanted)
    ]
    return chosen, [m for m in missing if m.split(":")[0] in sources]


async def main(argv: Sequence[str]) -> None:
    args = _args(argv)
    conversations, missing = select(args)
    for line in missing:
        print(f"skipped {line}", file=sys.stderr)
    if not conversations:
        print("no conversations to measure", file=sys.stderr)
        return
    settings: dict[str, Any] = {}
    if args.token_counter:
        settings["token_counter"] = args.token_counter
    for pair in args.set:
        key, _, value = pair.partition("=")
        settings[key] = value
    settings |= llm_summarizer_settings(args.summarizer_url, args.summarizer_model)
    strategies = [None if s == "default" else s for s in args.strategies.split(",")]
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.embeddings:
            missing_model = minilm.available()
            if missing_model is not None:
                print(f"skipped --embeddings: {missing_model}", file=sys.stderr)
                return
            directory = minilm.model_dir()
            assert directory is not None
            model = minilm.MiniLM(directory, data_dir() / ".cache" / f"{minilm.MODEL_NAME}.json")
            stack.callback(model.save)
            if args.embed_only:
                _embed_only(model, conversations)
                return
            settings |= {
                "embeddings_base_url": stack.enter_context(minilm.serve(model)),
                "embeddings_model": minilm.MODEL_NAME,
                # numpy on two shared cores: a batch of 64 items takes seconds.
                "embeddings_timeout_seconds": 300,
            }
        results = await measure(
            conversations,
            questions=args.questions,
            budgets=[int(b) for b in args.budgets.split(",")],
            strategies=strategies,
            settings=settings,
        )
    label = " with all-MiniLM-L6-v2 embeddings (hybrid retrieval)" if args.embeddings else ""
    if args.summarizer_url:
        label += f" with the LLM summarizer ({args.summarizer_model} at {args.summarizer_url})"
    print(f"split {args.split}{label}; " + render(results))
    print(f"\n({time.perf_counter() - started:.0f} s)")


async def run(report: Report) -> None:
    """`python -m bench.run quality`: the held-out split, then the synthetic check."""
    args = _args([])
    conversations, missing = select(args)
    if conversations:
        results = await measure(conversations)
        text = "Held-out split (bench/conversations.py).\n\n" + render(results)
    else:
        text = "Skipped: no data.\n\n" + "\n".join(f"- {m}" for m in missing)
    report.add("7. Context quality on real conversations (evidence recall)", text, "quality")
    await context_synthetic.run(report)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
