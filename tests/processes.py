"""The services as real OS processes (`python -m state_service` /
`python -m agent_service`) on ephemeral loopback ports, for tests that kill,
signal or restart them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import grpc

from state_service.storage.embedded import free_port
from tests.helpers import SERVING, health_status
from tests.patience import patience


@contextmanager
def _service_process(
    module: str, prefix: str, env: dict[str, str], output: int | None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        env={
            **os.environ,
            f"{prefix}LISTEN": f"127.0.0.1:{port}",
            f"{prefix}METRICS_PORT": "0",
            f"{prefix}HEALTH_INTERVAL_SECONDS": "0.2",
            **env,
        },
        stdout=output,
        stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
    )
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def state_service_process(
    redis_url: str, env: dict[str, str] | None = None, output: int | None = subprocess.DEVNULL
) -> AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    env = {"STATE_SERVICE_REDIS_URL": redis_url, **(env or {})}
    return _service_process("state_service", "STATE_SERVICE_", env, output)


def agent_service_process(
    state_target: str, env: dict[str, str] | None = None, output: int | None = subprocess.DEVNULL
) -> AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    env = {"AGENT_SERVICE_STATE_TARGET": state_target, **(env or {})}
    return _service_process("agent_service", "AGENT_SERVICE_", env, output)


async def wait_serving(address: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        try:
            if await health_status(address) == SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} never became ready")
