"""Okapi BM25 over a session's log, kept incrementally: adding an item costs
O(its terms); a query costs O(postings of its informative terms). Pure Python, no index
files: the index lives in the process and is rebuilt from Redis when lost."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

# A term in more than this share of a session's documents is that session's
# stopword: its idf is below log(2) against about log(n) for a rare term, so
# it barely moves a ranking, while scoring it costs O(n) per read. Skipping
# it keeps a read's cost proportional to the rare terms' postings.
COMMON_TERM_SHARE = 0.5
# Below this many documents every term is scored (shares are noisy there).
COMMON_TERM_MIN_DOCS = 64


class BM25Index:
    """Documents are numbered 0, 1, 2, ... in the order they are added."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, list[tuple[int, int]]] = {}
        self._lengths: list[int] = []
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, doc_terms: Iterable[str]) -> int:
        """Adds a document; returns its number."""
        doc = len(self._lengths)
        counts = Counter(doc_terms)
        for term, tf in counts.items():
            self._postings.setdefault(term, []).append((doc, tf))
        length = sum(counts.values())
        self._lengths.append(length)
        self._total_length += length
        return doc

    def idf(self, term: str) -> float:
        n = len(self._lengths)
        df = len(self._postings.get(term, ()))
        # The "+1" form (Lucene's) keeps every idf positive.
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def scores(self, query_terms: Iterable[str], *, below: int | None = None) -> dict[int, float]:
        """BM25 score of every document (numbered < `below`) that shares a term
        with the query; documents with no shared term are absent. Terms common
        to most documents are not scored (see COMMON_TERM_SHARE)."""
        n = len(self._lengths)
        if n == 0:
            return {}
        average = self._total_length / n or 1.0
        limit = n if below is None else min(below, n)
        common = n * COMMON_TERM_SHARE if n >= COMMON_TERM_MIN_DOCS else n + 1
        result: dict[int, float] = {}
        for term in set(query_terms):
            postings = self._postings.get(term)
            if not postings or len(postings) > common:
                continue
            idf = self.idf(term)
            k1, b = self.k1, self.b
            for doc, tf in postings:
                if doc >= limit:
                    break  # postings are in document order
                norm = k1 * (1.0 - b + b * self._lengths[doc] / average)
                result[doc] = result.get(doc, 0.0) + idf * tf * (k1 + 1.0) / (tf + norm)
        return result
