"""Summarizers: fold new log items into a running summary.

A summary is text, one statement per line. Folding is incremental: the
stored summary covers seqs first..k; `fold(previous, items k+1..m)` returns
the summary of first..m without looking at items 1..k again.

- ExtractiveSummarizer (the offline default) keeps the sentences that are
  informative in this conversation, whoever said them: each sentence is
  scored by the inverse frequency of its content words among the summary's
  candidate lines (TF-IDF with the conversation as the corpus: a word every
  other line uses, a speaker's name or "really", weighs little; a rare name,
  place or number weighs much), per token it costs; the words of every
  sentence folded, repeats and small talk included, make the corpus, so
  small talk said often weighs little. Sentences with fewer than three
  content words ("ok thanks", "lol that's funny") are never kept. No word
  lists: nothing here knows what a fact in any particular data set looks
  like. Lines read "#<seq> <role>: <sentence>" so a reader knows when
  something was said (and that a later line corrects an earlier one).
- LLMSummarizer asks any OpenAI-compatible chat completions endpoint.

`fit_summary` cuts a summary to a token budget at read time, keeping the most
informative lines (the same score, against the summary's own lines), in order.
"""

from __future__ import annotations

import functools
import math
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
    # The day the item was said, when it carries an original time ("8 May
    # 2023"); the LLM summarizer is shown it, the extractive one spends no
    # tokens on it (retrieval finds items by their date).
    when: str = ""


class Summarizer(Protocol):
    name: str

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str: ...


class SummarizerError(Exception):
    """The summarizer could not produce a summary (the caller keeps the old one)."""


_LINE = re.compile(r"#(\d+) (\w+): (.*)")
# Fewer content words than this and a sentence is filler ("Totally agree, Mel.").
MIN_CONTENT_TERMS = 3
# A question asks for facts more often than it states them.
QUESTION_WEIGHT = 0.5
MAX_SENTENCE_CHARS = 400


# A summary is folded again at every batch and keeps most of its lines: their
# terms and token counts are looked up, not recomputed (bounded: a few MB).
_LINE_MEMO_SIZE = 4096


@functools.lru_cache(maxsize=_LINE_MEMO_SIZE)
def content_terms(sentence: str) -> frozenset[str]:
    """The distinct content words (stemmed, no stopwords) of a sentence."""
    return frozenset(textlib.terms(sentence))


@functools.lru_cache(maxsize=_LINE_MEMO_SIZE)
def _line_tokens(counter: TokenCounter, rendered: str) -> int:
    return counter.count((rendered + "\n").encode())


def is_filler(sentence: str) -> bool:
    return len(content_terms(sentence)) < MIN_CONTENT_TERMS


@dataclass(slots=True)
class _Line:
    seq: int
    role: str
    text: str
    terms: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.terms:
            self.terms = content_terms(self.text)

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
            lines.append(_Line(int(match[1]), match[2], match[3]))
        else:
            lines.append(_Line(-(10**9) + position, "", raw))
    return lines


def informativeness(
    lines: Sequence[_Line], corpus: Sequence[frozenset[str]] | None = None
) -> list[float]:
    """Each line's summed idf of its content terms, against `corpus` (the
    content terms of every sentence seen; default: the lines themselves):
    what is informative in this conversation. Questions count half."""
    documents = corpus if corpus is not None else [line.terms for line in lines]
    df: dict[str, int] = {}
    for terms in documents:
        for term in terms:
            df[term] = df.get(term, 0) + 1
    for line in lines:
        for term in line.terms:
            df.setdefault(term, 1)
    n = max(1, len(documents))
    scores = []
    for line in lines:
        score = sum(math.log(1.0 + n / df[t]) for t in line.terms)
        if line.text.rstrip().endswith("?"):
            score *= QUESTION_WEIGHT
        scores.append(score)
    return scores


def _select(
    lines: list[_Line],
    budget: int,
    counter: TokenCounter,
    corpus: Sequence[frozenset[str]] | None = None,
) -> list[_Line]:
    """The lines with the most information per token (newest first among
    equals) whose joined text fits `budget` tokens, in their original order."""
    if not lines or budget <= 0:
        return []
    framing = counter.count(b"")
    costs = [max(1, _line_tokens(counter, line.render()) - framing) for line in lines]
    scores = informativeness(lines, corpus)
    ranked = sorted(range(len(lines)), key=lambda i: (scores[i] / costs[i], i), reverse=True)
    chosen: list[int] = []
    used = framing
    for i in ranked:
        if used + costs[i] <= budget:
            chosen.append(i)
            used += costs[i]
    kept = sorted(chosen)
    # Token counts of parts need not add up exactly: verify the whole.
    while kept and counter.count(render([lines[i] for i in kept]).encode()) > budget:
        weakest = min(range(len(kept)), key=lambda k: (scores[kept[k]], kept[k]))
        kept.pop(weakest)
    return [lines[i] for i in kept]


def render(lines: Sequence[_Line]) -> str:
    return "\n".join(line.render() if line.role else line.text for line in lines)


def fit_summary(summary: str, budget: int, counter: TokenCounter) -> tuple[str, int]:
    """`summary` cut to `budget` tokens: its most informative lines, newest
    first among equals, kept in order. Returns (text, tokens); ("", 0) if
    nothing fits."""
    if not summary or budget <= 0:
        return "", 0
    return _fit(summary, budget, counter)


# A stored summary changes only when the summarizer commits, and budgets repeat:
# every read of a session would otherwise count and rank the same lines again
# (about half of a tiered read's time with exact token counts).
@functools.lru_cache(maxsize=512)
def _fit(summary: str, budget: int, counter: TokenCounter) -> tuple[str, int]:
    whole = counter.count(summary.encode())
    if whole <= budget:
        return summary, whole
    kept = _select(_parse(summary), budget, counter)
    if not kept:
        return "", 0
    text = render(kept)
    return text, counter.count(text.encode())


class ExtractiveSummarizer:
    """Offline: keeps the sentences most informative in this conversation,
    in the order they were said; the summary stays within `max_tokens`."""

    name = "extractive"

    def __init__(self, counter: TokenCounter, *, max_tokens: int = 2000) -> None:
        self._counter = counter
        self.max_tokens = max_tokens

    def extract(self, items: Sequence[SummaryInput]) -> list[_Line]:
        return [line for line in self._sentences(items) if len(line.terms) >= MIN_CONTENT_TERMS]

    def _sentences(self, items: Sequence[SummaryInput]) -> list[_Line]:
        lines: list[_Line] = []
        for item in items:
            for sentence in textlib.sentences(item.text):
                sentence = " ".join(sentence.split())
                if len(sentence) > MAX_SENTENCE_CHARS:
                    sentence = sentence[:MAX_SENTENCE_CHARS].rsplit(" ", 1)[0] + " …"
                lines.append(_Line(item.seq, item.role, sentence))
        return lines

    def merge(self, previous: list[_Line], new: list[_Line]) -> list[_Line]:
        """`previous` then the new lines not said before. A later statement
        that corrects an earlier one comes after it, with its newer "#<seq>":
        telling a correction from a second fact of the same shape ("booked
        table 5", "booked table 6") takes understanding, so the reader of the
        summary decides, not a word list."""
        lines = list(previous)
        seen = {line.text.lower() for line in lines}
        for line in new:
            key = line.text.lower()
            if key not in seen:
                seen.add(key)
                lines.append(line)
        return lines

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str:
        return self.fold_sync(previous, items)

    def fold_sync(self, previous: str, items: Sequence[SummaryInput]) -> str:
        kept = _parse(previous)
        sentences = self._sentences(items)
        lines = self.merge(kept, [s for s in sentences if len(s.terms) >= MIN_CONTENT_TERMS])
        # Every sentence of the new items counts for how common a word is,
        # repeats and filler included: small talk said twenty times is common.
        corpus = [line.terms for line in kept] + [s.terms for s in sentences]
        return render(_select(lines, self.max_tokens, self._counter, corpus))


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
        new = "\n".join(
            f"#{i.seq} {i.role}: {f'[{i.when}] ' if i.when else ''}{i.text}"
            for i in items
            if i.text
        )
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
