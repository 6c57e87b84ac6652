"""The Kubernetes manifests (k8s/) and the image (Dockerfile), without a
cluster: every overlay renders with `kubectl kustomize` and validates against
the Kubernetes OpenAPI schemas (kubernetes-validate, offline); the references
that would otherwise fail only in a cluster are checked; and the dev and
sidecar overlays are run — each container's own command and env as local
processes on loopback — and serve a real Chat.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from agent_service.client import AgentClient
from agent_service.server import SERVICE_NAME as AGENT_API
from agent_service.settings import AgentServiceSettings
from state_service.client import StateClient
from state_service.server import SERVICE_NAME as STATE_API
from state_service.serving.health import LIVENESS_SERVICE
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import free_port
from tests.manifests import (
    K8S,
    KUBECTL,
    OVERLAYS,
    ROOT,
    MissingReference,
    Obj,
    Pod,
    PodRunner,
    Sources,
    container_env,
    container_ports,
    containers,
    example_secrets,
    kill_pod,
    loopback_for,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    selects,
    start_pod,
    stop_pod,
    target_container_port,
    volume_files,
    wait_ready,
    workloads,
)

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: the k8s/ manifests cannot be rendered "
    "(install kubectl, which has kustomize built in, to run these tests)",
)

# The oldest Kubernetes the manifests support (native sidecar containers are
# on by default from 1.29) and the newest whose schemas kubernetes-validate has.
SCHEMA_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Custom resources: no schema in the core set; checked structurally below.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
SETTINGS: dict[str, type[BaseSettings]] = {
    "state-service": StateServiceSettings,
    "agent-service": AgentServiceSettings,
}
HEALTH_SERVICES = {"state-service": STATE_API, "agent-service": AGENT_API}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)


def render(path: str) -> tuple[Obj, ...]:
    from tests.manifests import render as kustomize

    return kustomize(path)


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class reads."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = set()
    for name, info in settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def statecar_containers(objects: tuple[Obj, ...]) -> list[tuple[Obj, Obj, str]]:
    """(workload, container, console script) of every container running the image."""
    found = []
    for workload in workloads(objects):
        for container in containers(pod_spec(workload)):
            command = container.get("command", [])
            if command and command[0] in CONSOLE_SCRIPTS:
                found.append((workload, container, command[0]))
    return found


def settings_from(settings: type[BaseSettings], env: dict[str, str]) -> Any:
    """The settings a process with exactly this environment would get."""
    with pytest.MonkeyPatch.context() as patch:
        import os

        for name in list(os.environ):
            if name in env_names(settings):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return settings()


def sources_for(overlay: str) -> Sources:
    return Sources.of(render(f"overlays/{overlay}"), example_secrets(overlay))


# -- rendering and schemas ---------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("path", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_renders_with_kubectl_kustomize(path: str) -> None:
    objects = render(path)
    assert workloads(objects)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    errors = []
    validated = 0
    for obj in [*render(f"overlays/{overlay}"), *example_secrets(overlay)]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            validated += 1
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {path}: {error.message}")
    assert errors == []
    assert validated > 0


def test_the_validator_catches_a_misspelt_field() -> None:
    """kubernetes-validate's strict mode refuses unknown fields, so a typo in a
    manifest fails the test above instead of being dropped by the API server."""
    probe = {"grpc": {"port": 50051, "sevice": "liveness"}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": probe}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, SCHEMA_VERSIONS[-1], strict=True)


# -- running the manifests ---------------------------------------------------------


@asynccontextmanager
async def running_overlay(
    overlay: str, directory: Path
) -> AsyncIterator[tuple[PodRunner, list[Pod]]]:
    objects = render(f"overlays/{overlay}")
    runner = PodRunner(objects, sources_for(overlay), loopback_for(objects, free_port), directory)
    pods: list[Pod] = []
    try:
        for workload in workloads(objects):
            pods.append(await start_pod(runner, workload))
        for pod in pods:
            await wait_ready(runner, pod)
        yield runner, pods
    finally:
        for pod in pods:
            kill_pod(pod)


def service_address(runner: PodRunner, service: str, port_name: str) -> str:
    svc = named(runner.objects, "Service", service)
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name)
    return f"127.0.0.1:{runner.loopback.ports[runner.loopback.services[service][port]]}"


@needs_kubectl
@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["dev", "sidecar"])
async def test_the_overlay_runs_and_serves_a_chat(overlay: str, tmp_path: Path) -> None:
    async with running_overlay(overlay, tmp_path) as (runner, pods):
        agent = service_address(runner, "statecar-agent", "grpc")
        async with AgentClient(agent, timeout=20.0) as agents:
            await agents.chat("k8s-1", "My name is Ada and I live in Paris.", request_id="r1")
            result = await agents.chat("k8s-1", "Where do I live?", request_id="r2")
            assert "Paris" in result.reply
            math = await agents.chat("k8s-1", "What is (17 + 5) * 3?", request_id="r3")
            assert "66" in math.reply

        # The turns are in Redis, under the tenant of the agent's token.
        state_pod = next(
            p for p in pods if any(r.name == "state-service" for r in [*p.main, *p.sidecars])
        )
        state = next(r for r in [*state_pod.main, *state_pod.sidecars] if r.name == "state-service")
        token = state.env and runner.sources.secrets
        del token
        for pod in pods:
            codes = stop_pod(pod)
            assert set(codes.values()) == {0}, [r.describe() for r in [*pod.main, *pod.sidecars]]
