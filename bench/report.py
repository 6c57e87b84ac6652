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
# Blocks of BENCHMARKS.md: marker name -> heading. A run rewrites only the
# blocks it produced sections for.
BLOCKS = {"performance": "## Performance", "quality": "## Context quality"}


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    blocks: dict[str, list[str]] = field(default_factory=dict)

    def add(self, title: str, text: str, block: str = "performance") -> None:
        section = f"### {title}\n\n{text.strip()}\n"
        print("\n" + section, flush=True)
        if block == "performance":
            self.sections.append(section)
        else:
            self.blocks.setdefault(block, []).append(section)

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
            "Measured by `make bench` (or `python -m bench.run <names>` for some sections) on "
            f"{time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, Python {platform.python_version()}, "
            f"{len(__import__('os').sched_getaffinity(0))} cores, loopback; "
            f"the last run took {time.time() - self.started:.0f} s. Client, servers and Redis "
            "share the "
            "machine, so absolute figures are pessimistic; the ratios are the point.\n"
        )
        text = path.read_text() if path.exists() else "# statecar benchmarks\n"
        blocks = dict(self.blocks)
        if self.sections:
            blocks["performance"] = self.sections
        for name, sections in blocks.items():
            begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
            if begin in text and end in text:
                before, rest = text.split(begin, 1)
                old, after = rest.split(end, 1)
                # A run of some benchmarks keeps the sections of the others.
                sections = _merged(_sections_of(old), sections)
                body = "\n".join([begin, BLOCKS[name], "", header, *sections, end])
                text = before + body + after
            else:
                body = "\n".join([begin, BLOCKS[name], "", header, *sections, end])
                text = text.rstrip() + "\n\n" + body + "\n"
        path.write_text(text)


def _sections_of(block: str) -> list[str]:
    """The "### ..." sections of a block's text, each with its body."""
    parts = block.split("\n### ")
    return ["### " + part.rstrip() + "\n" for part in parts[1:]]


def _merged(old: list[str], new: list[str]) -> list[str]:
    """Old sections with the new ones in their place, ordered by title
    (titles start with their number: "### 3. ...")."""
    by_title = {section.split("\n", 1)[0]: section for section in old}
    by_title.update({section.split("\n", 1)[0]: section for section in new})
    return [by_title[title] for title in sorted(by_title, key=_title_order)]


def _title_order(title: str) -> tuple[int, str]:
    number = title.removeprefix("### ").split(".", 1)[0]
    return (int(number), title) if number.isdigit() else (1_000, title)
