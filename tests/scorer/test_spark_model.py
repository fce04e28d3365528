"""A model trained by `make train`'s code (Spark GBT, onnxmltools export, parity gate) and
published by it is served by the scorer with Spark's own probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from batch.train import publish as train_publish
from batch.train_config import TrainSettings
from common.features import FEATURE_NAMES
from scorer.model import Models
from tests.scorer.test_worker_memory import Rig


@pytest.mark.spark
def test_a_make_train_model_scores_like_spark_in_the_worker(trained, published, s3):
    result, events = trained
    settings = TrainSettings(bucket=published.bucket, model_name="buy-trained", auc_floor=0.0)
    outcome = train_publish(s3, settings, result)
    assert outcome["promoted"], outcome
    models = Models(s3, published.bucket, "buy-trained")
    models.refresh()
    assert models.champion.version == outcome["version"]
    assert models.champion.fused_trees == 8          # the GBT's per-tree nodes fused at load (optimize.py)
    rows = result.eval_rows
    direct = models.champion.predict(rows[list(FEATURE_NAMES)].to_numpy(dtype=np.float32))
    assert direct == pytest.approx(rows["p_spark"].to_numpy(), abs=1e-5)
    assert rows["p_spark"].round(3).nunique() > 3            # not a constant model
    # The evaluation sessions through the streaming worker: same probabilities, event by event.
    evaluated = set(rows["session_id"])
    rig = Rig(models=models)
    rig.put([e for e in events if e["domain_sessionid"] in evaluated])
    rig.drain()
    got = {p["event_id"]: p for p in rig.predictions()}
    expected = dict(zip(rows["event_id"], rows["p_spark"]))
    assert set(expected) <= set(got)
    assert [got[eid]["p_buy"] for eid in expected] == pytest.approx(list(expected.values()), abs=1e-5)
    assert {got[eid]["model_version"] for eid in expected} == {outcome["version"]}
