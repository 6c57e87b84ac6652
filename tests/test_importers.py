"""`statecar import --from ...`: sessions written by the stores users run
today, through those stores' own code (openai-agents SQLiteSession,
SQLAlchemySession on a SQLite URL, RedisSession on the fixtures' real Redis;
the design brief's session:<id> documents written as the brief writes them),
come into the state service with their items in order, seqs 1..n, and a
second import adds nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agent_service import cli
from state_service.client import StateClient, importers
from state_service.client.portability import Record, import_records
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "chat-1": [
        {"role": "user", "content": "Hi, I'm Ana; I moved to Lisbon in May."},
        {"role": "assistant", "content": "Welcome to Lisbon, Ana!"},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ],
    "chat-2": [
        {"role": "user", "content": "What's a good name for a cat?"},
        {"role": "assistant", "content": "Miso."},
    ],
}


async def imported_state(client: StateClient) -> dict[str, list[tuple[int, Any]]]:
    result = {}
    for session_id in CONVERSATIONS:
        items = await client.all_items(session_id)
        result[session_id] = [(item.seq, item.data) for item in items]
    return result


def expected() -> dict[str, list[tuple[int, Any]]]:
    return {
        session_id: list(enumerate(items, start=1)) for session_id, items in CONVERSATIONS.items()
    }


async def import_twice(client: StateClient, records: Any) -> None:
    first = await import_records(client, records())
    assert (first.sessions, first.imported, first.skipped) == (2, 6, 0)
    again = await import_records(client, records())
    assert (again.imported, again.skipped) == (0, 6)
    assert await imported_state(client) == expected()


async def test_from_sqlite_session(client: StateClient, tmp_path: Path) -> None:
    from agents import SQLiteSession

    path = tmp_path / "conversations.db"
    for session_id, items in CONVERSATIONS.items():
        session = SQLiteSession(session_id, path)
        await session.add_items(items)  # type: ignore[arg-type]
        session.close()

    def records() -> AsyncIterator[Record]:
        return importers.sqlite_records(path)

    await import_twice(client, records)
    # The SDK's created_at (CURRENT_TIMESTAMP, UTC) became the original time.
    first = (await client.all_items("chat-1"))[0]
    assert first.original_time is not None


async def test_from_sqlalchemy_session(client: StateClient, tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    from agents.extensions.memory import SQLAlchemySession

    url = f"sqlite+aiosqlite:///{tmp_path / 'sa.db'}"
    for session_id, items in CONVERSATIONS.items():
        session = SQLAlchemySession.from_url(session_id, url=url, create_tables=True)
        await session.add_items(items)  # type: ignore[arg-type]
        await session.engine.dispose()

    def records() -> AsyncIterator[Record]:
        return importers.sqlalchemy_records(url)

    await import_twice(client, records)


async def test_from_redis_session(client: StateClient, redis_server: EmbeddedRedis) -> None:
    from agents.extensions.memory import RedisSession

    url = redis_server.url
    for session_id, items in CONVERSATIONS.items():
        session = RedisSession.from_url(session_id, url=url)
        await session.add_items(items)  # type: ignore[arg-type]
        await session.close()

    def records() -> AsyncIterator[Record]:
        return importers.redis_session_records(url)

    await import_twice(client, records)


async def test_from_the_briefs_json_documents(
    client: StateClient, redis_server: EmbeddedRedis
) -> None:
    store = aioredis.from_url(redis_server.url)
    try:
        for session_id, items in CONVERSATIONS.items():
            # As the brief's stateless agent saves a session.
            await store.set(f"session:{session_id}", json.dumps(items), ex=3600)
        await store.rpush("session:not-a-document", "x")  # another kind of key: skipped
    finally:
        await store.aclose()

    def records() -> AsyncIterator[Record]:
        return importers.redis_json_records(redis_server.url)

    await import_twice(client, records)


async def test_cli_imports_from_sqlite(
    client: StateClient, state_server: StateServer, tmp_path: Path
) -> None:
    from agents import SQLiteSession

    path = tmp_path / "one.db"
    session = SQLiteSession("chat-2", path)
    await session.add_items(CONVERSATIONS["chat-2"])  # type: ignore[arg-type]
    session.close()
    target = ["--state-target", state_server.address]
    args = cli.parser().parse_args(["import", "--from", "sqlite", *target])
    assert await args.handler(args) == 2  # no --source
    args = cli.parser().parse_args(["import", "--from", "sqlite", "--source", str(path), *target])
    assert await args.handler(args) == 0
    items = await client.all_items("chat-2")
    assert [i.data for i in items] == CONVERSATIONS["chat-2"]
