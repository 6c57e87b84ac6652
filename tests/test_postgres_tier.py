"""The PostgreSQL durable tier against a real PostgreSQL (tests/postgres.py)
and a real redis-server: archive and rehydration (seqs, etags, request_id
replay), PostgreSQL down (hot sessions keep working, the backlog is bounded
and drains), the migrate command, and erasure leaving no rows."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from shared_runtime.process import StartupError
from state_service.client import StateClient
from state_service.client.errors import StateServiceError
from state_service.client.types import ItemRecord
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from state_service.storage.postgres import SCHEMA_VERSION, PostgresTier
from state_service.storage.tiered import REHYDRATE_VERSION_GAP, TieredStorage
from tests.conftest import StateServerFactory
from tests.patience import patience
from tests.postgres import PostgresServer

TENANT = "default"  # authentication off: every caller is this tenant


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def tier(postgres: PostgresServer) -> AsyncIterator[PostgresTier]:
    """A migrated database and a tier on it, for looking at the rows."""
    tier = await PostgresTier.connect(postgres.url)
    await tier.migrate()
    try:
        yield tier
    finally:
        await tier.close()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def start_tiered(
    factory: StateServerFactory, postgres: PostgresServer, **overrides: Any
) -> StateServer:
    values: dict[str, Any] = {
        "postgres_url": postgres.url,
        "postgres_archive_interval_seconds": 0.05,
        "postgres_timeout_seconds": 2.0,
    }
    values.update(overrides)
    return await factory(**values)


def storage_of(server: StateServer) -> TieredStorage:
    assert isinstance(server.storage, TieredStorage)
    return server.storage


async def archived(server: StateServer) -> None:
    """Waits until the archive backlog is empty."""
    storage = storage_of(server)
    deadline = asyncio.get_running_loop().time() + patience(20)
    while await storage.refresh_backlog():
        assert asyncio.get_running_loop().time() < deadline, "the backlog did not drain"
        await asyncio.sleep(0.05)


def message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def all_rows(tier: PostgresTier, tenant: str) -> int:
    return await tier.count_rows(tenant)


def test_redis_only_imports_nothing_of_the_tier() -> None:
    """The default pays nothing: serving without STATE_SERVICE_POSTGRES_URL
    imports neither the driver nor the tier's modules."""
    probe = (
        "import sys, state_service.server, state_service.__main__; "
        "print(sorted(m for m in sys.modules if m.startswith('asyncpg') "
        "or m in ('state_service.storage.tiered', 'state_service.storage.postgres', "
        "'state_service.archiver')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


async def test_migrate_command_is_idempotent(postgres: PostgresServer) -> None:
    env = {**os.environ, "STATE_SERVICE_POSTGRES_URL": postgres.url}
    command = [sys.executable, "-m", "state_service", "migrate"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"schema at {SCHEMA_VERSION}" in first.stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    tier = await PostgresTier.connect(postgres.url)
    try:
        assert await tier.schema_version() == SCHEMA_VERSION
        assert await tier.migrate() == []
    finally:
        await tier.close()


async def test_server_refuses_to_start_without_the_schema(
    postgres: PostgresServer, state_server_factory: StateServerFactory
) -> None:
    with pytest.raises(StartupError, match="state-service migrate"):
        await start_tiered(state_server_factory, postgres)


async def test_everything_archived_comes_back_after_a_flush(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        first = await client.append_items("s1", [message("one"), message("two")], request_id="r1")
        await client.append_items("s1", [message("three")], request_id="r2", etag=first.etag)
        await client.update_session("s1", persist=True)
        await client.pop_item("s1", request_id="p1")
        last = await client.append_items("s1", [message("four")], request_id="r3")
        # Long enough to take several pages to stage (256 entries a page).
        for start in range(0, 600, 200):
            batch = [message(f"item {i}") for i in range(start, start + 200)]
            await client.append_items("s2", batch, request_id=f"b{start}")
        before = await client.all_items("s1")
        before_2 = await client.all_items("s2")
        info = await client.get_session("s1")
        await archived(server)

        await redis.flushall()

        # GetSession, ListItems and GetContext load it back transparently.
        after_info = await client.get_session("s1")
        assert (after_info.item_count, after_info.last_seq) == (info.item_count, info.last_seq)
        incarnation, _, version = info.etag.partition(".")
        new_incarnation, _, new_version = after_info.etag.partition(".")
        assert new_incarnation == incarnation
        # An etag from before can never match again (see REHYDRATE_VERSION_GAP).
        assert int(new_version) == int(version) + REHYDRATE_VERSION_GAP
        assert after_info.persist
        after = await client.all_items("s1")
        assert [(i.seq, i.data) for i in after] == [(i.seq, i.data) for i in before]
        assert [i.seq for i in after] == [1, 2, 4]  # 3 was popped
        context = await client.get_context("s2", token_budget=100_000, max_items=1000)
        assert len(context.items) == 600
        await redis.flushall()
        after_2 = await client.all_items("s2")
        assert [(i.seq, i.data) for i in after_2] == [(i.seq, i.data) for i in before_2]

        # The request_id records came back: a retry is a replay.
        replay = await client.append_items("s1", [message("four")], request_id="r3")
        assert replay.replayed
        assert (replay.first_seq, replay.last_seq, replay.etag) == (
            last.first_seq,
            last.last_seq,
            last.etag,
        )
        # The old etag is refused; the new one appends after the old seqs.
        with pytest.raises(StateServiceError) as refused:
            await client.append_items("s1", [message("five")], etag=info.etag)
        assert refused.value.code == grpc.StatusCode.ABORTED
        appended = await client.append_items("s1", [message("five")], etag=after_info.etag)
        assert appended.first_seq == info.last_seq + 1
        # Loaded sessions are listed again.
        listed = await client.list_sessions()
        assert {s.session_id for s in listed.sessions} == {"s1", "s2"}


async def test_an_expired_session_is_loaded_back_not_recreated(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres, default_ttl_seconds=1)
    async with StateClient(server.address, timeout=5.0) as client:
        await client.append_items("cold", [message("hello"), message("there")])
        await archived(server)
        # Archived, so it got its TTL back and leaves Redis.
        deadline = asyncio.get_running_loop().time() + patience(10)
        while await redis.exists(storage_of(server).keys(TENANT, "cold").meta):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        # Listed while only PostgreSQL has it, with the etag it gets when loaded.
        listed = {s.session_id: s for s in (await client.list_sessions()).sessions}
        assert listed["cold"].item_count == 2
        assert (await client.get_session("cold")).etag == listed["cold"].etag
        await redis.flushall()
        # An unconditional append continues the archived log.
        appended = await client.append_items("cold", [message("again")])
        assert (appended.first_seq, appended.last_seq) == (3, 3)
        assert [i.seq for i in await client.all_items("cold")] == [1, 2, 3]


async def test_postgres_down_hot_sessions_work_backlog_bounded_then_drained(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres, postgres_max_backlog_sessions=3)
    acknowledged: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    async with StateClient(server.address, timeout=5.0) as client:
        for session_id, texts in acknowledged.items():
            await client.append_items(session_id, [message(f"{session_id} 0")])
            texts.append(f"{session_id} 0")
            await archived(server)
        postgres.stop()
        try:
            # Hot sessions: writes and reads keep working.
            for n in range(1, 4):
                for session_id in ("a", "b"):
                    text = f"{session_id} {n}"
                    await client.append_items(session_id, [message(text)])
                    acknowledged[session_id].append(text)
            context = await client.get_context("a")
            assert [i.data["content"] for i in context.items] == acknowledged["a"]
            # Two sessions wait (a, b); once c does too, the backlog is full
            # and writes are refused (it is counted once per archive pass, so
            # a write or two may still pass first), nothing written.
            refused = None
            deadline = asyncio.get_running_loop().time() + patience(10)
            while refused is None:
                try:
                    await client.append_items("c", [message("c refused")])
                    acknowledged["c"].append("c refused")
                except StateServiceError as error:
                    refused = error
                assert asyncio.get_running_loop().time() < deadline
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.reason == "ARCHIVE_BACKLOG"
            assert await storage_of(server).refresh_backlog() <= 3
            # A session Redis does not have needs PostgreSQL to be found.
            with pytest.raises(StateServiceError) as unavailable:
                await client.get_context("never-seen")
            assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
            assert unavailable.value.reason == "DURABLE_TIER_UNAVAILABLE"
        finally:
            postgres.start()
        await archived(server)
        await client.append_items("c", [message("c 1")])
        acknowledged["c"].append("c 1")
        await archived(server)
        await redis.flushall()
        for session_id, texts in acknowledged.items():
            items = await client.all_items(session_id)
            assert [i.data["content"] for i in items] == texts


async def test_delete_removes_the_archived_copy(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        await client.append_items("gone", [message("x")])
        await client.append_items("cold-gone", [message("y")])
        await archived(server)
        await client.delete_session("gone")
        await redis.flushall()
        # Deleting a session only PostgreSQL has (loaded, then deleted).
        await client.delete_session("cold-gone")
        await redis.flushall()
        for session_id in ("gone", "cold-gone"):
            with pytest.raises(StateServiceError) as missing:
                await client.get_session(session_id)
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            # Only the tombstone row is left.
            assert await tier.count_rows(TENANT, session_id) == 1
        # A new session of the same id starts afresh.
        created = await client.append_items("gone", [message("new")])
        assert created.first_seq == 1


async def test_erase_leaves_no_rows(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        for session_id in ("e1", "e2", "e3"):
            await client.append_items(session_id, [message("a"), message("b")], request_id="x")
        await client.delete_session("e3")  # a tombstone is a row too
        await archived(server)
    assert await tier.count_rows(TENANT, "e1") == 4  # session, 2 items, 1 record
    assert await tier.erase_session(TENANT, "e1") == 4
    assert await tier.count_rows(TENANT, "e1") == 0
    assert await tier.erase_tenant(TENANT) == 5  # e2: 4 rows, e3: its tombstone
    assert await all_rows(tier, TENANT) == 0
    assert await tier.erase_tenant(TENANT) == 0


async def test_erase_rpcs_leave_nothing_in_either_store(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    # Archive passes run all the time here, so the erase has to wait for one
    # that is copying the very sessions it erases.
    server = await start_tiered(
        state_server_factory, postgres, postgres_archive_interval_seconds=0.05
    )
    async with StateClient(server.address, timeout=10.0) as client:
        for session_id in ("e1", "e2", "e3"):
            await client.append_items(session_id, [message("a"), message("b")], request_id="x")
        await archived(server)
        await client.append_items("e1", [message("c")])  # marked again, not yet archived
        erased = await client.erase_session("e1")
        assert erased.durable_rows >= 4
        assert await tier.count_rows(TENANT, "e1") == 0
        await asyncio.sleep(0.2)  # passes that ran after it found nothing to bring back
        assert await tier.count_rows(TENANT, "e1") == 0
        with pytest.raises(StateServiceError) as gone:
            await client.get_session("e1")
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        await client.erase_tenant(TENANT)
        await asyncio.sleep(0.2)
    assert await all_rows(tier, TENANT) == 0
    leftover = [key async for key in redis.scan_iter(match=f"*{TENANT}*")]
    assert leftover == []


async def test_an_import_continues_a_session_only_postgres_has(
    postgres: PostgresServer,
    tier: PostgresTier,  # migrated
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        await client.import_items(
            "moved",
            [ItemRecord(1, '{"role":"user","content":"one"}', create_ms=1_600_000_000_000)],
        )
        await archived(server)  # imports are archived like appends
        await redis.flushall()
        imported = await client.import_items(
            "moved", [ItemRecord(2, '{"role":"user","content":"two"}')]
        )
        assert (imported.first_seq, imported.last_seq) == (2, 2)
        listed = (await client.list_items("moved")).items
    assert [(item.seq, item.data["content"]) for item in listed] == [(1, "one"), (2, "two")]


async def test_writes_redis_lost_never_collide_with_the_loaded_state(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    # Archived only when the test says so.
    server = await start_tiered(
        state_server_factory, postgres, postgres_archive_interval_seconds=3600
    )
    assert server.archiver is not None
    async with StateClient(server.address, timeout=5.0) as client:
        kept = await client.append_items("s", [message("kept")])
        assert await server.archiver.pass_once() == 1
        await client.get_context("s")  # the replica caches the tail
        lost = await client.append_items("s", [message("lost")], etag=kept.etag)
        assert [i.data["content"] for i in (await client.get_context("s")).items] == [
            "kept",
            "lost",
        ]
        await redis.flushall()  # Redis loses a write PostgreSQL never had
        context = await client.get_context("s")
        assert [i.data["content"] for i in context.items] == ["kept"]
        # Neither the etag of the lost write nor the one before it matches.
        for stale in (kept.etag, lost.etag):
            with pytest.raises(StateServiceError) as refused:
                await client.append_items("s", [message("stale")], etag=stale)
            assert refused.value.code == grpc.StatusCode.ABORTED
        again = await client.append_items("s", [message("new")], etag=context.etag)
        assert again.first_seq == 2
        assert [i.data["content"] for i in await client.all_items("s")] == ["kept", "new"]


async def test_list_sessions_pages_through_redis_and_the_archive(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        for session_id in ("a", "b", "c", "d", "e"):
            await client.append_items(session_id, [message(session_id)])
        await archived(server)
        await redis.flushall()
        await client.get_session("a")  # loaded: a and c hot, the others archived only
        await client.get_session("c")
        seen: list[str] = []
        token = ""
        while True:
            page = await client.list_sessions(page_size=2, page_token=token)
            assert len(page.sessions) <= 2
            seen.extend(s.session_id for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
        assert seen == ["a", "b", "c", "d", "e"]


async def test_compacted_views_and_forks_work_on_archived_sessions(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(state_server_factory, postgres)
    async with StateClient(server.address, timeout=5.0) as client:
        appended = await client.append_items("src", [message(f"m{i}") for i in range(6)])
        await client.compact_session("src", [message("summary of m0-m5")], etag=appended.etag)
        await client.append_items("taken", [message("x")])
        await archived(server)
        await redis.flushall()
        # The compacted view came back with its session.
        view = await client.get_compacted_view("src")
        assert view.compacted
        assert [i.data["content"] for i in view.items] == ["summary of m0-m5"]
        await redis.flushall()
        # A fork reads an archived source, and refuses a target only PostgreSQL has.
        forked = await client.fork_session("src", "branch", up_to_seq=3)
        assert forked.copied_item_count == 3
        assert [i.data["content"] for i in await client.all_items("branch")] == ["m0", "m1", "m2"]
        with pytest.raises(StateServiceError) as taken:
            await client.fork_session("src", "taken")
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS


async def test_no_acknowledged_write_is_lost_to_concurrent_archive_passes(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    """Writers and archive passes interleave (a pass every ~10 ms, sessions
    with a 1 s TTL once clean): every write acknowledged is in PostgreSQL once
    the backlog has drained, whenever it landed relative to a pass."""
    server = await start_tiered(
        state_server_factory,
        postgres,
        postgres_archive_interval_seconds=0.01,
        default_ttl_seconds=1,
    )
    sessions = ("w0", "w1", "w2")
    acknowledged: dict[str, set[str]] = {sid: set() for sid in sessions}

    async def writer(number: int) -> None:
        async with StateClient(server.address, timeout=10.0) as client:
            for n in range(40):
                session_id = sessions[(number + n) % len(sessions)]
                text = f"writer {number} item {n}"
                await client.append_items(session_id, [message(text)])
                acknowledged[session_id].add(text)
                if n % 7 == 0:
                    await asyncio.sleep(0.02)  # let some sessions go clean, then dirty again

    await asyncio.gather(*(writer(number) for number in range(4)))
    await archived(server)
    await redis.flushall()
    async with StateClient(server.address, timeout=10.0) as client:
        for session_id in sessions:
            items = await client.all_items(session_id)
            assert {i.data["content"] for i in items} == acknowledged[session_id]
            assert [i.seq for i in items] == list(range(1, len(items) + 1))


async def test_request_records_of_later_passes_are_archived_too(
    postgres: PostgresServer,
    tier: PostgresTier,
    state_server_factory: StateServerFactory,
    redis: aioredis.Redis,
) -> None:
    server = await start_tiered(
        state_server_factory, postgres, postgres_archive_interval_seconds=3600
    )
    assert server.archiver is not None
    async with StateClient(server.address, timeout=5.0) as client:
        first = await client.append_items("s", [message("one")], request_id="first")
        assert await server.archiver.pass_once() == 1  # the session's first copy
        second = await client.append_items("s", [message("two")], request_id="second")
        popped = await client.pop_item("s", request_id="pop")
        third = await client.append_items("s", [message("three")], request_id="third")
        assert await server.archiver.pass_once() == 1  # records queued since
        assert await redis.llen(storage_of(server).keys(TENANT, "s").meta[:-1] + "q") == 0
        await redis.flushall()
        for request_id, outcome in (("first", first), ("second", second), ("third", third)):
            replay = await client.append_items("s", [message("again")], request_id=request_id)
            assert replay.replayed
            assert (replay.first_seq, replay.etag) == (outcome.first_seq, outcome.etag)
        replayed_pop = await client.pop_item("s", request_id="pop")
        assert replayed_pop.etag == popped.etag
        assert [i.data["content"] for i in await client.all_items("s")] == ["one", "three"]
