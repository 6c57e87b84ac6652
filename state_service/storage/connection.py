"""A pipelined Redis connection for the per-request script calls.

Why not redis-py for these: its asyncio client costs about 50 µs of Python
per command on this path (pool checkout under an asyncio.Condition, health
checks, a timeout context per read, retry wrappers), more than the Redis
round trip itself; profiles of GetContext showed it as the largest single
cost. This connection is one socket shared by every caller: a command is
written as soon as it is issued and its reply is matched in order (Redis
answers a connection's commands in the order sent), so concurrent calls are
pipelined instead of each holding a pooled connection. hiredis parses.

It speaks only what RedisStorage needs on one node: AUTH, SELECT and single
commands (EVALSHA). Redis Cluster and TLS keep using redis-py (see
``RedisStorage.from_url``). Errors are redis-py's exception classes, so
RedisStorage maps them to statuses exactly as before:

- a reply error -> ``ResponseError`` or its subclass (NOSCRIPT, OOM, NOPERM...);
- a refused AUTH -> ``AuthenticationError``;
- a lost or unreachable connection -> ``ConnectionError`` for every caller
  waiting on it (the next call reconnects); ``ReplyLost``, its subclass, when
  the command had been sent (Redis may have run it: only an idempotent
  command may be sent again);
- no reply within ``socket_timeout`` -> ``TimeoutError`` for every caller
  waiting, and the connection is dropped (a reply arriving later cannot be
  matched to the wrong caller).

A caller cancelled while waiting (its deadline) leaves its slot in the queue;
the reply, when it comes, is discarded.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
import redis.exceptions as redis_errors

Arg = bytes | str | int | float


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis' stub types the argument as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


# Reply-error prefixes redis-py raises as these classes.
_ERROR_CLASSES: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "OOM": redis_errors.OutOfMemoryError,
    "NOPERM": redis_errors.NoPermissionError,
    "LOADING": redis_errors.BusyLoadingError,
    "READONLY": redis_errors.ReadOnlyError,
}
_AUTH_PREFIXES = ("WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH")


class ReplyLost(redis_errors.ConnectionError):
    """The connection was lost after the command was sent: Redis may have run it."""


def reply_error(message: str) -> redis_errors.RedisError:
    """redis-py's exception for a reply error."""
    if message.startswith(_AUTH_PREFIXES):
        return redis_errors.AuthenticationError(message)
    prefix = message.split(" ", 1)[0]
    return _ERROR_CLASSES.get(prefix, redis_errors.ResponseError)(message)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=redis_errors.ResponseError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._owner._transport = transport
        self._owner._protocol = self

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._owner._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as error:
                self._owner._drop(redis_errors.ConnectionError(f"Redis protocol error: {error}"))
                return
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: the stream is out of step
                self._owner._drop(redis_errors.ConnectionError("unexpected Redis reply"))
                return
            waiter, _ = pending.popleft()
            if not waiter.done():
                if isinstance(reply, redis_errors.ResponseError):
                    waiter.set_exception(reply_error(str(reply)))
                else:
                    waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self, exc)


class PipelinedConnection:
    """One Redis connection shared by all callers, commands pipelined."""

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
    ) -> None:
        if (host is None) == (path is None):
            raise ValueError("give either host (and port) or a unix socket path")
        self._host, self._port, self._path = host, port, path
        self._username, self._password, self._db = username, password, db
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        # (waiter, time sent) in the order the commands were written.
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # of the open connection
        self._ready = False  # connected, authenticated, database selected
        self._closed = False

    async def execute(self, *args: Arg) -> Any:
        """Sends one command and returns its reply (bytes, int, None or a list)."""
        transport = self._transport
        if not self._ready or transport is None or transport.is_closing():
            await self._connect()
        return await self._send(_pack(args))

    def _send(self, packed: bytes) -> asyncio.Future[Any]:
        transport = self._transport
        loop = self._loop
        if transport is None or loop is None or transport.is_closing():
            raise redis_errors.ConnectionError("Redis connection closed")
        waiter = loop.create_future()
        self._pending.append((waiter, loop.time()))
        transport.write(packed)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._socket_timeout, self._check_timeouts)
        return waiter

    def _check_timeouts(self) -> None:
        """One timer per connection, not one per command: drops the connection
        if its oldest unanswered command is older than socket_timeout."""
        self._watchdog = None
        loop = self._loop
        if not self._pending or loop is None:
            return
        waited = loop.time() - self._pending[0][1]
        if waited >= self._socket_timeout:
            self._drop(redis_errors.TimeoutError("Timeout reading from Redis"))
            return
        self._watchdog = loop.call_later(self._socket_timeout - waited, self._check_timeouts)

    async def _connect(self) -> None:
        if self._closed:
            raise redis_errors.ConnectionError("Redis connection closed")
        if self._connecting is not None:
            # Someone else is connecting: share the outcome.
            await asyncio.shield(self._connecting)
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            await self._open()
            self._ready = True
        except BaseException as error:
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: sharers get it too
            raise
        else:
            self._connecting.set_result(None)
        finally:
            self._connecting = None

    async def _open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), self._path
                    )
                else:
                    assert self._host is not None
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), self._host, self._port
                    )
        except (OSError, TimeoutError) as error:
            raise redis_errors.ConnectionError(f"cannot connect to Redis: {error}") from error
        assert protocol is self._protocol
        try:
            async with asyncio.timeout(self._socket_timeout):
                if self._password is not None:
                    auth: tuple[Arg, ...] = (
                        ("AUTH", self._username, self._password)
                        if self._username
                        else ("AUTH", self._password)
                    )
                    await self._send(_pack(auth))
                if self._db:
                    await self._send(_pack(("SELECT", self._db)))
        except TimeoutError as error:
            self._drop(redis_errors.TimeoutError("Timeout connecting to Redis"))
            raise redis_errors.TimeoutError("Timeout connecting to Redis") from error
        except redis_errors.RedisError as error:
            if isinstance(error, redis_errors.ResponseError) and not isinstance(
                error, redis_errors.AuthenticationError
            ):
                error = redis_errors.AuthenticationError(str(error))
            self._drop(redis_errors.ConnectionError("Redis refused the connection"))
            raise error from None

    def _drop(self, error: redis_errors.RedisError) -> None:
        """Closes the connection and fails every caller waiting on it."""
        transport = self._transport
        self._transport = None
        self._protocol = None
        self._ready = False
        if transport is not None:
            transport.abort()
        self._fail_pending(error)

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return  # an older connection, already dropped
        self._transport = None
        self._protocol = None
        self._ready = False
        message = f"Redis connection lost: {exc}" if exc else "Redis closed the connection"
        self._fail_pending(redis_errors.ConnectionError(message))

    def _fail_pending(self, error: redis_errors.RedisError) -> None:
        if isinstance(error, redis_errors.ConnectionError) and not isinstance(error, ReplyLost):
            # Every waiter's command was written when it was queued.
            error = ReplyLost(str(error))
        pending, self._pending = self._pending, collections.deque()
        for waiter, _ in pending:
            if not waiter.done():
                waiter.set_exception(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def aclose(self) -> None:
        self._closed = True
        self._drop(redis_errors.ConnectionError("Redis connection closed"))
