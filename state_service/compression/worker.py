"""The background summarizer: folds new log items into a session's stored
summary, off the request path.

Appends (and reads that find the summary lagging) call `notify`; a few worker
tasks per replica drain a de-duplicated queue. One run reads the session head,
folds only the items after the stored summary's covered-up-to seq (leaving the
newest few for the verbatim window), and commits with a compare-and-set on
covered-up-to in Redis: of two replicas folding the same range, one commits and
the other finds a conflict and starts over from the new summary. A summarizer
failure only means the summary lags: appends and reads never wait for it.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from state_service import metrics
from state_service.compression.embeddings import Embedder, EmbeddingError
from state_service.compression.memory import MemoryStore, SessionMemory, StaleMemory
from state_service.compression.strategies import StoredSummary
from state_service.compression.summarizer import Summarizer
from state_service.log import LogEntry
from state_service.storage.redis import RedisStorage, SessionHead, SummaryCommit
from state_service.tokens import TokenCounter

logger = logging.getLogger("statecar.state.compression")


class RunOutcome(enum.StrEnum):
    """What one look at a session did to its summary."""

    COMMITTED = "committed"
    CONFLICT = "conflict"  # another replica moved the summary first
    STALE = "stale"  # the log changed meanwhile
    FAILED = "failed"  # the summarizer failed
    SKIPPED = "skipped"  # nothing (enough) to fold


_COMMIT_OUTCOMES = {
    SummaryCommit.OK: RunOutcome.COMMITTED,
    SummaryCommit.CONFLICT: RunOutcome.CONFLICT,
    SummaryCommit.STALE: RunOutcome.STALE,
}


@dataclass(frozen=True, slots=True)
class CompressionPolicy:
    keep_recent_items: int = 8
    min_batch_items: int = 8
    max_batch_items: int = 200
    # The items' JSON bytes one fold may take (at least one item): a fold is
    # one job of the heavy-work thread, which other tenants wait behind.
    max_batch_bytes: int = 1024 * 1024
    failure_backoff_seconds: float = 5.0
    # A log with fewer tokens fits any default budget whole, so a summary of
    # it would never be read: appends leave it alone (0: look after every
    # append). A read that finds a summary lacking schedules one regardless.
    min_log_tokens: int = 0


def _seq_of(entry: LogEntry) -> int:
    return entry.seq


class SummaryCodec:
    """Seals and opens summary text (encryption at rest when configured)."""

    def __init__(
        self,
        seal: Callable[[str, str, bytes], bytes] | None = None,
        open_: Callable[[str, str, bytes], bytes] | None = None,
    ) -> None:
        self._seal = seal
        self._open = open_

    def seal(self, tenant: str, session_id: str, text: str) -> bytes:
        raw = text.encode()
        return raw if self._seal is None else self._seal(tenant, session_id, raw)

    def open(self, tenant: str, session_id: str, stored: bytes) -> str:
        raw = stored if self._open is None else self._open(tenant, session_id, stored)
        return raw.decode()


class SummaryReader:
    """Stored summaries through a small local cache keyed by (incarnation,
    covered-up-to): a summary with both fixed never changes."""

    def __init__(self, storage: RedisStorage, codec: SummaryCodec, max_sessions: int) -> None:
        self._storage = storage
        self._codec = codec
        self._cache: LRUCache[tuple[str, str], tuple[str, int, StoredSummary]] = LRUCache(
            maxsize=max_sessions
        )

    async def get(self, tenant: str, session_id: str, head: SessionHead) -> StoredSummary | None:
        if head.summary_upto <= 0:
            return None
        key = (tenant, session_id)
        cached = self._cache.get(key)
        if cached is not None and cached[:2] == (head.incarnation, head.summary_upto):
            return cached[2]
        record = await self._storage.summary(tenant, session_id)
        if record is None or record.incarnation != head.incarnation:
            return None
        summary = StoredSummary(
            self._codec.open(tenant, session_id, record.text), record.first_seq, record.last_seq
        )
        self._cache[key] = (record.incarnation, record.last_seq, summary)
        return summary


class Compressor:
    def __init__(
        self,
        storage: RedisStorage,
        memories: MemoryStore,
        summaries: SummaryReader,
        summarizer: Summarizer | None,
        codec: SummaryCodec,
        counter: TokenCounter,
        *,
        policy: CompressionPolicy,
        wants_summary: Callable[[SessionHead], bool],
        wants_embeddings: Callable[[SessionHead], bool],
        embedder: Embedder | None = None,
        workers: int = 1,
        max_pending: int = 10_000,
    ) -> None:
        self._storage = storage
        self._memories = memories
        self._summaries = summaries
        self._summarizer = summarizer
        self._codec = codec
        self._counter = counter
        self.policy = policy
        self._wants_summary = wants_summary
        self._wants_embeddings = wants_embeddings
        self._embedder = embedder
        self._workers = workers
        self._queue: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue(max_pending)
        self._pending: set[tuple[str, str]] = set()
        self._backoff_until: dict[tuple[str, str], float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        self._stopping = False
        # Uncovered items per recently seen session: the summary-lag gauge.
        self._lags: LRUCache[tuple[str, str], int] = LRUCache(maxsize=max_pending)
        # (summary covered-up-to seq, newest seq) a run last saw per session,
        # so an append that cannot make a batch yet schedules nothing.
        self._seen: LRUCache[tuple[str, str], tuple[int, int]] = LRUCache(maxsize=max_pending)
        metrics.SUMMARY_LAG.set_function(lambda: float(sum(self._lags.values())))

    def record_lag(self, tenant: str, session_id: str, lag: int) -> None:
        self._lags[(tenant, session_id)] = lag

    def appended(self, tenant: str, session_id: str, *, last_seq: int, log_tokens: int) -> None:
        """An append landed: schedules a look only when the log has outgrown
        what a budget holds whole and a run could have something to do, so the
        common append costs nothing here (no Redis read, no task)."""
        policy = self.policy
        if 0 <= log_tokens < policy.min_log_tokens:
            return
        seen = self._seen.get((tenant, session_id))
        if seen is not None and self._embedder is None:
            covered, newest = seen
            if newest <= last_seq and (
                last_seq - covered - policy.keep_recent_items < policy.min_batch_items
            ):
                return
        self.notify(tenant, session_id)

    def notify(self, tenant: str, session_id: str, *, force: bool = False) -> None:
        """Schedules a look at the session (never blocks, never fails)."""
        key = (tenant, session_id)
        if key in self._pending:
            return
        if self._backoff_until.get(key, 0.0) > time.monotonic():
            return
        try:
            self._queue.put_nowait((tenant, session_id, force))
        except asyncio.QueueFull:
            metrics.COMPRESSION_RUNS.labels("dropped").inc()
            return
        self._pending.add(key)
        self._idle.clear()

    def start(self) -> None:
        for n in range(self._workers):
            self._tasks.append(asyncio.create_task(self._run(), name=f"compressor-{n}"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A client library may turn a cancellation into an error of its own
            # (redis-py: a timeout); the flag ends the loop then, and the wait
            # is bounded either way.
            _, pending = await asyncio.wait(self._tasks, timeout=5)
            for task in pending:
                task.cancel()
        self._tasks.clear()

    async def idle(self) -> None:
        """Waits until nothing is queued or running (tests, benchmarks)."""
        while not (self._queue.empty() and self._busy == 0):
            self._idle.clear()
            await self._idle.wait()

    async def _run(self) -> None:
        while not self._stopping:
            tenant, session_id, force = await self._queue.get()
            self._pending.discard((tenant, session_id))
            self._busy += 1
            try:
                await self.run_once(tenant, session_id, force=force)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                logger.exception("compression of a session failed")
            finally:
                self._busy -= 1
                if self._queue.empty() and self._busy == 0:
                    self._idle.set()

    async def run_once(self, tenant: str, session_id: str, *, force: bool = False) -> RunOutcome:
        """One look at a session: embed new items, fold new items into the
        summary."""
        key = (tenant, session_id)
        head = (
            await self._storage.read(tenant, session_id, window=0, operation="compression_head")
        ).head
        if head is None:
            return RunOutcome.SKIPPED
        self._seen[key] = (head.summary_upto, head.last_seq)
        summarizer = self._summarizer
        want_summary = summarizer is not None and (force or self._wants_summary(head))
        want_vectors = self._embedder is not None and (force or self._wants_embeddings(head))
        if not (want_summary or want_vectors):
            return RunOutcome.SKIPPED
        # Seqs bound the uncovered items from above: skip the catch-up when
        # even that bound is below a batch (the common case after an append).
        uncovered = head.last_seq - head.summary_upto - self.policy.keep_recent_items
        if not want_vectors and uncovered < self.policy.min_batch_items:
            return RunOutcome.SKIPPED
        try:
            memory = await self._memories.sync(tenant, session_id, head)
        except StaleMemory:
            self.notify(tenant, session_id, force=force)
            return RunOutcome.STALE
        if want_vectors and self._embedder is not None:
            await self._embed(memory)
        if summarizer is None or not want_summary:
            return RunOutcome.SKIPPED
        covered = head.summary_upto
        last_eligible = memory.end_index - self.policy.keep_recent_items
        # Entries are in seq order: the uncovered ones start after `covered`,
        # found by bisection (the work is the uncovered items', not the log's).
        first_uncovered = bisect.bisect_right(memory.entries, covered, key=_seq_of)
        positions = list(range(first_uncovered, max(0, memory.position_of(last_eligible))))
        self.record_lag(tenant, session_id, len(positions))
        if len(positions) < self.policy.min_batch_items:
            return RunOutcome.SKIPPED
        batch = self._batch(memory, positions)
        previous = await self._summaries.get(tenant, session_id, head)
        if covered and previous is None:
            return RunOutcome.STALE
        started = time.perf_counter()
        try:
            text = await summarizer.fold(previous.text if previous else "", memory.inputs(batch))
        except Exception:
            metrics.COMPRESSION_RUNS.labels("failed").inc()
            metrics.COMPRESSION_SECONDS.labels(summarizer.name).observe(
                time.perf_counter() - started
            )
            self._backoff_until[key] = time.monotonic() + self.policy.failure_backoff_seconds
            logger.warning("summarizer failed; the summary of a session lags", exc_info=True)
            return RunOutcome.FAILED
        metrics.COMPRESSION_SECONDS.labels(summarizer.name).observe(time.perf_counter() - started)
        first_seq = previous.first_seq if previous else memory.entries[batch[0]].seq
        if previous is None and memory.start_index > 0:
            first_seq = memory.entries[0].seq
        status = await self._storage.commit_summary(
            tenant,
            session_id,
            incarnation=head.incarnation,
            trunc=head.trunc,
            expected_upto=covered,
            first_seq=first_seq,
            last_seq=memory.entries[batch[-1]].seq,
            text=self._codec.seal(tenant, session_id, text),
            tokens=self._counter.count(text.encode()),
        )
        result = _COMMIT_OUTCOMES[status]
        metrics.COMPRESSION_RUNS.labels(status.value).inc()
        if status is SummaryCommit.OK:
            self.record_lag(tenant, session_id, len(positions) - len(batch))
        self._backoff_until.pop(key, None)
        if result is not RunOutcome.COMMITTED or len(positions) > len(batch):
            # More to fold, or someone else moved the summary: look again.
            self.notify(tenant, session_id, force=force)
        return result

    def _batch(self, memory: SessionMemory, positions: list[int]) -> list[int]:
        """The oldest uncovered positions within the policy's item and byte bounds."""
        batch: list[int] = []
        size = 0
        for position in positions[: self.policy.max_batch_items]:
            size += len(memory.entries[position].item.json)
            if batch and size > self.policy.max_batch_bytes:
                break
            batch.append(position)
        return batch

    async def _embed(self, memory: SessionMemory) -> None:
        assert self._embedder is not None
        while True:
            positions = memory.unembedded(self._embedder.batch)
            if not positions:
                return
            try:
                vectors = await self._embedder.embed_items([memory.texts[p] for p in positions])
            except EmbeddingError:
                metrics.EMBEDDING_FAILURES.inc()
                logger.warning("embeddings endpoint failed; retrieval stays lexical")
                return
            if not memory.add_vectors(positions, vectors):
                return  # another run stored them, or the vectors' length changed
