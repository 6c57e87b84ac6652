"""The compression parts a state service runs with, built from its settings,
and the numbers a session's strategy setting is stored as."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from state_service.compression.embeddings import Embedder, EmbeddingError
from state_service.compression.memory import MemoryStore, RangeReader
from state_service.compression.strategies import Shares, Strategy
from state_service.compression.summarizer import (
    ExtractiveSummarizer,
    LLMSummarizer,
    Summarizer,
    SummaryInput,
)
from state_service.compression.worker import (
    CompressionPolicy,
    Compressor,
    SummaryCodec,
    SummaryReader,
)
from state_service.heavy_work import Offload, inline
from state_service.settings import StateServiceSettings
from state_service.storage.redis import RedisStorage, SessionHead
from state_service.tokens import TokenCounter

# A session's strategy setting in its meta hash ("strat"; 0 = service
# default). Stored data: these numbers never change. (They were the API's
# ContextStrategy numbers when the setting was introduced; the API's mapping
# lives in grpc_convert.py and may diverge.)
STRATEGY_OF_CODE: dict[int, Strategy] = {
    1: Strategy.SLIDING_WINDOW,
    2: Strategy.TOKEN_WINDOW,
    3: Strategy.SUMMARY,
    4: Strategy.RETRIEVAL,
    5: Strategy.TIERED,
}
CODE_OF_STRATEGY = {strategy: code for code, strategy in STRATEGY_OF_CODE.items()}
TIER_SHARE_SETTINGS = ("tier_recent_share", "tier_summary_share", "tier_retrieval_share")


@dataclass
class Compression:
    default_strategy: Strategy
    default_shares: Shares
    sliding_window_items: int
    memories: MemoryStore
    summaries: SummaryReader
    compressor: Compressor | None
    embedder: Embedder | None
    embed_timeout: float
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def strategy_of(self, head: SessionHead | None) -> Strategy:
        if head is not None and head.strategy:
            found = STRATEGY_OF_CODE.get(head.strategy)
            if found is not None:
                return found
        return self.default_strategy

    def shares_of(self, head: SessionHead | None) -> Shares:
        if head is not None and head.shares:
            decoded = Shares.decode(head.shares)
            if decoded is not None and decoded.problem() is None:
                return decoded
        return self.default_shares

    async def embed_query(self, query: str) -> Sequence[float] | None:
        """The query's vector, or None (no endpoint, or it failed or was slow:
        retrieval then stays lexical)."""
        if self.embedder is None or not query:
            return None
        try:
            async with asyncio.timeout(self.embed_timeout):
                (vector,) = await self.embedder.embed([query])
        except (EmbeddingError, TimeoutError):
            return None
        return vector

    def start(self) -> None:
        if self.compressor is not None:
            self.compressor.start()

    async def stop(self) -> None:
        if self.compressor is not None:
            await self.compressor.stop()
        for close in self.closers:
            await close()

    def clear(self) -> None:
        self.memories.clear()


class OffloadedSummarizer:
    """A CPU-bound summarizer (the extractive one) run off the event loop: its
    fold is plain computation inside a coroutine, so it runs to completion on
    a private loop in the heavy-work thread."""

    def __init__(self, inner: Summarizer, offload: Offload) -> None:
        self._inner = inner
        self._offload = offload
        self.name = inner.name

    async def fold(self, previous: str, items: Sequence[SummaryInput]) -> str:
        inner = self._inner
        return await self._offload(lambda: asyncio.run(inner.fold(previous, items)))


def _openai_client(base_url: str, api_key: str, timeout: float) -> Any:
    from openai import AsyncOpenAI

    # Retries are ours to decide (the summarizer just lags); keep calls bounded.
    return AsyncOpenAI(
        base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=0
    )


def build_compression(
    settings: StateServiceSettings,
    storage: RedisStorage,
    counter: TokenCounter,
    read_range: RangeReader,
    *,
    seal: Callable[[str, str, bytes], bytes] | None = None,
    open_: Callable[[str, str, bytes], bytes] | None = None,
    summarizer: Summarizer | None = None,
    offload: Offload | None = None,
) -> Compression:
    """`offload` runs CPU-heavy work (indexing, extractive summaries) off the
    event loop (state_service/heavy_work.py)."""
    default_strategy = Strategy(settings.default_context_strategy)
    memories = MemoryStore(
        read_range,
        max_sessions=settings.retrieval_max_sessions,
        ttl_seconds=settings.cache_ttl_seconds,
        max_items=settings.retrieval_max_items,
        max_bytes_per_session=settings.retrieval_max_session_bytes,
        max_bytes=settings.retrieval_max_bytes,
        offload=offload or inline,
    )
    codec = SummaryCodec(seal, open_)
    summaries = SummaryReader(storage, codec, settings.retrieval_max_sessions)
    embedder = None
    if settings.embeddings_base_url:
        embedder = Embedder(
            _openai_client(
                settings.embeddings_base_url,
                settings.embeddings_api_key.get_secret_value(),
                settings.embeddings_timeout_seconds,
            ),
            model=settings.embeddings_model,
            timeout=settings.embeddings_timeout_seconds,
        )
    if summarizer is None and settings.summarizer == "extractive":
        summarizer = ExtractiveSummarizer(counter, max_tokens=settings.summary_max_tokens)
        if offload is not None:
            summarizer = OffloadedSummarizer(summarizer, offload)
    elif summarizer is None and settings.summarizer == "llm":
        summarizer = LLMSummarizer(
            _openai_client(
                settings.summarizer_base_url,
                settings.summarizer_api_key.get_secret_value(),
                settings.summarizer_timeout_seconds,
            ),
            model=settings.summarizer_model,
            counter=counter,
            max_tokens=settings.summary_max_tokens,
            timeout=settings.summarizer_timeout_seconds,
        )
    closers: list[Callable[[], Awaitable[None]]] = []
    if embedder is not None:
        closers.append(embedder.close)
    if isinstance(summarizer, LLMSummarizer):
        closers.append(summarizer.close)
    compression = Compression(
        default_strategy=default_strategy,
        default_shares=Shares(
            settings.tier_recent_share,
            settings.tier_summary_share,
            settings.tier_retrieval_share,
            # Unless an operator set them, the shares adapt to each log's size.
            adaptive=not settings.model_fields_set & set(TIER_SHARE_SETTINGS),
        ),
        sliding_window_items=settings.sliding_window_items,
        memories=memories,
        summaries=summaries,
        compressor=None,
        embedder=embedder,
        embed_timeout=settings.embeddings_timeout_seconds,
        closers=closers,
    )
    if summarizer is not None or embedder is not None:
        compression.compressor = Compressor(
            storage,
            memories,
            summaries,
            summarizer,
            codec,
            counter,
            policy=CompressionPolicy(
                keep_recent_items=settings.summary_keep_recent_items,
                min_batch_items=settings.summary_min_batch_items,
                max_batch_items=settings.summary_max_batch_items,
                max_batch_bytes=settings.summary_max_batch_bytes,
                min_log_tokens=settings.summary_min_log_tokens,
            ),
            wants_summary=lambda head: compression.strategy_of(head).uses_summary,
            wants_embeddings=lambda head: compression.strategy_of(head).uses_retrieval,
            embedder=embedder,
            workers=settings.compression_workers,
        )
    return compression
