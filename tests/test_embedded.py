"""The embedded redis-server: the default with no Redis URL, AOF durability,
and cleanup of a server orphaned by a crash."""

from __future__ import annotations

from pathlib import Path

from state_service.client import StateClient
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from tests.conftest import state_settings


async def test_state_service_embeds_redis_without_a_url(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = await StateServer.start(state_settings("", data_dir=data_dir))
    try:
        assert server.embedded is not None
        async with StateClient(server.address) as client:
            await client.append_items("s", [{"role": "user", "content": "kept"}])
    finally:
        await server.stop(grace=0.5)
    # The data outlives the process: AOF in the data dir.
    again = await StateServer.start(state_settings("", data_dir=data_dir))
    try:
        async with StateClient(again.address) as client:
            assert [i.data["content"] for i in await client.all_items("s")] == ["kept"]
    finally:
        await again.stop(grace=0.5)


def test_orphaned_redis_is_stopped_at_next_start(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "r")
    first.start()
    assert first.process is not None
    orphan_pid = first.process.pid
    # Simulate the owner dying without cleanup: the lock goes, the child stays.
    assert first._lock_file is not None
    first._lock_file.close()
    first._lock_file = None
    second = EmbeddedRedis(tmp_path / "r")
    try:
        second.start()
        first.process.wait(10)  # the orphan was told to exit
        assert second.ping()
        assert second.process is not None and second.process.pid != orphan_pid
    finally:
        second.close()
