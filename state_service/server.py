"""The state service process: storage, cache, gRPC server, health, metrics and
a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from shared_runtime.auth import AuthInterceptor, auth_interceptor, parse_delegates
from shared_runtime.errors import ServiceError
from shared_runtime.grpc_metrics import ServerMetricsInterceptor, server_metrics
from shared_runtime.health import Readiness
from shared_runtime.interceptors import (
    ExceptionToStatusInterceptor,
    LoggingInterceptor,
    backend_timeout,
)
from shared_runtime.items import prepare_input_item_check
from shared_runtime.metrics_http import MetricsEndpoint
from shared_runtime.process import (
    StartupError,
    add_health_reflection_and_bind,
    create_server,
    reachable_address,
    serve_until_terminated,
    setting_hint,
)
from shared_runtime.server_chain import ServerChain
from state_service import heavy_work, metrics
from state_service.cache import CACHE_NAME, SessionCache
from state_service.compression.engine import Compression, build_compression
from state_service.encryption import KeyRing
from state_service.errors import (
    StoreAuthRefused,
    StorePermissionDenied,
    StoreUnavailable,
    WorkDeadline,
)
from state_service.grpc_errors import to_service_error
from state_service.heavy_work import HeavyWork
from state_service.index_sweep import IndexSweeper
from state_service.reader import LogReader
from state_service.servicer import StateServicer
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import EmbeddedRedis, EmbeddedRedisError
from state_service.storage.redis import RedisConnectOptions, RedisStorage
from state_service.tokens import make_token_counter
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from state_service.archiver import Archiver

logger = logging.getLogger("statecar.state")


_CLOSE_TIMEOUT_SECONDS = 5.0


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StateService"].full_name
ERROR_DOMAIN = "state.statecar.dev"


@dataclass
class StateEngine:
    """Everything a state service is besides its gRPC server: storage, cache,
    log reader, compression, readiness, background work and the servicer.
    StateServer serves it over gRPC; state_service.in_process runs it inside
    another process (an agent replica in sidecar mode) with no gRPC hop."""

    settings: StateServiceSettings
    storage: RedisStorage
    servicer: StateServicer
    cache: SessionCache | None
    readiness: Readiness
    compression: Compression
    heavy: HeavyWork
    sweeper: IndexSweeper
    embedded: EmbeddedRedis | None = None
    archiver: Archiver | None = None
    _stopped: bool = False

    @classmethod
    async def start(
        cls, settings: StateServiceSettings, undo: contextlib.AsyncExitStack
    ) -> StateEngine:
        """Starts the engine; `undo` gets the cleanup of every step, so a start
        that fails later leaves nothing running (no embedded redis-server, no
        Redis connections, no background tasks)."""
        embedded = None
        redis_url = settings.redis_url
        if not redis_url:
            embedded = EmbeddedRedis(settings.data_dir)
            undo.push_async_callback(asyncio.to_thread, embedded.close)
            try:
                embedded.launch()  # on the loop's thread: see launch()
                redis_url = await asyncio.to_thread(embedded.wait_ready)
            except EmbeddedRedisError as error:
                raise StartupError(
                    f"{error}; choose another data directory with "
                    f"{setting_hint(settings, 'data_dir')}, or use a Redis of your own "
                    f"with {setting_hint(settings, 'redis_url')}"
                ) from None
            logger.info("embedded redis-server at %s (data in %s)", redis_url, settings.data_dir)
        durable: dict[str, Any] = {}
        if settings.postgres_url is not None:
            durable = await _durable_tier(settings, undo)
        storage_class: Any = RedisStorage
        if durable:
            from state_service.storage.tiered import TieredStorage

            storage_class = TieredStorage
        storage: RedisStorage = storage_class.from_url(
            redis_url,
            options=RedisConnectOptions(
                cluster=settings.redis_cluster,
                max_connections=settings.redis_max_connections,
                socket_timeout=settings.redis_timeout_seconds,
                connect_timeout=settings.redis_connect_timeout_seconds,
                username=settings.redis_username or None,
                password=settings.redis_password_value(),
                tls_ca_file=settings.redis_tls_ca_file,
                tls_cert_file=settings.redis_tls_cert_file,
                tls_key_file=settings.redis_tls_key_file,
                wait_replicas=settings.redis_wait_replicas,
                wait_timeout_seconds=settings.redis_wait_timeout_seconds,
            ),
            key_prefix=settings.key_prefix,
            default_ttl_seconds=settings.default_ttl_seconds,
            on_command=metrics.observe_redis,
            read_step_bytes=settings.redis_read_step_bytes,
            **durable,
        )
        undo.push_async_callback(storage.close)
        await _check_redis(storage, settings)
        cache = (
            SessionCache(
                max_sessions=settings.cache_max_sessions,
                ttl_seconds=settings.cache_ttl_seconds,
                max_items=settings.cache_max_items_per_session,
                max_bytes=settings.cache_max_bytes,
            )
            if settings.cache_enabled
            else None
        )
        keys = KeyRing(settings.encryption_keys_file) if settings.encryption_keys_file else None
        if settings.item_schema == "openai-agents":
            await asyncio.to_thread(prepare_input_item_check)
        counter = make_token_counter(settings.token_counter, settings.tiktoken_encoding)
        logger.info("counting tokens with %s", counter.name)
        heavy = HeavyWork(
            per_tenant=settings.tenant_heavy_requests,
            retry_after_seconds=settings.tenant_busy_retry_seconds,
            wait_seconds=settings.tenant_heavy_wait_seconds,
        )
        undo.callback(heavy.close)
        reader = LogReader(
            storage, cache=cache, token_counter=counter, keys=keys, offload=heavy.run
        )
        compression = build_compression(
            settings,
            storage,
            counter,
            reader.read_range,
            seal=keys.seal if keys is not None else None,
            open_=keys.open if keys is not None else None,
            offload=heavy.run,
        )

        def on_readiness(ready: bool) -> None:
            metrics.REDIS_UP.set(1 if ready else 0)
            # The caches cannot vouch for anything while Redis is unreachable.
            if not ready:
                if cache is not None:
                    cache.clear()
                compression.clear()

        readiness = Readiness(
            [SERVICE_NAME],
            storage.ping,
            interval=settings.health_interval_seconds,
            failure_threshold=settings.health_failure_threshold,
            on_change=on_readiness,
        )
        metrics.build_info()
        metrics.initialize(CACHE_NAME)
        metrics.SERVING.set_function(lambda: 1.0 if readiness.ready else 0.0)
        server_metrics().initialize(pb.DESCRIPTOR.services_by_name["StateService"])
        servicer = StateServicer.over(
            storage,
            reader,
            settings,
            token_counter=counter,
            keys=keys,
            compression=compression,
            heavy=heavy,
            durable=durable.get("tier"),
        )
        await readiness.start()
        undo.push_async_callback(readiness.stop)
        compression.start()
        undo.push_async_callback(compression.stop)
        sweeper = IndexSweeper(
            storage,
            interval_seconds=settings.index_sweep_interval_seconds,
            batch=settings.index_sweep_batch,
            pause_seconds=settings.index_sweep_pause_seconds,
        )
        sweeper.start()
        undo.push_async_callback(sweeper.stop)
        archiver = None
        if durable:
            from state_service.archiver import Archiver
            from state_service.storage.tiered import TieredStorage

            assert isinstance(storage, TieredStorage)
            metrics.initialize_durable_tier()
            archiver = Archiver(
                storage,
                interval_seconds=settings.postgres_archive_interval_seconds,
                batch=settings.postgres_archive_batch,
            )
            archiver.start()
            undo.push_async_callback(archiver.stop)
        return cls(
            settings=settings,
            storage=storage,
            servicer=servicer,
            cache=cache,
            readiness=readiness,
            compression=compression,
            heavy=heavy,
            sweeper=sweeper,
            embedded=embedded,
            archiver=archiver,
        )

    def interceptors(self, auth: AuthInterceptor | None) -> list[grpc.aio.ServerInterceptor]:
        """The server interceptor chain every call to the engine goes through,
        over gRPC or in process: metrics, logging, errors to statuses (with
        the deadline), then `auth` (resolves the tenant)."""
        # Fused into one wrapper per unary method (shared_runtime/server_chain.py).
        return [
            ServerChain(
                ServerMetricsInterceptor(),
                LoggingInterceptor(),
                ExceptionToStatusInterceptor(ERROR_DOMAIN, _deadline_error),
                auth,
            )
        ]

    def add_to_server(self, server: Any) -> None:
        """Registers the StateService and grpc.health.v1 handlers."""
        pb_grpc.add_StateServiceServicer_to_server(self.servicer, server)
        self.readiness.add_to_server(server)

    async def stop(self) -> None:
        """Stops background work and closes Redis; callers stop serving first."""
        if self._stopped:
            return
        self._stopped = True
        await self.compression.stop()
        await self.sweeper.stop()
        if self.archiver is not None:
            await self.archiver.stop()
        self.heavy.close()
        await self.readiness.stop()
        # Bounded: a shutdown must not hang on closing Redis connections (seen
        # with a cluster under load, and with redis-py's pool after a cancelled
        # command). asyncio.wait, not wait_for: wait_for waits for the cancelled
        # close to finish, which is exactly what can hang.
        closing = asyncio.ensure_future(self.storage.close())
        _, unfinished = await asyncio.wait({closing}, timeout=_CLOSE_TIMEOUT_SECONDS)
        if unfinished:
            closing.cancel()
            logger.warning("closing the Redis connections timed out; exiting anyway")
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.close)


@dataclass
class StateServer:
    """The state service process: a StateEngine served over gRPC."""

    engine: StateEngine
    server: grpc.aio.Server
    port: int
    metrics_endpoint: MetricsEndpoint | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def settings(self) -> StateServiceSettings:
        return self.engine.settings

    @property
    def storage(self) -> RedisStorage:
        return self.engine.storage

    @property
    def servicer(self) -> StateServicer:
        return self.engine.servicer

    @property
    def cache(self) -> SessionCache | None:
        return self.engine.cache

    @property
    def readiness(self) -> Readiness:
        return self.engine.readiness

    @property
    def compression(self) -> Compression:
        return self.engine.compression

    @property
    def heavy(self) -> HeavyWork:
        return self.engine.heavy

    @property
    def embedded(self) -> EmbeddedRedis | None:
        return self.engine.embedded

    @property
    def archiver(self) -> Archiver | None:
        return self.engine.archiver

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def address(self) -> str:
        return reachable_address(self.settings.listen, self.port)

    @classmethod
    async def start(cls, settings: StateServiceSettings) -> StateServer:
        """Starts the service; a failed start leaves nothing running behind
        (no embedded redis-server, no Redis connections, no bound ports)."""
        async with contextlib.AsyncExitStack() as undo:
            engine = await StateEngine.start(settings, undo)
            auth = auth_interceptor(
                settings.auth, settings.auth_tokens_file, parse_delegates(settings.auth_delegates)
            )
            server = create_server(settings, engine.interceptors(auth), settings.max_message_bytes)
            pb_grpc.add_StateServiceServicer_to_server(engine.servicer, server)
            port = add_health_reflection_and_bind(server, settings, engine.readiness, SERVICE_NAME)
            endpoint = MetricsEndpoint.configured(settings, undo)
            await server.start()
            undo.push_async_callback(server.stop, 0)
            instance = cls(engine, server, port, endpoint)
            logger.info("state service listening on %s", instance.address)
            undo.pop_all()  # started: from now on stop() owns the cleanup
            return instance
        raise AssertionError("unreachable")

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, let in-flight RPCs finish, then close Redis."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.readiness.drain()
        await self.server.stop(self.settings.drain_seconds if grace is None else grace)
        await self.engine.stop()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        logger.info("state service stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _deadline_error() -> ServiceError:
    """What a caller hears when its deadline passes: DEADLINE_EXCEEDED if it
    was waiting for its own CPU work (abandoned), else Redis was slow."""
    if heavy_work.abandoned():
        metrics.WORK_ABANDONED.inc()
        return to_service_error(WorkDeadline())
    return backend_timeout()


async def _durable_tier(
    settings: StateServiceSettings, undo: contextlib.AsyncExitStack
) -> dict[str, Any]:
    """The durable tier's storage arguments (docs/durable-tier.md); imported
    only when it is configured, so the Redis-only default pays nothing."""
    assert settings.postgres_url is not None
    if settings.redis_cluster:
        raise StartupError(
            "the durable tier (STATE_SERVICE_POSTGRES_URL) needs a single Redis node; "
            "unset STATE_SERVICE_REDIS_CLUSTER or STATE_SERVICE_POSTGRES_URL"
        )
    try:
        from state_service.storage.postgres import PostgresTier, SchemaNotReady
        from state_service.storage.tiered import TierOptions
    except ImportError as error:
        raise StartupError(
            f"STATE_SERVICE_POSTGRES_URL is set but the PostgreSQL driver is missing ({error}); "
            "install statecar with the `postgres` extra (pip install 'statecar[postgres]')"
        ) from None
    try:
        tier = await PostgresTier.connect(
            settings.postgres_url.get_secret_value(),
            pool_size=settings.postgres_pool_size,
            timeout_seconds=settings.postgres_timeout_seconds,
        )
    except ValueError as error:  # a malformed URL (never shown: it holds a password)
        raise StartupError(
            f"STATE_SERVICE_POSTGRES_URL is not a valid postgresql:// URL ({type(error).__name__})"
        ) from None
    undo.push_async_callback(tier.close)
    from state_service.errors import DurableTierUnavailable

    try:
        await tier.check_schema()
    except SchemaNotReady as error:
        raise StartupError(str(error)) from None
    except DurableTierUnavailable:
        # Hot sessions do not need it: serve them, and archive once it is back.
        logger.warning(
            "PostgreSQL (the durable tier) is not reachable yet; sessions not in Redis "
            "are UNAVAILABLE until it is, and its schema is not checked"
        )
    return {"tier": tier, "tier_options": TierOptions(settings.postgres_max_backlog_sessions)}


async def _check_redis(storage: RedisStorage, settings: StateServiceSettings) -> None:
    """Refuses to start on credentials Redis rejects (a config error that will
    not heal); an unreachable Redis only delays readiness."""
    timeout = settings.redis_connect_timeout_seconds + settings.redis_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            await storage.ping()
    except StoreUnavailable as error:
        if isinstance(error, StoreAuthRefused | StorePermissionDenied):
            user = settings.redis_username or "the URL's or default user"
            raise StartupError(
                f"Redis rejected statecar's credentials ({error.message}; user: {user}); "
                "check STATE_SERVICE_REDIS_USERNAME and STATE_SERVICE_REDIS_PASSWORD"
            ) from None
        logger.warning("Redis is not reachable yet; readiness stays NOT_SERVING until it is")
    except TimeoutError:
        logger.warning("Redis did not answer yet; readiness stays NOT_SERVING until it does")


async def serve(settings: StateServiceSettings) -> None:
    await serve_until_terminated(lambda: StateServer.start(settings), "state service")
