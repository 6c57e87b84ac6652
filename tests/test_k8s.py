"""The Kubernetes manifests (k8s/) and the image (Dockerfile), without a
cluster: every overlay renders with `kubectl kustomize` and validates against
the Kubernetes OpenAPI schemas (kubernetes-validate, offline); the references
that would otherwise fail only in a cluster are checked; and the dev, sidecar
and in-process overlays are run — each container's own command and env as
local processes on loopback — and serve a real Chat.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from agent_service.client import AgentClient
from agent_service.config import load_config
from agent_service.server import SERVICE_NAME as AGENT_API
from agent_service.settings import AgentServiceSettings
from shared_runtime.health import LIVENESS_SERVICE
from state_service.client import StateClient
from state_service.client.errors import StateServiceError
from state_service.server import SERVICE_NAME as STATE_API
from state_service.server import StateServer
from state_service.settings import StateServiceSettings
from state_service.storage.embedded import free_port
from tests.conftest import state_settings
from tests.helpers import NOT_SERVING, SERVING, wait_health
from tests.manifests import (
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
    render,
    selects,
    start_pod,
    stop_pod,
    target_container_port,
    volume_files,
    wait_ready,
    workloads,
)
from tests.prometheus import promtool
from tools.prometheus_rules import PROMETHEUS_RULE, RULE_FILES, prometheus_rule_text

# In CI a missing kubectl fails these tests (render() says why) instead of skipping.
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None and not os.environ.get("CI"),
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
COMMON_LABELS = (
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
)
SHARED_KINDS = {
    "ConfigMap",
    "Secret",
    "NetworkPolicy",
    "ServiceMonitor",
    "PrometheusRule",
    "Namespace",
}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)


# STATE_SERVICE_* settings only a state-service process reads: its gRPC
# listener and metrics endpoint (StateServer, shared_runtime/process.py) and
# its logging (state_service/__main__.py). The engine an agent runs in its own
# process (AGENT_SERVICE_STATE_IN_PROCESS) reads all the others; the agent's
# own listener, metrics port and log level serve it.
STATE_LISTENER_SETTINGS = frozenset(
    {
        "listen",
        "metrics_host",
        "metrics_port",
        "drain_seconds",
        "max_connection_age_seconds",
        "keepalive_seconds",
        "auth",
        "auth_tokens_file",
        "auth_delegates",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "log_level",
    }
)
# AGENT_SERVICE_* settings of a remote state service: with the state service
# in process they do not apply (the settings refuse the token and TLS files).
REMOTE_STATE_SETTINGS = frozenset(
    {
        "state_target",
        "state_bearer_token",
        "state_tls_ca_file",
        "state_tls_cert_file",
        "state_tls_key_file",
    }
)


def env_names(settings: type[BaseSettings], fields: frozenset[str] | None = None) -> set[str]:
    """Every environment variable a settings class reads (of `fields` only, if given)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, info in settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def runs_state_in_process(script: str, env: dict[str, str]) -> bool:
    """An agent-service container whose process runs the state service too."""
    return script == "agent-service" and bool(
        settings_from(AgentServiceSettings, env).state_in_process
    )


def env_names_read(script: str, env: dict[str, str]) -> set[str]:
    """The variables a container's process reads and that apply to it: its
    service's settings; with the state service in process, less the remote
    state service's and plus the engine's (not its listener's)."""
    if not runs_state_in_process(script, env):
        return env_names(SETTINGS[script])
    agent = env_names(AgentServiceSettings) - env_names(AgentServiceSettings, REMOTE_STATE_SETTINGS)
    engine = env_names(StateServiceSettings) - env_names(
        StateServiceSettings, STATE_LISTENER_SETTINGS
    )
    return agent | engine


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


# -- references between objects -----------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_selectors_and_ports_match_pods(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for service in of_kind(objects, "Service"):
        name = service["metadata"]["name"]
        selected = [
            w for w in workloads(objects) if selects(service["spec"]["selector"], pod_labels(w))
        ]
        assert selected, f"Service {name} selects no pod"
        for workload in selected:
            for port in service["spec"]["ports"]:
                assert target_container_port(port, pod_spec(workload)) is not None, (
                    f"Service {name} port {port['name']}: no such container port in "
                    f"{workload['metadata']['name']}"
                )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_selectors_match_their_pod_templates(overlay: str) -> None:
    for workload in workloads(render(f"overlays/{overlay}")):
        selector = workload["spec"]["selector"]
        assert selects(selector, pod_labels(workload))
        # Selectors use only name (+ instance), so label changes never orphan pods.
        assert set(selector["matchLabels"]) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
        }
        for constraint in pod_spec(workload).get("topologySpreadConstraints", []):
            assert selects(constraint["labelSelector"], pod_labels(workload))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_container_ports_and_the_right_health_services(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for workload in workloads(objects):
        for container in containers(pod_spec(workload)):
            where = f"{workload['metadata']['name']}/{container['name']}"
            ports = container_ports(container)
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(kind)
                assert probe is not None, f"{where}: no {kind}"
                for handler in ("grpc", "tcpSocket", "httpGet"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        assert port in ports or port in ports.values(), f"{where} {kind}: {port}"
    for workload, container, script in statecar_containers(objects):
        where = f"{workload['metadata']['name']}/{container['name']}"
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc_probe = container[kind]["grpc"]
            assert isinstance(grpc_probe["port"], int), "gRPC probes need a numeric port"
            # Liveness must not follow Redis: an outage would restart every pod.
            expected = (
                {"", HEALTH_SERVICES[script]} if kind == "readinessProbe" else {LIVENESS_SERVICE}
            )
            assert grpc_probe.get("service", "") in expected, f"{where} {kind}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_and_secret_references_exist(overlay: str) -> None:
    """Secrets: generated in dev and sidecar (example values), declared in
    production's secrets.example.yaml (created by the operator). Only the model
    API key is optional (without it the agents use the offline model)."""
    objects = render(f"overlays/{overlay}")
    sources = sources_for(overlay)
    for workload in workloads(objects):
        spec = pod_spec(workload)
        for container in containers(spec):
            try:
                container_env(container, sources)
            except MissingReference as missing:
                pytest.fail(f"{workload['metadata']['name']}/{container['name']}: {missing}")
            optional = [
                v["name"]
                for v in container.get("env", [])
                if any(ref.get("optional") for ref in v.get("valueFrom", {}).values())
            ]
            assert set(optional) <= {"AGENT_SERVICE_MODEL_API_KEY"}
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            claims = {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
            }
            assert mounted <= {v["name"] for v in spec.get("volumes", [])} | claims
        for volume in spec.get("volumes", []):
            try:
                volume_files(volume, sources)
            except MissingReference as missing:
                pytest.fail(f"{workload['metadata']['name']}: {missing}")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_never_travel_in_config_maps(overlay: str) -> None:
    secret_like = re.compile(r"REDIS_URL$|TOKEN$|API_KEY$|PASSWORD")
    for _, container, _ in statecar_containers(render(f"overlays/{overlay}")):
        for var in container.get("env", []):
            if secret_like.search(var["name"]):
                assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
        config = container_env({"envFrom": container.get("envFrom", [])}, sources_for(overlay))
        assert not [k for k in config if secret_like.search(k)]


# -- what the code reads -----------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_is_a_setting_the_code_reads(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    sources = sources_for(overlay)
    services_seen = set()
    for _, container, script in statecar_containers(objects):
        env = container_env(container, sources)
        known = env_names_read(script, env)
        declared = {v["name"] for v in container.get("env", [])}
        assert declared | set(env) <= known, (declared | set(env)) - known
        services_seen.add(script)
        if runs_state_in_process(script, env):
            services_seen.add("state-service")
    assert services_seen == set(SETTINGS)


def test_the_in_process_settings_split_matches_the_settings_classes() -> None:
    """The names above are settings; the engine in process reads the state
    service's Redis, cache and context settings."""
    assert set(StateServiceSettings.model_fields) >= STATE_LISTENER_SETTINGS
    assert set(AgentServiceSettings.model_fields) >= REMOTE_STATE_SETTINGS
    engine = env_names_read("agent-service", {"AGENT_SERVICE_STATE_IN_PROCESS": "true"})
    assert {"STATE_SERVICE_REDIS_URL", "STATE_SERVICE_CACHE_MAX_SESSIONS"} <= engine
    assert not {"STATE_SERVICE_LISTEN", "AGENT_SERVICE_STATE_TARGET"} & engine
    assert not {n for n in env_names_read("agent-service", {}) if n.startswith("STATE_SERVICE_")}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_required_setting_is_set_and_consistent(overlay: str) -> None:
    """The settings each container would get validate, bind where the
    container's ports and probes expect, and point at things that exist."""
    objects = render(f"overlays/{overlay}")
    sources = sources_for(overlay)
    loopback = loopback_for(objects, free_port)
    tokens: dict[str, str] = {}
    bearer_tokens = []
    in_process_agents = 0

    def check_redis_url(where: str, settings: StateServiceSettings, container: Obj) -> None:
        # An empty URL would start an embedded redis-server on a read-only root.
        assert settings.redis_url.startswith(("redis://", "rediss://")), where
        redis_host = re.sub(r"^\w+://(?:[^@/]*@)?", "", settings.redis_url).rsplit(":", 1)[0]
        if of_kind(objects, "StatefulSet"):
            assert loopback.service_name(redis_host) is not None, settings.redis_url
            password = sources.secrets[
                next(v for v in container["env"] if v["name"] == "STATE_SERVICE_REDIS_URL")[
                    "valueFrom"
                ]["secretKeyRef"]["name"]
            ]["password"]
            assert f":{password}@" in settings.redis_url

    for workload, container, script in statecar_containers(objects):
        where = f"{workload['metadata']['name']}/{container['name']}"
        env = container_env(container, sources)
        settings = settings_from(SETTINGS[script], env)
        # With the state service in process, its engine's settings too.
        engine = (
            settings_from(StateServiceSettings, env) if runs_state_in_process(script, env) else None
        )
        ports = {
            name.removeprefix("state-"): number
            for number, name in container_ports(container).items()
        }
        host, _, port = settings.listen.rpartition(":")
        assert host in ("[::]", "0.0.0.0"), f"{where}: listens on {settings.listen}"
        assert int(port) == ports["grpc"] == container["readinessProbe"]["grpc"]["port"]
        assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == ports["metrics"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        values = [*settings.model_dump().items(), *(engine.model_dump().items() if engine else [])]
        for name, value in values:
            if isinstance(value, Path) and name != "data_dir":
                directory, file = str(value.parent), value.name
                assert directory in mounts, f"{where}: {name}={value} is not on a mounted volume"
                files = volume_files(volumes[mounts[directory]], sources) or {}
                assert file in files, f"{where}: {name}={value}: the volume has no {file}"
                if name == "auth_tokens_file":
                    for line in files[file].splitlines():
                        if line.strip() and not line.startswith("#"):
                            tenant, _, token = line.partition(":")
                            tokens[token.strip()] = tenant.strip()
                if name == "agents_config":
                    # The agent service accepts the file.
                    with tempfile.TemporaryDirectory() as tmp:
                        local = Path(tmp) / file
                        local.write_text(files[file])
                        assert load_config(local).agents
        if script == "state-service":
            check_redis_url(where, settings, container)
            assert settings.auth == "token", f"{where}: callers must authenticate"
        elif engine is not None:
            check_redis_url(where, engine, container)
            # Nothing about a remote state service: the engine is this process.
            remote = env_names(AgentServiceSettings, REMOTE_STATE_SETTINGS) | env_names(
                StateServiceSettings, STATE_LISTENER_SETTINGS
            )
            assert not set(env) & remote, f"{where}: {set(env) & remote}"
            in_process_agents += 1
        else:
            target_host, _, target_port = settings.state_target.rpartition(":")
            if target_host == "127.0.0.1":
                sidecars = [
                    c["name"]
                    for c in containers(pod_spec(workload))
                    if int(target_port) in container_ports(c)
                ]
                assert sidecars == ["state-service"], f"{where}: {settings.state_target}"
            else:
                service = loopback.service_name(target_host)
                assert service is not None, f"{where}: {settings.state_target} is no Service"
                assert named(objects, "Service", service)["spec"].get("clusterIP") == "None", (
                    "agents balance per request over a headless Service's DNS records"
                )
                assert loopback.services[service][int(target_port)] == 50051
            bearer_tokens.append(settings.state_bearer_token.get_secret_value())
    # Every agent that calls a state service over the network is its tenant "agents".
    assert bearer_tokens or in_process_agents
    assert all(tokens.get(t) == "agents" for t in bearer_tokens)


# -- network policies -------------------------------------------------------------

Endpoint = tuple[
    dict[str, str], dict[str, str] | None
]  # namespace labels, pod labels (None: outside)


def peer_matches(peer: Obj, endpoint: Endpoint, namespace: str) -> bool:
    namespace_labels, labels = endpoint
    if "ipBlock" in peer:
        return labels is None
    if labels is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace_labels.get("kubernetes.io/metadata.name") != namespace:
        return False
    return selects(peer.get("podSelector"), labels)


def rule_allows(rule: Obj, side: str, endpoint: Endpoint, port: int, namespace: str) -> bool:
    peers = rule.get(side)
    if peers is not None and not any(peer_matches(p, endpoint, namespace) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("port") == port for p in ports)


def allowed(objects: tuple[Obj, ...], source: Endpoint, destination: Endpoint, port: int) -> bool:
    """Whether NetworkPolicies let `source` open a connection to `destination`."""
    policies = of_kind(objects, "NetworkPolicy")
    namespace = next(o["metadata"]["namespace"] for o in objects if o["kind"] == "Deployment")

    def side_allows(endpoint: Endpoint, direction: str, other: Endpoint) -> bool:
        namespace_labels, labels = endpoint
        if labels is None or namespace_labels.get("kubernetes.io/metadata.name") != namespace:
            return True  # not governed by these policies
        applying = [
            p
            for p in policies
            if direction in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"]["podSelector"], labels)
        ]
        key, side = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        return not applying or any(
            rule_allows(rule, side, other, port, namespace)
            for p in applying
            for rule in p["spec"].get(key, [])
        )

    return side_allows(source, "Egress", destination) and side_allows(
        destination, "Ingress", source
    )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_real_pods(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    pods = [pod_labels(w) for w in workloads(objects)]
    for policy in of_kind(objects, "NetworkPolicy"):
        spec = policy["spec"]
        assert any(selects(spec["podSelector"], labels) for labels in pods), policy["metadata"][
            "name"
        ]
        for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selects(peer["podSelector"], labels) for labels in pods), peer


@needs_kubectl
def test_network_policies_allow_only_the_intended_flows() -> None:
    objects = render("overlays/production")
    namespace = {"kubernetes.io/metadata.name": "statecar"}
    agent = (namespace, pod_labels(named(objects, "Deployment", "statecar-agent")))
    state = (namespace, pod_labels(named(objects, "Deployment", "statecar-state")))
    caller = ({"kubernetes.io/metadata.name": "shop"}, {"statecar.dev/agent-client": "true"})
    stranger = ({"kubernetes.io/metadata.name": "shop"}, {"app": "other"})
    prometheus = ({"kubernetes.io/metadata.name": "monitoring"}, {"app": "prometheus"})
    outside: Endpoint = ({}, None)
    assert allowed(objects, caller, agent, 50061)
    assert not allowed(objects, stranger, agent, 50061)
    assert not allowed(objects, caller, state, 50051)
    assert allowed(objects, agent, state, 50051)
    assert not allowed(objects, state, agent, 50061)
    assert allowed(objects, state, outside, 6379)  # the external Redis
    assert not allowed(objects, agent, outside, 6379)
    assert allowed(objects, agent, outside, 443)  # the model endpoint
    assert not allowed(objects, state, outside, 443)
    assert allowed(objects, agent, outside, 53) and allowed(objects, state, outside, 53)
    assert allowed(objects, prometheus, state, 9464) and allowed(objects, prometheus, agent, 9465)
    assert not allowed(objects, stranger, state, 9464)


@needs_kubectl
@pytest.mark.parametrize(
    ("overlay", "client"),
    [("dev", "statecar-state"), ("sidecar", "statecar-agent"), ("in-process", "statecar-agent")],
)
def test_only_the_pods_with_a_redis_url_reach_redis(overlay: str, client: str) -> None:
    objects = render(f"overlays/{overlay}")
    namespace = {"kubernetes.io/metadata.name": f"statecar-{overlay}"}
    redis = (namespace, pod_labels(named(objects, "StatefulSet", "statecar-redis")))
    for workload in workloads(objects):
        has_url = any(
            v["name"] == "STATE_SERVICE_REDIS_URL"
            for c in containers(pod_spec(workload))
            for v in c.get("env", [])
        )
        if workload["kind"] == "Deployment":
            assert has_url == (workload["metadata"]["name"] == client)
            assert allowed(objects, (namespace, pod_labels(workload)), redis, 6379) == has_url


# -- monitoring ---------------------------------------------------------------------


@needs_kubectl
def test_the_service_monitor_scrapes_each_pod_once_on_a_metrics_port() -> None:
    objects = render("overlays/production")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = monitor["spec"]["endpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    scraped: dict[str, int] = {}
    for service in of_kind(objects, "Service"):
        if not selects(monitor["spec"]["selector"], service["metadata"]["labels"]):
            continue
        if "metrics" not in [p["name"] for p in service["spec"]["ports"]]:
            continue
        for workload in workloads(objects):
            if selects(service["spec"]["selector"], pod_labels(workload)):
                name = workload["metadata"]["name"]
                scraped[name] = scraped.get(name, 0) + 1
    assert scraped == {"statecar-agent": 1, "statecar-state": 1}


def test_the_prometheus_rule_is_monitoring_rules_verbatim() -> None:
    """components/monitoring/prometheus-rules.yaml is generated from
    monitoring/rules/*.yaml (make k8s-rules), whose promtool tests check the
    rules themselves."""
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text(), "run `make k8s-rules`"
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert groups and yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"] == groups


@needs_kubectl
def test_the_rules_select_the_jobs_the_service_monitor_creates(tmp_path: Path) -> None:
    """The Prometheus Operator names a ServiceMonitor target's job after its
    Service: the rules' job="statecar-state|statecar-agent" must be those."""
    objects = render("overlays/production")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    jobs = {
        s["metadata"]["name"]
        for s in of_kind(objects, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        and "metrics" in [p["name"] for p in s["spec"]["ports"]]
    }
    (rule,) = of_kind(objects, "PrometheusRule")
    expressions = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    used = set()
    for selector in re.findall(r'job=~?"([^"]+)"', expressions):
        used.update(selector.split("|"))
    assert used == jobs == {"statecar-state", "statecar-agent"}
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


# -- scaling, rollouts, hardening ----------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_disruption_budgets_fit_the_workloads(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    autoscaled = {}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        workload = named(objects, target["kind"], target["name"])
        assert "replicas" not in workload["spec"], "the HPA owns the replica count"
        assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        autoscaled[target["name"]] = hpa["spec"]["minReplicas"]
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        replicas = autoscaled.get(name, workload["spec"].get("replicas", 1))
        budgets = [
            p
            for p in of_kind(objects, "PodDisruptionBudget")
            if selects(p["spec"]["selector"], pod_labels(workload))
        ]
        # A budget only where there is more than one replica to keep.
        assert (len(budgets) == 1) == (replicas > 1), name
    if overlay == "production":
        assert set(autoscaled) == {"statecar-agent", "statecar-state"}
    if overlay == "dev":
        assert all(w["spec"].get("replicas") == 1 for w in workloads(objects))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_labelled(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        # Objects of one component carry them all; shared ones the common part.
        expected = RECOMMENDED_LABELS if obj["kind"] not in SHARED_KINDS else COMMON_LABELS
        missing = [k for k in expected if k not in labels]
        assert missing == [], f"{obj['kind']}/{obj['metadata']['name']}"
    for account in of_kind(objects, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert [k for k in RECOMMENDED_LABELS if k not in pod_labels(workload)] == [], name
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        assert spec["serviceAccountName"] in {
            a["metadata"]["name"] for a in of_kind(objects, "ServiceAccount")
        }
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        if workload["kind"] == "Deployment":
            assert workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        for container in containers(spec):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert set(resources[kind]) == {"cpu", "memory"}, f"{name}/{container['name']}"
            assert ":" in container["image"].rsplit("/", 1)[-1], "images carry a tag"


# How long an in-process state engine may take to stop after the agent drained
# (StateEngine.stop: background work and the Redis close, each bounded at 5 s).
IN_PROCESS_ENGINE_STOP_SECONDS = 10.0


def drain_seconds(container: Obj, sources: Sources, script: str) -> float:
    """From SIGTERM (after preStop) until the process may exit."""
    env = container_env(container, sources)
    settings = settings_from(SETTINGS[script], env)
    engine_stop = IN_PROCESS_ENGINE_STOP_SECONDS if runs_state_in_process(script, env) else 0.0
    return float(settings.drain_seconds) + engine_stop


def pre_stop_seconds(container: Obj) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if not command:
        return 0.0
    assert command[0] == "sleep", "preStop only waits for endpoint removal"
    return float(command[1])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_pre_stop_and_drain(overlay: str) -> None:
    """Main containers get SIGTERM after their preStop; native sidecars only
    after the main containers exited. All of it within the grace period, with
    a margin of 5 s for the process to exit after its drain."""
    objects = render(f"overlays/{overlay}")
    sources = sources_for(overlay)
    for workload in workloads(objects):
        spec = pod_spec(workload)
        needed = 0.0
        sidecars = 0.0
        for container in containers(spec):
            command = container.get("command", [])
            drain = drain_seconds(container, sources, command[0]) if command[0] in SETTINGS else 0.0
            if container in spec.get("initContainers", []):
                sidecars += drain
            else:
                needed = max(needed, pre_stop_seconds(container) + drain)
        assert needed + sidecars + 5 <= spec["terminationGracePeriodSeconds"], workload["metadata"][
            "name"
        ]


def unhashed(value: Any) -> Any:
    """Generated ConfigMap/Secret names without their content hash."""
    return json.loads(re.sub(r'(statecar-[a-z-]+)-[a-z0-9]{10}"', r'\1"', json.dumps(value)))


_QUANTITY_UNITS = {"m": 1e-3, "": 1.0, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity in the suffixes the manifests use."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match is not None, value
    return float(match.group(1)) * _QUANTITY_UNITS[match.group(2)]


@needs_kubectl
def test_the_sidecar_state_container_is_the_base_state_container() -> None:
    """The sidecar overlay repeats the base's state container; only what a
    native sidecar needs differently may differ."""
    base = named(render("base"), "Deployment", "statecar-state")
    (shared,) = pod_spec(base)["containers"]
    sidecar_pod = pod_spec(named(render("overlays/sidecar"), "Deployment", "statecar-agent"))
    (sidecar,) = sidecar_pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"

    for key in ("command", "envFrom", "env", "startupProbe", "livenessProbe", "readinessProbe"):
        assert unhashed(sidecar.get(key)) == unhashed(shared.get(key)), key
    for key in ("resources", "securityContext"):
        assert sidecar[key] == shared[key], key
    assert sidecar["image"] == shared["image"]

    assert [p["containerPort"] for p in sidecar["ports"]] == [
        p["containerPort"] for p in shared["ports"]
    ]
    assert [m["mountPath"] for m in sidecar["volumeMounts"]] == [
        m["mountPath"] for m in shared["volumeMounts"]
    ]
    # No endpoints route to a sidecar, so no preStop wait before its drain.
    assert "lifecycle" not in sidecar
    # Same-pod ports must not clash.
    all_ports = [p for c in containers(sidecar_pod) for p in container_ports(c)]
    assert len(all_ports) == len(set(all_ports))


@needs_kubectl
def test_the_in_process_agent_container_is_the_base_agent_container_with_the_engine() -> None:
    """The in-process overlay's one container is the base's agent container
    plus what the base's state container gives the engine: its ConfigMap, its
    Redis URL and its share of CPU and memory; no state service around it."""
    base = render("base")
    (agent,) = pod_spec(named(base, "Deployment", "statecar-agent"))["containers"]
    (state,) = pod_spec(named(base, "Deployment", "statecar-state"))["containers"]
    objects = render("overlays/in-process")
    assert {(w["kind"], w["metadata"]["name"]) for w in workloads(objects)} == {
        ("Deployment", "statecar-agent"),
        ("StatefulSet", "statecar-redis"),
    }
    assert not [o for o in objects if "state-service" in json.dumps(o["metadata"])]
    pod = pod_spec(named(objects, "Deployment", "statecar-agent"))
    (in_process,) = containers(pod)
    same = ("command", "image", "ports", "startupProbe", "livenessProbe", "readinessProbe")
    for key in (*same, "lifecycle", "securityContext", "volumeMounts"):
        assert unhashed(in_process.get(key)) == unhashed(agent.get(key)), key
    assert unhashed(in_process["envFrom"]) == unhashed([*agent["envFrom"], *state["envFrom"]])
    (redis_url,) = [v for v in state["env"] if v["name"] == "STATE_SERVICE_REDIS_URL"]
    expected_env = [
        {"name": "AGENT_SERVICE_STATE_IN_PROCESS", "value": "true"},
        redis_url,
        *(v for v in agent["env"] if v["name"] != "AGENT_SERVICE_STATE_BEARER_TOKEN"),
    ]
    assert sorted(unhashed(in_process["env"]), key=str) == sorted(unhashed(expected_env), key=str)
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            both = quantity(agent["resources"][kind][resource]) + quantity(
                state["resources"][kind][resource]
            )
            assert quantity(in_process["resources"][kind][resource]) >= both, (kind, resource)


# -- the image -----------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_the_dockerfile_builds_a_slim_non_root_image_with_both_entry_points() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    froms = [rest for stage in stages for instruction, rest in stage if instruction == "FROM"]
    # The virtualenv is copied between stages: both must have the same Python.
    assert len({f.split(" AS ")[0].split(" as ")[0] for f in froms}) == 1
    runs = " ".join(rest for instruction, rest in final if instruction == "RUN")
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", runs), runs
    copies = [rest for instruction, rest in final if instruction == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), "only the built virtualenv"
    (user,) = [rest for instruction, rest in final if instruction == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot checks it)"
    assert re.search(rf"useradd .*--uid {uid}\b", runs)
    (command,) = [rest for instruction, rest in final if instruction == "CMD"]
    assert yaml.safe_load(command)[0] in CONSOLE_SCRIPTS
    env = " ".join(rest for instruction, rest in final if instruction == "ENV")
    (venv,) = re.findall(r"PATH=(\S+?)/bin:", env)
    build_runs = " ".join(rest for instruction, rest in stages[0] if instruction == "RUN")
    assert f"{venv}/bin/pip install ." in build_runs, "the project is installed into that venv"


def test_the_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list"
    allowed_paths = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for stage in dockerfile_stages():
        for instruction, rest in stage:
            if instruction == "COPY" and not rest.startswith("--from="):
                copied.update(s.rstrip("/") for s in shlex.split(rest)[:-1])
    assert copied <= allowed_paths
    packages = {
        p.split("*")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert (
        {"shared_runtime", "state_service", "agent_service"}
        <= packages
        <= {"shared_runtime", "state_service", "agent_service", "statecar"}
    )
    # Every installed package is copied into the build (statecar from protos/).
    assert {"protos", "pyproject.toml", "README.md", *(packages - {"statecar"})} <= copied


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_run_the_image_entry_points_as_its_user(overlay: str) -> None:
    (user,) = [rest for instruction, rest in dockerfile_stages()[-1] if instruction == "USER"]
    uid, _, gid = user.partition(":")
    objects = render(f"overlays/{overlay}")
    found = statecar_containers(objects)
    statecar_images = [
        (w, c)
        for w in workloads(objects)
        for c in containers(pod_spec(w))
        if "statecar" in c["image"]
    ]
    assert found and len(found) == len(statecar_images), (
        "every statecar container names its entry point"
    )
    sources = sources_for(overlay)
    served = {script for _, _, script in found}
    served.update(
        "state-service"
        for _, container, script in found
        if runs_state_in_process(script, container_env(container, sources))
    )
    assert served == {"state-service", "agent-service"}, "both services run, in some process"
    for workload, _, script in found:
        assert script in ("state-service", "agent-service")
        assert CONSOLE_SCRIPTS[script].endswith(":main")
        assert (Path(sys.executable).parent / script).exists()
        security = pod_spec(workload)["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))


# -- running the manifests ---------------------------------------------------------


@asynccontextmanager
async def running_overlay(
    overlay: str, directory: Path
) -> AsyncIterator[tuple[PodRunner, list[Pod]]]:
    """The overlay's pods (one of each workload) as local processes, ready."""
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


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` with (at least) these labels in a scrape."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def chat_through_the_agent_service(runner: PodRunner) -> None:
    """Three turns of one session and the agent list, through the Service."""
    agent = service_address(runner, "statecar-agent", "grpc")
    async with AgentClient(agent, timeout=20.0) as agents:
        await agents.chat("k8s-1", "My name is Ada and I live in Paris.", request_id="r1")
        result = await agents.chat("k8s-1", "Where do I live?", request_id="r2")
        assert "Paris" in result.reply
        math = await agents.chat("k8s-1", "What is (17 + 5) * 3?", request_id="r3")
        assert "66" in math.reply
        listed, default = await agents.list_agents()
        assert ([a.name for a in listed], default) == (["assistant"], "assistant")


@needs_kubectl
@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["dev", "sidecar"])
async def test_the_overlay_runs_and_serves_a_chat(overlay: str, tmp_path: Path) -> None:
    async with running_overlay(overlay, tmp_path) as (runner, pods):
        await chat_through_the_agent_service(runner)

        # The turns are in Redis, under the tenant of the agent's token; the
        # state service refuses callers without one.
        state = runner.loopback.ports[50051]
        token = runner.sources.secrets[
            next(s for s in runner.sources.secrets if s.startswith("statecar-tokens"))
        ]["agent-token"]
        async with StateClient(f"127.0.0.1:{state}", bearer_token=token, timeout=5.0) as client:
            assert len(await client.all_items("k8s-1")) == 2 + 2 + 4
        async with StateClient(f"127.0.0.1:{state}", timeout=5.0) as anonymous:
            with pytest.raises(StateServiceError) as refused:
                await anonymous.all_items("k8s-1")
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

        # Metrics where the README says: :9464 state, :9465 agent.
        assert "grpc_server_handled_total" in scrape(runner.loopback.ports[9464])
        assert "statecar_agent_turns_total" in scrape(runner.loopback.ports[9465])

        # Pod deletion: SIGTERM, drain, exit 0 within the grace period.
        for pod in pods:
            codes = stop_pod(pod)
            assert set(codes.values()) == {0}, [r.describe() for r in [*pod.main, *pod.sidecars]]


@needs_kubectl
@pytest.mark.slow
async def test_the_in_process_overlay_runs_and_serves_a_chat(tmp_path: Path) -> None:
    """One agent process with the state service inside it (its manifest's
    command and env), on the overlay's Redis: it serves the Chat, stores the
    turns where any state replica reads them, serves the state service's
    metrics on its own port, and its readiness follows Redis."""
    async with running_overlay("in-process", tmp_path) as (runner, pods):
        assert not {50051, 9464} & set(runner.loopback.ports), "no state service port"
        (agent_pod,) = [p for p in pods if p.workload["metadata"]["name"] == "statecar-agent"]
        (agent_process,) = agent_pod.main
        await chat_through_the_agent_service(runner)

        # The turns are in Redis: a state-service process on the same Redis
        # (tenant "default", as the agent acts for unauthenticated callers)
        # reads them.
        redis_url = agent_process.env["STATE_SERVICE_REDIS_URL"]
        assert redis_url.startswith("redis://:statecar-in-process-password@127.0.0.1:")
        reader = await StateServer.start(state_settings(redis_url))
        try:
            async with StateClient(reader.address, timeout=5.0) as client:
                assert len(await client.all_items("k8s-1")) == 2 + 2 + 4
        finally:
            await reader.stop(grace=0.5)

        # One scrape of the agent's port has both services' metrics.
        metrics = scrape(runner.loopback.ports[9465])
        assert sample(metrics, "statecar_agent_turns_total") >= 3
        appended = sample(
            metrics,
            "grpc_server_handled_total",
            grpc_service=STATE_API,
            grpc_method="AppendItems",
            grpc_code="OK",
        )
        assert appended >= 3
        assert sample(metrics, "statecar_state_redis_up") == 1

        # Readiness follows Redis through the engine: NOT_SERVING while Redis
        # is down, SERVING and serving turns once it is back.
        agent = service_address(runner, "statecar-agent", "grpc")
        index = next(i for i, p in enumerate(pods) if p.workload["kind"] == "StatefulSet")
        assert set(stop_pod(pods[index]).values()) == {0}
        await wait_health(agent, NOT_SERVING)
        assert agent_process.process.poll() is None, "a Redis outage never stops the agent"
        pods[index] = await start_pod(runner, pods[index].workload)
        await wait_ready(runner, pods[index])
        await wait_health(agent, SERVING)
        async with AgentClient(agent, timeout=20.0) as agents:
            result = await agents.chat("k8s-1", "Still there?", request_id="r4")
            assert result.context_items == 2 + 2 + 4, "it sees every turn stored before"

        # Pod deletion: SIGTERM, drain, engine stop, exit 0 within the grace period.
        for pod in pods:
            codes = stop_pod(pod)
            assert set(codes.values()) == {0}, [r.describe() for r in [*pod.main, *pod.sidecars]]
