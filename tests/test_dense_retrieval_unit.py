"""Dense retrieval's vector store and hybrid fusion, and items' own speaker and
original time (synthetic data: unit checks only; quality figures come from
bench/context_quality.py on real conversations)."""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest

from state_service.compression import memory as memory_module
from state_service.compression.dense import VectorStore
from state_service.compression.embeddings import Embedder
from state_service.compression.engine import _openai_client
from state_service.compression.memory import SessionMemory, said_on
from state_service.compression.summarizer import LLMSummarizer, SummaryInput
from state_service.log import Item, LogEntry, describe
from state_service.tokens import EstimatingTokenCounter
from tests.fake_openai_compression import FakeOpenAI

COUNTER = EstimatingTokenCounter()


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def entry(seq: int, role: str, text: str, **fields: object) -> LogEntry:
    raw = json.dumps({"role": role, "content": text}).encode()
    metadata = fields.pop("metadata", {})
    assert isinstance(metadata, dict)
    item = Item(seq=seq, json=raw, metadata=metadata, **fields)  # type: ignore[arg-type]
    return describe(item, COUNTER.count(raw))


def test_vector_store_keeps_positions_in_order_and_refuses_gaps() -> None:
    store = VectorStore()
    assert store.add(0, [unit(1, 0), unit(0, 1)])
    assert not store.add(5, [unit(1, 1)])  # not the next position
    assert not store.add(2, [unit(1, 0, 0)])  # another model's length
    for n in range(200):  # grows past its first allocation
        assert store.add(store.count, [unit(1, n + 1)])
    assert store.count == 202
    assert store.nbytes >= 202 * 2 * 4


def test_best_is_the_top_cosines_below_the_cut_best_first() -> None:
    store = VectorStore()
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.add(0, vectors.tolist())
    query = vectors[17].tolist()
    best = store.best(query, below=250, limit=10)
    expected = np.argsort(-(vectors[:250] @ vectors[17]))[:10]
    assert [p for p, _ in best] == expected.tolist()
    assert best[0][0] == 17 and abs(best[0][1] - 1.0) < 1e-5
    assert all(p < 250 for p, _ in store.best(query, below=250, limit=1000))
    assert store.best(unit(1, 0), below=250, limit=5) == []  # wrong length: nothing


def test_suffix_renumbers_from_the_cut() -> None:
    store = VectorStore()
    store.add(0, [unit(1, 0), unit(0, 1), unit(1, 1)])
    tail = store.suffix(1)
    assert tail.count == 2
    assert tail.best(unit(0, 1), below=2, limit=1)[0][0] == 0


def test_hybrid_finds_a_paraphrase_lexical_search_cannot() -> None:
    log = [
        entry(1, "user", "We adopted a puppy from the shelter."),
        entry(2, "assistant", "The weather was grey all week."),
        entry(3, "user", "Work meetings ran late again."),
        entry(4, "assistant", "Lunch was a sandwich."),
    ]
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    assert memory.unembedded(10) == [0, 1, 2, 3]
    vectors = [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1), unit(0, 1, 1)]
    assert memory.add_vectors([0, 1], vectors[:2])
    assert not memory.add_vectors([0, 1], vectors[:2])  # already there
    assert memory.add_vectors([2, 3], vectors[2:])
    assert memory.unembedded(10) == [] and memory.has_vectors
    query = "new dog in the family?"
    assert memory.search(query, below_index=4, budget=1000) == []
    found = memory.search(query, below_index=4, budget=1000, query_vector=unit(1, 0.1, 0))
    best = max(found, key=lambda pair: pair[1])
    assert best[0].seq == 1


def test_only_the_dense_candidates_are_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "DENSE_CANDIDATES", 3)
    memory = SessionMemory("inc", 0, 0)
    memory.extend([entry(n + 1, "other", f"note {n}") for n in range(50)])
    memory.add_vectors(list(range(50)), [unit(1, n / 10) for n in range(50)])
    # "other" items lend nothing to neighbours: what is found is what was scored.
    found = memory.search("zzz", below_index=50, budget=10_000, query_vector=unit(1, 0))
    assert 1 <= len(found) <= 3
    assert found[0][0].seq == 1


def test_fitted_keeps_vectors_aligned_and_counts_their_bytes() -> None:
    memory = SessionMemory("inc", 0, 0)
    memory.extend([entry(n + 1, "user", f"message number {n} " + "x" * 200) for n in range(40)])
    memory.add_vectors(list(range(40)), [unit(1, n) for n in range(40)])
    assert memory.nbytes > memory.size
    fitted = memory.fitted(memory.nbytes // 2)
    assert fitted is not memory and fitted.vectors.count == len(fitted.entries)
    first = 40 - len(fitted.entries)
    (position, _), *_ = fitted.vectors.best(unit(1, first), below=len(fitted.entries), limit=1)
    assert position == 0


def test_an_items_own_speaker_and_time_are_searchable_and_quoted() -> None:
    may_8 = int(datetime.datetime(2023, 5, 8, 13, 56, tzinfo=datetime.UTC).timestamp() * 1000)
    june_9 = int(datetime.datetime(2023, 6, 9, tzinfo=datetime.UTC).timestamp() * 1000)
    log = [
        entry(1, "user", "I finished the quilt.", speaker="Ingrid", original_ms=may_8),
        entry(2, "assistant", "Well done!", speaker="Tomasz", original_ms=may_8),
        entry(3, "user", "Started a second quilt.", speaker="Ingrid", original_ms=june_9),
        # No own speaker or time: metadata still says them.
        entry(4, "assistant", "Nice weather today.", metadata={"speaker": "Tomasz"}),
    ]
    memory = SessionMemory("inc", 0, 0)
    memory.extend(log)
    assert said_on(may_8) == "8 May 2023"
    assert memory.texts[0] == "Ingrid: I finished the quilt."
    found = memory.search("What did Ingrid do in May 2023?", below_index=4, budget=10_000)
    scores = {e.seq: s for e, s in found}
    assert scores[1] > scores[3]
    assert 4 in {e.seq for e, _ in memory.search("tomasz", below_index=4, budget=10_000)}
    (first,) = memory.inputs([0])
    assert first == SummaryInput(1, "user", "Ingrid: I finished the quilt.", "8 May 2023")


def test_a_text_that_already_names_its_speaker_is_not_prefixed_twice() -> None:
    memory = SessionMemory("inc", 0, 0)
    memory.extend([entry(1, "user", "Ingrid: hello there", speaker="Ingrid")])
    assert memory.texts == ["Ingrid: hello there"]


async def test_the_llm_summarizer_is_shown_when_items_were_said() -> None:
    fake = await FakeOpenAI(replay_summary="#1 user: Ingrid finished a quilt.").start()
    try:
        client = _openai_client(fake.base_url, "", 10.0)
        summarizer = LLMSummarizer(client, model="m", counter=COUNTER)
        try:
            text = await summarizer.fold(
                "", [SummaryInput(1, "user", "Ingrid: quilt done", "8 May 2023")]
            )
        finally:
            await summarizer.close()
    finally:
        await fake.stop()
    assert text == "#1 user: Ingrid finished a quilt."
    (_, body), *_ = fake.requests
    assert "#1 user: [8 May 2023] Ingrid: quilt done" in body["messages"][-1]["content"]


def test_the_dense_query_moves_toward_the_best_lexical_matches() -> None:
    store = VectorStore()
    store.add(0, [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    moved = store.expanded(unit(1, 0, 0), [1, 99], 1.0)  # 99 has no vector: ignored
    assert abs(sum(v * v for v in moved) - 1.0) < 1e-5
    assert moved[1] > 0.5 and moved[2] == 0.0
    assert store.expanded(unit(1, 0, 0), [], 1.0) == unit(1, 0, 0)
    assert store.expanded(unit(1, 0), [1], 1.0) == unit(1, 0)  # another model's length


async def test_item_vectors_are_embedded_once_per_replica_within_the_bound() -> None:
    fake = await FakeOpenAI().start()
    try:
        embedder = Embedder(_openai_client(fake.base_url, "", 10.0), model="m")
        small = Embedder(_openai_client(fake.base_url, "", 10.0), model="m", cache_bytes=200)
        try:
            first = await embedder.embed_items(["a red car", "a doctor"])
            again = await embedder.embed_items(["a doctor", "a red car", "a new one"])
            assert embedder.calls == 2  # the second call sent only "a new one"
            assert np.allclose(again[0], first[1]) and np.allclose(again[1], first[0])
            assert [p for p, _ in fake.requests][-1].endswith("/embeddings")
            assert fake.requests[-1][1]["input"] == ["a new one"]
            await embedder.embed(["a red car"])  # a query: never cached
            assert embedder.calls == 3
            # A bound smaller than one vector keeps none (and does not fail).
            await small.embed_items(["one", "two"])
            await small.embed_items(["one", "two"])
            assert small.calls == 2
        finally:
            await embedder.close()
            await small.close()
    finally:
        await fake.stop()
