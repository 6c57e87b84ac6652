"""Readers of the session stores users run today, as import records
(client/portability.py): `statecar import --from ...`.

- ``sqlite``: openai-agents ``SQLiteSession`` (agents/memory/sqlite_session.py):
  tables ``agent_sessions(session_id, created_at, updated_at)`` and
  ``agent_messages(id, session_id, message_data, created_at)``.
- ``sqlalchemy``: openai-agents ``SQLAlchemySession``
  (agents/extensions/memory/sqlalchemy_session.py): the same two tables
  (names configurable) in any database SQLAlchemy reaches; needs the
  ``sqlalchemy`` extra and the URL's async driver (e.g. aiosqlite, asyncpg).
- ``redis-session``: openai-agents ``RedisSession``
  (agents/extensions/memory/redis_session.py): ``<prefix>:<id>`` a hash
  (session_id, created_at, updated_at), ``<prefix>:<id>:messages`` a list of
  item JSON, ``<prefix>:<id>:counter``; prefix ``agents:session`` by default.
- ``redis-json``: the design brief's stateless pattern, one JSON array of
  messages per session under ``session:<id>`` (a string key).

These read other applications' stores (read-only, with their own
clients); statecar's own Redis keys are touched by state_service/storage/
alone, and an import writes them through the service (ImportItems).

Every source's items get seqs 1, 2, ... in the source's order, so importing
the same source again skips what is there and adds what is new. Item JSON
is kept as the source stored it, except the brief's arrays (one document),
whose elements are written compactly. Times the source kept become
`original_time` (SQL sources: each message's created_at, in UTC, raised to the
previous one's where the source's clock went back, since original times must
not decrease); the create time is the import's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from state_service.client.portability import ExportedItem, Record, SessionHeader
from state_service.client.types import ItemRecord

SOURCES = ("sqlite", "sqlalchemy", "redis-session", "redis-json")
FETCH_ROWS = 500


def _sql_time_ms(value: Any) -> int:
    """A SQL CURRENT_TIMESTAMP (UTC, "YYYY-MM-DD HH:MM:SS" or a datetime) in ms."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return 0
    if not isinstance(value, datetime):
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return max(0, int(value.timestamp() * 1000))


class _Sequencer:
    """Numbers one session's items 1, 2, ... with non-decreasing original times."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.seq = 0
        self.latest_ms = 0

    def item(self, raw: str, original_ms: int = 0) -> ExportedItem:
        self.seq += 1
        if original_ms:
            original_ms = max(original_ms, self.latest_ms)
            self.latest_ms = original_ms
        return ExportedItem(self.session_id, ItemRecord(self.seq, raw, original_ms=original_ms))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- SQLiteSession ------------------------------------------------------------------


async def sqlite_records(
    path: Path,
    *,
    session_ids: Sequence[str] | None = None,
    sessions_table: str = "agent_sessions",
    messages_table: str = "agent_messages",
) -> AsyncIterator[Record]:
    """The sessions of an openai-agents SQLiteSession file (read-only), rows
    fetched FETCH_ROWS at a time."""
    for table in (sessions_table, messages_table):
        if not table.replace("_", "").isalnum():
            raise ValueError(f"table name {table!r} is not a plain identifier")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ids = list(session_ids) if session_ids is not None else None
        if ids is None:
            ids = [
                row[0]
                for row in connection.execute(
                    f"SELECT DISTINCT session_id FROM {messages_table} ORDER BY session_id"
                )
            ]
        for session_id in ids:
            yield SessionHeader(session_id)
            numbering = _Sequencer(session_id)
            cursor = connection.execute(
                f"SELECT message_data, created_at FROM {messages_table} "
                "WHERE session_id = ? ORDER BY id",
                (session_id,),
            )
            while rows := cursor.fetchmany(FETCH_ROWS):
                for data, created in rows:
                    yield numbering.item(_text(data), _sql_time_ms(created))
    finally:
        connection.close()


# -- SQLAlchemySession ----------------------------------------------------------------


async def sqlalchemy_records(
    url: str,
    *,
    session_ids: Sequence[str] | None = None,
    sessions_table: str = "agent_sessions",
    messages_table: str = "agent_messages",
) -> AsyncIterator[Record]:
    """The sessions of an openai-agents SQLAlchemySession database (an async
    URL, as the SDK takes), streamed with a server-side cursor."""
    try:
        from sqlalchemy import column, select, table
        from sqlalchemy.ext.asyncio import create_async_engine
    except ImportError as error:
        raise RuntimeError(
            "--from sqlalchemy needs SQLAlchemy: pip install 'statecar[sqlalchemy]' "
            "(and the async driver of your database URL)"
        ) from error
    messages = table(
        messages_table,
        column("id"),
        column("session_id"),
        column("message_data"),
        column("created_at"),
    )
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            ids = list(session_ids) if session_ids is not None else None
            if ids is None:
                result = await connection.execute(
                    select(messages.c.session_id).distinct().order_by(messages.c.session_id)
                )
                ids = [row[0] for row in result]
            for session_id in ids:
                yield SessionHeader(session_id)
                numbering = _Sequencer(session_id)
                # The SDK reads a session in (created_at, id) order.
                stream = await connection.stream(
                    select(messages.c.message_data, messages.c.created_at)
                    .where(messages.c.session_id == session_id)
                    .order_by(messages.c.created_at, messages.c.id)
                    .execution_options(yield_per=FETCH_ROWS)
                )
                async for data, created in stream:
                    yield numbering.item(_text(data), _sql_time_ms(created))
    finally:
        await engine.dispose()


# -- Redis stores -----------------------------------------------------------------------


async def _scan_ids(client: Any, match: str, prefix: str, suffix: str) -> list[str]:
    found: list[str] = []
    async for key in client.scan_iter(match=match, count=FETCH_ROWS):
        name = _text(key)
        if name.startswith(prefix) and name.endswith(suffix):
            found.append(name[len(prefix) : len(name) - len(suffix)])
    return sorted(set(found))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def redis_session_records(
    url: str,
    *,
    session_ids: Sequence[str] | None = None,
    key_prefix: str = "agents:session",
) -> AsyncIterator[Record]:
    """The sessions of openai-agents RedisSession (LRANGE FETCH_ROWS at a time)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        ids = (
            list(session_ids)
            if session_ids is not None
            else await _scan_ids(
                client, f"{_glob_escape(key_prefix)}:*:messages", f"{key_prefix}:", ":messages"
            )
        )
        for session_id in ids:
            yield SessionHeader(session_id)
            numbering = _Sequencer(session_id)
            key = f"{key_prefix}:{session_id}:messages"
            start = 0
            while chunk := await client.lrange(key, start, start + FETCH_ROWS - 1):
                for raw in chunk:
                    yield numbering.item(_text(raw))
                start += len(chunk)
    finally:
        await client.aclose()


def _document_items(session_id: str, document: Iterable[Any]) -> Iterable[ExportedItem]:
    numbering = _Sequencer(session_id)
    for message in document:
        if isinstance(message, dict):
            yield numbering.item(json.dumps(message, ensure_ascii=False, separators=(",", ":")))


async def redis_json_records(
    url: str,
    *,
    session_ids: Sequence[str] | None = None,
    key_prefix: str = "session",
) -> AsyncIterator[Record]:
    """Sessions stored the design brief's way: `<prefix>:<id>` holds the
    whole history as one JSON array (read whole: it is one value)."""
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors

    client = aioredis.from_url(url)
    try:
        ids = (
            list(session_ids)
            if session_ids is not None
            else await _scan_ids(client, f"{_glob_escape(key_prefix)}:*", f"{key_prefix}:", "")
        )
        for session_id in ids:
            try:
                raw = await client.get(f"{key_prefix}:{session_id}")
            except redis_errors.ResponseError:  # WRONGTYPE: another kind of key
                continue
            if raw is None:
                continue
            try:
                document = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(document, list):
                continue
            yield SessionHeader(session_id)
            for item in _document_items(session_id, document):
                yield item
    finally:
        await client.aclose()
