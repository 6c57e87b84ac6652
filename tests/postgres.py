"""A real PostgreSQL server for tests, from the binaries on the machine.

`PostgresServer(directory)` runs `initdb` once and `postgres` on a free
loopback port (no Unix socket, trust authentication for loopback only,
fsync off: tests stop it cleanly). `stop()` / `start()` take it down and
bring it back on the same port and data, for fault tests. The binaries are
found with `pg_config --bindir`, on PATH, or under /usr/lib/postgresql/*/bin
(the Debian package `postgresql`, which .ci/run installs). Outside CI (env CI
unset) tests that need them are skipped when they are absent; in CI they fail.

PostgreSQL refuses to run as root, so when the tests run as root the server
runs as the `postgres` user if there is one (the Debian package creates it),
else as `nobody`, in a data directory made for that user under the system's
temporary directory (pytest's own temporary directories are private to root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from state_service.storage.embedded import free_port
from tests.patience import patience

USER = "statecar"


def _bindir() -> Path | None:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(found))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    return None


def require_postgres() -> Path:
    """The directory of initdb and postgres; skips the test when they are
    missing outside CI, fails it in CI."""
    directory = _bindir()
    if directory is not None:
        return directory
    message = (
        "PostgreSQL's server binaries (initdb, postgres) are not installed: install the "
        "Debian package `postgresql` (apt-get install -y postgresql), as .ci/run does"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must have it")
    pytest.skip(message)


def _run_as() -> pwd.struct_passwd | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root, and there is no `postgres` or `nobody` user to run PostgreSQL")


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = require_postgres()
        self.user = _run_as()
        self.directory = Path(tempfile.mkdtemp(prefix="statecar-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.directory / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    @property
    def uid(self) -> int | None:
        return self.user.pw_uid if self.user is not None else None

    @property
    def gid(self) -> int | None:
        return self.user.pw_gid if self.user is not None else None

    def init(self) -> None:
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.directory,
            timeout=patience(120),
            user=self.uid,
            group=self.gid,
        )

    def start(self) -> None:
        log = self.log.open("ab")
        try:
            self.process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=40",
                    "-c",
                    "shared_buffers=16MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                user=self.uid,
                group=self.gid,
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + patience(30)
        isready = self.bindir / "pg_isready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            ready = subprocess.run(
                [str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER],
                capture_output=True,
                timeout=10,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not get ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """A fast shutdown (SIGINT: clients are disconnected)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=patience(30))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
