"""Run every benchmark (or those named) and write bench/report.md (bench/report-quick.md with --quick)."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

import click

from bench.report import Report

HERE = Path(__file__).resolve().parent

# Module name -> what it measures; each module has run(report, quick).
SUITES = {
    "streams": "producer and consumer records/s, emulator vs in-memory stream",
    "collector": "collector requests/s and latency with wrk vs a bare pixel app",
    "enrich": "enriched events/s per core",
    "loader": "lake loader events/s into Parquet",
    "train": "feature-table training: 5-fold AUC and parity on the UCI shoppers data",
    "features": "make train's features step: Spark build_examples vs the same fold in one process",
    "scorer": "in-process scoring vs Spark, /invocations latency, worker events/s",
    "treated": "make train on offered traffic: keep vs leave_out the offered sessions, on a day without offers",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks, each side by side with its baseline.")
    parser.add_argument("suites", nargs="*", help=f"which to run (default all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, for a smoke run; writes bench/report-quick.md unless --report is given")
    parser.add_argument("--report", type=Path, default=None,
                        help="where to write the report (default bench/report.md, or bench/report-quick.md with --quick)")
    args = parser.parse_args(argv)
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    names = list(args.suites or SUITES)
    path = args.report or HERE / ("report-quick.md" if args.quick else "report.md")
    report = Report(path, mode="quick" if args.quick else "full", suites=names)
    for name in names:
        report.suite(name, SUITES[name])
        # Any failure, at import (a missing third-party module included) or while it runs, is written
        # into this suite's section; the next suite still runs and the report is still written.
        try:
            module = importlib.import_module(f"bench.{name}")
            module.run(report, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken suite must not hide the others' figures
            traceback.print_exc()
            report.fail(exc)
        except KeyboardInterrupt:
            report.fail("interrupted (Ctrl-C); later suites not run")
            report.write()
            return 130
    report.write()
    if report.failed:
        click.echo(f"failed suites: {', '.join(report.failed)}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
