"""7b. Context quality, synthetic check: what each GetContext strategy keeps of a long
conversation, against the design brief's baselines.

Synthetic conversations (600 turns: chit-chat, tool calls, planted facts —
names, numbers, dates, preferences, decisions — and later corrections) are
played into a real state service (in process, real Redis). At known turns the
user asks about an earlier fact; the question is the newest user message, so
it is the default retrieval query. A question's evidence is the item that
states the current answer (the correction if there was one). Evidence recall:
the share of questions whose evidence item is in the context verbatim, or
whose answer survives in the summary text sent. The background summarizer
runs between turns (as it would while the model answers).

Baselines (computed on the same log): the whole log (the stateful sketch),
and the brief's sketches: sliding window of
20 messages, trim to the newest 40, and its summary (first 100 characters of
each older user message, cut to 500) plus the last 10 messages.

python -m bench.run quality  (after the real-data part, bench/context_quality.py)
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Stats, table
from bench.report import Report
from state_service import metrics
from state_service.client import StateClient
from state_service.server import StateServer
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import EmbeddedRedis, free_port
from state_service.tokens import make_token_counter

TURNS = 600
SEEDS = (1,)
BUDGETS = (1000, 2000, 4000)
STRATEGIES = ("sliding_window", "token_window", "summary", "retrieval", "tiered")
# The brief's baselines are counted as the service counts (exact o200k_base
# when the encoding is available offline, as it is with the project installed).
COUNTER = make_token_counter("auto")

NAMES = ["Ingrid", "Tomasz", "Aiyana", "Kofi", "Mireille", "Haruto", "Svetlana", "Dario"]
SURNAMES = ["Halvorsen", "Okafor", "Brennan", "Castellano", "Nakamura", "Lindqvist"]
CITIES = ["Porto", "Tallinn", "Kyoto", "Valparaiso", "Reykjavik", "Marrakesh", "Ljubljana"]
MONTHS = ["March", "April", "May", "June", "September", "October", "November"]
PETS = ["Biscuit", "Pixel", "Mango", "Juniper", "Waffles", "Pepper"]
FOODS = ["peanuts", "shellfish", "sesame", "kiwi", "gluten"]


def _fill(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(NAMES),
        "surname": rng.choice(SURNAMES),
        "city": rng.choice(CITIES),
        "date": f"{rng.randint(2, 27)} {rng.choice(MONTHS)}",
        "num": str(rng.randint(1000, 9999)),
        "money": f"{rng.randint(12, 95)},{rng.randint(100, 999)}",
        "time": f"{rng.randint(6, 21)}:{rng.choice(['05', '15', '30', '45'])}",
        "pet": rng.choice(PETS),
        "food": rng.choice(FOODS),
    }


# (statement, correction, question, answer key): the answer is the value of
# the key in the fill; a correction draws a new fill for that key.
FACTS: list[tuple[str, str, str, str]] = [
    ("My manager's name is {name} {surname}.", "Correction: my new manager is {name} {surname}, since the reorg.", "What is my manager's name?", "surname"),
    ("My locker code at the gym is {num}.", "Actually the gym changed my locker code to {num}.", "What's my gym locker code?", "num"),
    ("My sister's wedding is on {date} in {city}.", "Update: the wedding moved to {date}.", "When is my sister's wedding?", "date"),
    ("I prefer aisle seats and I always travel with a {pet} plush for luck.", "", "What plush do I travel with?", "pet"),
    ("We decided to hold the team offsite in {city}.", "Actually we changed the offsite to {city} because of the prices.", "Where is the team offsite?", "city"),
    ("My flight to the conference leaves on {date} at {time}.", "The airline rescheduled my conference flight to {time}.", "What time does my conference flight leave?", "time"),
    ("Our budget for the kitchen renovation is {money} dollars.", "We raised the kitchen renovation budget to {money} dollars.", "What is the kitchen renovation budget?", "money"),
    ("Our dog is called {pet}.", "", "What is our dog called?", "pet"),
    ("I am allergic to {food}, please remember that.", "", "What am I allergic to?", "food"),
    ("The wifi password at the cabin is lake{num}.", "The cabin wifi password is now lake{num}, my brother reset the router.", "What is the cabin wifi password?", "num"),
    ("My dentist is Dr. {surname} and the check-up is on {date}.", "", "Who is my dentist?", "surname"),
    ("The project deadline for the Atlas report is {date}.", "Correction: the Atlas report deadline was pushed to {date}.", "When is the Atlas report deadline?", "date"),
    ("My daughter's teacher is Ms. {surname}.", "", "What is the name of my daughter's teacher?", "surname"),
    ("I parked on level {num} of the airport garage.", "", "Where did I park at the airport?", "num"),
    ("My favourite restaurant is the tapas place in {city}.", "", "Which city has my favourite restaurant?", "city"),
    ("The plumber {name} is coming on {date} at {time}.", "The plumber moved the visit to {time}.", "When is the plumber coming?", "time"),
    ("Grandma's birthday is {date}, she turns {num}.", "", "When is grandma's birthday?", "date"),
    ("I want the quarterly report to use the {pet} colour theme.", "", "Which colour theme should the quarterly report use?", "pet"),
    ("My new bank account number ends in {num}.", "", "What does my bank account number end in?", "num"),
    ("We agreed that {name} will present the demo on {date}.", "Actually {name} will present the demo instead.", "Who presents the demo?", "name"),
]  # fmt: skip

# A second wording of each question, sharing few words with the statement.
PARAPHRASES = [
    "Remind me who my boss is?",
    "Which number opens my locker when I work out?",
    "What day do I need to be at my sister's ceremony?",
    "What good-luck toy do I bring on trips?",
    "Which city are we taking the team to?",
    "When do I have to be at the gate for the conference?",
    "How much money can we spend on the new kitchen?",
    "Remind me of our pup's name?",
    "Which food should you never suggest to me?",
    "How do I get online at the cabin?",
    "Who looks after my teeth?",
    "By when must Atlas be delivered?",
    "Who teaches my daughter?",
    "Which floor is my car on at the airport?",
    "Where is that tapas restaurant I love?",
    "At what hour does the plumber show up?",
    "What date is grandma's party?",
    "Which colours go in the quarterly slides?",
    "What are the last digits of my bank account?",
    "Who is giving the demo?",
]
# Chit-chat that shares words (and numbers, names) with the facts: what makes
# retrieval and summarization work for their recall.
DISTRACTORS = [
    "My manager scheduled another meeting at 16:00, ugh.",
    "The gym was packed today, I waited 20 minutes for the bench.",
    "My sister sent me 45 photos of her cat.",
    "I read that the Porto airport has a new terminal.",
    "The conference app keeps crashing on my phone.",
    "Kitchen gadgets are so expensive, a blender was 300 dollars.",
    "Our neighbour's dog barked until 2 in the morning.",
    "The office wifi password is on a sticky note somewhere.",
    "Dr. Who is on tonight at 21:00.",
    "The Atlas mountains look amazing in photos.",
    "My daughter wants to be a teacher when she grows up.",
    "Parking downtown cost me 18 dollars today.",
    "There is a new tapas bar near the station, I have not tried it.",
    "The plumber's van was blocking our street on Monday.",
    "Grandma called to say hi, she is doing well.",
    "The quarterly numbers look better than in March.",
    "The bank app logged me out three times today.",
    "We agreed to order pizza for the team on Friday.",
]
CHAT_USER = [
    "Tell me something interesting about octopuses.",
    "I watched a documentary about bees last night, pretty wild.",
    "Can you suggest a good stretching routine?",
    "What should I cook tonight, something quick?",
    "lol that reminds me of my college roommate",
    "How do I keep basil alive on a windowsill?",
    "Any tips for sleeping better?",
    "Write me a haiku about autumn rain.",
    "Is it worth learning to play the ukulele?",
    "What's the difference between a latte and a flat white?",
    "I'm so tired today, long meeting marathon.",
    "Recommend a board game for four people.",
    "Why do cats knock things off tables?",
    "Explain how a rainbow forms, simply.",
]
TOOL_QUERIES = ["weather", "news", "traffic", "stocks", "calendar"]


def _assistant(rng: random.Random) -> dict[str, Any]:
    words = (
        "that is a good question and there are a few things worth keeping in mind here "
        "first it depends on what you enjoy and how much time you have so start small "
        "and see how it feels then adjust as you go along which usually works well"
    ).split()
    text = " ".join(rng.choice(words) for _ in range(rng.randint(25, 70)))
    return {"role": "assistant", "content": text.capitalize() + "."}


@dataclass
class Question:
    turn: int
    text: str
    answer: str
    evidence_seq: int


@dataclass
class Outcome:
    recall: dict[tuple[str, int], list[bool]] = field(default_factory=dict)
    tokens: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)


def _baselines(history: list[dict[str, Any]]) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """(items kept, summary text) per brief baseline."""
    out: dict[str, tuple[list[dict[str, Any]], str]] = {
        "whole log (stateful)": (history, ""),
        "brief: sliding window 20": (history[-20:], ""),
        "brief: trim to 40": (history[-40:], ""),
    }
    if len(history) > 30:
        old = history[:-10]
        summary = f"Summary of {len(old)} prior messages: " + " | ".join(
            str(m.get("content", ""))[:100] for m in old if m.get("role") == "user"
        )
        out["brief: 100-char summary"] = (history[-10:], summary[:500])
    else:
        out["brief: 100-char summary"] = (history, "")
    return out


def _tokens(items: list[dict[str, Any]], summary: str) -> int:
    total = sum(COUNTER.count(json.dumps(i).encode()) for i in items)
    return total + (COUNTER.count(summary.encode()) if summary else 0)


async def _conversation(client: StateClient, server: StateServer, seed: int, out: Outcome) -> None:
    rng = random.Random(seed)
    sid = f"quality-{seed}"
    facts = []
    for statement, correction, question, key in FACTS:
        plant = rng.randint(3, 420)
        fill = _fill(rng)
        corrected = None
        if correction:
            later = dict(fill)
            while later[key] == fill[key]:
                later[key] = _fill(rng)[key]
            if key == "name":
                correction = correction.replace("{name}", later["name"])
            corrected = (rng.randint(plant + 40, plant + 150), correction.format(**later), later)
        facts.append((plant, statement.format(**fill), fill, corrected, question, key))
    plants = {f[0]: f for f in facts}
    corrections = {f[3][0]: f for f in facts if f[3] is not None}
    asks: dict[int, list[Any]] = {}
    for number, fact in enumerate(facts):
        for ask in range(3):
            turn = rng.randint(fact[0] + 15, TURNS - 1)
            while turn in asks or turn in plants or turn in corrections:
                turn += 1
            question = PARAPHRASES[number] if ask == 1 else fact[4]
            asks[turn] = [fact, question]
    history: list[dict[str, Any]] = []
    evidence: dict[str, tuple[int, str]] = {}  # question -> (seq, answer)
    compressor = server.compression.compressor
    assert compressor is not None
    for turn in range(TURNS):
        items: list[dict[str, Any]] = []
        if turn in plants:
            fact = plants[turn]
            items.append({"role": "user", "content": fact[1]})
            key = fact[5]
        elif turn in corrections:
            fact = corrections[turn]
            assert fact[3] is not None
            items.append({"role": "user", "content": fact[3][1]})
            key = fact[5]
        elif turn in asks:
            fact, question = asks[turn]
            items.append({"role": "user", "content": question})
            await client.append_items(sid, items)
            history += items
            await compressor.idle()
            seq, answer = evidence[fact[4]]
            for strategy in STRATEGIES:
                for budget in BUDGETS:
                    started = time.perf_counter()
                    context = await client.get_context(sid, token_budget=budget, strategy=strategy)
                    out.latency.setdefault(strategy, []).append(time.perf_counter() - started)
                    seqs = {i.seq for i in context.items} | {r.item.seq for r in context.retrieved}
                    hit = seq in seqs or bool(context.summary and answer in context.summary.text)
                    out.recall.setdefault((strategy, budget), []).append(hit)
                    out.tokens.setdefault((strategy, budget), []).append(
                        (turn, context.token_count)
                    )
            for name, (kept, summary) in _baselines(history).items():
                kept_seqs = set(range(len(history) - len(kept) + 1, len(history) + 1))
                hit = seq in kept_seqs or answer in summary
                out.recall.setdefault((name, 0), []).append(hit)
                out.tokens.setdefault((name, 0), []).append((turn, _tokens(kept, summary)))
            reply = {"role": "assistant", "content": "Let me look that up in our conversation."}
            await client.append_items(sid, [reply])
            history.append(reply)
            continue
        else:
            pool = DISTRACTORS if rng.random() < 0.3 else CHAT_USER
            items.append({"role": "user", "content": rng.choice(pool)})
            key = ""
            if rng.random() < 0.3:
                cid = f"call_{turn}"
                query = rng.choice(TOOL_QUERIES)
                items.append(
                    {
                        "type": "function_call",
                        "call_id": cid,
                        "name": "lookup",
                        "arguments": json.dumps({"topic": query}),
                    }  # fmt: skip
                )
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": cid,
                        "output": f"{query}: {rng.randint(1, 99)} items, updated {rng.randint(1, 59)} min ago",
                    }  # fmt: skip
                )
        items.append(_assistant(rng))
        result = await client.append_items(sid, items)
        history += items
        if key:
            fact = plants.get(turn) or corrections[turn]
            corrected = fact[3]
            values = corrected[2] if turn not in plants and corrected else fact[2]
            evidence[fact[4]] = (result.first_seq, values[key])


async def run(report: Report) -> None:
    metrics_before = _summarizer_totals()
    out = Outcome()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        redis = EmbeddedRedis(Path(scratch), port=free_port())
        redis.start()
        try:
            values: dict[str, Any] = {
                "listen": "127.0.0.1:0",
                "redis_url": redis.url,
                "metrics_port": 0,
                "log_level": "WARNING",
            }
            settings = StateServiceSettings(**values)
            server = await StateServer.start(settings)
            try:
                async with StateClient(server.address, timeout=30) as client:
                    for seed in SEEDS:
                        await _conversation(client, server, seed, out)
            finally:
                await server.stop(grace=1)
        finally:
            redis.close()
    runs, seconds = (a - b for a, b in zip(_summarizer_totals(), metrics_before, strict=True))
    rows = []
    questions = len(next(iter(out.recall.values())))
    flat: dict[str, tuple[float, float]] = {}
    for key, hits in out.recall.items():
        name, budget = key
        samples = out.tokens[key]
        early = [t for turn, t in samples if turn < TURNS / 3]
        late = [t for turn, t in samples if turn >= 2 * TURNS / 3]
        mean_early, mean_late = statistics.fmean(early), statistics.fmean(late)
        if budget == 2000 or budget == 0:
            flat[name] = (mean_early, mean_late)
        p50 = Stats.of(out.latency[name]).p50 if name in out.latency else None
        rows.append(
            [
                name,
                f"{budget:,}" if budget else "none",
                f"{100 * sum(hits) / len(hits):.1f}%",
                f"{statistics.fmean(t for _, t in samples):,.0f}",
                f"{mean_early:,.0f} → {mean_late:,.0f}",
                f"{p50:.2f}" if p50 is not None else "—",
            ]
        )
    order = {s: i for i, s in enumerate(STRATEGIES)}
    rows.sort(key=lambda r: (order.get(r[0], -1), r[1]))
    tiered = out.recall[("tiered", 2000)]
    tiered_recall = 100 * sum(tiered) / len(tiered)
    text = (
        f"{len(SEEDS)} synthetic conversations of {TURNS} turns ({len(FACTS)} planted facts "
        f"each, {sum(1 for f in FACTS if f[1])} corrected later; {questions} questions in all, a "
        "third of them paraphrased so they share few words with the fact; 30% of chit-chat "
        "turns are distractors sharing words, numbers and names with the facts). "
        "Default settings (adaptive tier shares, extractive summarizer, BM25 retrieval, "
        f"tokens counted with: {COUNTER.name}). Tokens/turn: mean tokens sent at the "
        "question turns; early → late: mean over the first third of the conversation vs the "
        "last third. GetContext p50 is the whole RPC in process (loopback gRPC + Redis).\n\n"
        + table(
            [
                "strategy",
                "budget",
                "evidence recall",
                "tokens/turn",
                "tokens early → late",
                "GetContext p50 ms",
            ],
            rows,
        )
    )
    text += (
        f"\n\n`tiered` at 2k tokens: **{tiered_recall:.1f}% evidence recall** (target ≥ 85%), "
        f"tokens/turn {flat['tiered'][0]:,.0f} early → {flat['tiered'][1]:,.0f} late (flat: "
        "bounded by the budget), while the brief's trim-to-40 sends "
        f"{flat['brief: trim to 40'][0]:,.0f} → {flat['brief: trim to 40'][1]:,.0f}. "
        f"Background summarizer: {runs:.0f} folds, mean {1000 * seconds / max(runs, 1):.2f} ms "
        "each (off the request path)."
    )
    report.add(
        "7b. Context quality, synthetic check (evidence recall per strategy and budget)",
        text,
        "quality",
    )


def _summarizer_totals() -> tuple[float, float]:
    count = total = 0.0
    for metric in metrics.COMPRESSION_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total
