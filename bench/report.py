"""A benchmark report: sections of rows, printed as they come and written to bench/report.md."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


def percentiles(samples: list[float], *points: float) -> list[float]:
    """Nearest-rank percentiles of ``samples`` (e.g. 50, 99)."""
    ordered = sorted(samples)
    return [ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in points]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.sections: list[Section] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def section(self, title: str, columns: list[str]) -> Section:
        section = Section(title, columns)
        self.sections.append(section)
        print(f"\n## {title}", flush=True)
        return section

    def row(self, section: Section, *values) -> None:
        section.rows.append(list(values))
        print("  " + " | ".join(f"{c}: {_cell(v)}" for c, v in zip(section.columns, values)), flush=True)

    def note(self, section: Section, text: str) -> None:
        section.notes.append(text)
        print(f"  -> {text}", flush=True)

    def markdown(self) -> str:
        lines = ["# Benchmark report", "",
                 (f"Run {self.started} on {platform.node()}: {os.cpu_count()} cores, "
                  f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}."), ""]
        for section in self.sections:
            lines += [f"## {section.title}", "", "| " + " | ".join(section.columns) + " |",
                      "|" + "---|" * len(section.columns)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in section.rows]
            lines += [""] + [f"- {note}" for note in section.notes] + [""]
        return "\n".join(lines)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.markdown())
        print(f"\nreport written to {self.path}")
