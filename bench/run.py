"""`make bench`: every benchmark, side by side, then BENCHMARKS.md + plots.

python -m bench.run            # all (about 5 minutes on 2 cores)
python -m bench.run sidecar    # one or more by name
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

from bench import (
    brief,
    cache_zipf,
    ceiling,
    cli_startup,
    context_quality,
    history,
    sidecar,
    turn_cost,
)
from bench.report import Report

BENCHMARKS: dict[str, Callable[[Report], Awaitable[None]]] = {
    "sidecar": sidecar.run,
    "history": history.run,
    "cache": cache_zipf.run,
    "brief": brief.run,
    "ceiling": ceiling.run,
    "cli": cli_startup.run,
    "quality": context_quality.run,
    "turns": turn_cost.run,
}


async def main(names: list[str]) -> None:
    report = Report()
    for name in names or list(BENCHMARKS):
        await BENCHMARKS[name](report)
    report.write()
    print("\nwrote BENCHMARKS.md")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
