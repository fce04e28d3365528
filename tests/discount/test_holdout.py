"""The control group and the uplift report against the emulator: a held-out session qualifies as an
offered one would, gets a holdout row and no offer, and the report compares the two groups' purchases."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from common import aws
from discount.offers import OfferTable, Prediction, held_out
from discount.uplift import (
    HOUR_MS,
    Group,
    compare,
    measure,
    pool,
    record,
    record_key,
    recordable_hours,
    recorded,
    render,
    table_heading,
)
from discount.uplift import main as uplift_command
from scorer.sink import PredictionWriter
from tests.conftest import ROOT, settings_env
from tests.discount.test_engine import T0, count, decided, discount_settings, drain, engine, prediction, publish


def sessions(control: bool, number: int, prefix: str = "s") -> list[str]:
    """The first ``number`` session ids of the form <prefix><i> that the hash puts in (or out of) a 50 % control group."""
    found = (f"{prefix}{i}" for i in range(10_000))
    return [sid for sid in found if held_out(sid, 50) == control][:number]


def test_the_control_group_is_a_stable_hash_share_of_the_sessions():
    ids = [f"session-{i}" for i in range(20_000)]
    share = sum(held_out(sid, 10) for sid in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert not any(held_out(sid, 0) for sid in ids) and all(held_out(sid, 100) for sid in ids)
    # Raising the share only moves sessions into the control group, never out of it.
    assert {sid for sid in ids if held_out(sid, 10)} < {sid for sid in ids if held_out(sid, 20)}


def test_a_held_out_session_gets_a_holdout_row_no_offer_and_spends_no_budget(aws_settings):
    settings = discount_settings(aws_settings, holdout_percent=50, budget_per_hour=2)
    control, treated = sessions(True, 2), sessions(False, 3)
    order = [control[0], treated[0], treated[1], control[1], treated[2]]
    publish(settings, [prediction(sid, 0.5) for sid in order] + [prediction(control[0], 0.6)])
    eng = engine(settings)
    drain(eng, 6)
    # The first control session passed the budget check without spending; once the two offers spent
    # the hour's budget, the next control session was refused like the next offer.
    assert decided(settings) == {control[0]: "holdout", treated[0]: "offer", treated[1]: "offer"}
    assert eng.offers.spent(T0) == 2
    assert {o: count(eng, o) for o in ("held_out", "offered", "budget_exhausted", "already_offered")} == {
        "held_out": 1, "offered": 2, "budget_exhausted": 2, "already_offered": 1}
    assert eng.offers.get(control[0], now=T0) is None          # what the shop reads: nothing to show
    eng.close()
    # A replay (another reader of the whole stream) writes no second row, in either group.
    replay = engine(settings, app="replay")
    drain(replay, 6)
    assert count(replay, "held_out") == 0 and count(replay, "offered") == 0 and len(decided(settings)) == 3
    replay.close()


def test_a_held_out_session_that_bought_gets_no_holdout_row(aws_settings):
    """The control group passes the purchase check too: otherwise it would hold sessions the offers
    never reach, and the comparison would be between unlike groups."""
    settings = discount_settings(aws_settings, holdout_percent=50)
    [bought] = sessions(True, 1)
    clicked_ms = int((T0 - 5) * 1000)
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 3600)
    assert writer.write({"shardId-0": [({"session_id": bought, "events_in_session": 5}, clicked_ms)]},
                        bought={"shardId-0": [(bought, clicked_ms + 1_000)]})
    writer.close()
    publish(settings, [prediction(bought, 0.5)])
    eng = engine(settings)
    drain(eng, 1)
    assert decided(settings) == {} and count(eng, "bought") == 1
    eng.close()


def test_the_difference_interval_is_newcombes():
    # Newcombe (1998), Statistics in Medicine 17:873, table II, example (a): 56/70 against 48/80.
    uplift = compare(Group(70, 56), Group(80, 48))
    assert uplift.difference == pytest.approx(0.2)
    assert (round(uplift.low, 4), round(uplift.high, 4)) == (0.0524, 0.3339)
    assert uplift.verdict() == "offers raised the purchase rate"
    # Zero purchases in a group still gives a finite interval (a normal approximation gives none).
    zero = compare(Group(10, 0), Group(10, 0))
    assert zero.low < 0 < zero.high and not math.isnan(zero.low)
    assert compare(Group(5, 1), Group(0, 0)).verdict().startswith("no comparison: the control group is empty")


def write_qualified(settings, kinds: dict[str, str], clicked_s: float, share: float = 20) -> None:
    """Offer and holdout rows as the engine writes them, for sessions clicked at ``clicked_s``: each
    session's group forced (a share of 0 or 100 %), then its row marked with the ``share`` it stands for."""
    dynamodb = aws.client("dynamodb")
    for kind in ("offer", "holdout"):
        table = OfferTable(dynamodb, settings.offers_table, budget_per_hour=100, discount_percent=10,
                           ttl_hours=24, holdout_percent=100 if kind == "holdout" else 0)
        for sid in (sid for sid, wanted in kinds.items() if wanted == kind):
            table.offer(prediction_of(sid, clicked_s), now=clicked_s + 1)
            dynamodb.update_item(TableName=settings.offers_table, Key={"session_id": {"S": sid}},
                                 UpdateExpression="SET holdout_percent = :share",
                                 ExpressionAttributeValues={":share": {"N": f"{share:g}"}})


def prediction_of(sid: str, clicked_s: float) -> Prediction:
    return Prediction.from_record(prediction(sid, 0.5, clicked=clicked_s))


def test_the_uplift_report_counts_purchases_after_the_qualifying_click(aws_settings):
    settings = discount_settings(aws_settings)
    now = T0 + 7200
    clicked = T0
    write_qualified(settings, {"o-bought": "offer", "o-browsed": "offer", "o-bought-before": "offer",
                               "h-bought": "holdout", "h-browsed": "holdout", "h-no-row": "holdout"}, clicked)
    write_qualified(settings, {"o-recent": "offer", "h-recent": "holdout"}, now - 60)      # may still buy
    clicked_ms = int(clicked * 1000)
    marks = {"o-bought": clicked_ms + 60_000, "o-bought-before": clicked_ms - 3_600_000,   # an earlier session's
             "h-bought": clicked_ms + 5_000, "o-recent": int((now - 30) * 1000)}
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 10 * 3600)
    assert writer.write({"shardId-0": [({"session_id": sid, "events_in_session": 5}, ms) for sid, ms in
                                       {**marks, "o-browsed": clicked_ms, "h-browsed": clicked_ms}.items()]},
                        bought={"shardId-0": list(marks.items())})
    writer.close()
    # Rows of an engine before offer schema 1-1-0 have no clicked_ms: the offer's own time stands in.
    old_rows = {"old-bought": clicked_ms + 60_000, "old-bought-before": clicked_ms - 60_000}
    for sid in old_rows:
        item = OfferTable(aws.client("dynamodb"), settings.offers_table, budget_per_hour=100, discount_percent=10,
                          ttl_hours=24).offer_item(prediction_of(sid, clicked), now=clicked + 1)
        del item["clicked_ms"]
        aws.client("dynamodb").put_item(TableName=settings.offers_table, Item=item)
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 10 * 3600)
    assert writer.write({"shardId-0": [({"session_id": sid, "events_in_session": 5}, ms) for sid, ms in old_rows.items()]},
                        bought={"shardId-0": list(old_rows.items())})
    writer.close()
    uplift = measure(aws.client("dynamodb"), settings.offers_table, settings.predictions_table, 1800, now=now)
    assert (uplift.offered, uplift.held_out, uplift.open_sessions) == (Group(5, 2), Group(3, 1), 2)
    # Once the offers' rows have expired they are no longer counted: they may belong to a new offer's session.
    assert measure(aws.client("dynamodb"), settings.offers_table, settings.predictions_table, 1800,
                   now=now + 24 * 3600).offered == Group(0, 0)


def test_the_uplift_command_prints_the_groups_and_their_json(aws_settings):
    settings = discount_settings(aws_settings)
    clicked = time.time() - 3600            # the command reads the rows on the real clock
    write_qualified(settings, {**{f"o{i}": "offer" for i in range(4)}, "h0": "holdout"}, clicked)
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 10 * 3600)
    clicked_ms = int(clicked * 1000)
    assert writer.write({"shardId-0": [({"session_id": "o0", "events_in_session": 5}, clicked_ms)]},
                        bought={"shardId-0": [("o0", clicked_ms + 1)]})
    writer.close()
    env = {**os.environ, **settings_env(settings)}

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "discount.uplift", "--settle-minutes", "0", *args], cwd=ROOT,
                                env=env, capture_output=True, encoding="utf-8", timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    text = run()
    assert "offered           4       1    25.0 %" in text and "held out          1       0     0.0 %" in text
    assert "difference (offered - held out): +25.0 points, 95 % interval" in text
    assert text.rstrip().endswith("no effect shown: the interval includes 0 (more sessions narrow it)")
    figures = json.loads(run("--json"))
    assert figures["offered"] == {"sessions": 4, "bought": 1, "rate": 0.25}
    assert figures["held_out"] == {"sessions": 1, "bought": 0, "rate": 0.0} and figures["difference"] == 0.25


def test_the_docs_example_is_what_the_command_prints():
    doc = (ROOT / "docs" / "discount-engine.md").read_text(encoding="utf-8")
    example = doc.split("$ python -m discount.uplift\n", 1)[1].split("```", 1)[0].rstrip("\n")
    uplift = compare(Group(412, 71), Group(103, 14), open_sessions=12)
    assert example == render(uplift, table_heading(uplift, "clickstream-offers"))


def mark_purchases(settings, marks: dict[str, int]) -> None:
    """The scorer's purchase marks (bought_ms) on the sessions' rows of the predictions table."""
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 10 * 3600)
    assert writer.write({"shardId-0": [({"session_id": sid, "events_in_session": 5}, ms) for sid, ms in marks.items()]},
                        bought={"shardId-0": list(marks.items())})
    writer.close()


def test_each_finished_hour_is_recorded_once_and_the_records_pool_over_any_period(aws_settings):
    """The table's rows live a day; the records keep each hour's counts for as long an experiment as needed."""
    settings = discount_settings(aws_settings)
    first = (T0 // 3600 + 1) * 3600                     # an hour's start
    second, third = first + 3600, first + 7200
    pseudonym = "9f2c" * 16                 # the scorer's key for a session whose tracker sent no session id
    write_qualified(settings, {"a-o1": "offer", "a-o2": "offer", "a-h1": "holdout", pseudonym: "offer"}, first + 600)
    write_qualified(settings, {"b-o1": "offer", "b-h1": "holdout"}, second + 3599, share=50)     # raised
    write_qualified(settings, {"c-o1": "offer"}, third + 60)           # the hour not finished yet
    mark_purchases(settings, {"a-o1": int(first * 1000) + 700_000, "b-o1": int(second * 1000) + 3_600_500,
                              "b-h1": int(second * 1000) + 3_599_999, "c-o1": int(third * 1000) + 70_000})
    dynamodb, s3 = aws.client("dynamodb"), aws.client("s3")
    now = third + 3600 + 600                # the third hour ended 10 minutes ago: its sessions may still buy

    written = record(dynamodb, s3, settings, 1800, now=now)
    assert written[-2:] == [first * 1000, second * 1000] and len(written) == 22      # back to the rows' TTL

    def counts(hour_s: float) -> dict:
        body = json.loads(s3.get_object(Bucket=settings.bucket, Key=record_key(int(hour_s * 1000)))["Body"].read())
        return {"offered": body["offered"], "held_out": body["held_out"]}

    assert counts(first) == {"offered": {"sessions": 3, "bought": 1}, "held_out": {"sessions": 1, "bought": 0}}
    first_record = json.loads(s3.get_object(Bucket=settings.bucket, Key=record_key(int(first * 1000)))["Body"].read())
    assert first_record["holdout_percent"] == [20]
    assert first_record["schema"] == "iglu:com.clickstream/uplift_hour/jsonschema/1-1-0"
    # The sessions, for training to leave out or weigh; one keyed by a user pseudonym is counted, not listed.
    assert first_record["offered_sessions"] == ["a-o1", "a-o2"]
    assert first_record["held_out_sessions"] == [{"session_id": "a-h1", "holdout_percent": 20}]
    assert counts(second) == {"offered": {"sessions": 1, "bought": 1}, "held_out": {"sessions": 1, "bought": 1}}
    # Recorded once: a later run writes only the hours finished since, even if rows have gone meanwhile.
    dynamodb.delete_item(TableName=settings.offers_table, Key={"session_id": {"S": "a-o1"}})
    assert record(dynamodb, s3, settings, 1800, now=now) == []
    assert record(dynamodb, s3, settings, 1800, now=now + 3600) == [third * 1000]
    assert counts(first)["offered"] == {"sessions": 3, "bought": 1}
    assert counts(third)["offered"] == {"sessions": 1, "bought": 1}

    everything = pool(s3, settings.bucket)
    assert (everything.uplift.offered, everything.uplift.held_out) == (Group(5, 3), Group(2, 1))
    assert everything.hours == 23 and everything.missing == []
    # Pooled over two shares, each group mixes the periods in other proportions: said, and named.
    assert everything.uplift.shares == (20, 50)
    assert render(everything.uplift, "").splitlines()[-1] == (
        "warning: the control group's share changed within the period (20 %, 50 %): compare periods of one share "
        "(--recorded with --since and --until)")
    one = pool(s3, settings.bucket, int(second * 1000), int(third * 1000))
    assert (one.uplift.offered, one.uplift.held_out, one.hours) == (Group(1, 1), Group(1, 1), 1)
    assert one.uplift.share_warning() is None and "warning" not in render(one.uplift, "")
    # A period reaching past the records names the hours not recorded.
    later = pool(s3, settings.bucket, int(second * 1000), int((third + 4 * 3600) * 1000), now=third + 3 * 3600 + 60)
    assert later.hours == 2 and later.missing == [int((third + 3600) * 1000), int((third + 7200) * 1000)]
    assert later.until_ms == int((third + 3 * 3600) * 1000)       # not the hour under way: it cannot be recorded yet
    assert HOUR_MS == 3_600_000


def test_the_uplift_command_records_hours_and_compares_the_recorded_ones(aws_settings):
    settings = discount_settings(aws_settings)
    clicked = (time.time() // 3600 - 2) * 3600 + 60           # in the hour before last: finished and settled
    write_qualified(settings, {"o0": "offer", "o1": "offer", "h0": "holdout"}, clicked)
    mark_purchases(settings, {"o0": int(clicked * 1000) + 1})
    env = {**os.environ, **settings_env(settings)}

    def run(*args: str, code: int = 0) -> str:
        result = subprocess.run([sys.executable, "-m", "discount.uplift", *args], cwd=ROOT, env=env,
                                capture_output=True, encoding="utf-8", timeout=60, check=False)
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

    assert "no hour is recorded" in run("--recorded", code=1)
    assert run("--record", "--settle-minutes", "0").startswith(f"recorded 23 hours in s3://{settings.bucket}/reports/uplift/: ")
    assert "(every finished hour already was)" in run("--record")
    text = run("--recorded")
    assert text.startswith("sessions that qualified from ") and "(23 recorded hours)" in text
    assert "offered           2       1    50.0 %" in text and "held out          1       0     0.0 %" in text
    def iso(epoch_s: float) -> str:
        return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat()

    figures = json.loads(run("--recorded", "--json", "--since", iso(clicked), "--until", iso(clicked - 60 + 3600)))
    assert (figures["offered"], figures["hours"], figures["missing_hours"]) == (
        {"sessions": 2, "bought": 1, "rate": 0.5}, 1, [])
    assert "use them with --recorded" in run("--since", "2026-12-01", code=2)
    aws.client("s3").put_object(Bucket=settings.bucket, Key="reports/uplift/hour=2026-01-01T00.json", Body=b"{}")
    assert "reports/uplift/hour=2026-01-01T00.json is not an uplift record (KeyError('offered'))" in run(
        "--recorded", code=1)
    assert "one at a time" in run("--record", "--recorded", code=2)


@pytest.mark.parametrize("minutes", ["nan", "inf", "1e306"])
def test_the_uplift_command_refuses_settle_minutes_that_are_not_finite(minutes):
    """FloatRange(min=0) passes them: nan left every session out in silence, inf (and minutes infinite
    in milliseconds) failed --record with a traceback."""
    for args in (["--settle-minutes", minutes], ["--record", "--settle-minutes", minutes]):
        result = CliRunner().invoke(uplift_command, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--settle-minutes'" in result.output


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_recorder_killed_mid_write_leaves_every_hour_to_the_next_run_once(aws_settings, when):
    """kill -9 while an hour's record is written: not written yet ("before"), or written and not
    acknowledged ("after"). The next run writes the hours still missing and keeps the one written."""
    from tests.faults import FaultProxy

    settings = discount_settings(aws_settings)
    hour = (time.time() // 3600 - 2) * 3600                   # the hour before last: finished
    write_qualified(settings, {"o0": "offer", "o1": "offer", "h0": "holdout"}, hour + 60)
    mark_purchases(settings, {"o1": int(hour * 1000) + 120_000})
    s3, key = aws.client("s3"), record_key(int(hour * 1000))
    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "discount.uplift", "--record", "--settle-minutes", "0"]
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.hang_next = (f"PUT /{settings.bucket}/{key}", when)
        process = subprocess.Popen(command, cwd=ROOT, env={**env, "AWS_ENDPOINT_URL": proxy.endpoint},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert proxy.hanging.wait(60), "the recorder never wrote that hour"
        finally:
            process.kill()                                    # SIGKILL: no cleanup runs
            process.wait(timeout=10)
            proxy.release()
    before = recorded(s3, settings.bucket)
    assert (int(hour * 1000) in before) == (when == "after") and before          # earlier hours were written
    written = s3.head_object(Bucket=settings.bucket, Key=key)["ETag"] if when == "after" else None

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    after = recorded(s3, settings.bucket)
    assert set(recordable_hours(time.time(), 0, settings.offer_ttl_hours)) <= set(after)
    assert set(before) <= set(after) and int(hour * 1000) in after
    if written:
        assert s3.head_object(Bucket=settings.bucket, Key=key)["ETag"] == written               # not rewritten
    body = json.loads(s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read())
    assert (body["offered"], body["held_out"]) == ({"sessions": 2, "bought": 1}, {"sessions": 1, "bought": 0})
