"""Run every benchmark (or those named) and write bench/report.md."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from bench.report import Report

# Module name -> what it measures; each module has run(report, quick).
SUITES = {
    "streams": "producer and consumer records/s, emulator vs in-memory stream",
    "collector": "collector requests/s and latency with wrk vs a bare pixel app",
    "enrich": "enriched events/s per core",
    "loader": "lake loader events/s into Parquet",
    "train": "feature-table training: 5-fold AUC and parity on the UCI shoppers data",
    "scorer": "in-process scoring vs Spark, /invocations latency, worker events/s",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks, each side by side with its baseline.")
    parser.add_argument("suites", nargs="*", help=f"which to run (default all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--report", type=Path, default=Path("bench/report.md"))
    args = parser.parse_args(argv)
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    report = Report(args.report)
    failed = []
    for name in args.suites or SUITES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            print(f"\n## {name}: not built yet ({SUITES[name]})")
            continue
        print(f"\n# {name}: {SUITES[name]}", flush=True)
        try:
            module.run(report, quick=args.quick)
        except Exception:  # noqa: BLE001 - one broken suite must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    report.write()
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
