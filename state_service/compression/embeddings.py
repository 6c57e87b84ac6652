"""Optional dense embeddings from any OpenAI-compatible /v1/embeddings endpoint,
combined with BM25 scores (hybrid retrieval) when configured."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class EmbeddingError(Exception):
    """The embeddings endpoint failed; callers fall back to lexical retrieval."""


def normalized(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class Embedder:
    def __init__(self, client: Any, *, model: str, timeout: float = 10.0, batch: int = 64) -> None:
        self._client = client  # an openai.AsyncOpenAI
        self._model = model
        self._timeout = timeout
        self.batch = batch

    async def close(self) -> None:
        await self._client.close()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors of `texts`, in order."""
        if not texts:
            return []
        try:
            response = await self._client.embeddings.create(
                model=self._model,
                input=[t or " " for t in texts],
                timeout=self._timeout,
            )
            data = sorted(response.data, key=lambda d: d.index)
            vectors = [normalized(d.embedding) for d in data]
        except Exception as exc:
            raise EmbeddingError(f"{type(exc).__name__} from the embeddings endpoint") from exc
        if len(vectors) != len(texts):
            raise EmbeddingError("the embeddings endpoint returned a different number of vectors")
        return vectors
