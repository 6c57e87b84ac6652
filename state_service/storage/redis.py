"""Every Redis command statecar sends lives here; nothing else talks to Redis.

Key layout (all keys of one session share the hash tag ``{tenant:session}`` and
so one Redis Cluster slot, which keeps the Lua steps atomic on a cluster too)::

    <prefix>:{<tenant>:<session>}:m   meta hash (etag parts, counters, settings)
    <prefix>:{<tenant>:<session>}:l   the log: a list of "<seq>:<Item bytes>"
    <prefix>:{<tenant>:<session>}:r   request ids already applied -> response
    <prefix>:{<tenant>:<session>}:s   the stored summary (text + covered seq range)
    <prefix>:idx:{<tenant>}           sorted set of the tenant's session ids

The log list only changes at its tail (append, pop) or as a whole (delete,
expiry), so an index into it stays valid for as long as the entry exists; the
meta field ``trunc`` counts pops so a cache can tell "only grew" from "changed".
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from state_service.serving.errors import EtagMismatch, ResourceExhausted, Unavailable

T = TypeVar("T")

ABSENT_ETAG = "0"
TTL_PERSIST = -1
TTL_DEFAULT = 0


@dataclass(frozen=True, slots=True)
class SessionHead:
    """A consistent snapshot of a session's meta hash."""

    incarnation: str
    version: int
    last_seq: int
    item_count: int
    trunc: int
    ttl_setting: int
    create_ms: int
    update_ms: int
    pttl_ms: int
    strategy: int = 0
    shares: str = ""
    log_tokens: int = -1
    summary_upto: int = 0

    @property
    def etag(self) -> str:
        return f"{self.incarnation}.{self.version}"


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """A stored summary: `text` (sealed if encryption is on) covers seqs
    first_seq..last_seq of incarnation `incarnation`."""

    incarnation: str
    first_seq: int
    last_seq: int
    text: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    etag: str
    first_seq: int
    last_seq: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class PopOutcome:
    etag: str
    entry: bytes | None
    replayed: bool


@dataclass(frozen=True, slots=True)
class CacheKnowledge:
    """What a cache already holds of a session, so a read fetches only the rest."""

    incarnation: str
    trunc: int
    version: int
    item_count: int


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A head plus log entries read in the same atomic step.

    mode: "missing" (no session), "hit" (the cache is current), "delta"
    (entries start at the cache's item_count), "reset" (entries are the newest
    items), "range" (entries are the requested index range).
    """

    head: SessionHead | None
    mode: str
    entries: list[bytes]


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    incarnation: str
    version: int
    body: bytes
    create_ms: int
    update_ms: int
    pttl_ms: int

    @property
    def etag(self) -> str:
        return f"{self.incarnation}.{self.version}"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    meta: str
    log: str
    requests: str
    summary: str

    def as_list(self) -> list[str]:
        return [self.meta, self.log, self.requests, self.summary]


def _load_scripts() -> dict[str, str]:
    text = resources.files("state_service.storage").joinpath("scripts.lua").read_text()
    sections: dict[str, list[str]] = {}
    current = "preamble"
    for line in text.splitlines():
        if line.startswith("--- "):
            current = line[4:].strip()
            continue
        sections.setdefault(current, []).append(line)
    common = "\n".join(sections.pop("common"))
    sections.pop("preamble", None)
    return {name: common + "\n" + "\n".join(body) for name, body in sections.items()}


async def _reraise(error: Exception) -> None:
    raise error


HEAD_FIELDS = (
    "inc",
    "ver",
    "last",
    "n",
    "trunc",
    "ttl",
    "ctime",
    "mtime",
    "strat",
    "shares",
    "tok",
)


def _parse_head(raw: Sequence[Any]) -> SessionHead | None:
    """A head from the HEAD_FIELDS values, then PTTL, then the summary's upto."""
    if not raw or raw[0] is None:
        return None
    inc, ver, last, count, trunc, ttl, ctime, mtime, strat, shares, tok = raw[:11]
    pttl = int(raw[11]) if len(raw) > 11 and raw[11] is not None else -1
    upto = int(raw[12]) if len(raw) > 12 and raw[12] is not None else 0
    return SessionHead(
        incarnation=inc.decode(),
        version=int(ver or 0),
        last_seq=int(last or 0),
        item_count=int(count or 0),
        trunc=int(trunc or 0),
        ttl_setting=int(ttl or 0),
        create_ms=int(ctime or 0),
        update_ms=int(mtime or ctime or 0),
        pttl_ms=pttl,
        strategy=int(strat or 0),
        shares=shares.decode() if shares else "",
        log_tokens=int(tok) if tok is not None else -1,
        summary_upto=upto,
    )


class RedisStorage:
    """The session log on plain Redis (>= 6.2, no modules)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "statecar",
        default_ttl_seconds: int = 86400,
        on_command: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain hash-tag braces")
        self._redis = client
        self._prefix = key_prefix
        self.default_ttl_seconds = default_ttl_seconds
        self._on_command = on_command
        self._scripts = {
            name: (body, hashlib.sha1(body.encode()).hexdigest())
            for name, body in _load_scripts().items()
        }

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 64,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        **kwargs: Any,
    ) -> RedisStorage:
        if not url.startswith("unix:"):
            kwargs.setdefault("socket_keepalive", True)
        pool_options = {k: kwargs.pop(k) for k in ("socket_keepalive",) if k in kwargs}
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            **pool_options,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
            retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        )
        return cls(aioredis.Redis(connection_pool=pool), **kwargs)

    async def close(self) -> None:
        await self._redis.aclose()

    # -- keys -----------------------------------------------------------------

    def keys(self, tenant: str, session_id: str) -> SessionKeys:
        base = f"{self._prefix}:{{{tenant}:{session_id}}}"
        return SessionKeys(
            meta=f"{base}:m", log=f"{base}:l", requests=f"{base}:r", summary=f"{base}:s"
        )

    def index_key(self, tenant: str) -> str:
        return f"{self._prefix}:idx:{{{tenant}}}"

    # -- error mapping and timing ---------------------------------------------

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        started = time.perf_counter()
        failed = True
        try:
            result = await awaitable
            failed = False
            return result
        except redis_errors.NoScriptError:
            # Normal after a Redis restart: the caller loads the script and
            # retries. A round trip, not an error.
            failed = False
            raise
        except redis_errors.ResponseError as exc:
            # Plain commands answer "OOM ..."; inside a script the same refusal is
            # wrapped as "Error running script ... -OOM command not allowed ...".
            # Scripts only write after all reads, so the refused write is the
            # script's first: nothing of it was applied.
            if "OOM command not allowed" in str(exc):
                raise ResourceExhausted(
                    "the state store is out of memory; nothing was written",
                    reason="BACKEND_FULL",
                ) from exc
            raise
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise Unavailable("the state store (Redis) is unreachable") from exc
        finally:
            if self._on_command is not None:
                self._on_command(operation, time.perf_counter() - started, failed)

    async def _script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[bytes | str | int],
        *,
        index_add: tuple[str, str] | None = None,
        operation: str | None = None,
    ) -> Any:
        """Runs a script by hash (loading it on NOSCRIPT), optionally preceded, in
        the same round trip, by adding a session id to a tenant index."""
        body, sha = self._scripts[name]
        label = operation or name
        if index_add is None:
            # The common case: one command, no pipeline bookkeeping.
            try:
                return await self._call(label, self._redis.evalsha(sha, len(keys), *keys, *args))
            except redis_errors.NoScriptError:
                await self._call("script_load", self._redis.script_load(body))
                return await self._call(label, self._redis.evalsha(sha, len(keys), *keys, *args))
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            if index_add is not None:
                pipe.zadd(index_add[0], {index_add[1]: 0}, nx=True)
            pipe.evalsha(sha, len(keys), *keys, *args)
            replies = await self._call(name, pipe.execute(raise_on_error=False))
            reply = replies[-1]
            if isinstance(reply, redis_errors.NoScriptError) and attempt == 0:
                await self._call("script_load", self._redis.script_load(body))
                continue
            if isinstance(reply, Exception):
                await self._call(name, _reraise(reply))
            return reply
        raise AssertionError("unreachable")

    # -- writes ---------------------------------------------------------------

    async def append(
        self,
        tenant: str,
        session_id: str,
        payloads: Sequence[bytes],
        *,
        request_id: str,
        expected_etag: str,
        new_incarnation: str,
        now_ms: int,
        tokens: int = 0,
    ) -> AppendOutcome:
        keys = self.keys(tenant, session_id)
        args: list[bytes | str | int] = [
            request_id,
            expected_etag,
            self.default_ttl_seconds,
            now_ms,
            new_incarnation,
            tokens,
            *payloads,
        ]
        # The index entry goes first (in the same round trip): a crash between
        # the two leaves an index entry ListSessions prunes, never a session
        # missing from the index. Only an append that may create the session
        # touches the index.
        may_create = bool(payloads) and expected_etag in ("", ABSENT_ETAG)
        index_add = (self.index_key(tenant), session_id) if may_create else None
        reply = await self._script("append", keys.as_list(), args, index_add=index_add)
        status, body = reply[0].decode(), reply[1].decode()
        if status == "conflict":
            raise EtagMismatch(body)
        etag, first, last = body.split(" ")
        return AppendOutcome(etag, int(first), int(last), replayed=status == "replay")

    async def pop(
        self, tenant: str, session_id: str, *, request_id: str, expected_etag: str, now_ms: int
    ) -> PopOutcome:
        keys = self.keys(tenant, session_id)
        args: list[str | int] = [request_id, expected_etag, self.default_ttl_seconds, now_ms]
        reply = await self._script("pop", keys.as_list(), args)
        status, body = reply[0].decode(), reply[1]
        if status == "conflict":
            raise EtagMismatch(body.decode())
        etag, _, entry = body.partition(b" ")
        return PopOutcome(etag.decode(), entry or None, replayed=status == "replay")

    async def update(
        self,
        tenant: str,
        session_id: str,
        *,
        ttl_setting: int | None,
        expected_etag: str,
        allow_missing: bool,
        new_incarnation: str,
        now_ms: int,
        strategy: int | None = None,
        shares: str | None = None,
    ) -> SessionHead | None:
        """Changes settings; None leaves a setting as it is (strategy 0 and
        shares "" reset to the service default)."""
        keys = self.keys(tenant, session_id)
        args: list[str | int] = [
            expected_etag,
            self.default_ttl_seconds,
            now_ms,
            new_incarnation,
            "1" if allow_missing else "0",
            "" if ttl_setting is None else str(ttl_setting),
            "" if strategy is None else str(strategy),
            "" if shares is None else (shares or "-"),
        ]
        may_create = allow_missing and expected_etag in ("", ABSENT_ETAG)
        index_add = (self.index_key(tenant), session_id) if may_create else None
        reply = await self._script("update", keys.as_list(), args, index_add=index_add)
        status = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status == "missing":
            return None
        return _parse_head(reply[1])

    async def delete(self, tenant: str, session_id: str, *, expected_etag: str) -> bool:
        """Deletes the session; False if it did not exist."""
        keys = self.keys(tenant, session_id)
        reply = await self._script("delete", keys.as_list(), [expected_etag])
        status: str = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status != "ok":
            return False
        await self._call("index_remove", self._redis.zrem(self.index_key(tenant), session_id))
        return True

    # -- reads ----------------------------------------------------------------

    async def read(
        self,
        tenant: str,
        session_id: str,
        *,
        known: CacheKnowledge | None = None,
        window: int = 0,
        index_range: tuple[int, int] | None = None,
        operation: str = "read",
    ) -> ReadResult:
        """Reads the head and, atomically with it, either an index range (inclusive,
        negative counts from the end) or what `known` lacks of the newest `window`."""
        keys = self.keys(tenant, session_id)
        args: list[str | int] = (
            [known.incarnation, known.trunc, known.version, known.item_count]
            if known is not None
            else ["", "", "", 0]
        )
        args.append(window)
        args.extend(index_range if index_range is not None else ("", ""))
        reply = await self._script("read", keys.as_list(), args, operation=operation)
        return ReadResult(_parse_head(reply[0]), reply[1].decode(), list(reply[2:]))

    async def heads(self, tenant: str, session_ids: Sequence[str]) -> list[SessionHead | None]:
        """Reads the heads of several sessions (one round trip on a single node)."""
        if not session_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            meta = self.keys(tenant, session_id).meta
            pipe.hmget(meta, *HEAD_FIELDS)
            pipe.pttl(meta)
        replies = await self._call("heads", pipe.execute())
        return [_parse_head([*replies[i], replies[i + 1]]) for i in range(0, len(replies), 2)]

    async def index_page(self, tenant: str, after: str, count: int) -> list[str]:
        """Up to `count` session ids of the tenant's index, in id order, after `after`."""
        start = f"({after}" if after else "-"
        members = await self._call(
            "index_page",
            self._redis.zrangebylex(self.index_key(tenant), start, "+", start=0, num=count),
        )
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def index_remove(self, tenant: str, session_ids: Sequence[str]) -> None:
        if session_ids:
            await self._call("index_remove", self._redis.zrem(self.index_key(tenant), *session_ids))

    # -- summaries ------------------------------------------------------------

    async def summary(self, tenant: str, session_id: str) -> SummaryRecord | None:
        """The stored summary of the session (of whichever incarnation wrote it)."""
        key = self.keys(tenant, session_id).summary
        values: list[Any] = await self._call(
            "summary_get", self._redis.hmget(key, "inc", "from", "upto", "text", "tok")
        )
        inc, first, upto, text, tok = values
        if inc is None or upto is None:
            return None
        return SummaryRecord(
            inc.decode(), int(first or 1), int(upto), bytes(text or b""), int(tok or 0)
        )

    async def commit_summary(
        self,
        tenant: str,
        session_id: str,
        *,
        incarnation: str,
        trunc: int,
        expected_upto: int,
        first_seq: int,
        last_seq: int,
        text: bytes,
        tokens: int,
    ) -> str:
        """Stores a summary of first_seq..last_seq if the stored one still covers
        exactly up to `expected_upto` (compare-and-set). Returns "ok",
        "conflict" (another writer moved it) or "stale" (the log changed)."""
        keys = self.keys(tenant, session_id)
        args: list[bytes | str | int] = [
            incarnation,
            trunc,
            expected_upto,
            last_seq,
            first_seq,
            text,
            tokens,
        ]
        reply = await self._script("summary_commit", keys.as_list(), args)
        status: str = reply[0].decode()
        return status

    # -- workflows ------------------------------------------------------------

    def workflow_key(self, tenant: str, workflow_id: str) -> str:
        return f"{self._prefix}:wf:{{{tenant}:{workflow_id}}}"

    async def get_workflow(self, tenant: str, workflow_id: str) -> WorkflowRecord | None:
        key = self.workflow_key(tenant, workflow_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(key, "inc", "ver", "body", "ctime", "mtime")
        pipe.pttl(key)
        (inc, ver, body, ctime, mtime), pttl = await self._call("workflow_get", pipe.execute())
        if inc is None:
            return None
        return WorkflowRecord(inc.decode(), int(ver), body, int(ctime), int(mtime), int(pttl))

    async def put_workflow(
        self,
        tenant: str,
        workflow_id: str,
        body: bytes,
        *,
        expected_etag: str,
        allow_missing: bool,
        new_incarnation: str,
        now_ms: int,
    ) -> WorkflowRecord | None:
        """Replaces the workflow body if the etag matches; None if missing."""
        args: list[bytes | str | int] = [
            expected_etag,
            "1" if allow_missing else "0",
            self.default_ttl_seconds,
            now_ms,
            new_incarnation,
            body,
        ]
        reply = await self._script(
            "workflow_update", [self.workflow_key(tenant, workflow_id)], args
        )
        status = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status == "missing":
            return None
        inc, ver, ctime, mtime = (part.decode() for part in reply[1:5])
        return WorkflowRecord(
            inc, int(ver), body, int(ctime), int(mtime), self.default_ttl_seconds * 1000
        )

    async def delete_workflow(self, tenant: str, workflow_id: str, *, expected_etag: str) -> bool:
        reply = await self._script(
            "workflow_delete", [self.workflow_key(tenant, workflow_id)], [expected_etag]
        )
        status: str = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        return status == "ok"

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())

    async def info_memory(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("info", self._redis.info("memory"))
        return info
