"""Collects sections and plots, prints ratio tables, rewrites BENCHMARKS.md
between its performance markers (other sections of the file are kept)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT

BEGIN = "<!-- performance:begin -->"
END = "<!-- performance:end -->"
RESULTS = ROOT / "bench" / "results"


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, title: str, text: str) -> None:
        block = f"### {title}\n\n{text.strip()}\n"
        print("\n" + block, flush=True)
        self.sections.append(block)

    def plot(self, name: str, draw: Any) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        RESULTS.mkdir(parents=True, exist_ok=True)
        figure, axes = plt.subplots(figsize=(7, 4))
        draw(axes)
        figure.tight_layout()
        path = RESULTS / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return f"![{name}](bench/results/{name}.png)"

    def write(self, path: Path = ROOT / "BENCHMARKS.md") -> None:
        header = (
            f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, Python {platform.python_version()}, "
            f"{len(__import__('os').sched_getaffinity(0))} cores, loopback; "
            f"took {time.time() - self.started:.0f} s. Client, servers and Redis share the "
            "machine, so absolute figures are pessimistic; the ratios are the point.\n"
        )
        body = "\n".join([BEGIN, "## Performance", "", header, *self.sections, END])
        existing = path.read_text() if path.exists() else "# statecar benchmarks\n"
        if BEGIN in existing and END in existing:
            before, rest = existing.split(BEGIN, 1)
            after = rest.split(END, 1)[1]
            text = before + body + after
        else:
            text = existing.rstrip() + "\n\n" + body + "\n"
        path.write_text(text)
