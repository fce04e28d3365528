"""Training leaves out the sessions offered a discount and weighs the control group's: from the
uplift records the discount engine's recorder writes (the real writer, against the emulator)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging

import pytest

from batch.train import _data_line, run_events
from batch.train_lake import Window
from batch.train_metrics import choose_threshold, evaluate, score_reference
from batch.train_model import WEIGHT, weigh
from batch.train_treated import HOLDOUT_WEIGHT, Treated, read_treated, treated_from
from common import aws
from common.features import parse_ms
from common.uplift_records import HOUR_MS, record_key
from discount.uplift import record
from tests.discount.test_engine import discount_settings
from tests.discount.test_holdout import write_qualified
from tests.train import synth
from tests.train.conftest import fast_settings

pytestmark = pytest.mark.spark
WINDOW = Window.last_days(2, "2026-11-21")
FIRST_HOUR = int(dt.datetime(2026, 11, 19, tzinfo=dt.UTC).timestamp() * 1000)     # the day before the window's


def finished_sessions(events: list[dict]) -> list[tuple[str, int, bool]]:
    """(session id, first event ms, bought) of each synthetic session, in start order."""
    sessions: dict[str, list[dict]] = {}
    for event in events:
        sessions.setdefault(event["domain_sessionid"], []).append(event)
    found = [(sid, min(parse_ms(e["collector_tstamp"]) for e in rows), any(e["event_name"] == "purchase" for e in rows))
             for sid, rows in sessions.items()]
    return sorted(found, key=lambda item: item[1])


def test_the_sessions_offered_a_discount_are_left_out_and_the_held_out_ones_weighed(spark, aws_settings, events, tmp_path):
    s3 = aws.client("s3")
    synth.write_lake_s3(s3, aws_settings.bucket, events)
    sessions = finished_sessions(events)
    # Sessions of the last hours, finished before the synthetic day's end: in the evaluation part of the split.
    late = sessions[-70:-15]
    offered = [sid for sid, _, bought in late if bought][:6]
    held_out = [sid for sid, _, bought in late if not bought][:4]
    assert len(offered) == 6 and len(held_out) == 4
    settings = discount_settings(aws_settings)
    clicks = {sid: start / 1000 + 30 for sid, start, _ in late if sid in offered + held_out}
    for sid, clicked in clicks.items():
        write_qualified(settings, {sid: "offer" if sid in offered else "holdout"}, clicked, share=20)
    recorded = record(aws.client("dynamodb"), s3, settings, 1800, now=(max(clicks.values()) // 3600 + 3) * 3600)
    assert len(recorded) == 22          # the rows' day, back from the last finished hour

    base = fast_settings(bucket=aws_settings.bucket, cache_dir=tmp_path / "cache", class_weight="balanced")
    left_out, _ = run_events(dataclasses.replace(base, treated_sessions="leave_out"), publish_model=False)
    kept, _ = run_events(base, publish_model=False)                 # the default

    treated = left_out.meta["training_window"]["treated_sessions"]
    # Missing: the hours from the first record to the end of the day after the window (none before: no engine ran).
    after_first = (int(dt.datetime(2026, 11, 23, tzinfo=dt.UTC).timestamp() * 1000) - recorded[0]) // HOUR_MS
    assert treated == {"recorded_hours": 22, "missing_hours": after_first - 22, "offered_left_out": 6,
                       "held_out_weighed": 4}
    assert kept.meta["training_window"]["treated_sessions"] is None
    assert left_out.meta["training_window"]["sessions"] == kept.meta["training_window"]["sessions"] - 6
    assert not set(left_out.eval_rows["session_id"]) & set(offered)
    assert set(kept.eval_rows["session_id"]) & set(offered)
    assert set(held_out) <= set(left_out.eval_rows["session_id"])       # the control group is trained on
    assert "; left out 6 sessions offered a discount, weighed 4 held-out ones by 100 / holdout_percent" in _data_line(
        left_out.meta)
    assert left_out.pipeline_model.stages[-1].getWeightCol() == WEIGHT
    # The drift references are of all the traffic: a held-out row weighs 100 / 20 there too.
    rows = left_out.eval_rows
    assert set(rows.loc[rows["session_id"].isin(held_out), HOLDOUT_WEIGHT]) == {5.0}
    assert set(rows.loc[~rows["session_id"].isin(held_out), HOLDOUT_WEIGHT]) == {1.0}
    threshold = left_out.meta["threshold"]
    assert left_out.meta["score_reference"] == score_reference(rows["p_onnx"], threshold, weights=rows[HOLDOUT_WEIGHT])
    assert left_out.meta["score_reference"] != score_reference(rows["p_onnx"], threshold)
    # The metrics and the threshold count each row once: weighed, they were noisier, not nearer the
    # shop as it is (make bench's treated suite; docs/training.md).
    assert left_out.meta["metrics"] == evaluate(rows["label"], rows["p_spark"])
    assert left_out.meta["threshold_selection"] == choose_threshold(rows["label"], rows["p_onnx"])


def test_held_out_rows_weigh_their_share_in_the_fit_and_in_the_class_balance(spark):
    rows = spark.createDataFrame([(1, 5.0), (0, 1.0), (0, 1.0), (0, 1.0), (0, 5.0)], f"label int, {HOLDOUT_WEIGHT} double")
    balanced, buyer_weight = weigh(rows, "label", "balanced")
    assert buyer_weight == pytest.approx(8 / 5)             # the weighted non-buyers over the weighted buyers
    assert [row[WEIGHT] for row in balanced.collect()] == pytest.approx([8.0, 1.0, 1.0, 1.0, 5.0])
    plain, buyer_weight = weigh(rows, "label", "none")
    assert buyer_weight == 1.0 and [row[WEIGHT] for row in plain.collect()] == [5.0, 1.0, 1.0, 1.0, 5.0]
    unweighted = rows.drop(HOLDOUT_WEIGHT)
    assert weigh(unweighted, "label", "none")[0].columns == ["label"]


def test_applied_keeps_the_untreated_and_weighs_the_held_out(spark):
    examples = spark.createDataFrame([("a", 1), ("a", 2), ("b", 1), ("c", 1)], "session_id string, n int")
    kept, summary = Treated({"a": 0.0, "b": 5.0, "z": 0.0}).applied(examples)
    assert sorted((row["session_id"], row["n"], row[HOLDOUT_WEIGHT]) for row in kept.collect()) == [
        ("b", 1, 5.0), ("c", 1, 1.0)]
    assert summary["offered_left_out"] == 1 and summary["held_out_weighed"] == 1
    same, summary = Treated({}).applied(examples)
    assert same is examples and summary["offered_left_out"] == 0


def write_record(root, hour_ms: int, body) -> None:
    path = root / record_key(hour_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body if isinstance(body, str) else json.dumps(body))


def test_records_beside_a_lake_folder_are_read_and_the_hours_without_lists_named(spark, tmp_path, caplog):
    listed = {"offered_sessions": ["o1"], "held_out_sessions": [{"session_id": "h1", "holdout_percent": 10},
                                                                {"session_id": "h2", "holdout_percent": None}]}
    write_record(tmp_path, FIRST_HOUR, listed)
    write_record(tmp_path, FIRST_HOUR + HOUR_MS, {"offered": {"sessions": 3, "bought": 1}})   # uplift_hour 1-0-0
    write_record(tmp_path, FIRST_HOUR + 2 * HOUR_MS, "{not json")
    write_record(tmp_path, FIRST_HOUR - HOUR_MS, {"offered_sessions": ["before"], "held_out_sessions": []})
    (tmp_path / "enriched").mkdir()
    with caplog.at_level(logging.INFO, logger="batch.train_treated"):
        treated = read_treated(spark, fast_settings(lake_path=str(tmp_path / "enriched")), WINDOW)
    assert treated.weights == {"o1": 0.0, "h1": 10.0, "h2": 1.0}         # an unknown share weighs as one session
    assert treated.recorded_hours == 1 and len(treated.missing) == 4 * 24 - 1
    assert treated.missing[:2] == [FIRST_HOUR + HOUR_MS, FIRST_HOUR + 2 * HOUR_MS]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("reports/uplift/hour=2026-11-19T02.json is not an uplift record" in w for w in warnings)
    assert any(w.startswith("95 hour(s) without an uplift record listing their sessions in ")
               and "2026-11-19T01, 2026-11-19T02, 2026-11-19T03" in w for w in warnings)


def test_no_records_at_all_trains_every_session_as_untreated(spark, aws_settings, tmp_path, caplog):
    (tmp_path / "enriched").mkdir()
    with caplog.at_level(logging.INFO, logger="batch.train_treated"):
        from_folder = read_treated(spark, fast_settings(lake_path=str(tmp_path / "enriched")), WINDOW)
        from_bucket = read_treated(spark, fast_settings(bucket=aws_settings.bucket), WINDOW)
    assert from_folder.weights == from_bucket.weights == {} and from_bucket.recorded_hours == 0
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("every session trains as untreated" in line for line in infos) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_hours_before_the_first_record_are_not_missing_but_gaps_after_it_are(caplog):
    """A discount engine deployed mid-window: its first record starts the period a recorder must cover."""
    listed = json.dumps({"offered_sessions": ["o1"], "held_out_sessions": []}).encode()
    start = FIRST_HOUR + 5 * HOUR_MS
    bodies = {start: listed, start + 3 * HOUR_MS: listed}
    end = FIRST_HOUR + 10 * HOUR_MS
    with caplog.at_level(logging.INFO, logger="batch.train_treated"):
        treated = treated_from(bodies, FIRST_HOUR, end, "s3://b/reports/uplift/", now=end / 1000 + 3 * 3600)
    assert treated.missing == [start + HOUR_MS, start + 2 * HOUR_MS, start + 4 * HOUR_MS]
    messages = [r.getMessage() for r in caplog.records]
    assert "the uplift records of s3://b/reports/uplift/ begin at 2026-11-19T05: sessions before it train as untreated" in messages
    assert any(m.startswith("3 hour(s) without an uplift record listing their sessions") for m in messages)
    # Hours too recent for the hourly recorder to have written yet are not missing either.
    assert treated_from(bodies, FIRST_HOUR, end, "x", now=(start + 4 * HOUR_MS) / 1000).missing == [start + HOUR_MS]
