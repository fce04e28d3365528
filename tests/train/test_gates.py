"""The promotion gates on their own (no Spark): which published versions may move CURRENT."""
from __future__ import annotations

import pandas as pd
import pytest

from batch.export import Parity
from batch.train_config import TrainSettings
from batch.train_model import TrainResult
from batch.train_publish import decide


def result(auc: float, parity: bool = True) -> TrainResult:
    return TrainResult(None, b"", {"metrics": {"roc_auc": auc}}, pd.DataFrame(), Parity(parity, 0.0, 100, 1e-5))


def test_a_better_model_with_the_same_features_moves_current():
    assert decide(result(0.80), {"version": "v1", "roc_auc": 0.78}, TrainSettings()) == (True, [])
    assert decide(result(0.80), None, TrainSettings()) == (True, [])


def test_floor_margin_and_parity_each_keep_current():
    settings = TrainSettings(auc_floor=0.7, champion_margin=0.01)
    promote, reasons = decide(result(0.65, parity=False), {"version": "v1", "roc_auc": 0.80}, settings)
    assert not promote and len(reasons) == 3
    assert "below the floor 0.7" in reasons[1] and "worse than CURRENT v1" in reasons[2]


def test_a_model_with_other_features_than_current_is_not_promoted():
    current = {"version": "v1", "roc_auc": None, "note": "not comparable: feature version '1' vs 'table-abc'"}
    promote, [reason] = decide(result(0.99), current, TrainSettings())
    assert not promote and "CURRENT v1" in reason and "table-abc" in reason and "batch.registry promote" in reason


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
