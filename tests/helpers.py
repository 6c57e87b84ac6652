"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tests.patience import patience

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
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        try:
            if await health_status(address) == expected:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} never reported {expected}")


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
