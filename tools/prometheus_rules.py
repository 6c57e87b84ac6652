"""Generates k8s/components/monitoring/prometheus-rules.yaml from
monitoring/rules/*.yaml, the source of truth that promtool checks and
unit-tests. `make k8s-rules` runs it; tests/test_k8s.py fails when the
committed file differs from what this writes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((ROOT / "monitoring" / "rules").glob("*.yaml"))
PROMETHEUS_RULE = ROOT / "k8s" / "components" / "monitoring" / "prometheus-rules.yaml"
_RULE_HEADER = """\
# GENERATED from monitoring/rules/*.yaml (the source of truth, with promtool
# unit tests in monitoring/tests/) by `make k8s-rules` (tools/prometheus_rules.py);
# do not edit here. tests/test_k8s.py fails when the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: statecar
  labels:
    app.kubernetes.io/name: statecar
    app.kubernetes.io/instance: statecar
    app.kubernetes.io/component: monitoring
spec:
  groups:
"""


def prometheus_rule_text() -> str:
    """The PrometheusRule: every group of monitoring/rules/*.yaml, comments kept
    (each file's `groups:` entries, indented under spec.groups)."""
    parts = [_RULE_HEADER]
    for path in RULE_FILES:
        lines = path.read_text().splitlines()
        start = lines.index("groups:") + 1
        parts.append(f"    # -- {path.relative_to(ROOT)}\n")
        parts.extend(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return "".join(parts)


def main() -> None:
    """`python -m tools.prometheus_rules`: rewrites the PrometheusRule (make k8s-rules)."""
    PROMETHEUS_RULE.write_text(prometheus_rule_text())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)} from {len(RULE_FILES)} rule files")


if __name__ == "__main__":
    main()
