"""Every Redis command statecar sends lives here; nothing else talks to Redis.

Key layout (all keys of one session share the hash tag ``{tenant:session}`` and
so one Redis Cluster slot, which keeps the Lua steps atomic on a cluster too)::

    <prefix>:{<tenant>:<session>}:m   meta hash (etag parts, counters, settings)
    <prefix>:{<tenant>:<session>}:l   the log: a list of "<seq>:<payload>" (log.py)
    <prefix>:{<tenant>:<session>}:r   request ids already applied -> response
    <prefix>:{<tenant>:<session>}:s   the stored summary (text + covered seq range)
    <prefix>:{<tenant>:<session>}:p   paused agent runs (approvals)
    <prefix>:{<tenant>:<session>}:f:<attempt>  a fork's staging list (short TTL)
    <prefix>:wf:{<tenant>:<workflow>} a workflow's shared state
    <prefix>:idx:{<tenant>}           sorted set of the tenant's session ids

The log list only changes at its tail (append, pop) or as a whole (delete,
expiry), so an index into it stays valid for as long as the entry exists; the
meta field ``trunc`` counts pops so a cache can tell "only grew" from "changed".

The tenant index lives in another slot than the sessions, so on Redis Cluster
no script may touch both. It is kept by separate steps whose order makes it
safe (see ``append`` and ``index_remove``): an index entry is written before
any step that may create a session and again after one that did; an entry is
removed only after its session is gone, and put back if a re-check finds the
session alive. So every live session is always listed; an entry whose session
died (crash between steps, expiry) is pruned when ListSessions meets it.

Durability on failover: with ``wait_replicas`` set, every write step is
followed by ``WAIT`` on the same connection, and a write that too few replicas
confirmed is answered as unavailable (it may or may not survive a failover;
retrying it with the same request_id is safe).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from state_service.errors import (
    EtagMismatch,
    IndexPending,
    ReplicationTimeout,
    SeqConflict,
    StoreAuthRefused,
    StoreFailover,
    StoreFull,
    StorePermissionDenied,
    StoreUnavailable,
)
from state_service.storage.connection import PipelinedConnection, ReplyLost

T = TypeVar("T")

ABSENT_ETAG = "0"
# Bounds of one read step (the ``read`` script): entries, and bytes past the
# first entry. Small enough that a step costs Redis well under a millisecond
# and its reply never keeps the shared pipelined connection busy for long
# (its watchdog drops it for everyone after socket_timeout); larger reads are
# several steps, each an atomic snapshot validated by the caller.
READ_STEP_ITEMS = 256
READ_STEP_BYTES = 1024 * 1024
TTL_PERSIST = -1
TTL_DEFAULT = 0

# Cluster redirections and outages: the slot is moving or has no primary yet
# (failover in progress). Retried a few times, then reported as unavailable.
_CLUSTER_TRANSIENT = (
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
)
# Scripts on a cluster retry for about 4 s with backoff: a failover (node
# timeout + election) fits, so a caller with a longer deadline sees it as
# latency, not as an error; a caller with a shorter one gets UNAVAILABLE at its
# deadline (servicer-side bound). Other commands use redis-py's own retries,
# which re-read the topology but do not back off, so they fail sooner.
_CLUSTER_ATTEMPTS = 12
_CLUSTER_RETRIES = 3


@dataclass(frozen=True, slots=True)
class RedisConnectOptions:
    """How to reach Redis: one node or a cluster, credentials, TLS, durability."""

    cluster: bool = False
    max_connections: int = 64
    socket_timeout: float = 2.0
    connect_timeout: float = 1.0
    username: str | None = None
    password: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    wait_replicas: int = 0
    wait_timeout_seconds: float = 0.5

    def __repr__(self) -> str:  # never show the password
        return f"RedisConnectOptions(cluster={self.cluster}, username={self.username!r})"


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


class SessionAbsent(Exception):
    """A write given no new incarnation (the durable tier's first attempt,
    see tiered.py) found no session to write to; nothing was written."""


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    etag: str
    first_seq: int
    last_seq: int
    replayed: bool
    # Tokens of the whole log after this append (-1: not known, as for a replay).
    log_tokens: int = -1


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


class ReadMode(enum.Enum):
    """What the entries of a read are (the read script's first reply)."""

    MISSING = "missing"  # no session (no entries)
    HIT = "hit"  # the cache is current (no entries)
    DELTA = "delta"  # entries start at the cache's item_count
    RESET = "reset"  # entries are the newest items
    RANGE = "range"  # entries are the requested index range


_READ_MODES = {mode.value.encode(): mode for mode in ReadMode}


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A head plus log entries read in the same atomic step."""

    head: SessionHead | None
    mode: ReadMode
    entries: list[bytes]


class SummaryCommit(enum.Enum):
    """How a summary compare-and-set ended."""

    OK = "ok"  # stored
    CONFLICT = "conflict"  # another writer moved the covered-up-to first
    STALE = "stale"  # the log changed (a pop, a delete) since the summary was made


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
class ForkChunk:
    """A chunk of a fork's source log, with the parts of the source's head it
    was read at: `incarnation` and `trunc` tell whether the log lost items
    between chunks; the settings are what the new session inherits."""

    incarnation: str
    trunc: int
    last_seq: int
    item_count: int
    ttl_setting: int
    strategy: str
    shares: str
    entries: list[bytes]


class ForkTarget(enum.Enum):
    """What fork_check found at the new session's id."""

    ABSENT = "absent"
    EXISTS = "exists"
    REPLAY = "replay"


@dataclass(frozen=True, slots=True)
class ForkRecord:
    """What a fork created ("etag copied up_to", the record kept for replays)."""

    etag: str
    copied: int
    up_to_seq: int

    @classmethod
    def parse(cls, raw: bytes) -> ForkRecord:
        etag, copied, up_to = raw.decode().split(" ")
        return cls(etag, int(copied), int(up_to))


class ForkInstall(enum.Enum):
    """How fork_install ended."""

    OK = "ok"  # the new session exists now, whole
    REPLAY = "replay"  # request_id had made it before; nothing done
    EXISTS = "exists"  # the id is taken; nothing done
    STALE = "stale"  # the staged copy is incomplete (expired); nothing done


@dataclass(frozen=True, slots=True)
class ForkInstalled:
    outcome: ForkInstall
    record: ForkRecord | None = None
    head: SessionHead | None = None


@dataclass(frozen=True, slots=True)
class StoredView:
    """A session's compacted view as read: its stored items (`blob`, see
    compaction.py) stand in for log indexes 0..covered_items-1 (seqs up to
    up_to_seq); `entries` are the log entries after them."""

    up_to_seq: int
    covered_items: int
    blob: bytes
    count: int
    entries: list[bytes]


@dataclass(frozen=True, slots=True)
class ViewRead:
    head: SessionHead | None
    view: StoredView | None


@dataclass(frozen=True, slots=True)
class ViewCommit:
    etag: str
    count: int
    up_to_seq: int
    replayed: bool


class PausedStatus(enum.Enum):
    PAUSED = "paused"
    CLAIMED = "claimed"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class PausedHeader:
    """A paused run's header field: status, expiry, creation, claim holder."""

    status: PausedStatus
    expire_ms: int
    create_ms: int
    claim_id: str

    @classmethod
    def parse(cls, raw: bytes) -> PausedHeader:
        status, expire, create, claim = raw.decode().split(" ")
        return cls(PausedStatus(status), int(expire), int(create), "" if claim == "-" else claim)


@dataclass(frozen=True, slots=True)
class PausedPut:
    """None header: the session is at its live-run limit (live_runs)."""

    header: PausedHeader | None
    replayed: bool
    live_runs: int = 0


class PausedClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # taken now by this claim id
    RESOLVED = "resolved"  # this claim id resolved it earlier
    HELD = "held"  # claimed by this claim id, not resolved yet
    BUSY = "busy"  # claimed by another claim id
    DONE = "done"  # resolved by another claim id
    MISSING = "missing"  # unknown or expired


@dataclass(frozen=True, slots=True)
class PausedClaim:
    outcome: PausedClaimOutcome
    header: PausedHeader | None
    body: bytes = b""
    approvals: bytes = b""


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


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _raised_inside_redis_client(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is in redis-py or asyncio's streams."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/redis/" in filename or "/asyncio/" in filename


@functools.lru_cache(maxsize=4096)
def _session_keys(prefix: str, tenant: str, session_id: str) -> SessionKeys:
    """A session's key names (remembered: the hot sessions ask on every call)."""
    base = f"{prefix}:{{{tenant}:{session_id}}}"
    return SessionKeys(meta=f"{base}:m", log=f"{base}:l", requests=f"{base}:r", summary=f"{base}:s")


def _pipelined_connection(url: str, options: RedisConnectOptions) -> PipelinedConnection:
    """The pipelined connection for a redis:// or unix:// URL; explicit
    credentials win over the URL's, as for the pool."""
    parsed: dict[str, Any] = dict(aioredis.connection.parse_url(url))
    password = options.password if options.password is not None else parsed.get("password")
    return PipelinedConnection(
        host=parsed.get("host", "localhost") if "path" not in parsed else None,
        port=int(parsed.get("port") or 6379),
        path=parsed.get("path"),
        username=options.username or parsed.get("username"),
        password=password,
        db=int(parsed.get("db") or 0),
        socket_timeout=options.socket_timeout,
        connect_timeout=options.connect_timeout,
    )


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
        client: aioredis.Redis | RedisCluster,
        *,
        key_prefix: str = "statecar",
        default_ttl_seconds: int = 86400,
        on_command: Callable[[str, float, bool], None] | None = None,
        wait_replicas: int = 0,
        wait_timeout_seconds: float = 0.5,
        pipelined: PipelinedConnection | None = None,
        read_step_bytes: int = READ_STEP_BYTES,
        client_once: aioredis.Redis | None = None,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain hash-tag braces")
        self._redis: Any = client
        # For writes that must not be sent twice (no request_id): a pool whose
        # connections do not resend a command after a lost connection.
        self._redis_once: Any = client_once or client
        self._cluster: RedisCluster | None = client if isinstance(client, RedisCluster) else None
        self.wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout_seconds * 1000))
        self._prefix = key_prefix
        self.default_ttl_seconds = default_ttl_seconds
        self._on_command = on_command
        # Single script calls on one node (the per-request path) go through
        # this connection when set; everything else through redis-py.
        self._pipelined = pipelined
        self.read_step_bytes = read_step_bytes
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
        options: RedisConnectOptions | None = None,
        **kwargs: Any,
    ) -> RedisStorage:
        """A storage on one Redis node (redis://, rediss://, unix://) or, with
        ``options.cluster``, on the Redis Cluster that node belongs to."""
        options = options or RedisConnectOptions(
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
        )
        connection: dict[str, Any] = {
            "socket_timeout": options.socket_timeout,
            "socket_connect_timeout": options.connect_timeout,
            "health_check_interval": 30,
        }
        if not url.startswith("unix:"):
            connection["socket_keepalive"] = True
        # Explicit credentials win over any in the URL (keep secrets out of URLs,
        # which end up in process listings and error messages).
        if options.username:
            connection["username"] = options.username
        if options.password is not None:
            connection["password"] = options.password
        tls_files = (options.tls_ca_file, options.tls_cert_file, options.tls_key_file)
        if any(f is not None for f in tls_files):
            if not url.startswith("rediss://"):
                raise ValueError("Redis TLS files need a rediss:// URL")
            connection.update(
                ssl_ca_certs=str(options.tls_ca_file) if options.tls_ca_file else None,
                ssl_certfile=str(options.tls_cert_file) if options.tls_cert_file else None,
                ssl_keyfile=str(options.tls_key_file) if options.tls_key_file else None,
            )
        kwargs.setdefault("wait_replicas", options.wait_replicas)
        kwargs.setdefault("wait_timeout_seconds", options.wait_timeout_seconds)
        if options.cluster:
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError("a Redis Cluster URL is redis:// or rediss://")
            # Retries here cover redirections and a failover in progress (the
            # cluster re-reads its topology between attempts); the caller's
            # deadline bounds the whole call. max_connections is per node.
            cluster = RedisCluster.from_url(
                url,
                **connection,
                max_connections=options.max_connections,
                retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), retries=_CLUSTER_RETRIES),
                # Serve the slots that have a primary while another fails over.
                require_full_coverage=False,
            )
            return cls(cluster, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            **connection,
            max_connections=options.max_connections,
            timeout=options.socket_timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
            retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        )
        once = aioredis.BlockingConnectionPool.from_url(
            url,
            **connection,
            max_connections=max(4, options.max_connections // 4),
            timeout=options.socket_timeout,
            retry=Retry(NoBackoff(), retries=0),
        )
        kwargs.setdefault("client_once", aioredis.Redis(connection_pool=once))
        if not url.startswith("rediss://"):
            kwargs.setdefault("pipelined", _pipelined_connection(url, options))
        return cls(aioredis.Redis(connection_pool=pool), **kwargs)

    @property
    def is_cluster(self) -> bool:
        return self._cluster is not None

    async def close(self) -> None:
        if self._pipelined is not None:
            await self._pipelined.aclose()
        if self._redis_once is not self._redis:
            await self._redis_once.aclose()
        await self._redis.aclose()

    # -- keys -----------------------------------------------------------------

    def keys(self, tenant: str, session_id: str) -> SessionKeys:
        return _session_keys(self._prefix, tenant, session_id)

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
            if isinstance(exc, redis_errors.OutOfMemoryError) or (
                "OOM command not allowed" in str(exc)
            ):
                raise StoreFull("the state store is out of memory; nothing was written") from exc
            if isinstance(exc, redis_errors.NoPermissionError):
                raise StorePermissionDenied(
                    "the state store (Redis) refused a command: its ACL user lacks a "
                    "permission statecar needs"
                ) from exc
            if isinstance(exc, _CLUSTER_TRANSIENT):
                raise StoreFailover(
                    "the state store (Redis Cluster) is failing over or resharding"
                ) from exc
            raise
        except redis_errors.AuthenticationError as exc:
            raise StoreAuthRefused(
                "the state store (Redis) refused statecar's credentials"
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise StoreUnavailable("the state store (Redis) is unreachable") from exc
        except _CLUSTER_TRANSIENT as exc:
            if _caused_by(exc, redis_errors.AuthenticationError):
                # No node of the cluster accepted our credentials.
                raise StoreAuthRefused(
                    "the state store (Redis) refused statecar's credentials"
                ) from exc
            raise StoreFailover(
                "the state store (Redis Cluster) is failing over or resharding"
            ) from exc
        except (AttributeError, TypeError) as exc:
            # redis-py's asyncio connections can leak these instead of a
            # ConnectionError when a peer closes a connection under a write
            # (redis/redis-py#3546, #4287; seen when a cluster node is killed).
            if not _raised_inside_redis_client(exc):
                raise
            raise StoreUnavailable("the state store (Redis) is unreachable") from exc
        finally:
            if self._on_command is not None:
                self._on_command(operation, time.perf_counter() - started, failed)

    async def _script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[bytes | str | int],
        *,
        write: bool = False,
        resend: bool = False,
        index_add: tuple[str, str] | None = None,
        operation: str | None = None,
    ) -> Any:
        """Runs a script by hash (loading it on NOSCRIPT).

        A ``write`` is sent again after a connection lost under it only with
        ``resend`` (it carries a request_id, so a resend replays): otherwise
        that is reported as unavailable, since Redis may have run it (an
        append stored twice, a pop whose item nobody receives, a delete
        answered NOT_FOUND). Reads are always sent again.

        ``index_add`` names the tenant index of a script that may create a
        session: on one node it is the script's KEYS[5] and the script adds the
        session in the same atomic step; on a cluster (the index is in another
        slot) it is added in a separate, earlier step. ``write`` scripts are
        followed by WAIT on the same connection when ``wait_replicas`` is set."""
        body, sha = self._scripts[name]
        label = operation or name
        wait = write and self.wait_replicas > 0
        if index_add is not None:
            if self._cluster is not None:
                await self._index_add(*index_add)
            else:
                keys = [*keys, index_add[0]]
        resend = resend or not write
        if not wait and self._pipelined is not None:
            # The common case on one node: one command on the shared pipelined
            # connection (see storage/connection.py).
            return await self._call(
                label, self._evalsha_pipelined(body, sha, keys, args, resend=resend)
            )
        if not wait and self._cluster is None:
            # The same without a pipelined connection: one command, no pipeline
            # bookkeeping. (On a cluster, scripts take _on_one_connection's
            # failover retries.)
            client = self._redis if resend else self._redis_once
            try:
                return await self._call(label, client.evalsha(sha, len(keys), *keys, *args))
            except redis_errors.NoScriptError:
                await self._call("script_load", self._redis.script_load(body))
                return await self._call(label, client.evalsha(sha, len(keys), *keys, *args))
        for attempt in range(2):
            commands: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args)]
            if wait:
                commands.append(("WAIT", self.wait_replicas, self._wait_ms))
            replies = await self._call(
                label, self._on_one_connection(keys[0], commands, resend=resend)
            )
            reply = replies[0]
            if isinstance(reply, redis_errors.NoScriptError) and attempt == 0:
                await self._call("script_load", self._redis.script_load(body))
                continue
            if isinstance(reply, Exception):
                await self._call(label, _reraise(reply))  # the script wrote nothing
            if wait:
                if isinstance(replies[-1], Exception):
                    await self._call(label, _reraise(replies[-1]))
                self._check_replicas(int(replies[-1]))
            return reply
        raise AssertionError("unreachable")

    async def _evalsha_pipelined(
        self,
        body: str,
        sha: str,
        keys: Sequence[str],
        args: Sequence[bytes | str | int],
        *,
        resend: bool,
    ) -> Any:
        """EVALSHA on the pipelined connection, loading the script on NOSCRIPT
        (after a Redis restart) and trying once more on a connection lost
        (a restarted Redis, a killed client connection): always if it was lost
        before the command was sent, after sending only if `resend`."""
        assert self._pipelined is not None
        connection = self._pipelined
        for attempt in range(3):
            try:
                return await connection.execute("EVALSHA", sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                if attempt == 2:
                    raise
                await connection.execute("SCRIPT", "LOAD", body)
            except ReplyLost:
                if attempt == 2 or not resend:
                    raise
            except redis_errors.ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check_replicas(self, acknowledged: int) -> None:
        if acknowledged < self.wait_replicas:
            raise ReplicationTimeout(
                f"the write was applied on the Redis primary but only {acknowledged} of "
                f"{self.wait_replicas} replicas confirmed it within {self._wait_ms} ms, so "
                "a failover could still lose it; retrying with the same request_id is "
                "safe (it returns the first response once replicated)",
                acknowledged=acknowledged,
                required=self.wait_replicas,
            )

    async def _on_one_connection(
        self, key: str, commands: Sequence[Sequence[Any]], *, resend: bool = True
    ) -> list[Any]:
        """Sends commands in order on one connection to the node that serves `key`
        (so a WAIT covers the writes before it); replies may be exceptions.
        A connection lost under them is tried again only if `resend`."""
        if self._cluster is None:
            pipe = (self._redis if resend else self._redis_once).pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
        cluster = self._cluster
        error: Exception = StoreUnavailable("the state store (Redis Cluster) is unreachable")
        for attempt in range(_CLUSTER_ATTEMPTS):
            if attempt:
                # The slot moved or its primary died: re-read the topology (one
                # refresh at a time; concurrent callers share it) and try again.
                await asyncio.sleep(min(0.05 * 2**attempt, 0.4))
                try:
                    await cluster.nodes_manager.initialize()
                except (redis_errors.RedisError, *_CLUSTER_TRANSIENT) as exc:
                    error = exc
                    continue
            await cluster.initialize()
            try:
                node = cluster.get_node_from_key(key)
                if node is None:
                    raise redis_errors.SlotNotCoveredError(f"no node serves {key!r}")
                pending = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
                await node.execute_pipeline(pending)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if not resend:
                    raise  # the node may have run them
                error = exc
                continue
            except _CLUSTER_TRANSIENT as exc:
                error = exc
                continue
            results = [command.result for command in pending]
            redirected = next((r for r in results if isinstance(r, _CLUSTER_TRANSIENT)), None)
            if redirected is None:
                return results
            error = redirected
        raise error

    async def _index_created(self, tenant: str, session_id: str) -> None:
        """The index step after a write that created a session: re-adds the
        entry if a concurrent prune removed it (a read first: the common case
        writes nothing, which also keeps it working at maxmemory)."""
        index = self.index_key(tenant)
        try:
            if await self._call("index_check", self._redis.zscore(index, session_id)) is None:
                await self._index_add(index, session_id)
        except (StoreUnavailable, StoreFull) as error:
            raise IndexPending(
                "the write was applied, but the new session could not be added to the "
                "session index; retry with the same request_id to complete it"
            ) from error

    async def _index_add(self, index: str, session_id: str) -> None:
        commands: list[tuple[Any, ...]] = [("ZADD", index, "NX", 0, session_id)]
        if self.wait_replicas > 0:
            commands.append(("WAIT", self.wait_replicas, self._wait_ms))
        replies = await self._call("index_add", self._on_one_connection(index, commands))
        for item in replies:
            if isinstance(item, Exception):
                await self._call("index_add", _reraise(item))
        if self.wait_replicas > 0:
            self._check_replicas(int(replies[-1]))

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
            session_id,
            *payloads,
        ]
        may_create = bool(payloads) and expected_etag in ("", ABSENT_ETAG)
        status, body, reply = await self._log_write(
            "append", tenant, session_id, keys, args, may_create=may_create, resend=bool(request_id)
        )
        # A replayed record carries the log's token count the first answer had.
        etag, first, last, *recorded = body.split(" ")
        if may_create and first == "1" and self._cluster is not None:
            # This step created the session (or replays the one that did): add
            # the entry again, in case a concurrent prune (which saw no session
            # yet) removed it between our two steps.
            await self._index_created(tenant, session_id)
        log_tokens = int(reply[2]) if len(reply) > 2 else int(recorded[0]) if recorded else -1
        return AppendOutcome(
            etag, int(first), int(last), replayed=status == "replay", log_tokens=log_tokens
        )

    async def _log_write(
        self,
        script: str,
        tenant: str,
        session_id: str,
        keys: SessionKeys,
        args: list[bytes | str | int],
        *,
        may_create: bool,
        resend: bool,
    ) -> tuple[str, str, Any]:
        """Runs a step that adds to the log (append, import): its status, body
        and whole reply; a conflict or a missing session is raised here.

        The index entry is part of a creating step on one node; on a cluster
        it goes first, so a crash between the two leaves an index entry
        ListSessions prunes, never a session missing from the index. Only a
        step that may create the session touches the index."""
        index_add = (self.index_key(tenant), session_id) if may_create else None
        reply = await self._script(
            script, keys.as_list(), args, write=True, resend=resend, index_add=index_add
        )
        status, body = reply[0].decode(), reply[1].decode()
        if status == "conflict":
            raise EtagMismatch(body)
        if status == "missing":
            raise SessionAbsent(session_id)
        return status, body, reply

    async def pop(
        self, tenant: str, session_id: str, *, request_id: str, expected_etag: str, now_ms: int
    ) -> PopOutcome:
        keys = self.keys(tenant, session_id)
        args: list[str | int] = [request_id, expected_etag, self.default_ttl_seconds, now_ms]
        reply = await self._script("pop", keys.as_list(), args, write=True, resend=bool(request_id))
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
            session_id,
        ]
        may_create = allow_missing and expected_etag in ("", ABSENT_ETAG)
        index_add = (self.index_key(tenant), session_id) if may_create else None
        reply = await self._script("update", keys.as_list(), args, write=True, index_add=index_add)
        status = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status == "missing":
            return None
        head = _parse_head(reply[1])
        if may_create and head is not None and head.version == 1 and self._cluster is not None:
            await self._index_created(tenant, session_id)  # as in append
        return head

    async def delete(self, tenant: str, session_id: str, *, expected_etag: str) -> bool:
        """Deletes the session; False if it did not exist."""
        keys = self.keys(tenant, session_id)
        reply = await self._script("delete", keys.as_list(), [expected_etag], write=True)
        status: str = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status != "ok":
            return False
        await self.index_remove(tenant, [session_id])
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
        newest_first: bool = False,
        operation: str = "read",
    ) -> ReadResult:
        """Reads the head and, atomically with it, either an index range (inclusive,
        negative counts from the end) or what `known` lacks of the newest `window`.

        One step returns at most READ_STEP_ITEMS entries and, past the first,
        `read_step_bytes` bytes: a range is cut at its end (at its start with
        `newest_first`), a window to its newest entries (mode RESET when that
        no longer reaches what `known` holds). Callers read more in further
        steps if they need it."""
        keys = self.keys(tenant, session_id)
        args: list[str | int] = (
            [known.incarnation, known.trunc, known.version, known.item_count]
            if known is not None
            else ["", "", "", 0]
        )
        args.append(window)
        args.extend(index_range if index_range is not None else ("", ""))
        args.extend(("back" if newest_first else "fwd", READ_STEP_ITEMS, self.read_step_bytes))
        reply = await self._script("read", keys.as_list(), args, operation=operation)
        return ReadResult(_parse_head(reply[0]), _READ_MODES[reply[1]], list(reply[2:]))

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

    async def head(self, tenant: str, session_id: str) -> SessionHead | None:
        """One session's head (the durable tier loads a session it archived)."""
        (found,) = await self.heads(tenant, [session_id])
        return found

    async def archived_page(
        self, tenant: str, after: str, count: int
    ) -> list[tuple[str, SessionHead]]:
        """Sessions kept elsewhere than Redis, in id order after `after`, with
        the heads they will have when loaded: none here (see tiered.py)."""
        return []

    async def index_page(self, tenant: str, after: str, count: int) -> list[str]:
        """Up to `count` session ids of the tenant's index, in id order, after `after`."""
        start = f"({after}" if after else "-"
        members = await self._call(
            "index_page",
            self._redis.zrangebylex(self.index_key(tenant), start, "+", start=0, num=count),
        )
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def index_remove(self, tenant: str, session_ids: Sequence[str]) -> None:
        """Removes index entries of sessions found gone, then re-checks them and
        puts back any that a concurrent first write re-created meanwhile (the
        index and the sessions are separate steps, on a cluster separate nodes).
        A creator that finished before the re-check is seen by it; one that
        finishes after it re-adds the entry itself (see ``append``)."""
        if not session_ids:
            return
        index = self.index_key(tenant)
        await self._call("index_remove", self._redis.zrem(index, *session_ids))
        heads = await self.heads(tenant, session_ids)
        for session_id, head in zip(session_ids, heads, strict=True):
            if head is not None:
                await self._index_add(index, session_id)

    async def index_tenants(self, batch: int) -> AsyncIterator[list[str]]:
        """The tenants that have a session index, a batch at a time (SCAN with
        COUNT `batch`: each step is bounded, whatever the number of keys)."""
        prefix = f"{self._prefix}:idx:{{"
        found: list[str] = []
        scan = self._redis.scan_iter(match=f"{prefix}*", count=batch, _type="zset")
        while True:
            try:
                key = await self._call("index_scan", anext(scan))
            except StopAsyncIteration:
                break
            name = key.decode() if isinstance(key, bytes) else key
            if name.startswith(prefix) and name.endswith("}"):
                found.append(name[len(prefix) : -1])
            if len(found) >= batch:
                yield found
                found = []
        if found:
            yield found

    async def try_lock(self, name: str, token: str, ttl_seconds: float) -> bool:
        """Takes the replica-wide lock `name` for `ttl_seconds` unless someone has it."""
        key = f"{self._prefix}:lock:{name}"
        taken = await self._call(
            "lock", self._redis.set(key, token, nx=True, px=max(1, int(ttl_seconds * 1000)))
        )
        return bool(taken)

    async def unlock(self, name: str, token: str) -> None:
        """Gives the lock back if this holder (`token`) still has it."""
        await self._script("unlock", [f"{self._prefix}:lock:{name}"], [token])

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
    ) -> SummaryCommit:
        """Stores a summary of first_seq..last_seq if the stored one still covers
        exactly up to `expected_upto` (compare-and-set)."""
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
        return SummaryCommit(reply[0].decode())

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
            "workflow_update", [self.workflow_key(tenant, workflow_id)], args, write=True
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
            "workflow_delete", [self.workflow_key(tenant, workflow_id)], [expected_etag], write=True
        )
        status: str = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        return status == "ok"

    # -- forks ----------------------------------------------------------------
    # A fork reads one session and creates another: on a cluster they are in
    # different slots, so no script can touch both. The copy is chunked into a
    # staging list in the new session's slot (fork_stage), then one script
    # there (fork_install) renames it into place with a new head: the new
    # session appears whole or not at all. The source is only read.

    def fork_staging_key(self, tenant: str, session_id: str, attempt: str) -> str:
        """A staging list of one fork attempt, in the new session's slot."""
        return f"{self._prefix}:{{{tenant}:{session_id}}}:f:{attempt}"

    async def fork_read(
        self, tenant: str, session_id: str, start: int, stop: int
    ) -> ForkChunk | None:
        """Log indexes start..stop (inclusive) of the source with its head, cut
        at the end to one read step (see ``read``); None if the source does not
        exist."""
        keys = self.keys(tenant, session_id)
        args = [start, stop, READ_STEP_ITEMS, self.read_step_bytes]
        reply = await self._script("fork_read", keys.as_list(), args)
        if reply[0] == b"missing":
            return None
        inc, trunc, last, count, ttl, strat, shares = reply[1:8]
        return ForkChunk(
            incarnation=inc.decode(),
            trunc=int(trunc),
            last_seq=int(last),
            item_count=int(count),
            ttl_setting=int(ttl),
            strategy=strat.decode(),
            shares=shares.decode(),
            entries=list(reply[8:]),
        )

    async def fork_check(
        self, tenant: str, session_id: str, request_id: str
    ) -> tuple[ForkTarget, ForkRecord | None]:
        keys = self.keys(tenant, session_id)
        reply = await self._script("fork_check", keys.as_list(), [request_id])
        found = ForkTarget(reply[0].decode())
        if found is not ForkTarget.REPLAY:
            return found, None
        if self._cluster is not None:
            # A retry after the install but before its index step finished.
            await self._index_created(tenant, session_id)
        return found, ForkRecord.parse(reply[1])

    async def fork_stage(self, staging_key: str, entries: Sequence[bytes], ttl_seconds: int) -> int:
        """Appends entries to a staging list; its length after."""
        reply = await self._script("fork_stage", [staging_key], [ttl_seconds, *entries], write=True)
        return int(reply)

    async def fork_discard(self, staging_key: str) -> None:
        await self._call("fork_discard", self._redis.delete(staging_key))

    async def fork_install(
        self,
        tenant: str,
        session_id: str,
        staging_key: str,
        *,
        request_id: str,
        copied: int,
        up_to_seq: int,
        tokens: int,
        now_ms: int,
        new_incarnation: str,
        ttl_setting: int,
        strategy: str,
        shares: str,
    ) -> ForkInstalled:
        """Makes the staged copy the new session's log, with a new head, in one
        step (or does nothing); the index entry as for a creating append."""
        keys = [*self.keys(tenant, session_id).as_list(), staging_key]
        args: list[str | int] = [
            request_id,
            copied,
            up_to_seq,
            tokens,
            now_ms,
            self.default_ttl_seconds,
            new_incarnation,
            ttl_setting,
            strategy,
            shares,
            session_id,
        ]
        index_add = (self.index_key(tenant), session_id)
        reply = await self._script("fork_install", keys, args, write=True, index_add=index_add)
        outcome = ForkInstall(reply[0].decode())
        if outcome is ForkInstall.OK:
            if self._cluster is not None:
                await self._index_created(tenant, session_id)  # as in append
            return ForkInstalled(outcome, ForkRecord.parse(reply[2]), _parse_head(reply[1]))
        if outcome is ForkInstall.REPLAY:
            if self._cluster is not None:
                await self._index_created(tenant, session_id)  # a retry completes it
            return ForkInstalled(outcome, ForkRecord.parse(reply[1]))
        return ForkInstalled(outcome)

    # -- compacted views -------------------------------------------------------

    async def view_read(self, tenant: str, session_id: str) -> ViewRead:
        """The head and, when current, the compacted view with the first read
        step (see ``read``) of the log after it: the view's entries end before
        the head's item count when more follow."""
        keys = self.keys(tenant, session_id)
        args = [READ_STEP_ITEMS, self.read_step_bytes]
        reply = await self._script("view_read", keys.as_list(), args)
        head = _parse_head(reply[0])
        if len(reply) < 2 or reply[1] != b"view":
            return ViewRead(head, None)
        upto, covered, blob, count = reply[2:6]
        view = StoredView(int(upto), int(covered), bytes(blob), int(count), list(reply[6:]))
        return ViewRead(head, view)

    async def view_commit(
        self,
        tenant: str,
        session_id: str,
        *,
        request_id: str,
        expected_etag: str,
        now_ms: int,
        up_to_seq: int,
        covered_items: int,
        blob: bytes,
        count: int,
    ) -> ViewCommit | None:
        """Stores a compacted view if the etag still matches; None if the
        session does not exist."""
        keys = self.keys(tenant, session_id)
        args: list[bytes | str | int] = [
            request_id,
            expected_etag,
            self.default_ttl_seconds,
            now_ms,
            up_to_seq,
            covered_items,
            blob,
            count,
        ]
        reply = await self._script("view_commit", keys.as_list(), args, write=True)
        status = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status == "missing":
            return None
        etag, stored, upto = reply[1].decode().split(" ")
        return ViewCommit(etag, int(stored), int(upto), replayed=status == "replay")

    # -- paused runs -------------------------------------------------------------
    # Agent runs paused on tools needing approval, in one hash per session in
    # the session's slot (see paused_put in scripts.lua for its fields).

    def paused_key(self, tenant: str, session_id: str) -> str:
        return f"{self._prefix}:{{{tenant}:{session_id}}}:p"

    async def paused_put(
        self,
        tenant: str,
        session_id: str,
        run_id: str,
        *,
        expected_etag: str,
        now_ms: int,
        ttl_ms: int,
        max_runs: int,
        body: bytes,
        approvals: bytes,
    ) -> PausedPut:
        keys = [self.keys(tenant, session_id).meta, self.paused_key(tenant, session_id)]
        args: list[bytes | str | int] = [
            expected_etag,
            run_id,
            now_ms,
            ttl_ms,
            max_runs,
            body,
            approvals,
        ]
        reply = await self._script("paused_put", keys, args, write=True)
        status = reply[0].decode()
        if status == "conflict":
            raise EtagMismatch(reply[1].decode())
        if status == "full":
            return PausedPut(None, replayed=False, live_runs=int(reply[1]))
        return PausedPut(PausedHeader.parse(reply[1]), replayed=status == "replay")

    async def paused_list(
        self, tenant: str, session_id: str, *, now_ms: int
    ) -> list[tuple[str, PausedHeader, bytes]]:
        """(run id, header, approvals) of the live runs."""
        keys = [self.paused_key(tenant, session_id), self.keys(tenant, session_id).meta]
        reply = await self._script("paused_list", keys, [now_ms])
        return [
            (reply[i].decode(), PausedHeader.parse(reply[i + 1]), bytes(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    async def paused_claim(
        self, tenant: str, session_id: str, run_id: str, *, claim_id: str, now_ms: int
    ) -> PausedClaim:
        reply = await self._script(
            "paused_claim",
            [self.paused_key(tenant, session_id), self.keys(tenant, session_id).meta],
            [run_id, claim_id, now_ms],
            write=True,
        )
        outcome = PausedClaimOutcome(reply[0].decode())
        if outcome is PausedClaimOutcome.MISSING:
            return PausedClaim(outcome, None)
        header = PausedHeader.parse(reply[1])
        if len(reply) < 4:
            return PausedClaim(outcome, header)
        return PausedClaim(outcome, header, bytes(reply[2] or b""), bytes(reply[3] or b""))

    async def paused_resolve(
        self,
        tenant: str,
        session_id: str,
        run_id: str,
        *,
        claim_id: str,
        now_ms: int,
        result: bytes,
    ) -> tuple[bool, PausedHeader | None]:
        """Whether this claim id now holds the run resolved, and its header."""
        reply = await self._script(
            "paused_resolve",
            [self.paused_key(tenant, session_id)],
            [run_id, claim_id, now_ms, result],
            write=True,
            resend=True,  # idempotent for the same claim id
        )
        status = reply[0].decode()
        if status == "missing":
            return False, None
        return status == "ok", PausedHeader.parse(reply[1])

    async def ping(self) -> None:
        """Readiness: every primary answers (a cluster with a primary down is
        failing over, and part of the sessions are unavailable until it has)."""
        if self._cluster is not None:
            await self._call("ping", self._cluster.ping(target_nodes=RedisCluster.PRIMARIES))
        else:
            await self._call("ping", self._redis.ping())

    async def info_memory(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("info", self._redis.info("memory"))
        return info

    # -- import and erasure (data portability) ---------------------------------

    def paused_runs_key(self, tenant: str, session_id: str) -> str:
        """The hash of a session's paused agent runs (written by the agent
        approvals feature), in the session's slot."""
        return f"{self._prefix}:{{{tenant}:{session_id}}}:p"

    async def import_entries(
        self,
        tenant: str,
        session_id: str,
        entries: Sequence[bytes],
        *,
        first_seq: int,
        last_seq: int,
        request_id: str,
        expected_etag: str,
        new_incarnation: str,
        now_ms: int,
        tokens: int,
    ) -> AppendOutcome:
        """Appends "<seq>:<payload>" entries that keep their seqs (first_seq..
        last_seq, increasing) in one step, as ``append`` does; raises
        SeqConflict when first_seq is not above the session's last seq."""
        keys = self.keys(tenant, session_id)
        args: list[bytes | str | int] = [
            request_id,
            expected_etag,
            self.default_ttl_seconds,
            now_ms,
            new_incarnation,
            tokens,
            session_id,
            first_seq,
            last_seq,
            *entries,
        ]
        may_create = bool(entries) and expected_etag in ("", ABSENT_ETAG)
        status, body, reply = await self._log_write(
            "import", tenant, session_id, keys, args, may_create=may_create, resend=bool(request_id)
        )
        if status == "behind":
            etag, last = body.split(" ")
            raise SeqConflict(session_id, int(last), etag)
        etag, first, last = body.split(" ")
        if may_create and self._cluster is not None:
            await self._index_created(tenant, session_id)  # as in append
        log_tokens = int(reply[2]) if len(reply) > 2 else -1
        return AppendOutcome(
            etag, int(first), int(last), replayed=status == "replay", log_tokens=log_tokens
        )

    async def erase_session_keys(self, tenant: str, session_id: str) -> tuple[bool, int]:
        """Deletes every key of a session whose name is known (meta, log,
        request ids, summary and view, paused runs) in one DEL (one slot), then
        its index entry. (Whether its meta existed, keys deleted.) Fork
        staging lists have random names: see ``tenant_keys``."""
        keys = self.keys(tenant, session_id)
        names = [*keys.as_list(), self.paused_runs_key(tenant, session_id)]
        existed, deleted = await self._call(
            "erase_session",
            self._on_one_connection(keys.meta, [("EXISTS", keys.meta), ("DEL", *names)]),
        )
        for reply in (existed, deleted):
            if isinstance(reply, Exception):
                await self._call("erase_session", _reraise(reply))
        removed = await self._call(
            "erase_index", self._redis.zrem(self.index_key(tenant), session_id)
        )
        return bool(existed), int(deleted) + int(removed)

    async def tenant_keys(self, tenant: str, batch: int) -> AsyncIterator[list[str]]:
        """Every key of a tenant's sessions and workflows (all carry the hash
        tag ``{<tenant>:...}``), a batch at a time, found with SCAN MATCH
        COUNT `batch` (each step bounded, on every primary of a cluster).
        Tenant ids have no glob characters (shared_runtime.auth); a key may
        come twice, as SCAN promises no more."""
        scan = self._redis.scan_iter(match=f"{self._prefix}:*{{{tenant}:*", count=batch)
        # One SCAN for both kinds; the exact check drops keys of another
        # deployment whose prefix merely starts with ours.
        starts = (f"{self._prefix}:{{{tenant}:", f"{self._prefix}:wf:{{{tenant}:")
        found: list[str] = []
        while True:
            try:
                key = await self._call("tenant_scan", anext(scan))
            except StopAsyncIteration:
                break
            name = key.decode() if isinstance(key, bytes) else key
            if name.startswith(starts):
                found.append(name)
            if len(found) >= batch:
                yield found
                found = []
        if found:
            yield found

    async def delete_keys(self, keys: Sequence[str]) -> int:
        """Deletes keys (on a cluster split by slot by the client); how many existed."""
        if not keys:
            return 0
        deleted: int = await self._call("erase_keys", self._redis.delete(*keys))
        return int(deleted)

    async def delete_index(self, tenant: str) -> int:
        """Deletes a tenant's session index; 1 if it existed."""
        return await self.delete_keys([self.index_key(tenant)])

    def session_of_key(self, tenant: str, key: str) -> str | None:
        """The session id of a session's meta key of `tenant`, else None."""
        start = f"{self._prefix}:{{{tenant}:"
        if key.startswith(start) and key.endswith("}:m"):
            return key[len(start) : -3]
        return None
