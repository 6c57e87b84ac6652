"""The dense side of hybrid retrieval: a session memory's item vectors in one
float32 matrix, scored against a query with one matrix-vector product.

Vectors arrive in log order (the background worker embeds a memory's oldest
unembedded items first), so "which items have a vector" is one count, not a
scan. A read costs one product over at most the memory's items (bounded by
RETRIEVAL_MAX_ITEMS / _BYTES) and a partial sort; only the best `limit`
positions come back to Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
# Rows are allocated in steps that double, so appending costs O(1) amortised.
_FIRST_ROWS = 64


class VectorStore:
    """Unit-length vectors of positions 0 .. count-1 of a memory."""

    __slots__ = ("_rows", "count")

    def __init__(self) -> None:
        self._rows: Matrix | None = None
        self.count = 0

    @property
    def dim(self) -> int:
        return 0 if self._rows is None else int(self._rows.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held (the allocated rows, not only the used ones)."""
        return 0 if self._rows is None else int(self._rows.nbytes)

    def add(self, first: int, vectors: Sequence[Sequence[float]]) -> bool:
        """Stores the vectors of positions first, first+1, ...; refuses (False)
        when `first` is not the next position without one (another embedding
        run got there first) or the vectors' length changed (another model)."""
        if first != self.count or len(vectors) == 0:
            return False
        block = np.asarray(vectors, dtype=np.float32)
        if block.ndim != 2 or (self._rows is not None and block.shape[1] != self.dim):
            return False
        needed = self.count + len(block)
        if self._rows is None or needed > len(self._rows):
            capacity = max(_FIRST_ROWS, needed, 2 * (0 if self._rows is None else len(self._rows)))
            grown = np.zeros((capacity, block.shape[1]), dtype=np.float32)
            if self._rows is not None:
                grown[: self.count] = self._rows[: self.count]
            self._rows = grown
        self._rows[self.count : needed] = block
        # The worker adds on the event loop while a search may run in the
        # heavy-work thread: rows are written (and a grown matrix swapped in
        # whole) before the count moves, so either count has rows behind it.
        self.count = needed
        return True

    def suffix(self, start: int) -> VectorStore:
        """The vectors of positions start .. count-1, renumbered from 0."""
        out = VectorStore()
        if self._rows is not None and start < self.count:
            out._rows = self._rows[start : self.count].copy()
            out.count = self.count - start
        return out

    def expanded(
        self, query: Sequence[float], positions: Sequence[int], weight: float
    ) -> Sequence[float]:
        """`query` plus `weight` times the mean vector of `positions` (those
        that have one), at unit length: the query moved toward what the
        matching items mean."""
        known = [p for p in positions if 0 <= p < self.count]
        if self._rows is None or not known or weight <= 0 or len(query) != self.dim:
            return query
        moved = np.asarray(query, dtype=np.float32) + weight * self._rows[known].mean(axis=0)
        norm = float(np.linalg.norm(moved))
        if norm == 0.0:
            return query
        result: Matrix = moved / norm
        return result.tolist()  # type: ignore[no-any-return]

    def cosines(self, query: Sequence[float], below: int) -> Matrix:
        """Cosine of each of positions 0 .. min(below, count)-1 with `query`
        (unit vectors: a dot product). Empty when the lengths differ."""
        upto = min(below, self.count)
        if self._rows is None or upto <= 0 or len(query) != self.dim:
            return np.zeros(0, dtype=np.float32)
        vector = np.asarray(query, dtype=np.float32)
        result: Matrix = self._rows[:upto] @ vector
        return result

    def best(self, query: Sequence[float], below: int, limit: int) -> list[tuple[int, float]]:
        """The `limit` positions below `below` most similar to `query`, best first."""
        cosines = self.cosines(query, below)
        if not len(cosines) or limit <= 0:
            return []
        if limit < len(cosines):
            top = np.argpartition(-cosines, limit - 1)[:limit]
        else:
            top = np.arange(len(cosines))
        top = top[np.argsort(-cosines[top], kind="stable")]
        return [(int(p), float(cosines[p])) for p in top]
