"""A real Prometheus server (and promtool) for tests.

`running_prometheus(directory, [ScrapeTarget("statecar-state", "127.0.0.1:9464"),
...])`, or the `prometheus_factory` fixture in conftest.py, starts the
`prometheus` binary on a free loopback port with its own storage directory, a
1 s scrape and rule-evaluation interval and, optionally, rule files; it yields
a client for the HTTP API. Add a ScrapeTarget per service (job "statecar-agent"
for the agent service, as the rules in monitoring/ expect).

The binaries come from the Debian `prometheus` package (.ci/run installs it).
Outside CI (env CI unset) tests that need them are skipped when they are
absent; in CI they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from state_service.storage.embedded import free_port
from tests.patience import patience

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yaml"))


def require_binary(name: str) -> str:
    """The path of `name` (prometheus, promtool); skips the test when it is
    missing outside CI, fails it in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"`{name}` is not installed: install the Debian package `prometheus` "
        "(apt-get install -y prometheus), as .ci/run does"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must have it")
    pytest.skip(message)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str  # host:port of the /metrics endpoint
    metrics_path: str = "/metrics"


def scrape_config(
    targets: Sequence[ScrapeTarget],
    *,
    interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> dict[str, Any]:
    jobs: dict[tuple[str, str], list[str]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.metrics_path), []).append(target.address)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "static_configs": [{"targets": addresses}],
            }
            for (job, path), addresses in jobs.items()
        ],
    }


class PrometheusError(AssertionError):
    pass


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            return json.loads(response.read())

    async def api(self, path: str, **params: str) -> Any:
        body = await asyncio.to_thread(self._get, f"/api/v1/{path}", params)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}]."""
        data = await self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: not a vector: {data}")
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The single value of an instant query; None when it is empty."""
        result = await self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr}: {len(result)} series, expected one")
        return float(result[0]["value"][1])

    async def values_by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(expr)}

    async def wait_for(
        self,
        expr: str,
        predicate: Callable[[float | None], bool],
        *,
        timeout: float = 30.0,
    ) -> float | None:
        """Polls `expr` until its value satisfies `predicate` (a bounded wait,
        not a timing assertion); returns that value."""
        deadline = time.monotonic() + patience(timeout)
        last: float | None = None
        while True:
            last = await self.value(expr)
            if predicate(last):
                return last
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr} stayed at {last} for {timeout} s; see {self.log}")
            await asyncio.sleep(0.2)

    async def wait_for_targets(self, jobs: Sequence[str], timeout: float = 30.0) -> None:
        """Waits until every job's targets have been scraped successfully."""
        for job in jobs:
            await self.wait_for(f'min(up{{job="{job}"}})', lambda v: v == 1, timeout=timeout)

    async def wait_for_scrape_after(self, job: str, timeout: float = 30.0) -> None:
        """Waits until a scrape of `job` *started* after this call, so every
        counter it returns includes what happened before the call."""
        begun = time.time()
        expr = f'min(timestamp(up{{job="{job}"}}))'
        await self.wait_for(expr, lambda v: v is not None and v > begun, timeout=timeout)


@asynccontextmanager
async def running_prometheus(
    directory: Path,
    targets: Sequence[ScrapeTarget],
    *,
    rule_files: Sequence[Path] = (),
    interval: str = "1s",
    ready_timeout: float = 60.0,
) -> AsyncIterator[Prometheus]:
    binary = require_binary("prometheus")
    home = directory
    home.mkdir(parents=True, exist_ok=True)
    config = home / "prometheus.yml"
    # JSON is YAML: no YAML library needed.
    config.write_text(
        json.dumps(scrape_config(targets, interval=interval, rule_files=rule_files), indent=2)
    )
    port = free_port()
    log = home / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        await _wait_ready(prometheus, ready_timeout)
        yield prometheus
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


async def _wait_ready(prometheus: Prometheus, timeout: float) -> None:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    deadline = time.monotonic() + patience(timeout)
    while not await asyncio.to_thread(ready):
        if prometheus.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {prometheus.process.returncode}: "
                f"{prometheus.log.read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus not ready after {timeout} s; see {prometheus.log}")
        await asyncio.sleep(0.2)
