"""Offline features equal online features; the window's failure modes give clear messages."""
from __future__ import annotations

import dataclasses
import itertools
import random
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from batch import train as train_cli
from batch.train import _python_error, load_window, missing_filesystem_error, window_start_ms
from batch.train_features import _as_millis, arrival_order, build_examples, require_trainable, sessionise, thinned
from batch.train_lake import TrainError, Window, spark_paths, unreadable_file_error
from common.features import (
    FEATURE_NAMES,
    SessionState,
    event_time_ms,
    features,
    in_calendar,
    is_purchase,
    parse_ms,
    session_key,
    step,
)
from scorer.sessions import SessionStore
from tests.conftest import ROOT
from tests.train import synth
from tests.train.conftest import START, fast_settings

pytestmark = pytest.mark.spark
WINDOW = Window.last_days(2, "2026-11-21")


def _settings(lake_dir, **overrides):
    return fast_settings(lake_path=str(lake_dir), **overrides)


def test_offline_rows_equal_the_online_fold_event_by_event(spark, lake_dir, events):
    frame = build_examples(load_window(spark, _settings(lake_dir), WINDOW)).toPandas()
    by_session = defaultdict(list)
    for event in events:
        by_session[event["domain_sessionid"]].append(event)
    prefixes = {sid: list(itertools.takewhile(lambda e: not is_purchase(e), sorted(session, key=arrival_order)))
                for sid, session in by_session.items()}
    newest = max(event_time_ms(e) for prefix in prefixes.values() for e in prefix)
    expected_rows, expected_keys, still_open, open_buyers = [], [], 0, 0
    for session_id, session in by_session.items():
        bought = any(is_purchase(e) for e in session)
        if event_time_ms(prefixes[session_id][-1]) > newest - 30 * 60_000:
            still_open += 1                                # may yet buy: no label, so no examples
            open_buyers += bought                          # left out too, or recent sessions look keener
            continue
        state = SessionState()
        for event in prefixes[session_id]:                 # as the scorer would see them, one by one
            step(state, event)
            expected_rows.append(features(state))
            expected_keys.append((session_id, event["event_id"], int(bought)))
    assert still_open and len(frame) == len(expected_keys)
    frame = frame.set_index("event_id").loc[[key[1] for key in expected_keys]]
    assert frame["session_id"].tolist() == [key[0] for key in expected_keys]
    assert frame["label"].tolist() == [key[2] for key in expected_keys]
    online = np.asarray(expected_rows, dtype=np.float32).astype(np.float64)
    assert np.array_equal(frame[list(FEATURE_NAMES)].to_numpy(), online)
    assert frame["label"].sum() > 0 and (frame["label"] == 0).sum() > 0


def test_sessions_without_tracker_id_split_after_30_minutes_of_inactivity(spark, tmp_path):
    rng = random.Random(4)
    origin = int(START.timestamp() * 1000)
    morning = synth.session_events(rng, origin, buyer=False, session_id="", user="u" * 64)
    evening = synth.session_events(rng, origin + 6 * 3_600_000, buyer=True, session_id="", user="u" * 64)
    for event in morning + evening:
        event["domain_sessionid"] = None
    later = synth.session_events(rng, origin + 9 * 3_600_000, buyer=False)     # closes the evening session
    root = synth.write_lake_dir(tmp_path, morning + evening + later)
    events = load_window(spark, _settings(root), WINDOW)
    sessions = sessionise(_as_millis(events)).groupBy("session_id").count().collect()
    by_user = [row for row in sessions if row["session_id"] != later[0]["domain_sessionid"]]
    assert sorted(row["count"] for row in by_user) == sorted([len(morning), len(evening)])
    assert all(row["session_id"].startswith("user:" + "u" * 64) for row in by_user)
    labels = build_examples(events).groupBy("session_id").agg({"label": "max"}).collect()
    assert sorted(row[1] for row in labels) == [0, 1]                  # the later, open session is left out


def _scored_online(events: list[dict], gap_minutes: int = 30) -> dict[str, list[float]]:
    """event_id -> features of every event the scorer scores, folding in the order the enricher wrote
    them (by ``etl_tstamp``, then as collected: what the enriched stream holds) through its
    own session store as its worker does (skip what has no calendar time, drop re-sent copies, no
    row once the session bought)."""
    store = SessionStore(gap_minutes * 60_000, max_sessions=10_000, dedupe_window=64)
    rows = {}
    for event in sorted(events, key=lambda e: (parse_ms(e["etl_tstamp"]), parse_ms(e["collector_tstamp"]))):
        at = event_time_ms(event)
        if not in_calendar(at):
            continue
        session = store.session_for(session_key(event), "shard", at, parse_ms(event["collector_tstamp"]), None)
        if session.first_sight(event["event_id"], 64):
            step(session.state, event, at)
            if not session.state.purchased:
                rows[event["event_id"]] = np.float32(features(session.state)).astype(np.float64).tolist()
    return rows


def _rows_match_the_scorers(spark, root, events: list[dict], later: list[dict]) -> pd.DataFrame:
    """Training's example rows of the lake at ``root``, checked equal, event by event, to what the
    scorer scores receiving ``events``; ``later`` only closes the other sessions (it stays open)."""
    frame = build_examples(load_window(spark, _settings(root), WINDOW)).toPandas()
    online = _scored_online(events)
    for event in later:
        online.pop(event["event_id"], None)
    assert sorted(frame["event_id"]) == sorted(online)
    offline = frame.set_index("event_id")[list(FEATURE_NAMES)]
    assert all(offline.loc[event_id].tolist() == row for event_id, row in online.items())
    return frame


def _shift(event: dict, ms: int) -> dict:
    at = parse_ms(event["derived_tstamp"]) + ms
    return {**event, "derived_tstamp": synth.iso(at), "dvce_created_tstamp": synth.iso(at),
            "collector_tstamp": synth.iso(at + 40), "etl_tstamp": synth.iso(at + 90)}


def test_pauses_purchases_resends_and_bad_times_make_the_scorers_sessions(spark, tmp_path):
    """Training sessionises as the scorer does: a tracker session idle for longer than the gap goes
    on as a new one; a purchase counts as activity (browsing 20 minutes after it, 40 after the last
    page, is the same bought session: no rows); a re-sent event counts once, its first copy; an event
    derived decades before its collection (a reset device clock, ``dtm`` sent in seconds) happened
    when collected, a purchase included, not in a session of its own."""
    rng = random.Random(21)
    origin = int(START.timestamp() * 1000)
    first = synth.Session(rng, origin)
    paused = synth.session_events(rng, origin, buyer=False, session_id=first.session_id, user=first.user)
    resumed = synth.session_events(rng, event_time_ms(paused[-1]) + 45 * 60_000, buyer=False,
                                   session_id=first.session_id, user=first.user)
    sid = "bought-then-browsed"
    buyer_events = synth.session_events(rng, origin + 2 * 3_600_000, buyer=True, session_id=sid)
    cut = next(i for i, e in enumerate(buyer_events) if is_purchase(e))
    before, purchase = buyer_events[:cut], buyer_events[cut]
    purchase = _shift(purchase, event_time_ms(before[-1]) + 20 * 60_000 - event_time_ms(purchase))
    after = synth.session_events(rng, event_time_ms(purchase) + 19 * 60_000, buyer=False, session_id=sid)
    resent_from = synth.session_events(rng, origin + 4 * 3_600_000, buyer=False)
    copy = {**_shift(resent_from[3], 5_000), "derived_tstamp": synth.iso(event_time_ms(resent_from[3]) - 3)}
    early = synth.session_events(rng, origin + 5 * 3_600_000, buyer=False)
    early[2] = {**early[2], "derived_tstamp": synth.iso(-5_000)}
    ancient = synth.session_events(rng, origin + 6 * 3_600_000, buyer=True)
    bought_at = next(i for i, e in enumerate(ancient) if is_purchase(e))
    ancient[bought_at] = {**ancient[bought_at], "derived_tstamp": "1970-01-21T10:06:50.956Z"}
    # Another visitor's tracker names its session as training names the second run of the first.
    impostor = synth.session_events(rng, origin + 7 * 3_600_000, buyer=True, session_id=f"{first.session_id}:2")
    # A server-side tracker's batch: no session id nor cookie, one collector id for every user in it.
    shoppers = [[{**event, "domain_sessionid": None, "domain_userid": None, "user_id": user * 32,
                  "network_userid": "5e" * 32} for event in synth.session_events(rng, origin + 8 * 3_600_000, buyer=False)]
                for user in ("a1", "b2")]
    later = synth.session_events(rng, origin + 9 * 3_600_000, buyer=False)     # closes the others
    events = (paused + resumed + before + [purchase] + after + resent_from + [copy] + early + ancient + impostor
              + shoppers[0] + shoppers[1] + later)
    root = synth.write_lake_dir(tmp_path, events)

    frame = _rows_match_the_scorers(spark, root, events, later)
    sessions = frame.groupby("session_id")["event_id"].count().to_dict()
    assert sessions[first.session_id] == len(paused) and sessions[f"{first.session_id}:2"] == len(resumed)
    assert frame.groupby("session_id")["label"].max()[f"{first.session_id}:2"] == 0
    assert sessions[f"{first.session_id}\\:2"] == next(i for i, e in enumerate(impostor) if is_purchase(e))
    assert [sessions[f"user:{user * 32}:1"] for user in ("a1", "b2")] == [len(shopper) for shopper in shoppers]
    assert sessions[sid] == len(before) and not {e["event_id"] for e in after} & set(frame["event_id"])
    assert sessions[resent_from[0]["domain_sessionid"]] == len(resent_from)
    assert frame.groupby("session_id")["label"].max()[ancient[0]["domain_sessionid"]] == 1
    assert sessions[ancient[0]["domain_sessionid"]] == bought_at
    assert sessions[early[0]["domain_sessionid"]] == len(early)


def _retimed(event: dict, happened_ms: int, collected_ms: int, enriched_ms: int | None = None) -> dict:
    return {**event, "derived_tstamp": synth.iso(happened_ms), "dvce_created_tstamp": synth.iso(happened_ms),
            "collector_tstamp": synth.iso(collected_ms),
            "etl_tstamp": synth.iso(collected_ms + 50 if enriched_ms is None else enriched_ms)}


def test_late_events_fold_in_the_order_the_scorer_receives_them(spark, tmp_path):
    """The scorer folds events as they arrive. A retried hit collected after the next one, or an
    offline queue sent 25 minutes late, changes its state in that order: the session's start (its
    local hour), its length, and whether a pause of 40 minutes between arrivals starts a new session.
    Training in time order gave other rows and other sessions than those scored. So does a hit the
    enricher wrote after later ones (no collector cookie: keyed to another raw shard, whose batch
    was enriched 3 s later): training in collection order gave 7 of make demo's 1,719 sessions other
    rows than the scorer's (python -m batch.skew)."""
    rng = random.Random(41)
    origin = int(START.timestamp() * 1000)
    retried = synth.Session(rng, origin, session_id="retried")
    retried.zone = "Europe/Berlin"
    first, second, third = (retried.page("/", "home"), retried.page("/c/x", "category", "x"),
                            retried.page("/c/y", "category", "y"))
    hour = origin - origin % 3_600_000 + 14 * 3_600_000
    retry = [_retimed(first, hour - 10_000, hour + 20_000),            # 13:59:50, collected after the next
             _retimed(second, hour + 5_000, hour + 5_040), _retimed(third, hour + 300_000, hour + 300_040)]
    queued = synth.Session(rng, origin, session_id="queued")
    pages = [queued.page(f"/c/{n}", "category", "x") for n in range(4)]
    at = hour + 3 * 3_600_000
    offline_queue = [_retimed(pages[0], at, at + 40),
                     _retimed(pages[1], at + 20 * 60_000, at + 45 * 60_000),   # sent 25 minutes late
                     _retimed(pages[2], at + 40 * 60_000, at + 40 * 60_000 + 40),
                     _retimed(pages[3], at + 41 * 60_000, at + 41 * 60_000 + 40)]
    cookieless = synth.Session(rng, origin, session_id="cookieless")
    at = hour + 5 * 3_600_000
    hits = [_retimed(cookieless.page(f"/c/{n}", "category", "x"), at + n, at + 40 + n) for n in range(3)]
    hits[0] = {**hits[0], "etl_tstamp": synth.iso(at + 3_000)}                # enriched after the other two
    # A raw shard's backlog (its enricher down for an hour): the first hit, 50 minutes before the next,
    # reaches the scorer after it, which it then continues (it happened before the newest seen).
    backlog = synth.Session(rng, origin, session_id="backlog")
    at = hour + 4 * 3_600_000
    stalled = [_retimed(backlog.page("/", "home"), at, at + 40, enriched_ms=at + 60 * 60_000),
               _retimed(backlog.page("/c/z", "category", "z"), at + 50 * 60_000, at + 50 * 60_000 + 40)]
    later = synth.session_events(rng, origin + 20 * 3_600_000, buyer=False)    # closes the others
    buyers = [e for n in range(2) for e in synth.session_events(rng, origin + n * 3_600_000, buyer=True)]
    events = retry + offline_queue + hits + stalled + later + buyers
    root = synth.write_lake_dir(tmp_path, events)

    offline = _rows_match_the_scorers(spark, root, events, later).set_index("event_id")
    assert offline.loc[[e["event_id"] for e in retry], "local_hour"].tolist() == [15.0] * 3   # begun 15:00:05 Berlin
    assert offline.loc[[e["event_id"] for e in offline_queue], "session_id"].tolist() == \
        ["queued", "queued:2", "queued:2", "queued:2"]                          # 40 minutes between arrivals
    assert offline.loc[[e["event_id"] for e in hits], "events"].tolist() == [3.0, 1.0, 2.0]  # folded last
    assert offline.loc[[e["event_id"] for e in stalled], "session_id"].tolist() == ["backlog", "backlog"]


def test_sessions_begun_before_the_windows_first_midnight_are_read_whole_and_left_out(spark, tmp_path):
    """The window is whole UTC days. Training reads the day before it too, so a session that began
    before its first midnight is seen whole and left to the previous window, instead of trained from
    its first event inside (wrong counts, length and local hour) or, after a purchase before
    midnight, on rows the scorer never scores. The rows kept are the scorer's."""
    rng = random.Random(31)
    midnight = window_start_ms(WINDOW)
    crossing = synth.session_events(rng, midnight - 3 * 60_000, buyer=True)
    sid = "bought-before-midnight"
    buyer_events = synth.session_events(rng, midnight - 20 * 60_000, buyer=True, session_id=sid)
    cut = next(i for i, e in enumerate(buyer_events) if is_purchase(e))
    shift = midnight - 60_000 - event_time_ms(buyer_events[cut])
    bought = [_shift(event, shift) for event in buyer_events[:cut + 1]]
    after = synth.session_events(rng, midnight + 5 * 60_000, buyer=False, session_id=sid)
    earlier = synth.session_events(rng, midnight - 5 * 3_600_000, buyer=True)
    inside = [e for hour in (1, 2, 3) for e in synth.session_events(rng, midnight + hour * 3_600_000, buyer=hour == 2)]
    later = synth.session_events(rng, midnight + 9 * 3_600_000, buyer=False)     # closes the others
    # Collected in the window, happened three days before it: a backfill or an offline queue. The
    # window is by collection, as the lake's partitions are: it belongs here.
    backfill = [{**event, "collector_tstamp": synth.iso(parse_ms(event["collector_tstamp"]) + 3 * 86_400_000)}
                for event in synth.session_events(rng, midnight - 3 * 86_400_000 + 4 * 3_600_000, buyer=True)]
    assert event_time_ms(crossing[0]) < midnight < event_time_ms(crossing[-1])
    events = crossing + bought + after + earlier + inside + later + backfill
    root = synth.write_lake_dir(tmp_path, events)

    read = load_window(spark, _settings(root), WINDOW)
    assert read.count() == len(events)                                  # the lead-in day too
    assert load_window(spark, _settings(f"file://{root}"), WINDOW).count() == len(events)
    frame = build_examples(read, 30, window_start_ms(WINDOW)).toPandas()
    online = _scored_online(events)
    kept = {e["event_id"] for e in inside + backfill} & set(online)
    assert sorted(frame["event_id"]) == sorted(kept)
    offline = frame.set_index("event_id")[list(FEATURE_NAMES)]
    assert all(offline.loc[event_id].tolist() == online[event_id] for event_id in kept)
    assert frame["label"].sum() > 0


def test_a_window_with_nothing_before_it_is_read_from_a_folder_or_a_url(spark, lake_dir, events):
    for where in (lake_dir, f"file://{lake_dir}"):
        assert load_window(spark, _settings(where), WINDOW).count() == len(events)


def test_a_column_older_files_lack_is_read_from_the_newer_ones_on_every_path(spark, tmp_path, events):
    # The s3a:// and file:// path took the schema of one file, an older loader's: a column added
    # since was null for every row, in the newer files too, and the parity gate could not see it.
    import pyarrow.parquet as pq

    root = synth.write_lake_dir(tmp_path, events)
    older = sorted(root.glob("date=2026-11-20/hour=*/*.parquet"))
    for path in older:
        pq.write_table(pq.read_table(path).drop_columns(["doc_height"]), path)
    newer = [e for e in events if e["collector_tstamp"] >= "2026-11-21"]
    for where in (root, f"file://{root}"):
        heights = load_window(spark, _settings(where), WINDOW).where("doc_height IS NOT NULL").count()
        assert older and heights == sum(e.get("doc_height") is not None for e in newer) > 0, where


def test_empty_window_says_so(spark, lake_dir):
    with pytest.raises(TrainError, match="no enriched events in .* for the window 2026-10-01..2026-10-07"):
        load_window(spark, _settings(lake_dir), Window.last_days(7, "2026-10-07"))


def test_window_without_purchases_says_so(spark, tmp_path):
    rng = random.Random(6)
    origin = int(START.timestamp() * 1000)
    events = [e for i in range(5) for e in synth.session_events(rng, origin + i * 3_600_000, buyer=False)]
    root = synth.write_lake_dir(tmp_path, events)
    examples = build_examples(load_window(spark, _settings(root), WINDOW))
    with pytest.raises(TrainError, match="4 sessions in the window .* but none bought"):   # the 5th may still buy
        require_trainable(examples, WINDOW)


def test_corrupt_parquet_file_is_named(spark, tmp_path, events):
    root = synth.write_lake_dir(tmp_path, events[:500])
    victim = min(root.glob("date=*/hour=*/*.parquet"))
    victim.write_bytes(victim.read_bytes()[:200])       # a truncated upload
    with pytest.raises(TrainError, match=f"1 corrupt Parquet file.*{victim.name}.*SKIP_CORRUPT_FILES"):
        load_window(spark, _settings(root), WINDOW)
    kept = load_window(spark, _settings(root, skip_corrupt_files=True), WINDOW)
    assert 0 < kept.count() < 500


def test_a_corrupt_file_read_through_a_url_is_named_too(spark, tmp_path, events):
    # A URL lake_path (s3a://, file://) skipped the footer check: a page of Java stack and exit 1.
    root = synth.write_lake_dir(tmp_path, events[:500])
    victim = min(root.glob("date=*/hour=*/*.parquet"))
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(TrainError, match=f"corrupt Parquet data in .*{victim.name}"):
        load_window(spark, _settings(f"file://{root}"), WINDOW)


def test_a_folder_the_executors_of_a_cluster_cannot_read_is_refused_with_the_setting_to_use(tmp_path):
    # Executors on other hosts looked for the driver's files and Spark blamed a corrupt footer.
    cluster = SimpleNamespace(sparkContext=SimpleNamespace(master="spark://spark-master:7077"))
    with pytest.raises(TrainError, match=f"spark://spark-master:7077 .* cannot read the folder {tmp_path} .*"
                                         "set CLICKSTREAM_LAKE_PATH to s3a://"):
        load_window(cluster, _settings(tmp_path), WINDOW)


def test_a_lake_url_spark_has_no_filesystem_for_names_the_setting_and_the_jar():
    found = Exception("java.lang.ClassNotFoundException: Class org.apache.hadoop.fs.s3a.S3AFileSystem not found")
    error = missing_filesystem_error(found, "s3a://lake/enriched")
    assert "CLICKSTREAM_LAKE_PATH s3a://lake/enriched" in str(error) and "hadoop-aws" in str(error)
    assert missing_filesystem_error(Exception("something else"), "s3a://lake/enriched") is None


def test_an_executor_without_the_dependencies_is_named_as_the_cause():
    failed = Exception("PythonException:\n  ModuleNotFoundError: No module named 'pyarrow'")
    assert "on a Spark executor: the Python that" in _python_error(failed) and "PYSPARK_PYTHON" in _python_error(failed)


def test_corrupt_data_behind_a_readable_footer_is_named_or_skipped(spark, tmp_path, events):
    root = synth.write_lake_dir(tmp_path, events[:500])
    victim = min(root.glob("date=*/hour=*/*.parquet"))
    data = bytearray(victim.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(8, len(data) - footer - 8, 7):             # scribble over the pages, keep the footer
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))
    events_read = load_window(spark, _settings(root), WINDOW)          # footers all read: passes the check
    with pytest.raises(Exception) as failure:
        build_examples(events_read).count()
    error = unreadable_file_error(failure.value)
    assert error is not None and victim.name in str(error) and "SKIP_CORRUPT_FILES" in str(error)
    assert unreadable_file_error(ValueError("something else")) is None
    kept = load_window(spark, _settings(root, skip_corrupt_files=True), WINDOW)
    assert 0 < len(kept.select("event_id").toPandas()) < 500         # reads the pages, not just footers


def test_spark_is_given_date_folders_unless_a_folder_holds_a_file_it_must_not_read(tmp_path):
    """A folder costs Spark one listing, a file path one lookup each (36 s for a 30-day window)."""
    root = tmp_path / "enriched"
    files = [root / name for name in ("date=2026-11-20/hour=09/a.parquet", "date=2026-11-20/hour=10/b.parquet",
                                      "date=2026-11-21/hour=09/c.parquet", "date=2026-11-21/hour=09/skipped.parquet",
                                      "date=2026-11-22/hour=00/_d.parquet", "date=2026-11-23/hour=00/e.parquet")]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"PAR1")
    (root / "date=2026-11-20/hour=09/.a.parquet.part").write_bytes(b"half")   # hidden: Spark skips it too
    (root / "date=2026-11-23/hour=00/_SUCCESS").write_bytes(b"")
    chosen = [file for file in files if file.name != "skipped.parquet"]
    assert spark_paths(root, chosen) == [root / "date=2026-11-20", root / "date=2026-11-21/hour=09/c.parquet",
                                         root / "date=2026-11-22/hour=00/_d.parquet",
                                         root / "date=2026-11-23/hour=00/e.parquet"]
    assert spark_paths(root, []) == []


def test_a_window_read_by_folders_or_by_files_gives_the_same_events(spark, tmp_path, events):
    root = synth.write_lake_dir(tmp_path, events[:500])
    by_folder = load_window(spark, _settings(root), WINDOW)
    (min(root.glob("date=*/hour=*/*.parquet")).parent / "_SUCCESS").write_bytes(b"")    # that day: by files
    by_file = load_window(spark, _settings(root), WINDOW)
    assert sorted(by_folder.toPandas()["event_id"]) == sorted(by_file.toPandas()["event_id"]) == \
        sorted(e["event_id"] for e in events[:500])
    assert {row.hour for row in by_file.select("hour").distinct().collect()} == \
        {row.hour for row in by_folder.select("hour").distinct().collect()}


def test_examples_come_back_cached_and_nothing_else_stays_cached(spark, lake_dir):
    """The sessionised events are cached while the examples are built (each pass that leaves sessions
    out read the lake and sorted it again), then let go; the caller unpersists the examples."""
    spark.catalog.clearCache()
    examples = build_examples(load_window(spark, _settings(lake_dir), WINDOW))
    assert examples.is_cached
    cache = spark._jsparkSession.sharedState().cacheManager()
    assert not cache.isEmpty()
    examples.unpersist(blocking=True)
    assert cache.isEmpty()


@pytest.mark.parametrize(("failure", "said"), [
    ("java.lang.OutOfMemoryError: Java heap space",
     "Spark ran out of memory (java.lang.OutOfMemoryError) in the driver: raise CLICKSTREAM_SPARK_DRIVER_MEMORY (3g;"),
    # On a cluster, as Spark words them: the first two measured on a local-cluster (an executor's heap, a
    # Python worker's MemoryError under spark.executor.pyspark.memory), the last two from Spark's source.
    (("Task 0 in stage 0.0 failed 4 times, most recent failure: Lost task 0.6 in stage 0.0 (TID 6) (192.0.2.2 "
     "executor 3): java.lang.OutOfMemoryError: Java heap space"),
     ("A Spark executor ran out of heap (java.lang.OutOfMemoryError in executor 3): give the executors more memory "
     "(spark-submit --executor-memory")),
    (("Task 0 in stage 0.0 failed 4 times, most recent failure: Lost task 0.3 in stage 0.0 (TID 3) (192.0.2.2 "
     "executor 0): org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n  File "
     "\"batch/train_features.py\", line 9, in fold\nMemoryError"),
     ("Spark ran out of memory outside the executors' JVM heap (MemoryError): that memory holds the Python workers, "
     "so raise spark.executor.memoryOverhead")),
    (("Task 0 in stage 0.0 failed 4 times, most recent failure: Lost task 0.3 in stage 0.0 (TID 3) (192.0.2.2 "
      "executor 2): ExecutorLostFailure (executor 2 exited caused by one of the running tasks) Reason: Command exited "
      "with code 52"),
     "A Spark executor ran out of heap (java.lang.OutOfMemoryError in executor 2): give the executors more memory"),
    (("Task 2 in stage 7.0 failed 4 times, most recent failure: Lost task 2.3 in stage 7.0 (TID 40) (ip-10-0-1-5 "
     "executor 12): ExecutorLostFailure (executor 12 exited caused by one of the running tasks) Reason: Container "
     "killed by YARN for exceeding memory limits. 5.5 GB of 5.5 GB physical memory used."),
     "(YARN killed an executor's container for exceeding its memory limits): that memory holds the Python workers"),
    (("Task 2 in stage 7.0 failed 4 times, most recent failure: Lost task 2.3 in stage 7.0 (TID 40) (10.0.3.7 "
     "executor 4): ExecutorLostFailure (executor 4 exited caused by one of the running tasks) Reason: The "
     "executor with id 4 exited with exit code 137(SIGKILL, possible container OOM)."),
     ("(an executor's container was killed (exit code 137)): that memory holds the Python workers, so raise "
     "spark.executor.memoryOverhead or set spark.executor.pyspark.memory (spark-submit --conf), or lower "
     "CLICKSTREAM_MAX_SESSION_EVENTS (100000")),
    ("java.io.IOException: No space left on device",
     ("Spark ran out of disk space (No space left on device) for its scratch files in /scratch/spark: free space there, "
     "or set SPARK_LOCAL_DIRS")),
    # as Spark words it (measured with PYSPARK_PYTHON=/nonexistent/bin/python)
    ('java.io.IOException: Cannot run program "/nonexistent/bin/python": error=2, No such file or directory',
     ("Spark could not start its Python workers: no program /nonexistent/bin/python on the executors' hosts. "
      "Set PYSPARK_PYTHON")),
])
def test_spark_out_of_memory_or_disk_names_the_setting_to_raise(spark, lake_dir, monkeypatch, failure, said):
    """A window too big for the driver's heap, or for the scratch disk, ended in a page of Java
    stack trace and exit 1 (which means an AWS call failed)."""
    def out_of_room(*args, **kwargs):
        raise RuntimeError("An error occurred while calling o1902.collectToPython.\n: org.apache.spark.SparkException: "
                           f"Job aborted due to stage failure: {failure}")

    monkeypatch.setattr(train_cli, "fit_and_export", out_of_room)
    monkeypatch.setenv("SPARK_LOCAL_DIRS", "/scratch/spark")
    env = {"CLICKSTREAM_LAKE_PATH": str(lake_dir), "CLICKSTREAM_PROGRESS": "false", "CLICKSTREAM_SPARK_DRIVER_MEMORY": "3g"}
    out = CliRunner().invoke(train_cli.main, ["--no-publish", "--window-end", "2026-11-21", "--window-days", "2"],
                             env=env)
    assert out.exit_code == 2, out.output
    assert said in out.output
    assert "Traceback" not in out.output


# Real failures in a Spark of its own, each named on the command line, in order (the last two end it): a
# Python worker killed, as the kernel's out-of-memory killer does; a task's heap running out, which under
# local[*] ends the whole JVM; the JVM killed.
REAL_OUT_OF_MEMORY = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pyspark import SparkContext
    from pyspark.sql import functions as F
    from batch.train import TrainError, spark_failures_explained
    from batch.train_config import TrainSettings, spark_session

    settings = TrainSettings(spark_master="local[1]", spark_driver_memory="512m", progress=False)
    spark = spark_session(settings, "out-of-memory")

    def killed(frames):
        os.kill(os.getpid(), signal.SIGKILL)
        yield from frames

    def slow(frames):
        time.sleep(20)      # the JVM is killed 3 s into it
        yield from frames

    def jvm_killed_meanwhile():
        threading.Timer(3, os.kill, (SparkContext._gateway.proc.pid, signal.SIGKILL)).start()
        spark.range(1, numPartitions=1).mapInPandas(slow, "id long").collect()

    huge = F.expr("repeat('x', cast(id + 100000000 as int))")
    jobs = {"worker": lambda: spark.range(1, numPartitions=1).mapInPandas(killed, "id long").collect(),
            "heap": lambda: spark.range(8, numPartitions=1).select(huge.alias("s")).groupBy()
                            .agg(F.length(F.concat_ws("", F.collect_list("s")))).collect(),
            "jvm": jvm_killed_meanwhile}
    for name in sys.argv[1:]:
        try:
            with spark_failures_explained(settings):
                jobs[name]()
        except TrainError as exc:
            print("said:", exc)
""")


def said_by_spark(*jobs: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", REAL_OUT_OF_MEMORY, *jobs], cwd=ROOT, capture_output=True,
                          encoding="utf-8", check=False, timeout=300)
    said = [line for line in done.stdout.splitlines() if line.startswith("said:")]
    assert len(said) == len(jobs), done.stdout + done.stderr[-3000:]
    return said


def test_memory_running_out_inside_a_local_spark_names_what_to_change():
    """Under local[*] a task that ran out of heap ends the JVM, and the job said only that its SparkContext
    was shut down, or py4j that it lost its connection: the OutOfMemoryError was in the log, and make
    train ended on a py4j traceback. A Python worker or the JVM killed for their memory did the same."""
    worker, heap = said_by_spark("worker", "heap")
    assert worker.startswith("said: Python ran out of memory on this machine (a Python worker exited unexpectedly, "
                             "most often killed for its memory): free memory, or lower CLICKSTREAM_MAX_SESSION_EVENTS")
    # Which reaches Python first, the JVM's exit (code 52) or the job's error naming the OutOfMemoryError,
    # is a race (a CI run under load saw the second): both are this failure, and both name the setting.
    assert re.match(r"said: Spark(?:'s JVM)? ran out of memory \(java\.lang\.OutOfMemoryError(?:, exit code 52)?\)"
                    r"(?: in the driver)?: raise CLICKSTREAM_SPARK_DRIVER_MEMORY \(512m;", heap), heap
    [jvm] = said_by_spark("jvm")
    assert jvm.startswith("said: Spark's JVM was killed (signal 9), most often by the kernel for the memory it took: "
                          "lower CLICKSTREAM_SPARK_DRIVER_MEMORY (512m) below the memory this machine has free")


def test_leakage_tell_tale_purchase_total_stays_out(spark, tmp_path):
    rng = random.Random(12)
    origin = int(START.timestamp() * 1000)
    events = [e for i in range(6) for e in synth.session_events(rng, origin + i * 600_000, buyer=i % 2 == 0,
                                                                purchase_total=987654.25)]
    events += synth.session_events(rng, origin + 3 * 3_600_000, buyer=False)    # the newest, still open
    root = synth.write_lake_dir(tmp_path, events)
    frame = build_examples(load_window(spark, _settings(root), WINDOW)).toPandas()
    purchases = {e["event_id"] for e in events if e["event_name"] == "purchase"}
    assert len(purchases) == 3 and not purchases & set(frame["event_id"])
    assert not np.isclose(frame[list(FEATURE_NAMES)].to_numpy(), 987654.25, rtol=1e-6).any()
    assert frame.groupby("session_id")["label"].max().sum() == 3


def test_settings_reject_unknown_algorithm_and_class_weight():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="CLICKSTREAM_ALGORITHM"):
        dataclasses.replace(fast_settings(), algorithm="xgb").validate()
    with pytest.raises(ConfigError, match="CLICKSTREAM_CLASS_WEIGHT.*balanced"):
        dataclasses.replace(fast_settings(), class_weight="auto").validate()


@pytest.mark.parametrize("key, value, message", [
    ("subsampling_rate", 2.0, "CLICKSTREAM_SUBSAMPLING_RATE: expected a number above 0 and at most 1"),
    ("target_precision", 5.0, "CLICKSTREAM_TARGET_PRECISION: expected a number above 0 and at most 1"),
    ("elastic_net", 1.5, "CLICKSTREAM_ELASTIC_NET: expected a number from 0 to 1"),
    ("spark_driver_memory", "lots", "CLICKSTREAM_SPARK_DRIVER_MEMORY: expected a size such as 2g"),
    ("seed", -1, "CLICKSTREAM_SEED: expected an integer from 0"),               # numpy refused it, a traceback
    ("model_name", "shop/buy", "CLICKSTREAM_MODEL_NAME: expected a name without '/'"),
    ("model_name", "", "CLICKSTREAM_MODEL_NAME"),
    ("lake_path", "s3a:/lake/enriched", "CLICKSTREAM_LAKE_PATH: 's3a:/lake/enriched' is neither a folder nor a URL"),
    ("lake_path", "/no/such/lake", "CLICKSTREAM_LAKE_PATH: no folder '/no/such/lake'"),
    ("treated_sessions", "drop", "CLICKSTREAM_TREATED_SESSIONS: expected one of leave_out, keep, got 'drop'"),
])
def test_settings_spark_would_refuse_minutes_into_a_run_are_refused_before_it_starts(key, value, message):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(fast_settings(), **{key: value}).validate()
    dataclasses.replace(fast_settings(), spark_driver_memory="512M").validate()


def test_a_session_above_max_session_events_is_left_out_and_named(spark, tmp_path, caplog):
    """A bot holding one session id for days would be one huge pandas frame in the fold."""
    rng = random.Random(21)
    origin = int(START.timestamp() * 1000)
    events = [e for i in range(6) for e in synth.session_events(rng, origin + i * 600_000, buyer=i % 2 == 0)]
    events += synth.session_events(rng, origin + 3 * 3_600_000, buyer=False)    # the newest, still open
    sizes = defaultdict(int)
    for event in events:
        sizes[event["domain_sessionid"]] += 1
    finished = [sid for sid in sizes if sid != events[-1]["domain_sessionid"]]
    biggest = max(finished, key=sizes.get)
    limit = sizes[biggest] - 1
    assert sorted(sizes[sid] > limit for sid in finished) == [False] * 5 + [True]
    read = load_window(spark, _settings(synth.write_lake_dir(tmp_path, events)), WINDOW)
    kept = set(build_examples(read, 30, None, limit).toPandas()["session_id"])
    assert kept == set(finished) - {biggest}
    assert f"left out 1 session(s) with more than {limit} events" in caplog.text and biggest in caplog.text
    assert set(build_examples(read).toPandas()["session_id"]) == set(finished)        # 0: no limit


def _ending_at(events: list[dict], end_ms: int) -> list[dict]:
    last = max(parse_ms(event["derived_tstamp"]) for event in events)
    return [_shift(event, end_ms - last) for event in events]


def test_a_session_on_a_lake_shard_whose_loader_is_behind_is_left_out_as_open(spark, tmp_path, caplog):
    """Each shard's loader lands its events on its own schedule. Against the other shard's newest
    event, a session on a shard whose loader stopped 45 minutes earlier looked finished, and was
    labelled a non-buyer though its purchase may not have landed yet."""
    rng = random.Random(5)
    hour = 3_600_000
    origin = int(START.timestamp() * 1000) + hour
    newest = origin + 5 * hour
    ahead = [_ending_at(synth.session_events(rng, origin, buyer=i == 0), origin + (i + 1) * hour) for i in range(3)]
    still_open = _ending_at(synth.session_events(rng, origin, buyer=False), newest)
    stalled = _ending_at(synth.session_events(rng, origin, buyer=False), newest - 45 * 60_000)
    earlier = _ending_at(synth.session_events(rng, origin, buyer=True), newest - 3 * hour)
    synth.write_lake_dir(tmp_path, [event for session in (*ahead, still_open) for event in session])
    root = synth.write_lake_dir(tmp_path, stalled + earlier, shard="shardId-000000000001")
    kept = set(build_examples(load_window(spark, _settings(root), WINDOW)).toPandas()["session_id"])
    assert kept == {session[0]["domain_sessionid"] for session in (*ahead, earlier)}
    assert "lake shard(s) ending more than session_gap_minutes (30) before the newest event: " \
           "shardId-000000000001 45 min." in caplog.text


def test_a_long_session_gives_max_examples_per_session_rows_spread_over_it(spark, tmp_path, caplog):
    """One long visit (a kiosk, a bot under max_session_events) gave most of a small window's rows."""
    rng = random.Random(22)
    origin = int(START.timestamp() * 1000)
    events = [e for i in range(6) for e in synth.session_events(rng, origin + i * 600_000, buyer=i % 2 == 0)]
    events += synth.session_events(rng, origin + 3 * 3_600_000, buyer=False)    # the newest, still open
    read = load_window(spark, _settings(synth.write_lake_dir(tmp_path, events)), WINDOW)
    every = build_examples(read).toPandas()
    rows = every.groupby("session_id", sort=False)["event_id"].apply(list)
    cap = sorted(map(len, rows))[-2] - 1                   # the two longest sessions are thinned
    caplog.set_level("INFO", logger="batch.train_features")
    capped = build_examples(read, 30, None, 0, cap).toPandas().set_index("event_id")
    assert "2 session(s) have more than" in caplog.text and "max_examples_per_session" in caplog.text
    for session_id, ids in rows.items():
        expected = [ids[i] for i in thinned(len(ids), cap)] if len(ids) > cap else ids
        got = capped[capped["session_id"] == session_id]
        assert sorted(got.index) == sorted(expected) and (len(ids) <= cap or (ids[0], ids[-1]) == (expected[0], expected[-1]))
        pd.testing.assert_frame_equal(got.loc[expected], every.set_index("event_id").loc[expected])
    assert len(capped) == sum(min(len(ids), cap) for ids in rows)


@pytest.mark.parametrize("count, most", [(10, 3), (1_000, 7), (501, 500), (11, 1)])
def test_thinned_rows_are_distinct_and_spread_from_first_to_last(count, most):
    kept = thinned(count, most)
    assert len(kept) == most and kept == sorted(set(kept)) and kept[-1] == count - 1
    assert most == 1 or kept[0] == 0
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_the_fold_runs_once_per_kept_session(spark, lake_dir, monkeypatch):
    """Open sessions are found from the events, not from the fold's output: that ran the fold three
    times over (once for the newest time, twice in the join with its own per-session maximum)."""
    from batch import train_features

    calls = spark.sparkContext.accumulator(0)
    fold = train_features.session_examples

    def counted(table, max_rows=0):
        calls.add(1)
        return fold(table, max_rows)

    monkeypatch.setattr(train_features, "session_examples", counted)
    examples = build_examples(load_window(spark, _settings(lake_dir), WINDOW))
    sessions = examples.select("session_id").distinct().count()
    assert sessions > 0 and calls.value == sessions


def test_the_features_benchmark_folds_the_same_rows_both_ways(spark):
    """`make bench`'s features suite times Spark against the fold in one process; its figures mean
    something only while both ways fold the same sessions into the same rows."""
    from bench.features import measure

    got = measure(spark, count=40, runs=1)
    assert 0 < got.kept <= 40 and got.folded <= got.events
    assert got.spark_rows == got.local_rows > got.kept
    assert got.spark_seconds > 0 and got.local_seconds > 0
