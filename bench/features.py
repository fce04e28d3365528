"""The features step of `make train`: Spark's build_examples (sessionise, leave out open sessions,
the scorer's fold per session through applyInArrow) against the same fold run in one process over
the sessions Spark kept. The ratio is what Spark's plumbing costs on top of the fold itself; both
must give the same number of example rows."""
from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from batch.train_config import TrainSettings, spark_session
from batch.train_features import arrival_order, build_examples, read_events
from bench.report import median
from common.features import session_features
from tests.train import synth

# `make train`'s own Spark settings (local[*], 8 shuffle partitions), without the progress bar.
SETTINGS = dataclasses.replace(TrainSettings(), progress=False)
START = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)


def _spark_pass(spark, root: Path) -> tuple[float, set[str], int]:
    """One features step over the lake folder: seconds, the sessions kept, the example rows."""
    started = time.perf_counter()
    examples = build_examples(read_events(spark, root), SETTINGS.session_gap_minutes)
    rows = examples.count()
    seconds = time.perf_counter() - started
    kept = {row.session_id for row in examples.select("session_id").distinct().collect()}
    examples.unpersist()
    return seconds, kept, rows


def _in_process_pass(sessions: list[list[dict]]) -> tuple[float, int]:
    """The same fold over the same sessions in this process: the scorer's cost, no Spark."""
    started = time.perf_counter()
    rows = sum(len(session_features(sorted(events, key=arrival_order))) for events in sessions)
    return time.perf_counter() - started, rows


@dataclasses.dataclass
class Figures:
    sessions: int
    kept: int
    events: int                 # in the lake: what Spark reads
    folded: int                 # of the kept sessions: what the fold in one process reads
    spark_rows: int
    local_rows: int
    spark_seconds: float
    local_seconds: float


def measure(spark, count: int, runs: int) -> Figures:
    """Both ways over ``count`` synthetic sessions, median seconds of ``runs`` after a warm-up each."""
    events = synth.make_events(count, START, hours=48)
    with tempfile.TemporaryDirectory() as tmp:
        root = synth.write_lake_dir(Path(tmp), events)
        _spark_pass(spark, root)                                # warm-up: Python workers, JIT, caches
        passes = [_spark_pass(spark, root) for _ in range(runs)]
    _, kept, spark_rows = passes[-1]
    by_session = defaultdict(list)
    for event in events:
        if event["domain_sessionid"] in kept:
            by_session[event["domain_sessionid"]].append(event)
    sessions = list(by_session.values())
    _in_process_pass(sessions)
    local = [_in_process_pass(sessions) for _ in range(runs)]
    return Figures(count, len(kept), len(events), sum(len(session) for session in sessions), spark_rows,
                   local[-1][1], median([seconds for seconds, _, _ in passes]),
                   median([seconds for seconds, _ in local]))


def run(report, quick: bool) -> None:
    count, runs = (300, 1) if quick else (2000, 3)
    section = report.section(f"training features step: Spark build_examples vs the fold in one process, "
                             f"{count} synthetic sessions, median of {runs} after a warm-up",
                             ["way", "events in", "example rows", "seconds", "us per event", "events/s"])
    spark = spark_session(SETTINGS, app_name="bench-features")
    try:
        got = measure(spark, count, runs)
    finally:
        spark.stop()        # the next suite builds its own session, with its own settings
    for way, events_in, rows, seconds in (
            ("Spark build_examples (read, sessionise, open sessions out, fold via applyInArrow, cache)",
             got.events, got.spark_rows, got.spark_seconds),
            ("the fold in one process over the kept sessions (baseline)", got.folded, got.local_rows,
             got.local_seconds)):
        report.row(section, way, events_in, rows, seconds, seconds / events_in * 1e6, events_in / seconds)
    report.note(section, f"rows {'equal' if got.spark_rows == got.local_rows else 'DIFFER'}: Spark {got.spark_rows}, "
                         f"in process {got.local_rows}; {got.kept} of {got.sessions} sessions kept (the rest still open "
                         f"at the end of the data); Spark takes {got.spark_seconds / got.local_seconds:.1f}x "
                         "the bare fold's time")
    if got.spark_rows != got.local_rows:
        raise AssertionError(f"the features step's rows differ from the fold's: {got.spark_rows} vs {got.local_rows}")
