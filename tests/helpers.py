"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from state_service.storage.embedded import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(address: str, service: str = "") -> int:
    """The grpc.health.v1 status of `service` at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack aio types
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(response.status)


async def wait_health(address: str, expected: int, timeout: float = 15.0) -> None:
    """Waits (bounded) until the overall health of `address` is `expected`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await health_status(address) == expected:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} never reported {expected}")


async def wait_serving(address: str, timeout: float = 15.0) -> None:
    await wait_health(address, SERVING, timeout)


@contextmanager
def state_service_process(
    redis_url: str, *, log: Path | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `python -m state_service` process on a loopback port; yields its
    gRPC address. Its output goes to `log` (or nowhere)."""
    port = free_port()
    output: IO[bytes] | int = log.open("wb") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "state_service"],
        env={
            **os.environ,
            "STATE_SERVICE_LISTEN": f"127.0.0.1:{port}",
            "STATE_SERVICE_REDIS_URL": redis_url,
            "STATE_SERVICE_METRICS_PORT": "0",
            "STATE_SERVICE_HEALTH_INTERVAL_SECONDS": "0.2",
            **env,
        },
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if not isinstance(output, int):
            output.close()


async def redis_digest(client: Any) -> Any:
    """A digest of the whole Redis dataset: equal digests, equal data."""
    return await client.execute_command("DEBUG", "DIGEST")


def metric(name: str, **labels: str) -> float:
    """A sample of this process's default registry (0 if it does not exist yet)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def has_series(name: str, **labels: str) -> bool:
    """Whether the default registry has a sample `name` with (at least) these labels."""
    return any(
        sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        for family in REGISTRY.collect()
        for sample in family.samples
    )


async def scrape(port: int, host: str = "127.0.0.1") -> str:
    """The text of http://host:port/metrics."""

    def get() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    return await asyncio.to_thread(get)
