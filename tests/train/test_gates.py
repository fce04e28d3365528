"""The promotion gates on their own (no Spark): which published versions may move CURRENT."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from batch import export
from batch.export import Parity
from batch.train import _champion_line
from batch.train_config import TrainSettings
from batch.train_metrics import evaluate
from batch.train_model import TrainResult
from batch.train_publish import ParityError, champion, decide, publish
from common.features import FEATURE_NAMES, FEATURE_VERSION
from tests.scorer.helpers import logistic_onnx, model_meta
from tests.scorer.helpers import publish as publish_bundle

SPLIT_AT = 1_795_000_000_000        # CURRENT's training split (session start, epoch ms)


def result(auc: float, parity: bool = True, rows: pd.DataFrame | None = None, **meta) -> TrainResult:
    """A challenger with the scorers' event features unless ``meta`` says otherwise."""
    meta = {"metrics": {"roc_auc": auc}, "feature_version": FEATURE_VERSION,
            "features": [{"name": name, "type": "float"} for name in FEATURE_NAMES], **meta}
    return TrainResult(None, b"", meta, pd.DataFrame() if rows is None else rows, Parity(parity, 0.0, 100, 1e-5))


def eval_rows(seen: int, unseen: int, seed: int = 3) -> pd.DataFrame:
    """Evaluation rows whose labels CURRENT (logistic_onnx) ranks perfectly on the sessions it trained
    on (starting before SPLIT_AT) and at random on the others."""
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame(rng.gamma(1.0, 2.0, (seen + unseen, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    p = export.onnx_probabilities(logistic_onnx(), rows.to_numpy())
    rows["session_start_ms"] = np.where(np.arange(len(rows)) < seen, SPLIT_AT - 60_000, SPLIT_AT + 60_000)
    rows["label"] = np.where(np.arange(len(rows)) < seen, p > np.median(p[:seen]) if seen else 0,
                             rng.random(len(rows)) < 0.3).astype(int)
    rows["p_spark"] = p                 # a challenger that scores like CURRENT unless a test says otherwise
    return rows


def complete(parity: Parity) -> TrainResult:
    """A challenger publish() can upload in full (ONNX, report, model.json): only ``parity`` stops it."""
    rows = eval_rows(seen=0, unseen=200)
    rows["p_spark"] = export.onnx_probabilities(logistic_onnx(), rows[list(FEATURE_NAMES)].to_numpy())
    meta = {"name": "parity-test", "algorithm": "lr", "label": "buy", "threshold": 0.5,
            "threshold_selection": {"objective": "f1"}, "metrics": evaluate(rows["label"], rows["p_spark"]),
            "rows": {"train": 0, "eval": len(rows)}, "feature_importances": {}, "parity": parity.as_meta(),
            "feature_version": FEATURE_VERSION, "features": [{"name": n, "type": "float"} for n in FEATURE_NAMES]}
    return TrainResult(None, logistic_onnx(), meta, rows, parity)


@pytest.fixture
def registry_with_current(aws_settings):
    """A bucket whose CURRENT is logistic_onnx() trained on the sessions that started before SPLIT_AT."""
    from common import aws

    settings = TrainSettings(bucket=aws_settings.bucket)
    meta = model_meta(settings.model_name, "v1", training_window={"split_at_ms": SPLIT_AT})
    publish_bundle(aws.client("s3"), settings.bucket, settings.model_name, "v1", logistic_onnx(), meta)
    return aws.client("s3"), settings


def test_a_better_model_with_the_same_features_moves_current():
    current = {"version": "v1", "roc_auc": 0.78, "challenger_roc_auc": 0.80, "rows": 500}
    assert decide(result(0.80), current, TrainSettings()) == (True, [])
    assert decide(result(0.80), None, TrainSettings()) == (True, [])


def test_floor_margin_and_parity_each_keep_current():
    settings = TrainSettings(auc_floor=0.7, champion_margin=0.01)
    current = {"version": "v1", "roc_auc": 0.80, "challenger_roc_auc": 0.65, "rows": 500}
    promote, reasons = decide(result(0.65, parity=False), current, settings)
    assert not promote and len(reasons) == 3
    assert "below the floor 0.7" in reasons[1] and "worse than CURRENT v1's 0.8000 on the same 500 rows" in reasons[2]


def test_a_model_with_other_features_than_current_is_not_promoted():
    current = {"version": "v1", "roc_auc": None, "features_differ": True,
               "note": "not comparable: feature version '1' vs 'table-abc'"}
    promote, [reason] = decide(result(0.99), current, TrainSettings())
    assert not promote and "CURRENT v1" in reason and "table-abc" in reason and "batch.registry promote" in reason


def test_the_champion_is_scored_only_on_sessions_it_did_not_train_on(registry_with_current):
    s3, settings = registry_with_current
    rows = eval_rows(seen=300, unseen=200)
    info = champion(s3, settings, result(0.55, rows=rows))
    unseen = rows[rows["session_start_ms"] >= SPLIT_AT]
    expected = evaluate(unseen["label"], export.onnx_probabilities(logistic_onnx(), unseen[list(FEATURE_NAMES)]))
    assert info["rows"] == 200 and info["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert info["roc_auc"] < 0.7 and "200 of 500 evaluation rows" in info["note"]     # in-sample it would be ~0.9
    # a CURRENT that records no split (table mode) is scored on every row, as before
    publish_bundle(s3, settings.bucket, settings.model_name, "v2", logistic_onnx(), model_meta(settings.model_name, "v2"))
    assert champion(s3, settings, result(0.55, rows=rows))["rows"] == 500


def test_champion_and_challenger_are_compared_on_the_same_rows(registry_with_current):
    """The challenger's AUC over every evaluation row was held against CURRENT's on the rows it did
    not train on: a challenger right on the older sessions and backwards on the newer was promoted."""
    s3, settings = registry_with_current
    rows = eval_rows(seen=300, unseen=200)
    seen = rows["session_start_ms"] < SPLIT_AT
    rows["p_spark"] = np.where(seen, 0.05 + 0.9 * rows["label"], 0.95 - 0.9 * rows["label"])
    overall = evaluate(rows["label"], rows["p_spark"])["roc_auc"]
    challenger = result(overall, rows=rows)
    info = champion(s3, settings, challenger)
    assert info["challenger_roc_auc"] == 0.0 and overall > info["roc_auc"] > 0.3
    promote, [reason] = decide(challenger, info, settings)
    assert not promote and reason.startswith("ROC AUC 0.0000 is worse than CURRENT v1's 0.") and "same 200 rows" in reason
    rows["p_spark"] = np.where(seen, 0.5, 0.05 + 0.9 * rows["label"])     # and the other way round
    better = result(evaluate(rows["label"], rows["p_spark"])["roc_auc"], rows=rows)
    assert decide(better, champion(s3, settings, better), settings) == (True, [])


def test_too_few_unseen_rows_leave_the_challenger_to_the_floor_and_parity(registry_with_current):
    s3, settings = registry_with_current
    challenger = result(0.70, rows=eval_rows(seen=300, unseen=40))
    info = champion(s3, settings, challenger)
    assert info["roc_auc"] is None and info["note"].startswith("not comparable: 40 of 340 evaluation rows")
    assert "floor and parity alone" in info["note"]
    assert decide(challenger, info, settings) == (True, [])
    assert decide(result(0.55, rows=challenger.eval_rows), info, settings)[0] is False      # the floor still holds


def test_the_training_summary_says_how_the_champion_did_or_why_it_was_not_compared():
    compared = {"version": "v1", "roc_auc": 0.91234, "rows": 340, "challenger_roc_auc": 0.9301}
    assert _champion_line(compared) == "champion v1: ROC AUC 0.9123 on the same 340 rows, where the new model has 0.9301"
    partly = compared | {"note": "200 of 340 evaluation rows are from sessions starting at or after ..."}
    assert _champion_line(partly) == (f"champion v1: ROC AUC 0.9123 on the same 340 rows, where the new model has "
                                      f"0.9301; {partly['note']}")
    skipped = {"version": "v1", "roc_auc": None, "rows": 40, "note": "not comparable: too few"}
    assert _champion_line(skipped) == "champion v1; not comparable: too few"


def test_publish_itself_refuses_a_model_whose_export_parity_failed(aws_settings):
    """publish() raises ParityError and writes nothing under models/<name>/; the same model with
    parity is published, so the parity guard alone kept it out."""
    from common import aws

    s3, settings = aws.client("s3"), TrainSettings(bucket=aws_settings.bucket, model_name="parity-test")
    failed = Parity(False, 2e-3, 200, 1e-5, stage="GBTClassificationModel(gbt)", worst=[])
    with pytest.raises(ParityError, match="export parity failed at stage GBTClassificationModel"):
        publish(s3, settings, complete(failed))
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix="models/parity-test/")["KeyCount"] == 0
    outcome = publish(s3, settings, complete(Parity(True, 0.0, 200, 1e-5)))
    assert s3.head_object(Bucket=settings.bucket, Key=f"models/parity-test/{outcome['version']}/model.onnx")


def test_a_table_model_never_becomes_current_of_the_scorers_model_name():
    table = result(0.95, feature_version="table-0123456789ab", features=[{"name": "PageValues", "type": "float"}])
    promote, [reason] = decide(table, None, TrainSettings())
    assert not promote and "'buy-propensity' is the name the scorers serve" in reason and "--model-name" in reason
    assert decide(table, None, TrainSettings(model_name="shoppers")) == (True, [])


def test_rollback_walks_back_through_the_moves_and_a_second_rollback_does_not_undo_the_first(aws_settings):
    from common import aws, registry

    s3 = aws.client("s3")
    bucket, name = aws_settings.bucket, "rollback-test"
    for version in ("A", "B", "C"):
        registry.set_current(s3, bucket, name, version, reason="train")
    registry.set_current(s3, bucket, name, "C", reason="promote")        # a no-op move
    assert registry.rollback(s3, bucket, name) == "B"
    assert registry.rollback(s3, bucket, name) == "A"
    assert registry.current_version(s3, bucket, name) == "A"
    with pytest.raises(LookupError, match="no earlier version"):
        registry.rollback(s3, bucket, name)


def test_rollback_skips_a_move_recorded_but_never_made(aws_settings):
    from common import aws, registry

    s3 = aws.client("s3")
    bucket, name = aws_settings.bucket, "crash-test"
    for version in ("A", "B"):
        registry.set_current(s3, bucket, name, version, reason="train")
    entries = registry.history(s3, bucket, name) + [{"version": "C", "previous": "B", "at": "", "reason": "train"}]
    s3.put_object(Bucket=bucket, Key=f"models/{name}/HISTORY",         # HISTORY written, then a crash
                  Body="".join(json.dumps(entry) + "\n" for entry in entries).encode())
    assert registry.rollback(s3, bucket, name) == "A"                 # not "B", where CURRENT already is


def test_two_runs_never_share_a_version_folder_or_move_current_past_each_other(aws_settings):
    from common import aws, registry

    s3 = aws.client("s3")
    bucket, name = aws_settings.bucket, "race-test"
    registry.publish(s3, bucket, name, "V1", {"model.onnx": b"first", "model.json": b"{}"})
    with pytest.raises(registry.Conflict):                              # the same second, a second run
        registry.publish(s3, bucket, name, "V1", {"model.onnx": b"second", "model.json": b"{}"})
    assert aws.get_object_bytes(s3, bucket, f"models/{name}/V1/model.onnx") == b"first"
    registry.set_current(s3, bucket, name, "A", reason="train", expected=None)
    registry.set_current(s3, bucket, name, "B", reason="train", expected="A")     # run 1, compared with A
    with pytest.raises(registry.Conflict, match="no longer A"):                   # run 2, also compared with A
        registry.set_current(s3, bucket, name, "C", reason="train", expected="A")
    assert registry.current_version(s3, bucket, name) == "B"
    assert [e["version"] for e in registry.history(s3, bucket, name)] == ["A", "B"]


@pytest.mark.parametrize("lost", ["CURRENT", "HISTORY", "V2/model.onnx"])
def test_a_registry_write_whose_answer_was_lost_and_retried_by_botocore_is_ours_not_a_conflict(aws_settings, lost):
    """The retry of a conditional write that went through failed its own condition: a Conflict while
    CURRENT had moved (the run then recorded its model as not promoted, and the scorers served it),
    or a version folder left with only model.onnx."""
    import os

    from botocore.config import Config

    from common import aws, registry
    from tests.faults import FaultProxy

    bucket, name = aws_settings.bucket, f"lost-{lost.replace('/', '-').replace('.', '-').lower()}"
    registry.set_current(aws.client("s3"), bucket, name, "V1", reason="train", expected=None)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        s3 = aws.session().client("s3", endpoint_url=proxy.endpoint,
                                  config=Config(read_timeout=1, retries={"max_attempts": 2, "mode": "standard"}))
        proxy.hang_next = (f"PUT /{bucket}/models/{name}/{lost}", "after")          # done, then never answered
        registry.publish(s3, bucket, name, "V2", {"model.onnx": b"onnx", "model.json": b"{}"})
        registry.set_current(s3, bucket, name, "V2", reason="train", expected="V1")
        assert proxy.hanging.is_set() and proxy.calls[f"PUT /{bucket}/models/{name}/{lost}"] == 2
        assert registry.current_version(s3, bucket, name) == "V2"
        assert [(e["version"], e["previous"]) for e in registry.history(s3, bucket, name)] == [
            ("V1", None), ("V2", "V1")]
        with pytest.raises(registry.Conflict):               # another writer's change is still a Conflict
            registry.publish(s3, bucket, name, "V2", {"model.onnx": b"other", "model.json": b"{}"})


def test_rollback_follows_the_chain_of_moves_past_a_move_that_lost_its_race(aws_settings):
    """A -> B was recorded but never made (CURRENT's write lost a race), then A -> C happened: the
    second rollback goes to X, where A came from, not "back" to A through the phantom move."""
    from common import aws, registry

    s3 = aws.client("s3")
    bucket, name = aws_settings.bucket, "phantom-test"
    for version in ("X", "A"):
        registry.set_current(s3, bucket, name, version, reason="train")
    entries = registry.history(s3, bucket, name) + [{"version": "B", "previous": "A", "at": "", "reason": "train"}]
    s3.put_object(Bucket=bucket, Key=f"models/{name}/HISTORY",
                  Body="".join(json.dumps(entry) + "\n" for entry in entries).encode())
    registry.set_current(s3, bucket, name, "C", reason="promote")
    assert registry.rollback(s3, bucket, name) == "A"
    assert registry.rollback(s3, bucket, name) == "X"
    assert registry.current_version(s3, bucket, name) == "X"


def test_a_move_that_lost_its_race_to_the_version_current_moved_to_is_never_rolled_back_to(aws_settings, monkeypatch):
    """A rollback C -> B and a promote of B at once: the promote recorded its line, then lost CURRENT.
    The ghost line names B too, so the walk by version took it for the move made and went to C."""
    from click.testing import CliRunner

    from batch import registry as registry_cli
    from common import aws, registry
    from tests.conftest import settings_env

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, "ghost-test"
    for version in ("A", "B", "C"):
        registry.set_current(s3, bucket, name, version, reason="train")
    read_by_the_promote = registry._current(s3, bucket, name)
    assert registry.rollback(s3, bucket, name) == "B"
    with monkeypatch.context() as patch:
        patch.setattr(registry, "_current", lambda *args: read_by_the_promote)
        with pytest.raises(registry.Conflict):
            registry.set_current(s3, bucket, name, "B", reason="promoted by hand")
    assert registry.current_version(s3, bucket, name) == "B"
    assert [(e["reason"], made) for e, made in registry.recorded_moves(s3, bucket, name)][-1] == ("promoted by hand", False)
    shown = CliRunner().invoke(registry_cli.cli, ["--name", name, "history"], env=settings_env(aws_settings))
    assert shown.output.splitlines()[-1].endswith("(promoted by hand)  [not made]"), shown.output
    assert shown.output.count("[not made]") == 1
    assert registry.rollback(s3, bucket, name) == "A"            # not C, the model just rolled back


def test_moves_made_before_a_move_by_code_from_before_ids_are_kept(aws_settings):
    """During an upgrade an older trainer moved CURRENT (a line without an id, CURRENT with a write id
    no line has): the newer moves before it showed as [not made], and rollback stopped short of them."""
    import uuid

    from common import aws, registry

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, "upgrade-test"
    for version in ("A", "B"):
        registry.set_current(s3, bucket, name, version, reason="train")
    key = f"models/{name}/HISTORY"
    old_line = json.dumps({"version": "C", "previous": "B", "at": "", "reason": "train"})     # as the old code wrote it
    s3.put_object(Bucket=bucket, Key=key, Body=aws.get_object_bytes(s3, bucket, key) + old_line.encode() + b"\n")
    s3.put_object(Bucket=bucket, Key=f"models/{name}/CURRENT", Body=b"C", Metadata={registry.WRITE_ID: uuid.uuid4().hex})
    registry.set_current(s3, bucket, name, "D", reason="train")
    assert [(e["version"], made) for e, made in registry.recorded_moves(s3, bucket, name)] == [
        ("A", True), ("B", True), ("C", True), ("D", True)]
    assert [registry.rollback(s3, bucket, name) for _ in range(3)] == ["C", "B", "A"]


def test_a_damaged_history_line_is_passed_over_and_kept(aws_settings, caplog):
    """A hand's edit left a broken line: history, rollback and training's move all stopped with a
    JSONDecodeError, in the incident a rollback is for."""
    from common import aws, registry

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, "damaged-test"
    for version in ("A", "B"):
        registry.set_current(s3, bucket, name, version, reason="train")
    key = f"models/{name}/HISTORY"
    lines = aws.get_object_bytes(s3, bucket, key).decode().splitlines()
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join([lines[0], '{"version": "X", "prev', lines[1]]).encode())
    registry.set_current(s3, bucket, name, "C", reason="train")          # appended to the text as it was
    assert [e["version"] for e in registry.history(s3, bucket, name)] == ["A", "B", "C"]
    assert "line 2 of HISTORY is not a move of CURRENT" in caplog.text
    assert registry.rollback(s3, bucket, name) == "B"
    assert '{"version": "X", "prev' in aws.get_object_bytes(s3, bucket, key).decode().splitlines()[1]


def test_a_bundle_changed_after_publishing_or_unscorable_is_never_made_current(aws_settings):
    """Nothing checked model.onnx against what was published: an overwritten one was served under
    the old version's name, and a rollback to a version whose model.onnx does not load said it
    worked while every scorer refused it."""
    from click.testing import CliRunner

    from batch import registry as registry_cli
    from common import aws, registry
    from tests.conftest import settings_env

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, registry.DEFAULT_MODEL
    for version in ("v1", "v2"):
        meta = model_meta(name, version, parity={"passed": True})
        meta["onnx"]["sha256"] = registry.onnx_digest(logistic_onnx())
        publish_bundle(s3, bucket, name, version, logistic_onnx(), meta)
    s3.put_object(Bucket=bucket, Key=f"models/{name}/v1/model.onnx", Body=logistic_onnx(bias=10.0))
    with pytest.raises(ValueError, match="model.onnx of version v1 is not the one published"):
        registry.load(s3, bucket, name, "v1")
    runner, env = CliRunner(), settings_env(aws_settings)
    refused = runner.invoke(registry_cli.cli, ["rollback", "--force"], env=env)
    assert refused.exit_code != 0 and "not the one published" in refused.output, refused.output
    publish_bundle(s3, bucket, name, "v3", logistic_onnx()[:200],             # no sha256: an older bundle
                   model_meta(name, "v3", parity={"passed": True}), current=False)
    refused = runner.invoke(registry_cli.cli, ["promote", "v3", "--force"], env=env)
    assert refused.exit_code != 0 and "model.onnx does not score a row" in refused.output, refused.output
    assert registry.current_version(s3, bucket, name) == "v2"
    assert runner.invoke(registry_cli.cli, ["promote", "v1"], env=env).exit_code != 0
    s3.put_object(Bucket=bucket, Key=f"models/{name}/v1/model.onnx", Body=logistic_onnx())      # put back
    assert runner.invoke(registry_cli.cli, ["rollback"], env=env).exit_code == 0
    assert registry.current_version(s3, bucket, name) == "v1"


def test_a_run_that_loses_the_race_for_current_rewrites_its_report_too(aws_settings, monkeypatch):
    from common import aws, registry

    s3, settings = aws.client("s3"), TrainSettings(bucket=aws_settings.bucket, model_name="lost-race", auc_floor=0.0)
    challenger = complete(Parity(True, 0.0, 200, 1e-5))
    challenger.meta["onnx"] = {"sha256": registry.onnx_digest(challenger.onnx_bytes)}
    moved = registry.set_current

    def another_run_moves_current_first(s3, bucket, name, version, reason, expected=""):
        moved(s3, bucket, name, "other", reason="train")
        moved(s3, bucket, name, version, reason, expected=expected)

    monkeypatch.setattr(registry, "set_current", another_run_moves_current_first)
    outcome = publish(s3, settings, challenger)
    assert not outcome["promoted"] and "another run moved it" in outcome["reasons"][0]
    bundle = registry.load(s3, settings.bucket, settings.model_name, outcome["version"])
    assert bundle.meta["promotion"]["promoted"] is False
    report = aws.get_object_bytes(s3, settings.bucket, f"models/lost-race/{outcome['version']}/report.html").decode()
    assert "another run moved it" in report and "CURRENT points to this version" not in report


def test_a_rollback_or_promote_the_scorers_could_not_serve_is_refused(aws_settings):
    """The registry CLI loads the target first: a deleted bundle, or one with other features under
    the scorers' model name, leaves CURRENT where it is (--force insists on the latter)."""
    from click.testing import CliRunner

    from batch import registry as registry_cli
    from common import aws, registry
    from tests.conftest import settings_env

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, registry.DEFAULT_MODEL
    for version, features in (("old", "0"), ("gone", FEATURE_VERSION), ("new", FEATURE_VERSION)):
        publish_bundle(s3, bucket, name, version, logistic_onnx(),
                       model_meta(name, version, feature_version=features, parity={"passed": True}))
    s3.delete_object(Bucket=bucket, Key=f"models/{name}/gone/model.onnx")
    runner, env = CliRunner(), settings_env(aws_settings)
    refused = runner.invoke(registry_cli.cli, ["rollback"], env=env)             # new -> gone: no bundle
    assert refused.exit_code != 0 and "no complete, readable version gone" in refused.output
    assert registry.current_version(s3, bucket, name) == "new"
    registry.set_current(s3, bucket, name, "old", reason="promote")              # gone was never served
    registry.set_current(s3, bucket, name, "new", reason="promote")
    refused = runner.invoke(registry_cli.cli, ["rollback"], env=env)             # new -> old: other features
    assert refused.exit_code != 0 and "feature_version '0'" in refused.output
    assert registry.current_version(s3, bucket, name) == "new"
    assert runner.invoke(registry_cli.cli, ["promote", "old"], env=env).exit_code != 0
    forced = runner.invoke(registry_cli.cli, ["rollback", "--force"], env=env)
    assert forced.exit_code == 0 and registry.current_version(s3, bucket, name) == "old"


def test_training_replaces_a_current_whose_bundle_is_gone(aws_settings):
    """CURRENT names a deleted version: nothing to compare, so a challenger that passes the gates
    becomes CURRENT (restarted scorers would otherwise have no model to serve)."""
    from common import aws, registry

    s3, settings = aws.client("s3"), TrainSettings(bucket=aws_settings.bucket, model_name="cure-test", auc_floor=0.0)
    registry.set_current(s3, settings.bucket, settings.model_name, "deleted", reason="train")
    outcome = publish(s3, settings, complete(Parity(True, 0.0, 200, 1e-5)))
    assert outcome["promoted"], outcome["reasons"]
    assert "cannot be loaded" in outcome["champion"]["note"]
    assert registry.current_version(s3, settings.bucket, settings.model_name) == outcome["version"]


def test_training_with_keep_versions_prunes_after_publishing_but_keeps_where_rollback_leads(aws_settings):
    from common import aws, registry

    s3 = aws.client("s3")
    settings = TrainSettings(bucket=aws_settings.bucket, model_name="keep-test", auc_floor=0.0, keep_versions=2)
    old = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z", "20260104T000000Z"]
    for version in old:
        registry.publish(s3, settings.bucket, settings.model_name, version, {"model.json": b"{}"})
    for version in old[:2]:
        registry.set_current(s3, settings.bucket, settings.model_name, version, reason="train")
    s3.delete_object(Bucket=settings.bucket, Key=f"models/keep-test/{old[1]}/model.json")    # CURRENT unreadable
    outcome = publish(s3, settings, complete(Parity(True, 0.0, 200, 1e-5)))
    assert outcome["promoted"] and outcome["pruned"] == 1
    # Kept: the newest two (day 4 and the new one, now CURRENT) and the last two moves' versions
    # (day 1 -> day 2 -> new); day 3 went.
    assert registry.versions(s3, settings.bucket, settings.model_name) == [old[0], old[3], outcome["version"]]
    again = publish(s3, settings, complete(Parity(True, 0.0, 200, 1e-5)))
    assert again["promoted"] and again["pruned"] == 2                  # day 1 left the last two moves
    assert registry.versions(s3, settings.bucket, settings.model_name) == [outcome["version"], again["version"]]


def test_the_registry_cli_says_what_it_did_not_find_and_does_not_record_a_move_to_where_current_is(aws_settings):
    from click.testing import CliRunner

    from batch import registry as registry_cli
    from common import aws, registry
    from tests.conftest import settings_env

    s3 = aws.client("s3")
    bucket, name = aws_settings.bucket, "cli-test"
    meta = {"parity": {"passed": True}, "promotion": {"promoted": True, "reasons": []}, "metrics": {"roc_auc": 0.8},
            "features": [{"name": name, "type": "float"} for name in FEATURE_NAMES]}
    for version in ("20261201T000000Z", "20261202T000000Z"):
        registry.publish(s3, bucket, name, version, {"model.onnx": logistic_onnx(), "model.json": json.dumps(meta).encode()})
    registry.set_current(s3, bucket, name, "20261202T000000Z", reason="train")
    env, run = settings_env(aws_settings), CliRunner().invoke

    typo = run(registry_cli.cli, ["--name", "cli-tset", "ls"], env=env)
    assert typo.exit_code == 0 and "no version of model 'cli-tset'" in typo.output and "cli-test" in typo.output
    unknown = run(registry_cli.cli, ["--name", name, "promote", "latest"], env=env)
    assert unknown.exit_code == 1 and "has no version 'latest'" in unknown.output
    assert "20261201T000000Z, 20261202T000000Z" in unknown.output and "incomplete" not in unknown.output
    again = run(registry_cli.cli, ["--name", name, "promote", "20261202T000000Z"], env=env)
    assert again.exit_code == 0 and "already CURRENT" in again.output
    assert len(registry.history(s3, bucket, name)) == 1                  # no "X -> X" entry
    shown = run(registry_cli.cli, ["--name", name, "current"], env=env)
    assert shown.exit_code == 0 and '"promoted": true' in shown.output                            # the gates' reasons, as operations.md says


def test_prune_keeps_where_keep_rollbacks_in_a_row_lead_after_earlier_rollbacks():
    """After a rollback and a move back, the second of two rollbacks reached a version older than
    the last two moves, and prune --keep 2 had deleted it."""
    from common.registry import ROLLBACK_REASON, previous_version, prunable

    moves = [{"version": "v4", "previous": None, "reason": "train"},
             {"version": "v6", "previous": "v4", "reason": "promote"},
             {"version": "v5", "previous": "v6", "reason": "train"},
             {"version": "v6", "previous": "v5", "reason": ROLLBACK_REASON + "v5"},
             {"version": "v5", "previous": "v6", "reason": "promote"}]
    versions = [f"v{n}" for n in range(1, 7)]
    assert prunable(versions, "v5", moves, keep=2) == ["v1", "v2", "v3"]
    # A version named by a publisher's slow clock sorts among the oldest: its own prune kept none of it.
    assert prunable(versions, "v5", moves, keep=2, published="v2") == ["v1", "v3"]
    first = previous_version(moves, "v5")
    second = previous_version(moves + [{"version": first, "previous": "v5", "reason": ROLLBACK_REASON + "v5"}], first)
    assert (first, second) == ("v6", "v4")


def test_prune_deletes_old_bundles_but_keeps_the_newest_current_and_where_rollback_leads(aws_settings):
    from click.testing import CliRunner

    from batch import registry as registry_cli
    from common import aws, registry
    from tests.conftest import settings_env

    s3, bucket, name = aws.client("s3"), aws_settings.bucket, "prune-test"
    versions = [f"2026110{day}T000000Z" for day in range(1, 8)]
    for version in versions:
        registry.publish(s3, bucket, name, version, {"model.onnx": b"onnx", "model.json": b"{}", "report.html": b"<p>"})
    for version in (versions[0], versions[2], versions[1]):        # CURRENT: day 1, then 3, then 2 (a rollback)
        registry.set_current(s3, bucket, name, version, reason="promote")
    env, run = settings_env(aws_settings), CliRunner().invoke

    dry = run(registry_cli.cli, ["--name", name, "prune", "--keep", "1", "--dry-run"], env=env)
    assert dry.exit_code == 0 and "4 of 7 versions" in dry.output
    refused = run(registry_cli.cli, ["--name", name, "prune", "--keep", "1"], env=env, input="n\n")
    assert refused.exit_code == 1 and registry.versions(s3, bucket, name) == versions

    done = run(registry_cli.cli, ["--name", name, "prune", "--keep", "1", "--yes"], env=env)
    assert done.exit_code == 0 and "deleted 4 versions of 'prune-test' (12 files)" in done.output
    # The newest, CURRENT (day 2) and where its last move came from (day 3) stay, with all their files.
    assert registry.versions(s3, bucket, name) == [versions[1], versions[2], versions[6]]
    assert not s3.list_objects_v2(Bucket=bucket, Prefix=f"models/{name}/{versions[0]}/").get("Contents")
    assert len(registry.history(s3, bucket, name)) == 3
    assert registry.rollback(s3, bucket, name) == versions[2]
    assert registry.load(s3, bucket, name, versions[2]).onnx == b"onnx"
    again = run(registry_cli.cli, ["--name", name, "prune", "--keep", "1", "--yes"], env=env)
    assert again.exit_code == 0 and "nothing to prune" in again.output
