"""Summarizers: fold new log items into a running summary.

A summary is text, one statement per line. Folding is incremental: the
stored summary covers seqs first..k; `fold(previous, items k+1..m)` returns
the summary of first..m without looking at items 1..k again.

- ExtractiveSummarizer (the offline default) keeps the sentences that carry
  facts: names, numbers, dates, decisions, preferences, and lets a later
  correction replace the statement it corrects. Lines read
  "#<seq> <role>: <sentence>" so a reader knows when something was said.
- LLMSummarizer asks any OpenAI-compatible chat completions endpoint.

`fit_summary` cuts a summary to a token budget at read time, keeping the most
informative (then newest) lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from state_service.compression import text as textlib
from state_service.tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class SummaryInput:
    """One log item as a summarizer sees it."""

    seq: int
    role: str
    text: str


class Summarizer(Protocol):
    name: str

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str: ...


class SummarizerError(Exception):
    """The summarizer could not produce a summary (the caller keeps the old one)."""


_MONTHS = (
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
).split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_RELATIVE = "today tomorrow tonight yesterday weekend week month year morning evening".split()
_DECISION = (
    "decide decided decision agree agreed chose choose chosen plan planned book booked "
    "schedule scheduled confirm confirmed settle settled pick picked deadline due budget "
    "order ordered reserve reserved appointment meeting"
).split()
_PREFERENCE = (
    "prefer prefers preferred preference favorite favourite like likes love loves hate hates "
    "dislike dislikes allergic allergy vegetarian vegan always never want wants avoid "
    "need needs must"
).split()
_CORRECTION = (
    "actually correction correct instead changed change moved update updated mistake wrong "
    "rather anymore longer postponed rescheduled"
).split()
_FEATURE_WORDS = {
    **dict.fromkeys(_MONTHS + _DAYS, ("date", 2.0)),
    **dict.fromkeys(_RELATIVE, ("date", 1.0)),
    **dict.fromkeys(_DECISION, ("decision", 2.0)),
    **dict.fromkeys(_PREFERENCE, ("preference", 2.0)),
    **dict.fromkeys(_CORRECTION, ("correction", 2.0)),
}
_NOT_NAMES = frozenset(
    "I I'm I've I'll I'd OK Ok The A An And But So Yes No Sure Thanks Thank Hi Hello Hey "
    "Okay Well Also Then Great Good Nice Please Sorry Let Let's What When Where Why How Who "
    "It It's That This These Those There We You He She They My Your Our Their".split()
    + [m.capitalize() for m in _MONTHS + _DAYS]
)
_NUMBER = re.compile(r"\d")
_IDENTIFIER = re.compile(r"\b(?=[A-Za-z-]*\d)(?=\d*[A-Za-z])[A-Za-z0-9-]{3,}\b")
_CONTACT = re.compile(r"@|https?://|\$|€|£|%")
_CAPITALIZED = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)?\b")
_LINE = re.compile(r"#(\d+) (\w+): (.*)")
_ROLE_WEIGHT = {"user": 1.0, "assistant": 0.6, "system": 1.0, "tool": 0.5}
KEEP_SCORE = 2.0


def score_sentence(sentence: str) -> tuple[float, bool]:
    """How much a sentence is worth keeping (0 = chit-chat), and whether it
    corrects something said earlier."""
    words = textlib.words(sentence)
    if len(words) < 3:
        return 0.0, False
    score = 0.0
    kinds: set[str] = set()
    if _NUMBER.search(sentence):
        score += 2.0
        kinds.add("number")
    if _CONTACT.search(sentence) or _IDENTIFIER.search(sentence):
        score += 1.0
    for word in words:
        feature = _FEATURE_WORDS.get(word)
        if feature is not None and feature[0] not in kinds:
            kinds.add(feature[0])
            score += feature[1]
    names = [m for m in _CAPITALIZED.findall(sentence) if m not in _NOT_NAMES]
    # A capitalized word that does not start the sentence is likely a name.
    if names and not (len(names) == 1 and sentence.startswith(names[0])):
        score += 1.5
    if sentence.rstrip().endswith("?"):
        score *= 0.5  # questions ask for facts more often than they state them
    return score, "correction" in kinds


@dataclass(slots=True)
class _Line:
    seq: int
    role: str
    text: str
    score: float

    def render(self) -> str:
        return f"#{self.seq} {self.role}: {self.text}"


def _parse(summary: str) -> list[_Line]:
    lines = []
    for position, raw in enumerate(summary.splitlines()):
        raw = raw.strip()
        if not raw:
            continue
        match = _LINE.fullmatch(raw)
        if match:
            seq, role, body = int(match[1]), match[2], match[3]
        else:
            seq, role, body = -(10**9) + position, "", raw
        score, _ = score_sentence(body)
        lines.append(_Line(seq, role, body, score * _ROLE_WEIGHT.get(role, 1.0)))
    return lines


def _topic(sentence: str) -> set[str]:
    """Content words of a sentence minus numbers and correction cues: what it is about."""
    return {
        t
        for t in textlib.terms(sentence)
        if not t.isdigit() and t not in _FEATURE_WORDS and t not in _MONTHS
    }


def _select(lines: list[_Line], budget: int, counter: TokenCounter) -> list[_Line]:
    """The most valuable lines (score, then newest) whose joined text fits
    `budget` tokens, in their original order."""
    if not lines or budget <= 0:
        return []
    ranked = sorted(range(len(lines)), key=lambda i: (lines[i].score, i), reverse=True)
    chosen: list[int] = []
    used = counter.count(b"")
    for i in ranked:
        cost = counter.count((lines[i].render() + "\n").encode()) - counter.count(b"")
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    kept = [lines[i] for i in sorted(chosen)]
    # Token counts of parts need not add up exactly: verify the whole.
    while kept and counter.count(render(kept).encode()) > budget:
        weakest = min(range(len(kept)), key=lambda i: (kept[i].score, i))
        kept.pop(weakest)
    return kept


def render(lines: Sequence[_Line]) -> str:
    return "\n".join(line.render() if line.role else line.text for line in lines)


def fit_summary(summary: str, budget: int, counter: TokenCounter) -> tuple[str, int]:
    """`summary` cut to `budget` tokens: its most informative lines, newest
    first among equals, kept in order. Returns (text, tokens); ("", 0) if
    nothing fits."""
    if not summary or budget <= 0:
        return "", 0
    whole = counter.count(summary.encode())
    if whole <= budget:
        return summary, whole
    kept = _select(_parse(summary), budget, counter)
    if not kept:
        return "", 0
    text = render(kept)
    return text, counter.count(text.encode())


class ExtractiveSummarizer:
    """Offline: keeps fact-bearing sentences; later corrections replace what
    they correct; the summary stays within `max_tokens`."""

    name = "extractive"

    def __init__(self, counter: TokenCounter, *, max_tokens: int = 2000) -> None:
        self._counter = counter
        self.max_tokens = max_tokens

    def extract(self, items: Sequence[SummaryInput]) -> list[_Line]:
        lines: list[_Line] = []
        for item in items:
            weight = _ROLE_WEIGHT.get(item.role, 0.5)
            for sentence in textlib.sentences(item.text):
                sentence = " ".join(sentence.split())
                if len(sentence) > 400:
                    sentence = sentence[:400].rsplit(" ", 1)[0] + " …"
                score, _ = score_sentence(sentence)
                if score * weight >= KEEP_SCORE:
                    lines.append(_Line(item.seq, item.role, sentence, score * weight))
        return lines

    def merge(self, previous: list[_Line], new: list[_Line]) -> list[_Line]:
        lines = list(previous)
        seen = {line.text.lower() for line in lines}
        for line in new:
            key = line.text.lower()
            if key in seen:
                continue
            _, corrects = score_sentence(line.text)
            if corrects:
                topic = _topic(line.text)
                if len(topic) >= 2:
                    lines = [
                        old
                        for old in lines
                        if len(topic & _topic(old.text)) < max(2, len(_topic(old.text)) // 2)
                    ]
            seen.add(key)
            lines.append(line)
        return lines

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str:
        return self.fold_sync(previous, items)

    def fold_sync(self, previous: str, items: Sequence[SummaryInput]) -> str:
        lines = self.merge(_parse(previous), self.extract(items))
        return render(_select(lines, self.max_tokens, self._counter))


SYSTEM_PROMPT = (
    "You maintain the running memory of a conversation between a user and an assistant. "
    "Update the current summary with the new messages. Keep every name, number, date, "
    "decision, preference and commitment; when a new message corrects an earlier fact, keep "
    "only the corrected fact. Drop greetings and small talk. Answer with the updated summary "
    "only: one short statement per line, no preamble."
)


class LLMSummarizer:
    """Summarizes with any OpenAI-compatible /v1/chat/completions endpoint."""

    name = "llm"

    def __init__(
        self,
        client: Any,
        *,
        model: str,
        counter: TokenCounter,
        max_tokens: int = 2000,
        timeout: float = 30.0,
    ) -> None:
        self._client = client  # an openai.AsyncOpenAI
        self._model = model
        self._counter = counter
        self.max_tokens = max_tokens
        self._timeout = timeout

    async def close(self) -> None:
        await self._client.close()

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str:
        new = "\n".join(f"#{i.seq} {i.role}: {i.text}" for i in items if i.text)
        if not new:
            return previous
        prompt = f"Current summary:\n{previous or '(empty)'}\n\nNew messages:\n{new}"
        try:
            response = await self._client.chat.completions.create(
                model=self._model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                ],
                max_tokens=self.max_tokens,
                temperature=0,
                timeout=self._timeout,
            )
            content = response.choices[0].message.content
        except Exception as exc:  # any failure of the endpoint: keep the old summary
            raise SummarizerError(f"{type(exc).__name__} from the summarizer endpoint") from exc
        if not isinstance(content, str) or not content.strip():
            raise SummarizerError("the summarizer endpoint returned no text")
        text, _ = fit_summary(content.strip(), self.max_tokens, self._counter)
        return text
