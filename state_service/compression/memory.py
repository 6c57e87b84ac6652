"""Per-session retrieval memory held in process: every item of a session's log
(up to a limit) with its text, a BM25 index and, when an embeddings endpoint
is configured, its vector.

Like the tail cache, it holds only immutable things (log entries at indexes of
one incarnation and pop count) and is never the authority: it is rebuilt from
Redis when lost, stale or evicted, and caught up incrementally otherwise.
"""

from __future__ import annotations

import datetime
import functools
import heapq
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

from state_service import metrics
from state_service.cache import CountingTTLCache
from state_service.compression import text as textlib
from state_service.compression.bm25 import BM25Index
from state_service.compression.dense import VectorStore
from state_service.compression.summarizer import SummaryInput
from state_service.heavy_work import Offload, inline
from state_service.log import LogEntry
from state_service.storage.redis import SessionHead

# Reads an inclusive index range of the log: the head at that moment and the
# decoded entries.
RangeReader = Callable[
    [str, str, int, int], Awaitable[tuple[SessionHead | None, tuple[LogEntry, ...]]]
]
FETCH_CHUNK = 1000
# The cache label of retrieval memories in statecar_state_cache_evictions_total.
MEMORY_CACHE_NAME = "retrieval_memory"
# Hybrid retrieval (an embeddings endpoint configured): the lexical score's
# weight against the dense one, and how many of the most similar items the
# dense side proposes. Dev split, all-MiniLM-L6-v2, tiered at 2k tokens:
# weights 0.3 / 0.5 / 0.7 / 0.9 scored 81.2 / 85.3 / 86.5 / 84.8 %; 30 / 100 /
# 300 candidates 85.7 / 86.4 / 86.5 %; reciprocal-rank fusion at best 85.6 %;
# every cosine (the earlier fusion) 85.2 %.
HYBRID_LEXICAL_WEIGHT = 0.7
DENSE_CANDIDATES = 300
# The dense query moves toward the mean vector of the best few lexical matches
# (query expansion from the lexical side: what those turns mean, in words the
# question did not use). Dev: weight 0.3 / 0.5 / 1.0 / 1.5 of 3 items +0.4 /
# +0.3 / +0.5 / -0.3 points; the dense side's own best instead: -0.2.
LEXICAL_EXPANSION_ITEMS = 3
LEXICAL_EXPANSION_WEIGHT = 0.5
# A message that matches lends this share of its score to the messages just
# before and after it, and that share of the share to the next ones out, up to
# NEIGHBOUR_SPAN away: in a dialogue the turn a query matches is often the
# question, or the remark, whose answer or detail is in the next (or previous)
# turns, which share no word with the query. (Dev split: one message each way
# +5.4 points of evidence recall at 2k tokens, a second +1.7, a third +0.2.)
NEIGHBOUR_WEIGHT = 0.5
NEIGHBOUR_SPAN = 2
# Metadata annotations that say who said an item and when: indexed with its
# text (an imported conversation often carries them there, not in the text).
SPEAKER_KEYS = frozenset({"speaker", "name", "author", "sender", "from"})
TIME_KEYS = frozenset({"time", "date", "timestamp", "datetime", "created_at", "sent_at"})
# A query that names a speaker is more likely about what that speaker said.
SPEAKER_BOOST = 1.25
# Pseudo-relevance feedback: the rarest words of the best few matches join the
# query at a fraction of its weight, so turns about the same thing in other
# words are found too. Costs the postings of FEEDBACK_TERMS more terms.
FEEDBACK_DOCS = 3
FEEDBACK_TERMS = 5
FEEDBACK_WEIGHT = 0.3
# With the dense side, more feedback terms pay (dev: 5 → 10 terms +0.5 points;
# lexical alone they cost 0.3).
HYBRID_FEEDBACK_TERMS = 10
_DIALOGUE = frozenset({"user", "assistant"})


def _catch_up(
    memory: SessionMemory, begin: int, entries: Sequence[LogEntry], max_bytes: int
) -> SessionMemory:
    """Indexes the part of `entries` (log indexes from `begin`) that `memory`
    lacks; returns the memory to keep (a newer-only one when it outgrew
    `max_bytes`). Runs where MemoryStore's offload puts it, so the check and
    the extend happen together, after any other catch-up queued before it."""
    if begin <= memory.end_index < begin + len(entries):
        memory.extend(entries[memory.end_index - begin :])
    return memory.fitted(max_bytes)


class StaleMemory(Exception):
    """The log changed under a catch-up (pop, delete): try again from scratch."""


def _annotations(entry: LogEntry) -> tuple[frozenset[str], list[str]]:
    """(the speaker's name terms, the terms of who-and-when metadata). The
    item's own speaker and original time come first; metadata that says the
    same (an import's "speaker", "date", ...) is read when they are unset."""
    item = entry.item
    speaker: list[str] = textlib.terms(item.speaker) if item.speaker else []
    # Both spellings of the day, as people and as machines write it.
    other: list[str] = (
        textlib.terms(f"{said_on(item.original_ms)} {iso_day(item.original_ms)}")
        if item.original_ms
        else []
    )
    for key, value in item.metadata.items():
        lowered = key.lower()
        if lowered in SPEAKER_KEYS and not item.speaker:
            speaker += textlib.terms(value)
        elif lowered in TIME_KEYS and not item.original_ms:
            other += textlib.terms(value)
    return frozenset(speaker), speaker + other


def said_on(original_ms: int) -> str:
    """The day an item was said, in words a question would use ("8 May 2023")."""
    day = datetime.datetime.fromtimestamp(original_ms / 1000, tz=datetime.UTC)
    return f"{day.day} {day:%B %Y}"


def iso_day(original_ms: int) -> str:
    """The day an item was said as a date ("2023-05-08")."""
    return datetime.datetime.fromtimestamp(original_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d")


def _describe_text(entry: LogEntry) -> tuple[str, str]:
    """(role, text) of an item; an item that names its speaker reads
    "<speaker>: <text>" (what the summary quotes and the dense side embeds),
    unless its text already starts so."""
    try:
        data: Any = json.loads(entry.item.json)
    except ValueError:
        return "other", ""
    text = textlib.item_text(data)
    speaker = entry.item.speaker
    if speaker and text and not text.startswith(f"{speaker}:"):
        text = f"{speaker}: {text}"
    return textlib.item_role(data), text


def _size_of_entry(entry: LogEntry, text: str) -> int:
    # What a memory holds per item grows with its JSON (the entry) and its
    # text (kept, and indexed: postings and feedback terms follow the text).
    return len(entry.item.json) + len(text)


@dataclass
class SessionMemory:
    incarnation: str
    trunc: int
    start_index: int
    entries: list[LogEntry] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    index: BM25Index = field(default_factory=BM25Index)
    # Stemmed name terms of each item's speaker (from metadata), and every
    # speaker term seen: a query term among them names a speaker.
    speakers: list[frozenset[str]] = field(default_factory=list)
    speaker_terms: set[str] = field(default_factory=set)
    # Vectors of positions 0 .. vectors.count-1 (embedded oldest first).
    vectors: VectorStore = field(default_factory=VectorStore)
    # call_id -> positions of the call and its outputs (a retrieval unit).
    groups: dict[str, list[int]] = field(default_factory=dict)
    total_tokens: int = 0
    # _size_of_entry of each item, and their sum: the memory's byte bound.
    sizes: list[int] = field(default_factory=list)
    size: int = 0

    @property
    def end_index(self) -> int:
        return self.start_index + len(self.entries)

    def extend(self, entries: Sequence[LogEntry]) -> None:
        for entry in entries:
            position = len(self.entries)
            role, text = _describe_text(entry)
            self.entries.append(entry)
            self.roles.append(role)
            self.texts.append(text)
            size = _size_of_entry(entry, text)
            self.sizes.append(size)
            self.size += size
            speaker, annotations = _annotations(entry)
            self.speakers.append(speaker)
            self.speaker_terms |= speaker
            self.index.add(textlib.terms(text) + annotations)
            self.total_tokens += entry.tokens
            key = entry.call_id or entry.output_of
            if key:
                self.groups.setdefault(key, []).append(position)

    def fitted(self, max_bytes: int) -> SessionMemory:
        """This memory if it is within `max_bytes`, else one rebuilt over its
        newest items that fit half of it (at least one item; BM25Index cannot
        remove documents, and the slack spares a rebuild on every append)."""
        if self.nbytes <= max_bytes or len(self.entries) <= 1:
            return self
        vector_bytes = 4 * self.vectors.dim
        kept = 0
        cut = len(self.entries)
        while cut > 1 and kept + self.sizes[cut - 1] + vector_bytes <= max_bytes // 2:
            cut -= 1
            kept += self.sizes[cut] + vector_bytes
        cut = min(cut, len(self.entries) - 1)
        newer = SessionMemory(self.incarnation, self.trunc, self.start_index + cut)
        newer.extend(self.entries[cut:])
        newer.vectors = self.vectors.suffix(cut)
        return newer

    @property
    def nbytes(self) -> int:
        """What the memory holds: items' JSON and text, and their vectors."""
        return self.size + self.vectors.nbytes

    @property
    def has_vectors(self) -> bool:
        return self.vectors.count > 0

    def position_of(self, log_index: int) -> int:
        return log_index - self.start_index

    def inputs(self, positions: Sequence[int]) -> list[SummaryInput]:
        out = []
        for p in positions:
            item = self.entries[p].item
            when = said_on(item.original_ms) if item.original_ms else ""
            out.append(SummaryInput(item.seq, self.roles[p], self.texts[p], when))
        return out

    def unembedded(self, limit: int) -> list[int]:
        """The oldest (at most `limit`) positions without a vector."""
        return list(range(self.vectors.count, min(len(self.entries), self.vectors.count + limit)))

    def add_vectors(self, positions: Sequence[int], vectors: Sequence[Sequence[float]]) -> bool:
        """Stores the vectors of `positions` (consecutive, as unembedded gave
        them); False if they are no longer the ones missing."""
        if not positions or positions[-1] >= len(self.entries):
            return False
        return self.vectors.add(positions[0], vectors)

    def unit(self, position: int) -> list[int]:
        entry = self.entries[position]
        key = entry.call_id or entry.output_of
        if not key:
            return [position]
        return sorted(self.groups.get(key, [position]))

    def search(
        self,
        query: str,
        *,
        below_index: int,
        budget: int,
        query_vector: Sequence[float] | None = None,
    ) -> list[tuple[LogEntry, float]]:
        """The most relevant older items (log index < below_index) that fit
        `budget` tokens, as whole units (a call with its outputs), in log order."""
        below = self.position_of(below_index)
        if below <= 0 or budget <= 0:
            return []
        query_terms = textlib.terms(query)
        scores = self.index.scores(query_terms, below=below)
        hybrid = query_vector is not None and self.has_vectors
        feedback_terms = HYBRID_FEEDBACK_TERMS if hybrid else FEEDBACK_TERMS
        if feedback_terms and scores:
            scores = self._with_feedback(scores, set(query_terms), below, feedback_terms)
        if hybrid and query_vector is not None:
            scores = self._hybrid(scores, query_vector, below)
        named = self.speaker_terms.intersection(query_terms)
        if named:
            for position, score in scores.items():
                if self.speakers[position] & named:
                    scores[position] = score * SPEAKER_BOOST
        scores = self._with_neighbours(scores, below)
        units: dict[tuple[int, ...], float] = {}
        for position, score in scores.items():
            if score <= 0:
                continue
            members = tuple(self.unit(position))
            if members[-1] >= below or members[0] < 0:
                continue  # would split a call from its output across the cut
            units[members] = max(units.get(members, 0.0), score)
        chosen: list[tuple[int, float]] = []
        used = 0
        for members, score in sorted(units.items(), key=lambda u: (-u[1], -u[0][0])):
            cost = sum(self.entries[p].tokens for p in members)
            if used + cost > budget:
                continue
            used += cost
            chosen.extend((p, score) for p in members)
        chosen.sort()
        return [(self.entries[p], score) for p, score in chosen]

    def _with_feedback(
        self, scores: dict[int, float], query_terms: set[str], below: int, limit: int
    ) -> dict[int, float]:
        best = sorted(scores, key=lambda p: -scores[p])[:FEEDBACK_DOCS]
        candidates: dict[str, float] = {}
        for position in best:
            for term in set(textlib.terms(self.texts[position])) - query_terms:
                candidates[term] = candidates.get(term, 0.0) + self.index.idf(term)
        chosen = sorted(candidates, key=lambda t: -candidates[t])[:limit]
        out = dict(scores)
        for position, score in self.index.scores(chosen, below=below).items():
            out[position] = out.get(position, 0.0) + FEEDBACK_WEIGHT * score
        return out

    def _with_neighbours(self, scores: dict[int, float], below: int) -> dict[int, float]:
        """`scores` plus, for each matching message, its neighbouring messages at
        NEIGHBOUR_WEIGHT of its score per step away (if they do not score more
        themselves). Costs O(matches * NEIGHBOUR_SPAN)."""
        out = dict(scores)
        for position, score in scores.items():
            if score <= 0 or self.roles[position] not in _DIALOGUE:
                continue
            for step in (-1, 1):
                lent = score
                near = position
                for _ in range(NEIGHBOUR_SPAN):
                    near += step
                    if not (0 <= near < below and self.roles[near] in _DIALOGUE):
                        break
                    lent *= NEIGHBOUR_WEIGHT
                    if lent > out.get(near, 0.0):
                        out[near] = lent
        return out

    def _hybrid(
        self, lexical: dict[int, float], query_vector: Sequence[float], below: int
    ) -> dict[int, float]:
        """Lexical scores (scaled to the best one) fused with the cosines of the
        DENSE_CANDIDATES most similar items, scaled between the last of them
        (0) and the best (1): raw cosines of a small model sit in a narrow band
        (0.2-0.6) whatever the query, so only their order within this session
        says something. Only those candidates come back from the matrix."""
        if LEXICAL_EXPANSION_ITEMS and lexical:
            strongest = heapq.nlargest(LEXICAL_EXPANSION_ITEMS, lexical, key=lexical.__getitem__)
            query_vector = self.vectors.expanded(query_vector, strongest, LEXICAL_EXPANSION_WEIGHT)
        best = self.vectors.best(query_vector, below, DENSE_CANDIDATES)
        if not best:
            return lexical
        top = max(lexical.values(), default=0.0) or 1.0
        combined = {p: HYBRID_LEXICAL_WEIGHT * s / top for p, s in lexical.items()}
        dense_weight = 1.0 - HYBRID_LEXICAL_WEIGHT
        floor = best[-1][1]
        span = (best[0][1] - floor) or 1.0
        for position, cosine in best:
            value = (cosine - floor) / span
            if value > 0:
                combined[position] = combined.get(position, 0.0) + dense_weight * value
        return combined


def _size_of(memory: SessionMemory) -> int:
    return max(1, memory.nbytes)


class MemoryStore:
    """The retrieval memories of this replica's recently used sessions,
    bounded in sessions, in items and bytes per session, and in bytes in all
    (least recently used sessions leave): an item bound alone let a few
    sessions of large items hold far more than the local cache's bound."""

    def __init__(
        self,
        read_range: RangeReader,
        *,
        max_sessions: int = 1000,
        ttl_seconds: float = 300.0,
        max_items: int = 20_000,
        max_bytes_per_session: int = 64 * 1024 * 1024,
        max_bytes: int = 256 * 1024 * 1024,
        offload: Offload = inline,
    ) -> None:
        self._read_range = read_range
        # Indexing is CPU work proportional to bytes: state_service/heavy_work.py.
        self._offload = offload
        self._max_sessions = max_sessions
        self._memories: TTLCache[tuple[str, str], SessionMemory] = CountingTTLCache(
            MEMORY_CACHE_NAME, maxsize=max_bytes, ttl=ttl_seconds, getsizeof=_size_of
        )
        self.max_items = max_items
        # A memory larger than the whole bound could not be stored at all.
        self.max_bytes_per_session = min(max_bytes_per_session, max_bytes)
        self._bytes = metrics.RETRIEVAL_MEMORY_BYTES
        self._bytes.set(0)

    def get(self, tenant: str, session_id: str) -> SessionMemory | None:
        return self._memories.get((tenant, session_id))

    def sessions_of(self, tenant: str) -> list[str]:
        """The sessions of `tenant` this replica holds a memory of (erasure)."""
        return [session for owner, session in list(self._memories) if owner == tenant]

    def drop(self, tenant: str, session_id: str) -> None:
        self._memories.pop((tenant, session_id), None)
        self._bytes.set(self._memories.currsize)

    def clear(self) -> None:
        self._memories.clear()
        self._bytes.set(0)

    def _put(self, key: tuple[str, str], memory: SessionMemory) -> None:
        # The cache weighs a value when it is inserted; a memory grows after
        # that, so it is taken out and put back to be weighed again (and to
        # make room, least recently used first, for what it has become).
        self._memories.pop(key, None)
        if _size_of(memory) <= self._memories.maxsize:  # else it serves this request only
            self._memories[key] = memory
        while len(self._memories) > self._max_sessions:
            self._memories.popitem()
        self._bytes.set(self._memories.currsize)

    async def sync(
        self,
        tenant: str,
        session_id: str,
        head: SessionHead,
        tail_start: int | None = None,
        tail: Sequence[LogEntry] = (),
    ) -> SessionMemory:
        """The session's memory caught up to `head` (whose newest entries from
        log index `tail_start` on are `tail`, already read)."""
        key = (tenant, session_id)
        memory = self._memories.get(key)
        if (
            memory is None
            or memory.incarnation != head.incarnation
            or memory.trunc != head.trunc
            or head.item_count - memory.start_index > 2 * self.max_items
        ):
            memory = SessionMemory(
                head.incarnation, head.trunc, max(0, head.item_count - self.max_items)
            )
            self._put(key, memory)
        fetch_until = head.item_count if tail_start is None else tail_start
        while memory.end_index < fetch_until:
            begin = memory.end_index
            stop = min(fetch_until, begin + FETCH_CHUNK) - 1
            now, entries = await self._read_range(tenant, session_id, begin, stop)
            if now is None or now.incarnation != head.incarnation or now.trunc != head.trunc:
                self.drop(tenant, session_id)
                raise StaleMemory(session_id)
            memory = await self._offload(
                functools.partial(_catch_up, memory, begin, entries, self.max_bytes_per_session)
            )
            if not entries:
                break
        if tail_start is not None:
            memory = await self._offload(
                functools.partial(_catch_up, memory, tail_start, tail, self.max_bytes_per_session)
            )
        # Weighs it again, and keeps it fresh for LRU/TTL purposes.
        self._put(key, memory)
        return memory
