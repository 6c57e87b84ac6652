"""The Prometheus artifacts in monitoring/: rules pass `promtool check rules`
and their unit tests (`promtool test rules`); rules and dashboard use only
metrics that exist (or that the agent and compression code promise)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import agent_service.metrics  # noqa: F401  (registers the agent's families)
from shared_runtime.grpc_metrics import (
    SERVER_FAULT_CODES,
    client_metrics,
    go_code,
    server_metrics,
)
from state_service import metrics
from tests.prometheus import MONITORING, RULE_FILES, promtool

DASHBOARD = MONITORING / "grafana" / "statecar-dashboard.json"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))

# Metrics the compression code will add; the rules and the dashboard rely on
# these names. (The agent service's metrics are checked against
# agent_service/metrics.py itself.)
COMPRESSION_METRICS = {
    "statecar_state_compression_lag_items",  # gauge
    "statecar_state_compression_runs_total",  # {outcome}
    "statecar_state_compression_duration_seconds",  # histogram
    "statecar_state_compression_tokens_saved_total",
}
PROMETHEUS_METRICS = {"up", "ALERTS"}
NAME = re.compile(
    r"\b(?:statecar_[a-z0-9_]+|grpc_(?:server|client)_[a-z0-9_]+|[a-z_]+:[a-z0-9_:]+)"
)
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _rules() -> list[dict[str, Any]]:
    """Every rule (record or alert) of the shipped rule files."""
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs.extend(target["expr"] for target in inner.get("targets", []))
    return exprs


def _exported_names() -> set[str]:
    """Sample names both services export, plus the gRPC client family."""
    server_metrics()
    client_metrics()
    metrics.build_info()
    names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def _known_names() -> set[str]:
    known = _exported_names() | PROMETHEUS_METRICS | COMPRESSION_METRICS
    for name in COMPRESSION_METRICS:
        if not name.endswith("_total"):
            known.update(f"{name}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
    known.update(rule["record"] for rule in _rules() if "record" in rule)
    return known


def test_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rule_unit_tests_pass() -> None:
    assert len(RULE_TESTS) >= 2
    tested = promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    tested = "\n".join(path.read_text() for path in RULE_TESTS)
    assert alerts
    assert {a for a in alerts if f"alertname: {a}" not in tested} == set()


def test_error_ratio_rules_count_exactly_the_server_fault_codes() -> None:
    codes = "|".join(sorted(go_code(code) for code in SERVER_FAULT_CODES))
    for rule in _rules():
        for found in re.findall(r'grpc_code=~"([^"]+)"', rule["expr"]):
            assert "|".join(sorted(found.split("|"))) == codes, rule
    for expr in _dashboard_exprs():
        for found in re.findall(r'grpc_code=~"([^"]+)"', expr):
            assert "|".join(sorted(found.split("|"))) == codes, expr


def test_rules_and_dashboard_use_only_known_metrics() -> None:
    known = _known_names()
    used = {name: where for where in _dashboard_exprs() for name in NAME.findall(where)}
    used.update({name: rule["expr"] for rule in _rules() for name in NAME.findall(rule["expr"])})
    unknown = {name: where for name, where in used.items() if name not in known}
    assert unknown == {}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    # Each query as a recording rule: promtool parses every one of them.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query:{n}",
                        "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
                    }
                    for n, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    "title",
    ["Cache hit ratio", "gRPC latency percentiles by service", "Error ratio (server faults)",
     "Tokens per turn", "Tokens saved by compression", "Redis command latency"],
)  # fmt: skip
def test_dashboard_has_the_panels_the_issue_asks_for(title: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert title in {panel["title"] for panel in dashboard["panels"]}
