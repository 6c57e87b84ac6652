"""Start-up failures a user can cause are one line that names the cause and
the setting that changes it, exit 78 (EX_CONFIG), and leave nothing running:
no embedded redis-server survives a failed start or a SIGKILLed owner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from state_service.storage.embedded import free_port

EX_CONFIG = 78


@contextmanager
def _taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _redis_servers_on(data_dir: Path) -> list[int]:
    """redis-server processes serving data_dir (their command line names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"redis-server" in a for a in args) and str(data_dir).encode() in args:
            found.append(int(proc.name))
    return [pid for pid in found if _alive(pid)]


def _redis_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _state_env(data_dir: Path) -> dict[str, str]:
    return {
        "STATE_SERVICE_DATA_DIR": str(data_dir),
        "STATE_SERVICE_LISTEN": f"127.0.0.1:{free_port()}",
        "STATE_SERVICE_METRICS_PORT": "0",
    }


def _started_state_service(data_dir: Path) -> subprocess.Popen[str]:
    """A state service on an embedded Redis in data_dir, once it is ready."""
    service = subprocess.Popen(
        [sys.executable, "-m", "state_service"],
        env={**os.environ, **_state_env(data_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert service.stdout is not None
    assert "ready on" in service.stdout.readline()
    return service


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    failures = [line for line in lines if "cannot start" in line]
    assert len(failures) == 1, output
    assert "Traceback" not in output, output
    return failures[0]


@pytest.mark.parametrize("setting", ["LISTEN", "METRICS_PORT"])
def test_a_taken_port_names_the_port_and_the_setting_and_stops_redis(
    tmp_path: Path, setting: str
) -> None:
    data_dir = tmp_path / "state"
    with _taken_port() as port:
        env = {
            "STATE_SERVICE_DATA_DIR": str(data_dir),
            "STATE_SERVICE_LISTEN": f"127.0.0.1:{free_port()}",
            "STATE_SERVICE_METRICS_PORT": str(free_port()),
        }
        env["STATE_SERVICE_" + setting] = f"127.0.0.1:{port}" if setting == "LISTEN" else str(port)
        result = _run("state_service", env)
    assert result.returncode == EX_CONFIG, result.stderr
    line = _one_line(result.stderr)
    assert str(port) in line
    assert f"STATE_SERVICE_{setting}" in line
    assert f"--{setting.lower().replace('_', '-')}" in line
    assert (data_dir / "redis.log").exists(), "the embedded Redis was never started"
    assert not _redis_servers_on(data_dir), "the embedded redis-server outlived the failed start"


def test_a_taken_agent_port_is_one_line() -> None:
    with _taken_port() as port:
        result = _run(
            "agent_service",
            {
                "AGENT_SERVICE_LISTEN": f"127.0.0.1:{port}",
                "AGENT_SERVICE_METRICS_PORT": "0",
                "AGENT_SERVICE_STATE_TARGET": f"127.0.0.1:{free_port()}",
            },
        )
    assert result.returncode == EX_CONFIG, result.stderr
    line = _one_line(result.stderr)
    assert str(port) in line and "AGENT_SERVICE_LISTEN" in line


def test_a_data_dir_in_use_names_the_process_holding_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    first = _started_state_service(data_dir)
    try:
        result = _run("state_service", _state_env(data_dir))
        assert result.returncode == EX_CONFIG, result.stderr
        line = _one_line(result.stderr)
        assert f"pid {first.pid}" in line
        assert "STATE_SERVICE_DATA_DIR" in line
        assert first.poll() is None, "the failed start disturbed the running service"
    finally:
        first.terminate()
        first.wait(30)


def test_a_sigkilled_service_takes_its_embedded_redis_with_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    service = _started_state_service(data_dir)
    try:
        pid = _redis_pid(data_dir)
        assert pid is not None and _alive(pid)
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait(30)
    if not Path("/usr/bin/setpriv").exists() and not _wait_gone(pid, 1):
        pytest.skip("without util-linux's setpriv the orphan is stopped at the next start")
    assert _wait_gone(pid), "redis-server outlived the SIGKILLed service"
