"""ForkSession against a real state server, on one redis-server and on a real
Redis Cluster (where the source and the new session live in different slots)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from state_service.client import (
    EtagMismatchError,
    InvalidRequestError,
    NewItem,
    SessionAlreadyExistsError,
    SessionNotFoundError,
    StateClient,
    StateServiceError,
    StoredItem,
)
from state_service.errors import ForkSourceChanged
from state_service.forks import CHUNK_ITEMS, SessionForks
from state_service.log import NewItem as DomainItem
from state_service.reader import LogReader
from state_service.sessions import SessionStore
from state_service.storage.embedded import EmbeddedRedis
from state_service.storage.redis import RedisStorage
from state_service.tokens import EstimatingTokenCounter
from tests.conftest import StateServerFactory
from tests.helpers import metric
from tests.redis_cluster import EmbeddedRedisCluster


@pytest.fixture(params=["single", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one redis-server and on a Redis Cluster."""
    return str(request.param)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def same(items: list[StoredItem]) -> list[tuple[Any, ...]]:
    return [(i.seq, i.data, i.metadata, i.create_time) for i in items]


async def conversation(client: StateClient, session_id: str, turns: int) -> None:
    for n in range(turns):
        await client.append_items(
            session_id, [NewItem(user(f"q{n}"), {"turn": str(n)}), assistant(f"a{n}")]
        )


def test_the_forked_pairs_sit_in_different_cluster_slots() -> None:
    # On the cluster, the sessions these tests fork between sit in different
    # slots (3 primaries: usually different nodes), the case one script cannot do.
    for source, new in [("src", "branch"), ("big", "all"), ("busy", "f0"), ("src", "once")]:
        assert key_slot(f"statecar:{{default:{source}}}:m".encode()) != key_slot(
            f"statecar:{{default:{new}}}:m".encode()
        )


async def test_fork_copies_the_prefix_and_leaves_the_source_alone(client: StateClient) -> None:
    await conversation(client, "src", 5)
    before = await client.get_session("src")
    source_items = await client.all_items("src")

    forked = await client.fork_session("src", "branch", up_to_seq=6, request_id="f1")

    assert (forked.copied_item_count, forked.up_to_seq, forked.replayed) == (6, 6, False)
    assert forked.session.session_id == "branch"
    assert (forked.session.item_count, forked.session.last_seq) == (6, 6)
    assert same(await client.all_items("branch")) == same(source_items[:6])
    after = await client.get_session("src")
    # expire_time is computed per read (now + the key's TTL): equal to the ms.
    assert dataclasses.replace(after, expire_time=None) == dataclasses.replace(
        before, expire_time=None
    )
    assert same(await client.all_items("src")) == same(source_items)
    # The fork is a session of its own: it grows past the copied seqs, and
    # its context and listing see it.
    appended = await client.append_items("branch", [user("another path")], etag=forked.session.etag)
    assert appended.first_seq == 7
    context = await client.get_context("branch")
    assert [i.data["content"] for i in context.items][-2:] == ["a2", "another path"]
    assert {s.session_id for s in (await client.list_sessions()).sessions} == {"src", "branch"}
    assert len(await client.all_items("src")) == 10


async def test_fork_of_everything_and_of_more_than_a_chunk(client: StateClient) -> None:
    # 600 items: the copy spans several read and staging chunks.
    for start in range(0, 600, 100):
        await client.append_items("big", [user(f"m{n}") for n in range(start, start + 100)])
    everything = await client.fork_session("big", "all")
    assert (everything.copied_item_count, everything.up_to_seq) == (600, 600)
    assert same(await client.all_items("all")) == same(await client.all_items("big"))
    part = await client.fork_session("big", "part", up_to_seq=300)
    assert part.copied_item_count == 300
    assert [i.seq for i in await client.all_items("part")] == list(range(1, 301))


async def test_fork_skips_popped_seqs(client: StateClient) -> None:
    await client.append_items("s", [user("a"), assistant("b"), user("c")])
    await client.pop_item("s")
    await client.append_items("s", [user("d")])  # seqs now 1, 2, 4
    forked = await client.fork_session("s", "t", up_to_seq=3)
    assert [i.seq for i in await client.all_items("t")] == [1, 2]
    assert (forked.copied_item_count, forked.session.last_seq) == (2, 3)
    assert (await client.append_items("t", [user("e")])).first_seq == 4


async def test_retry_with_the_same_request_id_replays(client: StateClient) -> None:
    await conversation(client, "src", 2)
    first = await client.fork_session("src", "copy", up_to_seq=2, request_id="fork-1")
    await client.append_items("src", [user("later")])
    again = await client.fork_session("src", "copy", up_to_seq=2, request_id="fork-1")
    assert again.replayed
    assert (again.copied_item_count, again.up_to_seq) == (2, 2)
    assert again.session.etag == first.session.etag
    assert len(await client.all_items("copy")) == 2
    # Another request for the same new session is refused: it exists.
    with pytest.raises(SessionAlreadyExistsError) as raised:
        await client.fork_session("src", "copy", request_id="fork-2")
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert raised.value.reason == "SESSION_ALREADY_EXISTS"
    assert raised.value.metadata["session_id"] == "copy"


async def test_concurrent_forks_with_one_request_id_create_one_session(
    client: StateClient,
) -> None:
    await conversation(client, "src", 50)
    results = await asyncio.gather(
        *(client.fork_session("src", "once", request_id="same", up_to_seq=80) for _ in range(4)),
        return_exceptions=True,
    )
    forks = [r for r in results if not isinstance(r, BaseException)]
    # Each attempt either created the session, replayed its record, or (when
    # it checked before the winner installed and installed after) was told
    # the session exists; never two sessions, never a torn one.
    assert sum(1 for r in forks if not r.replayed) <= 1
    for failure in (r for r in results if isinstance(r, BaseException)):
        assert isinstance(failure, SessionAlreadyExistsError)
    assert [i.seq for i in await client.all_items("once")] == list(range(1, 81))


async def test_appends_during_a_fork_never_tear_the_copy(client: StateClient) -> None:
    await conversation(client, "busy", 300)  # 600 items, three chunks
    stop = asyncio.Event()

    async def writer() -> int:
        written = 0
        while not stop.is_set():
            await client.append_items("busy", [user(f"during {written}")])
            written += 1
            await asyncio.sleep(0)
        return written

    task = asyncio.create_task(writer())
    try:
        forks = [await client.fork_session("busy", f"f{n}") for n in range(5)]
    finally:
        stop.set()
    await task
    source = await client.all_items("busy")
    for n, forked in enumerate(forks):
        copied = await client.all_items(f"f{n}")
        # Each fork is exactly the source's prefix up to the seq it reports.
        assert forked.up_to_seq >= 600
        assert len(copied) == forked.copied_item_count == forked.up_to_seq
        assert same(copied) == same(source[: forked.up_to_seq])


async def test_pops_during_a_fork_are_refused_or_not_seen(client: StateClient) -> None:
    await conversation(client, "shrinking", 300)
    stop = asyncio.Event()

    async def popper() -> None:
        while not stop.is_set():
            await client.pop_item("shrinking")
            await client.append_items("shrinking", [user("again")])
            await asyncio.sleep(0)

    task = asyncio.create_task(popper())
    outcomes: list[str] = []
    try:
        for n in range(5):
            try:
                forked = await client.fork_session("shrinking", f"p{n}", up_to_seq=550)
            except EtagMismatchError as changed:
                assert changed.reason == "FORK_SOURCE_CHANGED"
                outcomes.append("refused")
                with pytest.raises(SessionNotFoundError):
                    await client.get_session(f"p{n}")  # nothing half-written
            else:
                outcomes.append("forked")
                assert [i.seq for i in await client.all_items(f"p{n}")] == list(range(1, 551))
                assert forked.copied_item_count == 550
    finally:
        stop.set()
        await task
    assert len(outcomes) == 5


async def test_errors(client: StateClient) -> None:
    await conversation(client, "src", 2)
    with pytest.raises(SessionNotFoundError) as missing:
        await client.fork_session("nope", "new")
    assert missing.value.reason == "SESSION_NOT_FOUND"
    for bad in (-1, 5):
        with pytest.raises(InvalidRequestError) as invalid:
            await client.fork_session("src", "new", up_to_seq=bad)
        assert invalid.value.metadata["field"] == "up_to_seq"
    with pytest.raises(InvalidRequestError) as invalid:
        await client.fork_session("src", "bad id!")
    assert invalid.value.metadata["field"] == "new_session_id"
    with pytest.raises(InvalidRequestError) as invalid:
        await client.fork_session("", "new")
    assert invalid.value.metadata["field"] == "source_session_id"
    with pytest.raises(SessionAlreadyExistsError):
        await client.fork_session("src", "src")
    # None of the refusals wrote anything.
    assert {s.session_id for s in (await client.list_sessions()).sessions} == {"src"}
    with pytest.raises(SessionNotFoundError):
        await client.get_session("new")


async def test_fork_limit_is_enforced(state_server_factory: StateServerFactory) -> None:
    server = await state_server_factory(max_fork_items=300)
    async with StateClient(server.address) as client:
        await conversation(client, "src", 200)
        with pytest.raises(InvalidRequestError) as too_many:
            await client.fork_session("src", "all")
        assert too_many.value.metadata["field"] == "up_to_seq"
        assert "300" in too_many.value.message
        with pytest.raises(SessionNotFoundError):
            await client.get_session("all")
        assert (await client.fork_session("src", "some", up_to_seq=300)).copied_item_count == 300


async def test_fork_inherits_settings_with_a_fresh_ttl(client: StateClient) -> None:
    await conversation(client, "src", 1)
    await client.update_session("src", ttl=timedelta(hours=2), context_strategy="token_window")
    forked = await client.fork_session("src", "copy")
    assert forked.session.ttl == timedelta(hours=2)
    assert forked.session.context_strategy == "token_window"
    assert forked.session.expire_time is not None
    persisted = await client.update_session("src", persist=True)
    assert persisted.persist
    kept = await client.fork_session("src", "kept")
    assert kept.session.persist
    assert kept.session.expire_time is None


async def test_forks_are_tenant_scoped(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha:token-alpha\nbeta:token-beta\n")
    server = await state_server_factory(auth="token", auth_tokens_file=tokens)
    async with (
        StateClient(server.address, bearer_token="token-alpha") as alpha,
        StateClient(server.address, bearer_token="token-beta") as beta,
    ):
        await conversation(alpha, "secret", 2)
        with pytest.raises(SessionNotFoundError):
            await beta.fork_session("secret", "stolen")
        with pytest.raises(SessionNotFoundError):
            await beta.get_session("stolen")
        # Beta's own session with alpha's id neither collides nor leaks.
        await beta.append_items("secret", [user("beta's own")])
        forked = await beta.fork_session("secret", "mine")
        assert [i.data["content"] for i in await beta.all_items("mine")] == ["beta's own"]
        assert forked.copied_item_count == 1
        assert len(await alpha.all_items("secret")) == 4
        with pytest.raises(SessionNotFoundError):
            await alpha.get_session("mine")


async def test_fork_of_encrypted_sessions_reseals(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("*:k1:" + "A" * 43 + "=\n")
    server = await state_server_factory(encryption_keys_file=keys)
    async with StateClient(server.address) as client:
        await conversation(client, "src", 3)
        await client.fork_session("src", "copy", up_to_seq=4)
        assert same(await client.all_items("copy")) == same((await client.all_items("src"))[:4])


async def test_unknown_failures_are_not_internal(client: StateClient) -> None:
    with pytest.raises(StateServiceError) as raised:
        await client.fork_session("a", "b", request_id="x" * 200)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- interleavings, made deterministic: the business module over real Redis --


class PoppingStorage(RedisStorage):
    """A storage whose source changes between a fork's chunks, as a concurrent
    PopItem or DeleteSession on another replica would."""

    change: str = ""

    async def fork_read(self, tenant: str, session_id: str, start: int, stop: int) -> Any:
        chunk = await super().fork_read(tenant, session_id, start, stop)
        if start > 0 and self.change == "pop":
            await self.pop(tenant, session_id, request_id="", expected_etag="", now_ms=0)
        elif start == 0 and self.change == "delete-after-first":
            await self.delete(tenant, session_id, expected_etag="")
        elif start == 0 and self.change == "append":
            await self.append(
                tenant,
                session_id,
                [b"x"] * 10,
                request_id="",
                expected_etag="",
                new_incarnation="unused",
                now_ms=0,
            )
        return chunk


@pytest.fixture
async def forks(
    request: pytest.FixtureRequest, redis_backend: str
) -> AsyncIterator[tuple[PoppingStorage, SessionForks, SessionStore]]:
    if redis_backend == "cluster":
        cluster: EmbeddedRedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        storage = PoppingStorage(RedisCluster.from_url(cluster.url, require_full_coverage=False))
    else:
        server: EmbeddedRedis = request.getfixturevalue("redis_server")
        storage = PoppingStorage(redis.asyncio.Redis.from_url(server.url))
    counter = EstimatingTokenCounter()
    reader = LogReader(storage, cache=None, token_counter=counter)
    store = SessionStore(storage, reader, token_counter=counter)
    yield storage, SessionForks(storage, token_counter=counter, max_items=10_000), store
    await storage.close()


async def fill(store: SessionStore, session_id: str, count: int) -> None:
    items = [DomainItem(json=f'{{"role":"user","content":"m{n}"}}'.encode()) for n in range(count)]
    await store.append("t", session_id, items, request_id="", etag="")


@pytest.mark.parametrize("change", ["pop", "delete-after-first"])
async def test_a_source_that_loses_items_mid_copy_is_refused_whole(
    forks: tuple[PoppingStorage, SessionForks, SessionStore], change: str
) -> None:
    storage, forker, store = forks
    await fill(store, "src", CHUNK_ITEMS * 2 + 10)
    storage.change = change
    with pytest.raises(ForkSourceChanged):
        await forker.fork("t", "src", "new", up_to_seq=0, request_id="r")
    assert (await storage.heads("t", ["new"])) == [None]
    # Neither the new session nor a staging list is left in its slot.
    keys = storage.keys("t", "new")
    raw: Any = storage._redis
    for key in (*keys.as_list(), storage.fork_staging_key("t", "new", "*")):
        assert not [k async for k in _scan(raw, key)], key


async def test_appends_between_chunks_are_not_copied(
    forks: tuple[PoppingStorage, SessionForks, SessionStore],
) -> None:
    storage, forker, store = forks
    await fill(store, "src", CHUNK_ITEMS + 5)
    storage.change = "append"
    result = await forker.fork("t", "src", "new", up_to_seq=0, request_id="r")
    assert result.copied == result.up_to_seq == CHUNK_ITEMS + 5
    (head,) = await storage.heads("t", ["src"])
    assert head is not None and head.item_count == CHUNK_ITEMS + 15


async def _scan(raw: Any, pattern: str) -> AsyncIterator[bytes]:
    if isinstance(raw, RedisCluster):
        async for key in raw.scan_iter(match=pattern, target_nodes=RedisCluster.PRIMARIES):
            yield key
    else:
        async for key in raw.scan_iter(match=pattern):
            yield key


async def test_fork_metrics(client: StateClient) -> None:
    await conversation(client, "src", 3)
    forks, copied = "statecar_state_forks_total", "statecar_state_fork_items_copied_total"
    replays = ("statecar_state_idempotent_replays_total", {"operation": "fork"})
    before = (metric(forks), metric(copied), metric(replays[0], **replays[1]))
    await client.fork_session("src", "a", up_to_seq=4, request_id="m1")
    await client.fork_session("src", "a", up_to_seq=4, request_id="m1")  # replayed
    with pytest.raises(SessionAlreadyExistsError):
        await client.fork_session("src", "a")  # refused: not counted
    after = (metric(forks), metric(copied), metric(replays[0], **replays[1]))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 4, 1]
