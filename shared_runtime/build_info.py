"""The build info gauge both services export: ``<prefix>_build_info{version,
git_sha} 1``.

version is the installed distribution's version. git_sha is, in order: the
``STATECAR_GIT_SHA`` environment variable (set it when building an image, e.g.
``--build-arg GIT_SHA=$(git rev-parse HEAD)`` into ``ENV STATECAR_GIT_SHA``);
else ``git rev-parse HEAD`` when the code runs from a git checkout (a
development or editable install); else "unknown".
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

GIT_SHA_ENV = "STATECAR_GIT_SHA"
DISTRIBUTION = "statecar"
UNKNOWN = "unknown"
_SHA = re.compile(r"[0-9a-f]{7,64}")


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


@functools.cache
def git_sha() -> str:
    configured = os.environ.get(GIT_SHA_ENV, "").strip().lower()
    if configured:
        return configured if _SHA.fullmatch(configured) else UNKNOWN
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # a directory, or a file in a git worktree
        return UNKNOWN
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    sha = done.stdout.strip()
    return sha if _SHA.fullmatch(sha) else UNKNOWN


def register_build_info(prefix: str, registry: CollectorRegistry | None = REGISTRY) -> Gauge:
    """Registers ``<prefix>_build_info`` (e.g. prefix "statecar_state") at 1."""
    gauge = Gauge(
        f"{prefix}_build_info",
        "Always 1; the labels tell which build is running.",
        ["version", "git_sha"],
        registry=registry,
    )
    gauge.labels(version(), git_sha()).set(1)
    return gauge
