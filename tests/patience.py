"""How long tests wait for things that take longer on a busy machine
(readiness, failover, a scrape): a base duration times a factor that follows
the machine's load, so a loaded CI runner waits longer instead of failing.

The factor is the one-minute load average per core, at least 1 and at most 4;
STATECAR_TEST_PATIENCE sets it explicitly (e.g. 3 on a known-slow machine).
Only waits scale: no test asserts on a duration."""

from __future__ import annotations

import functools
import os


@functools.cache
def factor() -> float:
    configured = os.environ.get("STATECAR_TEST_PATIENCE", "").strip()
    if configured:
        return max(1.0, float(configured))
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(4.0, max(1.0, load))


def patience(seconds: float) -> float:
    """`seconds` scaled for this machine's current load."""
    return seconds * factor()
