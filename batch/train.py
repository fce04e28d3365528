"""``make train``: learn "will this session buy?" from the lake, export to ONNX, gate, publish.

    python -m batch.train                                  # the last 7 days of the lake
    python -m batch.train --window-end 2026-11-28 --window-days 3 --algorithm rf
    python -m batch.train --table shoppers.csv --label Revenue --cv 5      # feature-table mode

Steps: sync the window's lake partitions → prefix examples with the scorer's own fold (Spark,
applyInArrow) → split by time → fit → evaluate → export to ONNX → parity (every evaluation row
scored by Spark and onnxruntime) → publish the bundle, and move CURRENT when the gates pass.
In-process users (benchmarks, end-to-end tests) call ``train_from_events`` / ``publish`` directly.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import click
from py4j.protocol import Py4JError
from pyspark.errors import AnalysisException, PythonException
from pyspark.sql import DataFrame

from batch import train_table
from batch.export import ExportError
from batch.train_config import LAKE_URL_SCHEMES, TrainSettings, in_process, spark_session
from batch.train_features import ID_COLUMNS, build_examples, read_events, require_trainable
from batch.train_lake import (
    TrainError,
    Window,
    check_files,
    local_window,
    midnight_ms,
    spark_paths,
    unreadable_file_error,
    window_files,
)
from batch.train_metrics import threshold_text
from batch.train_model import Steps, TrainResult, fit_and_export, importance_by_column, time_split, utc_text
from batch.train_publish import ParityError, publish, write_bundle
from batch.train_treated import Treated, read_treated
from common import aws, logs
from common.cli import CLI_CONTEXT, AwsCommand
from common.config import ConfigError, load
from common.features import FEATURE_NAMES, FEATURE_VERSION, ONE_HOT_GROUPS

__all__ = ["TrainError", "TrainResult", "TrainSettings", "load_window", "main", "publish", "read_events",
           "train_from_events"]
log = logging.getLogger("batch.train")
LABEL = ("1 when the session has a purchase (shop purchase event or transaction) after this prefix; "
         "prefixes end before the first purchase")
EVENT_STEPS = ["sync", "features", "fit", "evaluate", "export", "parity", "publish"]
# session_start_ms: the champion gate keeps only the evaluation sessions CURRENT did not train on.


def load_window(spark, settings: TrainSettings, window: Window, steps: Steps | None = None) -> DataFrame:
    """The enriched events of ``window`` and of its lead-in (``lead_in``), synced from S3 to the
    cache (or read from ``lake_path``). An empty lead-in is fine; an empty window is a TrainError."""
    steps = steps or Steps(["sync"], enabled=False)
    before = lead_in(window, settings.session_gap_minutes)
    with steps("sync"):
        if settings.lake_path.startswith(LAKE_URL_SCHEMES):
            dates = ",".join(f"date={d}" for d in before.days() + window.days())
            try:
                # Merged as read_events does locally: a column a later loader added is not lost to
                # the schema of an older file.
                return read_events(spark, settings.lake_path, [f"{settings.lake_path}/{{{dates}}}"],
                                   skip_corrupt=settings.skip_corrupt_files)
            except AnalysisException as exc:          # Spark's answer when no partition of the window exists
                raise _empty_window(settings, window) from exc
            except Exception as exc:            # a corrupt footer fails the schema merge here, not in features
                clear = unreadable_file_error(exc) or missing_filesystem_error(exc, settings.lake_path)
                if clear is None:
                    raise
                raise clear from None
        master = spark.sparkContext.master
        if not in_process(master):
            # Executors on other hosts looked for the driver's files: FileNotFoundException, reported
            # by Spark as a footer that "could not be read".
            where = f"the folder {settings.lake_path}" if settings.lake_path else f"cache_dir {settings.cache_dir}"
            raise TrainError(f"Spark master {master} runs executors on other hosts, which cannot read {where} on this "
                             "one: set CLICKSTREAM_LAKE_PATH to s3a://<bucket>/enriched (or a file:// URL every node "
                             "mounts)")
        root = Path(settings.lake_path) if settings.lake_path else \
            local_window(settings.bucket, Window(before.start, window.end), settings.cache_dir,
                         region=settings.region, progress=settings.progress)
        files = check_files(window_files(root, window), skip_corrupt=settings.skip_corrupt_files)
        if not files:
            raise _empty_window(settings, window)
        earlier = check_files(window_files(root, before), skip_corrupt=settings.skip_corrupt_files)
        log.info("reading %d lake files of %s and %d of its lead-in %s", len(files), window, len(earlier), before)
        return read_events(spark, root, spark_paths(root, earlier + files), skip_corrupt=settings.skip_corrupt_files)


def missing_filesystem_error(exc: Exception, lake_path: str) -> TrainError | None:
    """A lake URL whose Hadoop filesystem is not on Spark's classpath (a page of Java stack otherwise)."""
    if "S3AFileSystem not found" in str(exc) or "No FileSystem for scheme" in str(exc):
        scheme = lake_path.split(":", 1)[0]
        return TrainError(f"Spark cannot read CLICKSTREAM_LAKE_PATH {lake_path}: no Hadoop filesystem for {scheme}:// "
                          "on its classpath. For s3a:// add hadoop-aws (the Hadoop version of Spark's "
                          "hadoop-client jars) and the AWS SDK bundle to every node, e.g. spark-submit "
                          "--packages org.apache.hadoop:hadoop-aws:<version>; s3:// is not a Hadoop scheme, use s3a://")
    return None


def lead_in(window: Window, gap_minutes: int) -> Window:
    """The whole days before ``window`` that span one session gap: a session running at the window's
    first midnight began there, and only when they are read is it seen whole, as the scorer saw it,
    and known to be the previous window's (build_examples leaves it out)."""
    days = math.ceil(gap_minutes / (24 * 60))
    return Window(window.start - dt.timedelta(days=days), window.start - dt.timedelta(days=1))


def window_start_ms(window: Window) -> int:
    """Epoch ms of the window's first midnight (UTC)."""
    return midnight_ms(window.start)


def _empty_window(settings: TrainSettings, window: Window) -> TrainError:
    where = settings.lake_path or f"s3://{settings.bucket}/enriched/"
    return TrainError(f"no enriched events in {where} for the window {window} (no Parquet files in its "
                      "date partitions): is the lake loader running, and is the window right "
                      "(CLICKSTREAM_WINDOW_DAYS / CLICKSTREAM_WINDOW_END)?")


def train_from_events(spark, events: DataFrame, settings: TrainSettings, *, window: Window | None = None,
                      steps: Steps | None = None, treated: Treated | None = None) -> TrainResult:
    """Train, evaluate, export and parity-check a model from a DataFrame of enriched events; with
    ``window``, of the sessions that started in it (``load_window`` also reads the days before);
    with ``treated``, without the sessions offered a discount (``read_treated``)."""
    own_steps = steps is None
    steps = steps or Steps(EVENT_STEPS[1:-1], enabled=settings.progress)
    try:
        with steps("features"):
            since = window_start_ms(window) if window else None
            built = build_examples(events, settings.session_gap_minutes, since, settings.max_session_events,
                                   settings.max_examples_per_session)
            examples, treatment = treated.applied(built) if treated else (built, None)
            stats = require_trainable(examples, window or "given")
            train, evaluation, cutoff = time_split(examples, settings.eval_fraction)
        result = fit_and_export(spark, train, evaluation, list(FEATURE_NAMES), settings, steps,
                                id_columns=ID_COLUMNS, row_id="event_id")
    except PythonException as exc:      # an error inside the fold: surface its own message
        raise TrainError(f"building features failed: {_python_error(exc)}") from None
    finally:
        if own_steps:
            steps.close()
    # The session rule is part of the features: the scorer warns when its session_timeout_s differs.
    training_window = {**(window.as_dict() if window else {}), "split_at_ms": cutoff, "sessions": stats["sessions"],
                       "buying_sessions": stats["buyers"], "examples": stats["rows"], "treated_sessions": treatment}
    result.meta.update(feature_version=FEATURE_VERSION, label=LABEL, session_gap_s=settings.session_gap_minutes * 60,
                       training_window=training_window,
                       importance_by_column=importance_by_column(result.meta["feature_importances"], ONE_HOT_GROUPS))
    built.unpersist()
    return result


def _python_error(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ValueError", "KeyError", "TypeError", "TrainError",
                                                          "ModuleNotFoundError"))]
    error = (errors or lines or ["unknown error"])[-1]
    if error.startswith("ModuleNotFoundError"):
        error += (" on a Spark executor: the Python that CLICKSTREAM_SPARK_MASTER's workers run (PYSPARK_PYTHON) "
                  "needs the trainer's dependencies (requirements.lock)")
    return error


def _champion_line(champion: dict) -> str:
    """How CURRENT did on the challenger's evaluation rows, and why it was not compared if it was not."""
    line = f"champion {champion['version']}"
    if champion.get("roc_auc") is not None:
        line += (f": ROC AUC {champion['roc_auc']:.4f} on the same {champion['rows']} rows, where the new "
                 f"model has {champion['challenger_roc_auc']:.4f}")
    return line + (f"; {champion['note']}" if champion.get("note") else "")


def _summary(result: TrainResult, outcome: dict | None) -> str:
    m, p = result.meta["metrics"], result.meta["parity"]
    lines = [(f"model {result.meta['name']} ({result.meta['algorithm']}): ROC AUC {m['roc_auc']:.4f}, "
              f"PR AUC {m['pr_auc']:.4f}, log loss {m['log_loss']:.4f}, lift@10% {m['lift_top_decile']:.2f}, "
              f"threshold {threshold_text(result.meta)}"),
             (f"parity: {'passed' if p['passed'] else 'FAILED'}, max |p_onnx - p_spark| {p['max_abs_diff']:.2e} "
              f"on {p['rows']} rows"),
             _data_line(result.meta),
             "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())]
    if outcome:
        where = "CURRENT moved to it" if outcome["promoted"] else "CURRENT not moved: " + "; ".join(outcome["reasons"])
        lines.append(f"published version {outcome['version']}; {where}")
        if outcome.get("champion"):
            lines.append(_champion_line(outcome["champion"]))
        if outcome.get("pruned"):
            lines.append(f"pruned {outcome['pruned']} old versions (keep_versions)")
    return "\n".join(lines)


def _data_line(meta: dict) -> str:
    """What the model learnt from: the rows of each part, and for the lake the window's sessions."""
    rows = meta["rows"]
    line = f"rows: {rows['train']} for training, {rows['eval']} for evaluation"
    window = meta.get("training_window")
    if window and "sessions" in window:
        line += (f" (split at session start {utc_text(window['split_at_ms'])}); "
                 f"{window['sessions']} finished sessions ({window['buying_sessions']} bought)"
                 + (f" collected {window['start']}..{window['end']}" if "start" in window else ""))
        treated = window.get("treated_sessions") or {}
        if treated.get("offered_left_out") or treated.get("held_out_weighed"):
            line += (f"; left out {treated['offered_left_out']} sessions offered a discount, weighed "
                     f"{treated['held_out_weighed']} held-out ones by 100 / holdout_percent")
    elif window and "table" in window:
        line += f" from {window['table']}"
    return line


def run_events(settings: TrainSettings, *, publish_model: bool = True) -> tuple[TrainResult, dict | None]:
    """What ``make train`` does."""
    window = Window.last_days(settings.window_days, settings.window_end or None)
    spark = spark_session(settings)
    steps = Steps(EVENT_STEPS if publish_model else EVENT_STEPS[:-1], enabled=settings.progress)
    try:
        events = load_window(spark, settings, window, steps)
        treated = read_treated(spark, settings, window) if settings.treated_sessions == "leave_out" else None
        with spark_failures_explained(settings):
            result = train_from_events(spark, events, settings, window=window, steps=steps, treated=treated)
        outcome = None
        if publish_model:
            with steps("publish"):
                outcome = publish(aws.client("s3", settings.region), settings, result)
        return result, outcome
    finally:
        steps.close()


@contextmanager
def spark_failures_explained(settings: TrainSettings):
    """A Spark job's failure that has a known remedy becomes a TrainError saying it (a page of Java
    stack trace and exit 1 otherwise, which means an AWS call failed)."""
    try:
        yield
    except TrainError:
        raise
    except Exception as exc:
        try:
            clear = (unreadable_file_error(exc) or out_of_memory_error(exc, settings) or disk_full_error(exc)
                     or python_worker_error(exc) or jvm_ended_error(exc, settings))
        except (Py4JError, ConnectionError):     # a py4j error asks the JVM for its message, and the JVM has gone
            clear = jvm_ended_error(exc, settings)
        if clear is None:
            raise
        raise clear from None


def python_worker_error(exc: Exception) -> TrainError | None:
    """Spark could not start its Python workers: PYSPARK_PYTHON (by default the trainer's own Python)
    is not a program on the executors' hosts, as on a cluster whose nodes keep Python elsewhere."""
    found = re.search(r'Cannot run program "([^"]*)"', str(exc))
    if found is None:
        return None
    return TrainError(f"Spark could not start its Python workers: no program {found.group(1)} on the executors' "
                      "hosts. Set PYSPARK_PYTHON to the Python that has the trainer's dependencies on every node "
                      "(it defaults to the trainer's own interpreter)")


# A failed task's executor, as Spark names it: "Lost task 0.3 in stage 0.0 (TID 3) (10.0.0.5 executor 3):"
# ("executor driver" under local[*]), and an executor its cluster manager killed.
_TASK_EXECUTOR = re.compile(r"Lost task .*?\(TID \d+\) \(\S+ executor (\S+)\):")
_LOST_EXECUTOR = re.compile(r"\(executor (\S+) exited|executor with id (\S+) exited")
# Memory outside the executors' JVM heap ran out: a Python worker's (the fold, the pandas UDFs) or the
# container's. Spark's words for it, measured (the first two) and from its source (YARN, Kubernetes).
_OFF_HEAP_OUT_OF_MEMORY = {
    r"Python worker exited unexpectedly": "a Python worker exited unexpectedly, most often killed for its memory",
    r"\bMemoryError\b": "MemoryError",
    r"for exceeding memory limits": "YARN killed an executor's container for exceeding its memory limits",
    r"possible container OOM": "an executor's container was killed (exit code 137)",
}


def driver_heap(settings: TrainSettings) -> str:
    return (f"raise CLICKSTREAM_SPARK_DRIVER_MEMORY ({settings.spark_driver_memory}; under local[*] the driver's heap "
            "is also the only executor's), or train on fewer rows (a shorter window, a smaller eval_fraction)")


JVM_OUT_OF_MEMORY_EXIT = 52     # Spark's SparkExitCode.OOM: its handler of an uncaught OutOfMemoryError exits so


def jvm_exit_code(wait_s: float = 2.0) -> int | None:
    """How the JVM this process launched ended (negative: the signal that killed it), or None while it runs
    or under spark-submit, whose JVM launched us. Under local[*] a task's OutOfMemoryError ends the JVM,
    and the job's error says only that its SparkContext shut down, or that py4j lost its connection."""
    from pyspark import SparkContext
    jvm = getattr(SparkContext._gateway, "proc", None)
    if jvm is None:
        return None
    try:
        return jvm.wait(wait_s)
    except subprocess.TimeoutExpired:
        return None


def jvm_ended_error(exc: Exception, settings: TrainSettings) -> TrainError | None:
    """What to do when the JVM this process launched ended in the middle of a job."""
    exit_code = jvm_exit_code() if isinstance(exc, (Py4JError, ConnectionError)) else None   # py4j lost the JVM
    if exit_code == JVM_OUT_OF_MEMORY_EXIT:
        return TrainError(f"Spark's JVM ran out of memory (java.lang.OutOfMemoryError, exit code {exit_code}): "
                          f"{driver_heap(settings)}")
    if exit_code is not None and exit_code < 0:
        return TrainError(f"Spark's JVM was killed (signal {-exit_code}), most often by the kernel for the memory it "
                          f"took: lower CLICKSTREAM_SPARK_DRIVER_MEMORY ({settings.spark_driver_memory}) below the "
                          "memory this machine has free, or train on fewer rows (a shorter window)")
    return None


def out_of_memory_error(exc: Exception, settings: TrainSettings) -> TrainError | None:
    """What to do when Spark ran out of memory (a Java stack trace otherwise); None for other failures.
    Which setting to raise depends on where: the driver's heap, an executor's, or memory outside them."""
    text = str(exc)
    lost = _LOST_EXECUTOR.search(text)
    found = _TASK_EXECUTOR.search(text) or lost
    executor = next((name for name in found.groups() if name), None) if found else None
    # An executor whose heap ran out exits with Spark's code 52, and that may reach the driver before the task's error.
    heap_out = "java.lang.OutOfMemoryError" in text or (lost and re.search(r"\bcode 52\b", text))
    if heap_out and executor not in (None, "driver"):
        return TrainError(f"A Spark executor ran out of heap (java.lang.OutOfMemoryError in executor {executor}): give "
                          "the executors more memory (spark-submit --executor-memory, spark.executor.memory), or "
                          "spread the work over more tasks (CLICKSTREAM_SPARK_SHUFFLE_PARTITIONS, "
                          f"{settings.spark_shuffle_partitions}), or train on fewer rows (a shorter window)")
    if "java.lang.OutOfMemoryError" in text:
        return TrainError(f"Spark ran out of memory (java.lang.OutOfMemoryError) in the driver: {driver_heap(settings)}")
    said = next((what for sign, what in _OFF_HEAP_OUT_OF_MEMORY.items() if re.search(sign, text)), None)
    if said is None:
        return None
    cap = (f"or lower CLICKSTREAM_MAX_SESSION_EVENTS ({settings.max_session_events}: the fold holds one "
           "session's events at once), or train on a shorter window")
    if executor in (None, "driver"):      # local[*]: the workers are this machine's processes
        return TrainError(f"Python ran out of memory on this machine ({said}): free memory, {cap}")
    return TrainError(f"Spark ran out of memory outside the executors' JVM heap ({said}): that memory holds the "
                      "Python workers, so raise spark.executor.memoryOverhead or set spark.executor.pyspark.memory "
                      f"(spark-submit --conf), {cap}")


def disk_full_error(exc: Exception) -> TrainError | None:
    """What to do when Spark's scratch disk filled up (a page of Java stack trace and exit 1 otherwise)."""
    if "No space left on device" not in str(exc):
        return None
    where = os.environ.get("SPARK_LOCAL_DIRS") or f"{tempfile.gettempdir()} (Spark's default spark.local.dir)"
    return TrainError(f"Spark ran out of disk space (No space left on device) for its scratch files in {where}: free "
                      "space there, or set SPARK_LOCAL_DIRS to a folder on a larger disk, or train on a shorter window")


def check_table_options(table, **given) -> None:
    """Options of feature-table mode are an error without --table (they were ignored), and --label is needed with it."""
    if table and not given["label_column"]:
        raise click.UsageError("--table needs --label COLUMN")
    if not table:
        used = [name for name, value in given.items() if value]
        if used:
            flags = ", ".join("--" + ("label" if name == "label_column" else name) for name in used)
            raise click.UsageError(f"{flags}: only for feature-table mode (--table PATH)")


def check_bucket(settings: TrainSettings) -> None:
    """The bucket answers, before Spark starts: missing credentials or a wrong bucket are told in a
    second, not after the JVM's start-up or, when only publishing needs it, after the training."""
    aws.client("s3", settings.region).head_bucket(Bucket=settings.bucket)


def check_out_folder(out: Path) -> None:
    """--out can be written (or created) at all: said before an hour of training, not after publishing.
    Nothing is created yet, as a refused model writes nothing."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable")


def check_folds(cv: int) -> None:
    """--cv: 0 is off; one fold would have nothing to train on, and Spark's error would not say so."""
    if cv != 0 and cv < 2:
        raise ConfigError(f"--cv: expected 0 (no cross-validation) or at least 2 folds, got {cv}")


@click.command(cls=AwsCommand, context_settings=CLI_CONTEXT, epilog="\b\nExamples:\n" + "\n".join(
    line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith("python -m")))
@click.option("--table", type=click.Path(exists=True, path_type=Path),
              help="feature-table mode: train from this CSV or Parquet table (or folder of Parquet files) "
                   "instead of the lake")
@click.option("--label", "label_column", help="label column of --table (bool, 0/1 or yes/no)")
@click.option("--drop", multiple=True, help="column of --table to leave out (repeatable)")
@click.option("--categorical", multiple=True, help="numeric column of --table to one-hot encode (repeatable)")
@click.option("--missing", type=click.Choice(["drop", "impute"]), default="drop", show_default=True,
              help="rows of --table with missing values: drop them, or impute medians")
@click.option("--cv", type=int, default=0, help="k-fold cross-validation report for --table (0: none, else k >= 2)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="also write the bundle (model.onnx, model.json, report.html) to this folder")
@click.option("--publish/--no-publish", "publish_model", default=None,
              help="publish to the registry (default: yes for the lake, no for --table)")
@click.option("--algorithm", type=click.Choice(["gbt", "rf", "lr"]), help="overrides CLICKSTREAM_ALGORITHM (default gbt)")
@click.option("--window-days", type=int, help="overrides CLICKSTREAM_WINDOW_DAYS (default 7)")
@click.option("--window-end", help="last day of the window, YYYY-MM-DD (overrides CLICKSTREAM_WINDOW_END; default: today, UTC)")
@click.option("--model-name", help="overrides CLICKSTREAM_MODEL_NAME")
def main(table, label_column, drop, categorical, missing, cv, out, publish_model, **overrides) -> None:
    """Train the buy/defer model and publish it if it passes the gates.

    Settings come from CLICKSTREAM_* variables and the [train] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/training.md lists the keys: max_depth, class_weight, cache_dir, lake_path, ...);
    the options below override them. A bad value exits with status 2, naming where it was set.
    """
    logs.setup()
    try:
        settings = load(TrainSettings, section="train", **overrides)
        check_folds(cv)
        if out:
            check_out_folder(out)
        check_table_options(table, label_column=label_column, drop=drop, categorical=categorical, cv=cv)
        publishing = bool(publish_model) if table else publish_model is not False
        if publishing or not (table or settings.lake_path):
            check_bucket(settings)
        if table:
            with spark_failures_explained(settings):
                result, outcome = train_table.run(settings, table, label_column, drop=drop, categorical=categorical,
                                                  missing=missing, cv=cv, publish_model=bool(publish_model))
        else:
            result, outcome = run_events(settings, publish_model=publish_model is not False)
        if not result.parity.passed:        # not publishing: publish() did not get to refuse it
            raise ParityError(result.parity.message())
    except ParityError as exc:
        click.echo(f"train: refused the model (nothing published or written): {exc}", err=True)
        sys.exit(3)
    except (TrainError, ExportError, ConfigError) as exc:
        click.echo(f"train: error: {exc}", err=True)
        sys.exit(2)
    click.echo(_summary(result, outcome))       # first: it names what was published whatever follows
    if out:
        try:
            write_bundle(out, result)
        except OSError as exc:
            click.echo(f"train: error: could not write the bundle to --out {out}: {exc} (the summary above says "
                       "what was published)", err=True)
            sys.exit(2)


if __name__ == "__main__":
    main()
