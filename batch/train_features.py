"""Training examples from enriched events, with the scorer's own fold run inside Spark.

Each session's events go to one ``applyInArrow`` call, which rebuilds the event dicts the scorer
sees (JSON columns parsed back to objects, timestamps as epoch ms) and runs
``common.features.session_prefixes``: one row per event before the first purchase, labelled with
whether the session bought. Features are rounded through float32 here, because ONNX scores in float32:
with identical inputs on both sides, Spark and the exported model can agree to 1e-7.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from batch.lake import JSON_COLUMNS
from batch.train_lake import TrainError
from common.features import (
    EVENT_FIELDS,
    FEATURE_NAMES,
    LAST_MS,
    MAX_EVENT_AGE_MS,
    NIL_USER,
    event_time_ms,
    is_purchase,
    parse_ms,
    request_order,
    session_prefixes,
)
from common.logs import first_few

LAKE_SHARD = "_lake_shard"
LOADER_FILE = r"^(shardId-[0-9]+)-[0-9]+-[0-9]+\.parquet$"
ID_COLUMNS = ("session_id", "event_id", "event_time_ms", "session_start_ms", "label")
EXAMPLE_SCHEMA = T.StructType(
    [T.StructField("session_id", T.StringType()), T.StructField("event_id", T.StringType()),
     T.StructField("event_time_ms", T.LongType()), T.StructField("session_start_ms", T.LongType()),
     T.StructField("label", T.IntegerType())]
    + [T.StructField(name, T.DoubleType()) for name in FEATURE_NAMES])
EXAMPLE_COLUMNS = [field.name for field in EXAMPLE_SCHEMA.fields]

log = logging.getLogger(__name__)


def read_events(spark: SparkSession, root: Path | str, paths: list[Path | str] | None = None,
                skip_corrupt: bool = False) -> DataFrame:
    """The enriched events of the lake folder, or of just ``paths`` under it (files, date folders or
    a glob). ``skip_corrupt`` also leaves out files whose data pages fail to decode (their footers
    read fine in ``check_files``)."""
    reader = spark.read.option("basePath", str(root)).option("mergeSchema", "true")
    if skip_corrupt:
        reader = reader.option("ignoreCorruptFiles", "true")
    paths = [str(path) for path in paths] if paths is not None else [str(root)]
    # The shard a lake loader's file holds (its name: <shard_id>-<first_seq>-<last_seq>.parquet), or null
    # (a compacted hour): each shard's loader lands its events on its own schedule (finished_sessions).
    shard = F.regexp_extract(F.col("_metadata.file_name"), LOADER_FILE, 1)
    return reader.parquet(*paths).withColumn(LAKE_SHARD, F.when(shard != "", shard))


# ---------------------------------------------------------------------------------------- Spark side


def _as_millis(df: DataFrame) -> DataFrame:
    """The fields the fold reads (common.features.EVENT_FIELDS, plus the user pseudonyms for
    sessionising), timestamps as epoch ms; a field the lake lacks is null, as in JSON."""
    present = {field.name: field.dataType for field in df.schema.fields}
    columns = []
    for name in dict.fromkeys((*EVENT_FIELDS, "domain_userid", "user_id", "etl_tstamp", LAKE_SHARD)):   # etl: arrival_order
        kind = present.get(name)
        if kind is None:
            columns.append(F.lit(None).cast("string").alias(name))
        elif isinstance(kind, (T.TimestampType, T.TimestampNTZType)):
            columns.append(F.unix_millis(F.col(name).cast("timestamp")).alias(name))
        else:
            columns.append(F.col(name))
    return df.select(*columns)


def _event_time():
    """common.features.event_time_ms as a column of epoch ms: the derived time, but never later than
    the collector's nor more than MAX_EVENT_AGE_MS earlier."""
    collected, derived = F.col("collector_tstamp"), F.col("derived_tstamp")
    within = derived.between(collected - MAX_EVENT_AGE_MS, collected)
    return F.when(within, derived).otherwise(collected)


def sessionise(df: DataFrame, gap_minutes: int = 30) -> DataFrame:
    """Add ``session_id`` by the scorer's rule, in its order (``arrival_order``): an event more than
    ``gap_minutes`` after the latest event of its key seen so far (purchases count as activity) starts
    a new session. The key is ``domain_sessionid`` when the tracker sent one, else the user pseudonym
    (common.features.session_key). A tracker session's first run keeps its id; later runs get
    ``<id>:<n>``, a user's runs ``user:<user>:<n>`` (ids with ``\\`` and ``:`` escaped by a ``\\``).
    Events the scorer skips (a time outside the calendar, common.features.in_calendar) are left out."""
    df = df.withColumn("_at", _event_time()).filter((F.col("_at") >= 0) & (F.col("_at") < LAST_MS))
    known_user = F.when(F.col("network_userid") != NIL_USER, F.col("network_userid"))   # not SP-Anonymous' nil id
    # Ids are the tracker's to choose: escaped, a session id "B:2" (or "user:x") is not the second run
    # of "B" (or the run of user x), which would fold two visitors into one session, and its label.
    user = F.concat(F.lit("user:"), _escaped(F.coalesce(F.col("domain_userid"), F.col("user_id"), known_user,
                                                        F.col("event_id"))))
    sid = F.col("domain_sessionid")
    by_key = Window.partitionBy("_key").orderBy("etl_tstamp", "collector_tstamp", "_at", "event_id")
    # A late event (a retry, an offline queue) arrives after later ones: it continues the session
    # when it is within the gap of the newest event seen, as online, not of its neighbour in time.
    latest_before = F.max("_at").over(by_key.rowsBetween(Window.unboundedPreceding, -1))
    run = F.col("_n")
    return (df.withColumn("_key", F.coalesce(_escaped(sid), user))
            .withColumn("_new", F.when(latest_before.isNull() | (F.col("_at") - latest_before > gap_minutes * 60_000), 1)
                        .otherwise(0))
            .withColumn("_n", F.sum("_new").over(by_key.rowsBetween(Window.unboundedPreceding, 0)))
            .withColumn("session_id", F.when(sid.isNotNull() & (run == 1), F.col("_key"))
                        .otherwise(F.concat(F.col("_key"), F.lit(":"), run.cast("string"))))
            .drop("_key", "_new", "_n", "_at"))


def _escaped(text):
    """``text`` with each backslash and colon escaped by a backslash: an escaped id holds no bare colon."""
    return F.regexp_replace(F.regexp_replace(text, r"\\", r"\\\\"), ":", r"\\:")   # Java regex and replacement


def build_examples(events: DataFrame, gap_minutes: int = 30, window_start_ms: int | None = None,
                   max_session_events: int = 0, max_examples_per_session: int = 0) -> DataFrame:
    """Prefix examples (EXAMPLE_SCHEMA) of every finished session in ``events``; with
    ``window_start_ms``, only of those first collected then or later (``events`` then include the
    window's lead-in, so that a session running at its start is seen whole, and known to be earlier).
    With ``max_session_events``, sessions with more events are left out too, and a warning names them;
    with ``max_examples_per_session``, a longer session gives that many of its rows (``thinned``).

    The examples come back cached and computed (the caller unpersists them): training reads them
    several times, and the sessionised events they come from, read by the passes below that leave
    sessions out, are cached only while they are built. Without that, each pass read the lake and
    sorted it into sessions again (five reads of the lake in all)."""
    sessions = sessionise(_as_millis(events), gap_minutes).cache()
    try:
        kept = sessions
        if window_start_ms is not None:
            kept = kept.join(_collected_before(sessions, window_start_ms), "session_id", "left_anti")
        kept = finished_sessions(kept, gap_minutes, max_session_events, max_examples_per_session).drop(LAKE_SHARD)
        examples = (kept.groupBy("session_id").applyInArrow(_fold(max_examples_per_session), schema=EXAMPLE_SCHEMA)
                    .cache())
        examples.count()
    finally:
        sessions.unpersist()
    return examples


def _collected_before(sessions: DataFrame, start_ms: int) -> DataFrame:
    """The sessions whose first event was collected before ``start_ms``: the previous window's,
    trained there, where the whole session is (or left out as open). By collection time, as the
    lake's partitions are: a backfill or an offline queue collected in the window belongs to it
    however long ago its events happened."""
    first = sessions.groupBy("session_id").agg(F.min("collector_tstamp").alias("_first_collected"))
    return first.filter(F.col("_first_collected") < start_ms).select("session_id")


def finished_sessions(sessions: DataFrame, gap_minutes: int, max_session_events: int = 0,
                      max_examples_per_session: int = 0) -> DataFrame:
    """The events of ``sessions`` without two kinds of session, both found before the fold runs, in
    one pass over a few columns:

    - Still open: active within ``gap_minutes`` of the newest event of the lake shard its last event
      came from (LAKE_SHARD; of any shard, when that is not known). One that has not bought may
      still, so its label is not known yet (a window ending today, the default, holds many). Buyers
      go too: keeping only them would make the latest sessions, all in the evaluation set, look
      likelier to buy than they are. Each shard's loader lands its events on its own schedule: a
      session on a shard whose loader is an hour behind looked finished against the other shards'
      newest events, and was labelled a non-buyer though its purchase had not landed yet.
    - Above ``max_session_events`` events (lake rows, copies included; 0 = no limit). The fold gets
      a session's events as one pandas frame, so a bot or a load test holding one session id for
      days would exhaust a worker's memory; such sessions are not shoppers either.

    It also says how many kept sessions have more events than ``max_examples_per_session``.
    """
    shard = F.col(LAKE_SHARD) if LAKE_SHARD in sessions.columns else F.lit(None).cast("string")
    per_session = sessions.groupBy("session_id").agg(F.max(_event_time()).alias("_last"),
                                                     F.count("*").alias("_events"),
                                                     F.max_by(shard, _event_time()).alias("_shard"))
    oversized = (F.col("_events") > max_session_events) if max_session_events else F.lit(False)
    long = (F.col("_events") > max_examples_per_session) if max_examples_per_session else F.lit(False)
    by_shard = per_session.groupBy("_shard").agg(
        F.max("_last"), F.collect_list(F.when(oversized, F.col("session_id"))),
        F.count(F.when(long & ~oversized, 1))).collect()
    if not by_shard:
        return sessions
    shard_ends = {row[0]: row[1] for row in by_shard if row[0] is not None}
    newest = max(row[1] for row in by_shard)
    too_big = [session for row in by_shard for session in row[2]]
    long_sessions = sum(row[3] for row in by_shard)
    if too_big:
        log.warning("left out %d session(s) with more than %d events (max_session_events; bots or scripts, "
                    "not shoppers): %s", len(too_big), max_session_events, first_few(sorted(too_big)))
    if long_sessions:
        log.info("%d session(s) have more than %d events: each gives at most %d examples, spread evenly over it "
                 "(max_examples_per_session)", long_sessions, max_examples_per_session, max_examples_per_session)
    _warn_of_shards_behind(shard_ends, newest, gap_minutes)
    # The shards are few: their ends go to the executors as a map literal, not a join.
    end_of_shard = (F.try_element_at(F.create_map(*[F.lit(v) for item in shard_ends.items() for v in item]),
                                     F.col("_shard")) if shard_ends else F.lit(None))
    ends = F.coalesce(end_of_shard, F.lit(newest))
    left_out = per_session.filter((F.col("_last") > ends - gap_minutes * 60_000) | oversized)
    return sessions.join(left_out.select("session_id"), "session_id", "left_anti")


def _warn_of_shards_behind(shard_ends: dict[str, int], newest: int, gap_minutes: int) -> None:
    behind = {shard: newest - end for shard, end in shard_ends.items() if newest - end > gap_minutes * 60_000}
    if behind:
        log.warning("lake shard(s) ending more than session_gap_minutes (%d) before the newest event: %s. Their "
                    "loader is behind (LakeLoaderBehind), or the shard was closed by a reshard; their sessions "
                    "active within the gap of the shard's own newest event are left out as still open",
                    gap_minutes, ", ".join(f"{shard} {lag / 60_000:,.0f} min" for shard, lag in sorted(behind.items())))


# ---------------------------------------------------------------------------------------- the fold


def _json(value, column: str, event_id):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"event {event_id}: column {column} is not valid JSON ({exc})") from None


def records(table: pa.Table) -> list[dict]:
    """Event dicts as the scorer sees them, in the order it folds them (``arrival_order``), each event
    once (the lake is at-least-once: a duplicate event_id would count twice). Of a re-sent event's
    copies the first enriched is kept, as the scorer keeps the first to arrive."""
    # Column lists, not rows: a session is small and wide. Arrow's nulls are None, like JSON null.
    names = [name for name in table.column_names if name != "session_id"]
    columns = [table.column(name).to_pylist() for name in names]
    rows = [dict(zip(names, values)) for values in zip(*columns)]
    rows.sort(key=arrival_order)
    json_columns = [name for name in JSON_COLUMNS if name in names]
    events, seen = [], set()
    for event in rows:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        for column in json_columns:
            event[column] = _json(event[column], column, event["event_id"])
        events.append(event)
    return events


def arrival_order(event: dict) -> tuple:
    """The order in which the scorer folds a session's events: as enriched (``etl_tstamp``, stamped
    per raw record), then as collected. The scorer reads them in the order the enricher wrote them,
    which is not always the collector's: hits with neither a tracker id nor the collector's cookie
    are keyed at random to a raw shard, and one shard's batch may be enriched seconds after
    another's (make demo's skew check found 7 of 1,719 sessions folded otherwise when this was the
    collector's order alone, before raw records were keyed by the tracker's session id). So do a late retry, an offline queue's
    events, a replayed bad row and copies of one event re-read by an enricher after a crash (the
    first enriched is the one folded). The enricher writes a session's events in this order: each
    record's ``etl_tstamp`` a millisecond after the previous record's of its key, and one request's
    events (which share both times) by ``common.features.request_order``, and an event sent again after
    the stream refused it a new stamp (enrich.enrichments.EtlClock, enrich.pipeline). Spark hands rows over in an order of its own (file sizes,
    compaction): this is the only order the fold may take."""
    enriched = event.get("etl_tstamp")
    return (-1 if enriched is None else parse_ms(enriched), parse_ms(event["collector_tstamp"]),
            *request_order(event))


def examples_of(session_id: str, events: list[dict], max_rows: int = 0) -> pa.Table:
    """The example rows (EXAMPLE_SCHEMA) of one session whose events are already in arrival order;
    with ``max_rows``, at most that many of them (``thinned``)."""
    bought = int(any(is_purchase(event) for event in events))
    ids, times, rows = [], [], []
    for event, row in session_prefixes(events):
        ids.append(event["event_id"])
        times.append(event_time_ms(event))
        rows.append(row)
    if max_rows and len(rows) > max_rows:
        kept = thinned(len(rows), max_rows)
        ids, times, rows = ([values[i] for i in kept] for values in (ids, times, rows))
    count = len(rows)
    matrix = np.asarray(rows, dtype=np.float32).reshape(count, len(FEATURE_NAMES)).astype(np.float64)
    start = event_time_ms(events[0]) if events else 0
    columns = [pa.array([session_id] * count, pa.string()), pa.array(ids, pa.string()),
               pa.array(times, pa.int64()), pa.array(np.full(count, start, dtype=np.int64)),
               pa.array(np.full(count, bought, dtype=np.int32)), *(pa.array(column) for column in matrix.T)]
    return pa.Table.from_arrays(columns, names=EXAMPLE_COLUMNS)


def thinned(count: int, max_rows: int) -> list[int]:
    """``max_rows`` of ``count`` row positions, evenly spread from the first to the last. Every event
    of a session is an example: one bot or kiosk session under ``max_session_events`` gave 76 % of a
    small window's rows, one visitor weighing as much as all the others. Spread, not the first rows:
    the scorer scores a session's late events too."""
    if max_rows == 1:
        return [count - 1]
    return [round(i * (count - 1) / (max_rows - 1)) for i in range(max_rows)]


def _fold(max_rows: int):
    """session_examples for applyInArrow, which tells its kind of function by the type hints (a
    functools.partial has none)."""
    def fold(table: pa.Table) -> pa.Table:
        return session_examples(table, max_rows)
    return fold


def session_examples(table: pa.Table, max_rows: int = 0) -> pa.Table:
    """applyInArrow body: one session's events in, its example rows out. Arrow, not pandas: building
    a pandas frame per session in and out made the fold's pass over the sessions 3-4x slower."""
    return examples_of(table.column("session_id")[0].as_py(), records(table), max_rows)


def require_trainable(examples: DataFrame, window) -> dict:
    """Counts of the examples; a clear TrainError when there is nothing to learn from."""
    counts = examples.agg(F.count("*").alias("rows"), F.countDistinct("session_id").alias("sessions"),
                          F.coalesce(F.sum("label"), F.lit(0)).alias("positive_rows"),
                          F.countDistinct(F.when(F.col("label") == 1, F.col("session_id"))).alias("buyers")).first()
    stats = counts.asDict()
    if stats["rows"] == 0:
        raise TrainError(f"no enriched events to learn from in the window {window}: check the lake loader "
                         "and the window (CLICKSTREAM_WINDOW_DAYS / CLICKSTREAM_WINDOW_END)")
    if stats["buyers"] == 0:
        raise TrainError(f"{stats['sessions']} sessions in the window {window} but none bought: a buy model "
                         "needs purchases; widen the window or check that purchase events are tracked")
    return stats
