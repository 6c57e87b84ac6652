"""The PostgreSQL durable tier: every SQL statement statecar sends lives here.

Optional (``STATE_SERVICE_POSTGRES_URL``); this module, and asyncpg, are
imported only when it is set. Redis stays the authority for hot sessions; this
tier holds a copy of each session as of its last archived version (see
storage/tiered.py for the protocol and docs/durable-tier.md for the loss
window). Tables (all keyed by tenant + session id)::

    statecar_sessions   one row per session: the Redis meta hash (incarnation,
                        version, counters, settings), the summary hash, and
                        `deleted` (a tombstone: DeleteSession of that
                        incarnation, so an archive still in flight cannot
                        bring it back)
    statecar_items      the log: one row per entry, by log index, holding
                        the stored "<seq>:<payload>" bytes exactly as Redis
                        had them (sealed payloads stay sealed)
    statecar_requests   the request_id records (field -> first response)

The schema is versioned by ``statecar_schema_migrations`` and changed only by
``state-service migrate`` (``migrate()``), never at import or start: a
server refuses to start on a schema that is missing or not the one it
expects (``check_schema``).

Why asyncpg and not psycopg 3: asyncio-native with its own pool, binary
protocol and prepared statements, manylinux wheels with no libpq, and
``executemany`` pipelined in one round trip, which is what the archiver's
batches are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from state_service.errors import DurableTierUnavailable

T = TypeVar("T")

# (version, statements). Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE statecar_sessions (
            tenant          text    NOT NULL,
            session_id      text    NOT NULL,
            incarnation     text    NOT NULL,
            version         bigint  NOT NULL,
            item_count      bigint  NOT NULL,
            trunc           bigint  NOT NULL,
            meta_fields     text[]  NOT NULL,
            meta_values     bytea[] NOT NULL,
            summary_fields  text[]  NOT NULL DEFAULT '{}',
            summary_values  bytea[] NOT NULL DEFAULT '{}',
            deleted         boolean NOT NULL DEFAULT false,
            archive_time    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, session_id)
        );
        CREATE TABLE statecar_items (
            tenant      text   NOT NULL,
            session_id  text   NOT NULL,
            idx         bigint NOT NULL,
            entry       bytea  NOT NULL,
            PRIMARY KEY (tenant, session_id, idx)
        );
        CREATE TABLE statecar_requests (
            tenant      text  NOT NULL,
            session_id  text  NOT NULL,
            field       text  NOT NULL,
            response    bytea NOT NULL,
            PRIMARY KEY (tenant, session_id, field)
        );
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# One number for the advisory lock that serialises concurrent migrate runs.
_MIGRATE_LOCK = 0x5374617465636172  # "Statecar"


class SchemaNotReady(Exception):
    """The database has no statecar schema, or another version of it."""


@dataclass(frozen=True, slots=True)
class ArchivedSession:
    """A session's row: its meta and summary hashes as Redis had them."""

    incarnation: str
    version: int
    item_count: int
    trunc: int
    meta: dict[str, bytes]
    summary: dict[str, bytes]
    deleted: bool


@dataclass(slots=True)
class SessionArchive:
    """What one archive pass writes for a session: the head and summary at
    `version`, log entries from index `first_index` (given to `write` as an
    async iterator of chunks; everything at or above it is replaced), and
    request records (new ones are added)."""

    incarnation: str
    version: int
    item_count: int
    trunc: int
    meta: dict[str, bytes]
    summary: dict[str, bytes]
    first_index: int
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    fresh: bool = False  # a new incarnation: drop everything older first


class PostgresTier:
    """The durable copy of sessions, on one asyncpg pool."""

    def __init__(self, pool: Any, *, timeout_seconds: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout_seconds
        self._closed = False

    @classmethod
    async def connect(
        cls, url: str, *, pool_size: int = 4, timeout_seconds: float = 5.0
    ) -> PostgresTier:
        """A pool to `url` (postgresql://...). Connections are opened lazily
        (min_size 0), so an unreachable database does not stop a start."""
        pool = await asyncpg.create_pool(
            url,
            min_size=0,
            max_size=pool_size,
            timeout=timeout_seconds,
            command_timeout=timeout_seconds,
        )
        return cls(pool, timeout_seconds=timeout_seconds)

    async def close(self) -> None:
        """Closes the pool, bounded: a graceful close waits for every
        connection to be released, and one left mid-query by a cancelled
        task may never be; then the connections are terminated."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(self._timeout):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    async def _run(self, operation: Callable[[Any], Awaitable[T]], *, bounded: bool = True) -> T:
        """Runs `operation` on a pooled connection; PostgreSQL being down,
        slow or refusing is DurableTierUnavailable. Each statement has the
        timeout (the pool's command_timeout); `bounded` operations also as a
        whole (an archive pass's transaction is as long as what it copies)."""
        try:
            async with asyncio.timeout(self._timeout if bounded else None):
                async with self._pool.acquire() as connection:
                    return await operation(connection)
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
        ) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled from outside (a shutdown, a caller gone): asyncpg may
                # report that as a connection error, and asyncio.timeout (3.11)
                # as a timeout; neither may turn a cancellation into an error
                # that a retry loop would survive.
                raise asyncio.CancelledError from exc
            raise DurableTierUnavailable(
                "the durable tier (PostgreSQL) is unreachable or refused the request"
            ) from exc

    # -- schema ---------------------------------------------------------------

    async def schema_version(self) -> int:
        """The applied schema version; 0 when there is no statecar schema."""

        async def read(connection: Any) -> int:
            exists = await connection.fetchval(
                "SELECT to_regclass('statecar_schema_migrations') IS NOT NULL"
            )
            if not exists:
                return 0
            return int(
                await connection.fetchval(
                    "SELECT coalesce(max(version), 0) FROM statecar_schema_migrations"
                )
            )

        return await self._run(read)

    async def check_schema(self) -> None:
        """Raises SchemaNotReady unless the schema is the one this code expects."""
        version = await self.schema_version()
        if version != SCHEMA_VERSION:
            raise SchemaNotReady(
                f"the PostgreSQL schema is at version {version}, this statecar needs "
                f"{SCHEMA_VERSION}; run `state-service migrate` with the same "
                "STATE_SERVICE_POSTGRES_URL"
                if version < SCHEMA_VERSION
                else f"the PostgreSQL schema is at version {version}, newer than this "
                f"statecar ({SCHEMA_VERSION}); upgrade statecar"
            )

    async def migrate(self) -> list[int]:
        """Applies the migrations not applied yet, each in its own transaction,
        under an advisory lock (two concurrent runs apply each once). Returns
        the versions applied (none when the schema is current)."""

        async def apply(connection: Any) -> list[int]:
            applied: list[int] = []
            await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
            try:
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS statecar_schema_migrations ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    row["version"]
                    for row in await connection.fetch(
                        "SELECT version FROM statecar_schema_migrations"
                    )
                }
                for version, statements in MIGRATIONS:
                    if version in done:
                        continue
                    async with connection.transaction():
                        await connection.execute(statements)
                        await connection.execute(
                            "INSERT INTO statecar_schema_migrations (version) VALUES ($1)",
                            version,
                        )
                    applied.append(version)
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)
            return applied

        # Migrations may take longer than a request: no short timeout here.
        async with self._pool.acquire() as connection:
            return await apply(connection)

    # -- sessions ---------------------------------------------------------------

    async def session(self, tenant: str, session_id: str) -> ArchivedSession | None:
        """The archived row of a session (a tombstone too: see `deleted`)."""

        async def read(connection: Any) -> ArchivedSession | None:
            row = await connection.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM statecar_sessions"
                " WHERE tenant = $1 AND session_id = $2",
                tenant,
                session_id,
            )
            return None if row is None else _archived(row)

        return await self._run(read)

    async def items(
        self, tenant: str, session_id: str, after_index: int, limit: int
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` log entries (index, entry) with index > `after_index`."""

        async def read(connection: Any) -> list[tuple[int, bytes]]:
            rows = await connection.fetch(
                "SELECT idx, entry FROM statecar_items"
                " WHERE tenant = $1 AND session_id = $2 AND idx > $3 ORDER BY idx LIMIT $4",
                tenant,
                session_id,
                after_index,
                limit,
            )
            return [(row["idx"], bytes(row["entry"])) for row in rows]

        return await self._run(read)

    async def requests(
        self, tenant: str, session_id: str, after_field: str, limit: int
    ) -> list[tuple[str, bytes]]:
        """Up to `limit` request records with field > `after_field`, by field."""

        async def read(connection: Any) -> list[tuple[str, bytes]]:
            rows = await connection.fetch(
                "SELECT field, response FROM statecar_requests"
                " WHERE tenant = $1 AND session_id = $2 AND field > $3 ORDER BY field LIMIT $4",
                tenant,
                session_id,
                after_field,
                limit,
            )
            return [(row["field"], bytes(row["response"])) for row in rows]

        return await self._run(read)

    async def session_page(
        self, tenant: str, after: str, limit: int
    ) -> list[tuple[str, ArchivedSession]]:
        """Live (not deleted) sessions of a tenant, in id order, after `after`."""

        async def read(connection: Any) -> list[tuple[str, ArchivedSession]]:
            rows = await connection.fetch(
                f"SELECT session_id, {_SESSION_COLUMNS} FROM statecar_sessions"
                # Byte order, as the Redis index and the page tokens have it,
                # whatever the database's collation.
                ' WHERE tenant = $1 AND session_id > $2 COLLATE "C" AND NOT deleted'
                ' ORDER BY session_id COLLATE "C" LIMIT $3',
                tenant,
                after,
                limit,
            )
            return [(row["session_id"], _archived(row)) for row in rows]

        return await self._run(read)

    async def write(
        self,
        tenant: str,
        session_id: str,
        archive: SessionArchive,
        entries: AsyncIterator[list[bytes]],
    ) -> bool:
        """Stores one archive pass in one transaction; False (nothing written)
        when the session's row is a tombstone of the same incarnation (it was
        deleted while this pass read it). `entries` is read chunk by chunk
        inside the transaction; an exception from it rolls everything back."""

        async def store(connection: Any) -> bool:
            async with connection.transaction():
                row = await connection.fetchrow(
                    "SELECT incarnation, deleted FROM statecar_sessions"
                    " WHERE tenant = $1 AND session_id = $2 FOR UPDATE",
                    tenant,
                    session_id,
                )
                if row is not None and row["deleted"] and row["incarnation"] == archive.incarnation:
                    return False
                if archive.fresh or (row is not None and row["incarnation"] != archive.incarnation):
                    await _delete_rows(connection, tenant, session_id, sessions=False)
                else:
                    await connection.execute(
                        "DELETE FROM statecar_items"
                        " WHERE tenant = $1 AND session_id = $2 AND idx >= $3",
                        tenant,
                        session_id,
                        archive.first_index,
                    )
                await connection.execute(
                    "INSERT INTO statecar_sessions (tenant, session_id, incarnation, version,"
                    " item_count, trunc, meta_fields, meta_values,"
                    " summary_fields, summary_values, deleted, archive_time)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, false, now())"
                    " ON CONFLICT (tenant, session_id) DO UPDATE SET"
                    " incarnation = excluded.incarnation, version = excluded.version,"
                    " item_count = excluded.item_count, trunc = excluded.trunc,"
                    " meta_fields = excluded.meta_fields, meta_values = excluded.meta_values,"
                    " summary_fields = excluded.summary_fields,"
                    " summary_values = excluded.summary_values, deleted = false,"
                    " archive_time = now()",
                    tenant,
                    session_id,
                    archive.incarnation,
                    archive.version,
                    archive.item_count,
                    archive.trunc,
                    list(archive.meta),
                    list(archive.meta.values()),
                    list(archive.summary),
                    list(archive.summary.values()),
                )
                index = archive.first_index
                async for chunk in entries:
                    await connection.executemany(
                        "INSERT INTO statecar_items (tenant, session_id, idx, entry)"
                        " VALUES ($1, $2, $3, $4)",
                        [(tenant, session_id, index + i, entry) for i, entry in enumerate(chunk)],
                    )
                    index += len(chunk)
                if archive.requests:
                    await connection.executemany(
                        "INSERT INTO statecar_requests (tenant, session_id, field, response)"
                        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        [(tenant, session_id, f, r) for f, r in archive.requests],
                    )
            return True

        return await self._run(store, bounded=False)

    async def delete_session(self, tenant: str, session_id: str, incarnation: str) -> None:
        """DeleteSession: drops the session's items and records and leaves a
        tombstone of `incarnation` (an archive pass of that incarnation still in
        flight then writes nothing; a new incarnation replaces it)."""

        async def delete(connection: Any) -> None:
            async with connection.transaction():
                await _delete_rows(connection, tenant, session_id, sessions=False)
                await connection.execute(
                    "INSERT INTO statecar_sessions (tenant, session_id, incarnation, version,"
                    " item_count, trunc, meta_fields, meta_values, deleted)"
                    " VALUES ($1, $2, $3, 0, 0, 0, '{}', '{}', true)"
                    " ON CONFLICT (tenant, session_id) DO UPDATE SET"
                    " incarnation = excluded.incarnation, version = 0, item_count = 0,"
                    " trunc = 0, meta_fields = '{}', meta_values = '{}',"
                    " summary_fields = '{}', summary_values = '{}', deleted = true,"
                    " archive_time = now()",
                    tenant,
                    session_id,
                    incarnation,
                )

        await self._run(delete)

    # -- erasure ----------------------------------------------------------------

    async def erase_session(self, tenant: str, session_id: str) -> int:
        """Deletes every row about one session (tombstone included); the rows
        deleted. Delete the session from Redis first: an archive pass reads
        Redis, so one that read it before may still write its copy here
        afterwards (it runs at most once per archive interval; erasing again
        after that interval removes such a copy)."""

        async def erase(connection: Any) -> int:
            async with connection.transaction():
                return await _delete_rows(connection, tenant, session_id, sessions=True)

        return await self._run(erase)

    async def erase_tenant(self, tenant: str) -> int:
        """Deletes every row about every session of a tenant; the rows deleted."""

        async def erase(connection: Any) -> int:
            deleted = 0
            async with connection.transaction():
                for table in _TABLES:
                    status = await connection.execute(
                        f"DELETE FROM {table} WHERE tenant = $1",
                        tenant,
                    )
                    deleted += _row_count(status)
            return deleted

        return await self._run(erase)

    async def count_rows(self, tenant: str, session_id: str | None = None) -> int:
        """Rows about a tenant (or one of its sessions) in every table."""

        async def count(connection: Any) -> int:
            total = 0
            for table in _TABLES:
                if session_id is None:
                    total += await connection.fetchval(
                        f"SELECT count(*) FROM {table} WHERE tenant = $1",
                        tenant,
                    )
                else:
                    total += await connection.fetchval(
                        f"SELECT count(*) FROM {table} WHERE tenant = $1 AND session_id = $2",
                        tenant,
                        session_id,
                    )
            return total

        return await self._run(count)


_TABLES: Sequence[str] = ("statecar_items", "statecar_requests", "statecar_sessions")


_SESSION_COLUMNS = (
    "incarnation, version, item_count, trunc, meta_fields, meta_values,"
    " summary_fields, summary_values, deleted"
)


def _archived(row: Any) -> ArchivedSession:
    return ArchivedSession(
        incarnation=row["incarnation"],
        version=row["version"],
        item_count=row["item_count"],
        trunc=row["trunc"],
        meta={k: bytes(v) for k, v in zip(row["meta_fields"], row["meta_values"], strict=True)},
        summary={
            k: bytes(v) for k, v in zip(row["summary_fields"], row["summary_values"], strict=True)
        },
        deleted=row["deleted"],
    )


def _row_count(status: str) -> int:
    """The row count of a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[-1]) if status else 0


async def _delete_rows(connection: Any, tenant: str, session_id: str, *, sessions: bool) -> int:
    deleted = 0
    for table in _TABLES:
        if table == "statecar_sessions" and not sessions:
            continue
        status = await connection.execute(
            f"DELETE FROM {table} WHERE tenant = $1 AND session_id = $2",
            tenant,
            session_id,
        )
        deleted += _row_count(status)
    return deleted
