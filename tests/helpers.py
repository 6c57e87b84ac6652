"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(address: str, service: str = "") -> int:
    """The grpc.health.v1 status of `service` at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack aio types
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(response.status)


async def redis_digest(client: Any) -> Any:
    """A digest of the whole Redis dataset: equal digests, equal data."""
    return await client.execute_command("DEBUG", "DIGEST")
