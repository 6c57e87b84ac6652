"""The local cache's byte bound covers what its tails' memos hold: prepared
results never carry more item bytes than their tail, and the cache charges
each tail twice its JSON for them."""

from __future__ import annotations

from state_service import log
from state_service.cache import MEMO_MAX, CachedTail, SessionCache
from state_service.storage.redis import SessionHead


def tail_of(items: int, size: int) -> CachedTail:
    head = SessionHead("inc", 1, items, items, 0, 0, 0, 0, -1)
    entries = tuple(
        log.describe(log.Item(seq, b'{"content":"' + b"x" * size + b'"}'), 1)
        for seq in range(1, items + 1)
    )
    return CachedTail.of(head, 0, entries)


def test_a_memo_never_holds_more_item_bytes_than_its_tail() -> None:
    tail = tail_of(4, 100)
    for i in range(10):
        tail.remember(("shape", i), object(), tail.size // 3)
        assert tail.memo.item_bytes <= tail.size
    assert 0 < len(tail.memo) <= 3
    tail.remember("too big", object(), tail.size + 1)
    assert "too big" not in tail.memo


def test_a_memo_is_bounded_in_entries() -> None:
    tail = tail_of(2, 10)
    for i in range(MEMO_MAX * 3):
        tail.remember(i, i)
    assert len(tail.memo) <= MEMO_MAX


def test_the_cache_charges_a_tail_for_its_memo() -> None:
    cache = SessionCache(max_sessions=100, ttl_seconds=60, max_items=1000, max_bytes=80_000)
    for n in range(20):
        cache.put("t", f"s{n}", tail_of(10, 1000))  # ~10 KB of JSON each
    held = [cache.get("t", f"s{n}") for n in range(20)]
    kept = [tail for tail in held if tail is not None]
    # A session keeps at most an eighth of the bound as JSON (9 of its 10
    # items, 9,126 bytes), charged twice: four fit in 80 KB, not eight.
    assert [tail.size for tail in kept] == [9126] * 4
    assert held[-4:] == kept
    assert sum(2 * tail.size for tail in kept) <= 80_000
