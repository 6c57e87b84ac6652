"""The state service process: storage, cache, gRPC server, health, metrics and
a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_reflection.v1alpha import reflection

from state_service import metrics
from state_service.cache import CACHE_NAME, SessionCache
from state_service.compression.engine import Compression, build_compression
from state_service.encryption import KeyRing
from state_service.servicer import StateServicer
from state_service.serving.auth import AuthInterceptor, authenticator_for
from state_service.serving.errors import Unavailable
from state_service.serving.grpc_metrics import ServerMetricsInterceptor, server_metrics
from state_service.serving.health import Readiness
from state_service.serving.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from state_service.serving.metrics_http import MetricsEndpoint
from state_service.serving.tls import ReloadingServerCredentials
from state_service.sessions import SessionStore
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import EmbeddedRedis
from state_service.storage.redis import RedisConnectOptions, RedisStorage
from state_service.tokens import make_token_counter
from state_service.workflows import WorkflowStore
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

logger = logging.getLogger("statecar.state")


_CLOSE_TIMEOUT_SECONDS = 5.0


class StartupError(RuntimeError):
    """A configuration the service cannot run with (message safe to log)."""


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StateService"].full_name
ERROR_DOMAIN = "state.statecar.dev"


def server_options(
    *,
    max_message_bytes: int,
    max_connection_age_seconds: float,
    drain_seconds: float,
    keepalive_seconds: float,
) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Clients behind a Kubernetes Service balance per connection; closing
        # old connections lets them find new pods.
        ("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(drain_seconds, 1) * 1000)),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass
class StateServer:
    settings: StateServiceSettings
    server: grpc.aio.Server
    storage: RedisStorage
    store: SessionStore
    cache: SessionCache | None
    readiness: Readiness
    port: int
    compression: Compression
    embedded: EmbeddedRedis | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        if host in ("::", "0.0.0.0"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @classmethod
    async def start(cls, settings: StateServiceSettings) -> StateServer:
        embedded = None
        redis_url = settings.redis_url
        if not redis_url:
            embedded = EmbeddedRedis(settings.data_dir)
            redis_url = await asyncio.to_thread(embedded.start)
            logger.info("embedded redis-server at %s (data in %s)", redis_url, settings.data_dir)
        storage = RedisStorage.from_url(
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
        )
        await _check_redis(storage, settings, embedded)
        cache = (
            SessionCache(
                max_sessions=settings.cache_max_sessions,
                ttl_seconds=settings.cache_ttl_seconds,
                max_items=settings.cache_max_items_per_session,
            )
            if settings.cache_enabled
            else None
        )
        keys = KeyRing(settings.encryption_keys_file) if settings.encryption_keys_file else None
        counter = make_token_counter(settings.token_counter, settings.tiktoken_encoding)
        logger.info("counting tokens with %s", counter.name)
        store = SessionStore(storage, cache=cache, token_counter=counter, keys=keys)
        compression = build_compression(
            settings,
            storage,
            counter,
            store.read_range,
            seal=keys.seal if keys is not None else None,
            open_=keys.open if keys is not None else None,
        )
        store.compression = compression

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
            on_change=on_readiness,
        )
        metrics.build_info()
        metrics.initialize(CACHE_NAME)
        metrics.SERVING.set_function(lambda: 1.0 if readiness.ready else 0.0)
        server_metrics().initialize(pb.DESCRIPTOR.services_by_name["StateService"])
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ServerMetricsInterceptor(),
            LoggingInterceptor(),
            ExceptionToStatusInterceptor(ERROR_DOMAIN),
        ]
        authenticator = authenticator_for(settings.auth, settings.auth_tokens_file)
        if authenticator is not None:
            interceptors.append(AuthInterceptor(authenticator))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(
                max_message_bytes=settings.max_message_bytes,
                max_connection_age_seconds=settings.max_connection_age_seconds,
                drain_seconds=settings.drain_seconds,
                keepalive_seconds=settings.keepalive_seconds,
            ),
        )
        pb_grpc.add_StateServiceServicer_to_server(
            StateServicer(store, WorkflowStore(storage), settings), server
        )
        readiness.add_to_server(server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server
        )
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = ReloadingServerCredentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
            port = server.add_secure_port(settings.listen, tls.credentials)
        else:
            port = server.add_insecure_port(settings.listen)
        if port == 0:
            raise RuntimeError(f"could not bind {settings.listen}")
        endpoint = None
        if settings.metrics_port:
            endpoint = MetricsEndpoint.start(settings.metrics_host, settings.metrics_port)
        await server.start()
        await readiness.start()
        compression.start()
        instance = cls(
            settings=settings,
            server=server,
            storage=storage,
            store=store,
            cache=cache,
            readiness=readiness,
            port=port,
            compression=compression,
            embedded=embedded,
            metrics_endpoint=endpoint,
        )
        logger.info("state service listening on %s", instance.address)
        return instance

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, let in-flight RPCs finish, then close Redis."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.readiness.drain()
        await self.server.stop(self.settings.drain_seconds if grace is None else grace)
        await self.compression.stop()
        await self.readiness.stop()
        try:
            # Bounded: a shutdown must not hang on a Redis node that does not
            # answer (seen once with a cluster under load).
            await asyncio.wait_for(self.storage.close(), _CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            logger.warning("closing the Redis connections timed out; exiting anyway")
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.close)
        logger.info("state service stopped")

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def _check_redis(
    storage: RedisStorage, settings: StateServiceSettings, embedded: EmbeddedRedis | None
) -> None:
    """Refuses to start on credentials Redis rejects (a config error that will
    not heal); an unreachable Redis only delays readiness."""
    timeout = settings.redis_connect_timeout_seconds + settings.redis_timeout_seconds
    try:
        await asyncio.wait_for(storage.ping(), timeout)
    except Unavailable as error:
        if error.reason in ("BACKEND_AUTH", "BACKEND_PERMISSION"):
            await storage.close()
            if embedded is not None:
                await asyncio.to_thread(embedded.close)
            user = settings.redis_username or "the URL's or default user"
            raise StartupError(
                f"Redis rejected statecar's credentials ({error.message}; user: {user}); "
                "check STATE_SERVICE_REDIS_USERNAME and STATE_SERVICE_REDIS_PASSWORD"
            ) from None
        logger.warning("Redis is not reachable yet; readiness stays NOT_SERVING until it is")
    except TimeoutError:
        logger.warning("Redis did not answer yet; readiness stays NOT_SERVING until it does")


async def serve(settings: StateServiceSettings) -> None:
    app = await StateServer.start(settings)
    print(f"state service ready on {app.address}", flush=True)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(app.stop())))
    await app.wait_for_termination()
    if stopping:
        await asyncio.gather(*stopping)
