"""Optional dense embeddings from any OpenAI-compatible /v1/embeddings endpoint,
combined with BM25 scores (hybrid retrieval) when configured."""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from typing import Any

from state_service.cache import CountingTTLCache

# Vectors of item texts this replica embedded, by a hash of the text: a
# retrieval memory rebuilt after its session left the process (LRU, TTL) or
# outgrew its bound gets its vectors back without calling the endpoint again.
# Bounded in bytes (a 384-dimension vector is 1.5 KiB: ~20,000 of them).
EMBEDDING_CACHE_BYTES = 32 * 1024 * 1024
EMBEDDING_CACHE_TTL_SECONDS = 3600.0
# The cache label of statecar_state_cache_evictions_total.
EMBEDDING_CACHE_NAME = "embeddings"
_ENTRY_OVERHEAD = 96  # key, array header, the cache's own bookkeeping


class EmbeddingError(Exception):
    """The embeddings endpoint failed; callers fall back to lexical retrieval."""


def normalized(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class Embedder:
    def __init__(
        self,
        client: Any,
        *,
        model: str,
        timeout: float = 10.0,
        batch: int = 64,
        cache_bytes: int = EMBEDDING_CACHE_BYTES,
    ) -> None:
        self._client = client  # an openai.AsyncOpenAI
        self._model = model
        self._timeout = timeout
        self.batch = batch
        self._known: CountingTTLCache = CountingTTLCache(
            EMBEDDING_CACHE_NAME,
            maxsize=max(1, cache_bytes),
            ttl=EMBEDDING_CACHE_TTL_SECONDS,
            getsizeof=lambda vector: _ENTRY_OVERHEAD + 4 * len(vector),
        )
        self.calls = 0  # requests sent to the endpoint

    def _key(self, text: str) -> bytes:
        return hashlib.blake2b(f"{self._model}\0{text}".encode(), digest_size=16).digest()

    async def embed_items(self, texts: Sequence[str]) -> list[list[float]]:
        """Like `embed`, but each text is sent once per replica while its
        vector stays in the bounded cache. Only for log items: a query's
        vector is never cached, so how fast a read answers says nothing about
        which texts another session holds."""
        keys = [self._key(t) for t in texts]
        found: list[list[float] | None] = []
        for key in keys:
            cached = self._known.get(key)
            found.append(None if cached is None else cached.tolist())
        missing = [i for i, vector in enumerate(found) if vector is None]
        if missing:
            fresh = await self.embed([texts[i] for i in missing])
            for i, vector in zip(missing, fresh, strict=True):
                found[i] = vector
                stored = array("f", vector)
                if self._known.getsizeof(stored) <= self._known.maxsize:
                    self._known[keys[i]] = stored
        return [vector for vector in found if vector is not None]

    async def close(self) -> None:
        await self._client.close()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors of `texts`, in order."""
        if not texts:
            return []
        self.calls += 1
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
