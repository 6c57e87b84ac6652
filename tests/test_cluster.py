"""The state service on a real Redis Cluster: a primary killed during a write
load, with and without WAIT for a replica.

The API itself runs on the cluster in test_state_api.py and
test_state_consistency.py (parametrized backend). Run with -s for the figures
docs/RELIABILITY.md reports."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio.cluster import RedisCluster

from state_service import log
from state_service.client import StateClient, StateServiceError
from state_service.grpc_errors import to_service_error
from state_service.storage.redis import RedisConnectOptions, RedisStorage
from tests.patience import patience
from tests.processes import state_service_process, wait_serving
from tests.redis_cluster import EmbeddedRedisCluster

SESSIONS = [f"fo-{n}" for n in range(6)]


@dataclass
class SpreadLoad:
    """Writers appending unique items to several sessions (so several slots and
    primaries); records acknowledgements and the errors that reached callers."""

    client: StateClient
    acknowledged: dict[str, set[str]] = field(default_factory=dict)
    acknowledged_at: dict[str, list[float]] = field(default_factory=dict)
    errors: list[tuple[float, str, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, w: int, limit: int) -> None:
        session_id = SESSIONS[w % len(SESSIONS)]
        for n in range(limit):
            if self.stop.is_set():
                return
            content = f"{w}:{n}"
            try:
                await self.client.append_items(
                    session_id, [{"role": "user", "content": content}], timeout=5.0
                )
                self.acknowledged.setdefault(session_id, set()).add(content)
                self.acknowledged_at.setdefault(session_id, []).append(time.monotonic())
            except StateServiceError as error:
                self.errors.append((time.monotonic(), error.code.name, error.reason or ""))
                await asyncio.sleep(0.02)

    def count(self, sessions: set[str] | None = None) -> int:
        return sum(
            len(v) for k, v in self.acknowledged.items() if sessions is None or k in sessions
        )

    def longest_gap(self, sessions: set[str], since: float) -> float:
        """The longest time with no acknowledgement on any of `sessions`, from
        `since` to the end of the load."""
        times = sorted(t for k in sessions for t in self.acknowledged_at.get(k, []) if t >= since)
        points = [since, *times]
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


async def stored(url: str, session_id: str) -> list[str]:
    r = RedisCluster.from_url(url)
    try:
        raw = await r.lrange(f"statecar:{{default:{session_id}}}:l", 0, -1)
    finally:
        await r.aclose()
    return [json.loads(log.decode(cast(bytes, e)).json)["content"] for e in raw]


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("wait_replicas", [1, 0])
async def test_primary_kill9_during_load(tmp_path: Path, wait_replicas: int) -> None:
    """kill -9 of the primary serving loaded sessions; its replica takes over;
    the killed node comes back (as a process supervisor would restart it) and
    rejoins as a replica. With WAIT 1, no acknowledged append may be lost."""
    with EmbeddedRedisCluster(tmp_path / "cluster") as cluster:
        victim = cluster.node_for_key("statecar:{default:fo-0}:m")
        on_victim = {
            s for s in SESSIONS if cluster.node_for_key(f"statecar:{{default:{s}}}:m") is victim
        }
        env = {
            "STATE_SERVICE_REDIS_CLUSTER": "true",
            "STATE_SERVICE_REDIS_WAIT_REPLICAS": str(wait_replicas),
            "STATE_SERVICE_REDIS_WAIT_TIMEOUT_SECONDS": "0.5",
            "STATE_SERVICE_REDIS_TIMEOUT_SECONDS": "1.0",
        }
        with state_service_process(cluster.url, env) as (address, _):
            await wait_serving(address)
            async with StateClient(address) as client:
                load = SpreadLoad(client)
                tasks = [asyncio.create_task(load.writer(w, 4000)) for w in range(12)]
                await asyncio.sleep(1.0)
                before = load.count()
                killed_at = time.monotonic()
                victim.stop(kill=True)
                # The replica is promoted once the others agree the primary
                # failed (node timeout 1 s).
                await asyncio.to_thread(cluster.wait_failover, victim.port)
                failover_s = time.monotonic() - killed_at
                await asyncio.to_thread(victim.start)
                await asyncio.to_thread(cluster.wait_healthy, 30.0)
                rejoined_s = time.monotonic() - killed_at
                await asyncio.sleep(1.5)
                load.stop.set()
                await asyncio.gather(*tasks)
            url = cluster.url
            lost = 0
            duplicates = 0
            total_stored = 0
            for session_id in SESSIONS:
                contents = await stored(url, session_id)
                total_stored += len(contents)
                duplicates += len(contents) - len(set(contents))
                lost += len(load.acknowledged.get(session_id, set()) - set(contents))
    acknowledged = load.count()
    window = max(t for t, _, _ in load.errors) - killed_at if load.errors else 0.0
    victim_gap = load.longest_gap(on_victim, killed_at)
    other_gap = load.longest_gap(set(SESSIONS) - on_victim, killed_at)
    print(
        f"\ncluster primary kill -9 (WAIT {wait_replicas}): {acknowledged} acknowledged, "
        f"{lost} lost, {duplicates} duplicates, {total_stored} stored; replica promoted "
        f"{failover_s * 1000:.0f} ms after the kill, old primary back as replica at "
        f"{rejoined_s * 1000:.0f} ms; {len(load.errors)} errors reached callers "
        f"({sorted({f'{c}/{r}' for _, c, r in load.errors})}), last "
        f"{window * 1000:.0f} ms after the kill; longest pause in acknowledgements: "
        f"{victim_gap * 1000:.0f} ms on the killed primary's sessions, "
        f"{other_gap * 1000:.0f} ms on the others; {acknowledged - before} acknowledged "
        "after the kill"
    )
    assert load.count(on_victim) > 0 and victim_gap < 30, "writes resumed after the failover"
    assert duplicates == 0, "a retried append was stored twice"
    if wait_replicas:
        assert lost == 0, "an acknowledged append was lost in the failover"


async def test_wait_with_too_few_replicas_is_unavailable_and_retry_safe(
    redis_cluster: EmbeddedRedisCluster,
) -> None:
    """WAIT for more replicas than exist: the write is applied on the primary
    but answered REPLICATION_TIMEOUT; a retry with the same request_id replays
    it (no duplicate) and is answered the same way until replicas confirm."""
    from state_service.errors import ReplicationTimeout

    redis_cluster.flush()
    plain = RedisStorage.from_url(redis_cluster.url, options=RedisConnectOptions(cluster=True))
    strict = RedisStorage.from_url(
        redis_cluster.url,
        options=RedisConnectOptions(cluster=True, wait_replicas=2, wait_timeout_seconds=0.1),
    )
    try:
        created = await plain.append(
            "default", "s", [b"a"], request_id="", expected_etag="0", new_incarnation="i", now_ms=1
        )
        for _ in range(2):
            with pytest.raises(ReplicationTimeout) as raised:
                await strict.append(
                    "default",
                    "s",
                    [b"b"],
                    request_id="r-1",
                    expected_etag=created.etag,
                    new_incarnation="unused",
                    now_ms=2,
                )
            assert (raised.value.acknowledged, raised.value.required) == (1, 2)
            status = to_service_error(raised.value)
            assert status.reason == "REPLICATION_TIMEOUT"
            assert status.metadata == {"replicas_acknowledged": "1", "replicas_required": "2"}
        (head,) = await plain.heads("default", ["s"])
        assert head is not None and head.item_count == 2  # applied once, replayed once
        # A first write that would create a session: its index entry is not
        # confirmed either, so nothing of the session is written.
        with pytest.raises(ReplicationTimeout):
            await strict.append(
                "default",
                "new",
                [b"x"],
                request_id="",
                expected_etag="",
                new_incarnation="n",
                now_ms=3,
            )
        assert await plain.heads("default", ["new"]) == [None]
    finally:
        await plain.close()
        await strict.close()


async def test_wait_on_one_primary_with_a_replica(tmp_path: Path) -> None:
    """WAIT without a cluster: a primary with one replica acknowledges writes
    (one round trip with the index step); with the replica frozen, the same
    write answers REPLICATION_TIMEOUT and its retry replays it."""
    from state_service.errors import ReplicationTimeout
    from state_service.storage.embedded import EmbeddedRedis, free_port

    with EmbeddedRedis(tmp_path / "primary", port=free_port()) as primary:
        replica = EmbeddedRedis(
            tmp_path / "replica",
            port=free_port(),
            extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
        )
        with replica:
            storage = RedisStorage.from_url(
                primary.url,
                options=RedisConnectOptions(wait_replicas=1, wait_timeout_seconds=0.2),
            )
            try:
                deadline = time.monotonic() + patience(10)
                while True:  # until the replica has synced and acknowledges
                    try:
                        first = await storage.append(
                            "default",
                            "s",
                            [b"a"],
                            request_id="r-0",
                            expected_etag="",
                            new_incarnation="i",
                            now_ms=1,
                        )
                        break
                    except ReplicationTimeout:
                        assert time.monotonic() < deadline, "the replica never synced"
                        await asyncio.sleep(0.1)
                assert first.first_seq == 1
                replica.pause()
                try:
                    for _ in range(2):
                        with pytest.raises(ReplicationTimeout):
                            await storage.append(
                                "default",
                                "s",
                                [b"b"],
                                request_id="r-1",
                                expected_etag=first.etag,
                                new_incarnation="unused",
                                now_ms=2,
                            )
                finally:
                    replica.resume()
                replayed = await storage.append(
                    "default",
                    "s",
                    [b"b"],
                    request_id="r-1",
                    expected_etag="",
                    new_incarnation="unused",
                    now_ms=3,
                )
                assert replayed.replayed and replayed.last_seq == 2
                assert await storage.index_page("default", "", 10) == ["s"]
            finally:
                await storage.close()
