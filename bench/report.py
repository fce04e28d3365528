"""A benchmark report: suites of sections of rows, printed as they come and written to a Markdown file."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import click


def percentiles(samples: list[float], *points: float) -> list[float]:
    """Nearest-rank percentiles of ``samples`` (e.g. 50, 99): the ceil(p/100 * n)-th smallest value.

    p is read as written (``Fraction(str(p))``), so 7 % of 100 is the 7th value, not the 8th that
    0.07 * 100 = 7.000000000000001 would give.
    """
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentiles of no samples")
    n = len(ordered)
    return [ordered[min(n, max(1, math.ceil(Fraction(str(p)) * n / 100))) - 1] for p in points]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def median(values: list[float]) -> float:
    return statistics.median(values)


def verdict(target: str, met: bool | None, measured: str) -> str:
    """One form for every suite's target: ``target <target>: met|not met|not judged (<measured>)``.

    ``met`` is computed by the suite from its measured numbers; None when this run cannot judge the
    target (say so in ``measured``, e.g. a quick run's smaller model).
    """
    state = "not judged" if met is None else "met" if met else "not met"
    return f"target {target}: {state} ({measured})"


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    description: str
    sections: list[Section] = field(default_factory=list)
    failure: str | None = None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


class Report:
    def __init__(self, path: Path, mode: str = "full", suites: list[str] | None = None):
        self.path = path
        self.mode = mode
        self.planned = list(suites or [])
        self.suites: list[Suite] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    @property
    def sections(self) -> list[Section]:
        return [section for suite in self.suites for section in suite.sections]

    def suite(self, name: str, description: str = "") -> Suite:
        """Start a suite: the sections that follow belong to it."""
        self.suites.append(Suite(name, description))
        click.echo(f"\n# {name}: {description}")
        return self.suites[-1]

    def fail(self, error: BaseException | str) -> None:
        """Mark the current suite FAILED; its report section says so above whatever it measured."""
        if not self.suites:
            self.suite("(no suite)")
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.suites[-1].failure = text
        click.echo(f"  FAILED: {text}")

    @property
    def failed(self) -> list[str]:
        return [suite.name for suite in self.suites if suite.failure is not None]

    def section(self, title: str, columns: list[str]) -> Section:
        if not self.suites:
            self.suite("(no suite)")
        section = Section(title, columns)
        self.suites[-1].sections.append(section)
        click.echo(f"\n## {title}")
        return section

    def row(self, section: Section, *values) -> None:
        section.rows.append(list(values))
        click.echo("  " + " | ".join(f"{c}: {_cell(v)}" for c, v in zip(section.columns, values)))

    def note(self, section: Section, text: str) -> None:
        section.notes.append(text)
        click.echo(f"  -> {text}")

    def markdown(self) -> str:
        ran = [suite.name for suite in self.suites]
        status = ", ".join(f"{s.name} ({'FAILED' if s.failure is not None else 'ok'})" for s in self.suites)
        not_run = [name for name in self.planned if name not in ran]
        lines = ["# Benchmark report", "",
                 (f"Run {self.started} on {platform.node()}: {os.cpu_count()} cores, "
                  f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}."), "",
                 f"Mode: **{self.mode}**{' (smaller sizes: a smoke run, not the recorded figures)' if self.mode == 'quick' else ''}. "
                 f"Suites run: {status or 'none'}."
                 + (f" Not reached: {', '.join(not_run)}." if not_run else ""), ""]
        for suite in self.suites:
            lines += [f"## {suite.name}: {suite.description}".rstrip(": "), ""]
            if suite.failure is not None:
                lines += [f"**FAILED: {suite.failure}**" + (" (the tables below are what it measured before failing)"
                                                            if suite.sections else ""), ""]
            for section in suite.sections:
                lines += [f"### {section.title}", "", "| " + " | ".join(section.columns) + " |",
                          "|" + "---|" * len(section.columns)]
                lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in section.rows]
                lines += [""] + [f"- {note}" for note in section.notes] + [""]
        return "\n".join(lines)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.markdown(), encoding="utf-8")
        click.echo(f"\nreport written to {self.path}")
