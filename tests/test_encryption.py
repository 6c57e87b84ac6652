"""Item content encrypted at rest with per-tenant AES-GCM keys, and rotation."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from state_service.client import StateClient, StateServiceError
from state_service.storage.embedded import EmbeddedRedis
from tests.conftest import StateServerFactory

SECRET = "the launch code is 0000"


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def raw_log(url: str, session_id: str) -> list[bytes]:
    r = aioredis.from_url(url)
    try:
        entries = await r.lrange(f"statecar:{{default:{session_id}}}:l", 0, -1)
        return [e if isinstance(e, bytes) else e.encode() for e in entries]
    finally:
        await r.aclose()


async def test_items_are_encrypted_at_rest_and_keys_rotate(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    old, new = key(), key()
    keys_file.write_text(f"*:k1:{old}\n")
    server = await state_server_factory(encryption_keys_file=keys_file)
    async with StateClient(server.address) as client:
        await client.append_items("s", [{"role": "user", "content": SECRET}])
        assert all(SECRET.encode() not in entry for entry in await raw_log(redis_server.url, "s"))
        assert (await client.get_context("s")).items[0].data["content"] == SECRET

        # Rotation: the new key goes first; items sealed with the old one still open.
        keys_file.write_text(f"*:k2:{new}\n*:k1:{old}\n")
    rotated = await state_server_factory(encryption_keys_file=keys_file)
    async with StateClient(rotated.address) as client:
        await client.append_items("s", [{"role": "assistant", "content": SECRET + "!"}])
        contents = [i.data["content"] for i in await client.all_items("s")]
        assert contents == [SECRET, SECRET + "!"]
        entries = await raw_log(redis_server.url, "s")
        assert b"k1" in entries[0] and b"k2" in entries[1]

    # Dropping a key that items still need is refused loudly, not served as garbage.
    keys_file.write_text(f"*:k2:{new}\n")
    strict = await state_server_factory(encryption_keys_file=keys_file, cache_enabled=False)
    async with StateClient(strict.address) as client:
        with pytest.raises(StateServiceError) as raised:
            await client.all_items("s")
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert raised.value.reason == "ENCRYPTION_KEY_UNAVAILABLE"


async def test_sealed_items_are_bound_to_their_session(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"*:k1:{key()}\n")
    server = await state_server_factory(encryption_keys_file=keys_file, cache_enabled=False)
    async with StateClient(server.address) as client:
        await client.append_items("a", [{"role": "user", "content": SECRET}])
        await client.append_items("b", [{"role": "user", "content": "other"}])
        r = aioredis.from_url(redis_server.url)
        # Copy a's sealed entry into b's log: it must not decrypt there.
        (entry,) = await r.lrange("statecar:{default:a}:l", 0, -1)
        await r.lset("statecar:{default:b}:l", 0, entry)  # type: ignore[arg-type]
        await r.aclose()
        with pytest.raises(StateServiceError) as raised:
            await client.get_context("b")
        assert raised.value.reason == "ENCRYPTION_INTEGRITY"


async def test_summaries_are_encrypted_at_rest_too(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"*:k1:{key()}\n")
    server = await state_server_factory(
        encryption_keys_file=keys_file,
        summary_keep_recent_items=0,
        summary_min_batch_items=1,
        summary_min_log_tokens=0,
    )
    async with StateClient(server.address) as client:
        await client.append_items("s", [{"role": "user", "content": f"Remember: {SECRET}."}])
        for n in range(20):
            await client.append_items("s", [{"role": "user", "content": f"filler {n} " * 20}])
        compressor = server.compression.compressor
        assert compressor is not None
        await compressor.idle()
        context = await client.get_context("s", token_budget=400, strategy="summary")
    assert context.summary is not None and SECRET in context.summary.text
    r = aioredis.from_url(redis_server.url)
    try:
        stored = await r.hget("statecar:{default:s}:s", "text")
    finally:
        await r.aclose()
    assert stored and SECRET.encode() not in stored
