"""The ONNX export scores like Spark: GBT, RF and LR, numeric and one-hot categorical inputs."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from batch import export, train_model
from batch.train import main as train_main
from batch.train_model import Steps, fit_and_export, score_with_spark
from batch.train_table import ID_COLUMNS, prepare, train_from_table
from common.features import FEATURE_NAMES
from scorer.drift import feature_reference_of, reference_of
from tests.train.conftest import fast_settings

pytestmark = pytest.mark.spark
NODE_SCORER = Path(__file__).with_name("score_onnx.mjs")


def node_p_buy(onnx_bytes: bytes, meta: dict, matrix: np.ndarray, folder: Path) -> np.ndarray:
    """P(buy) of each row as onnxruntime for Node gives it, from the bundle's files alone."""
    (folder / "model.onnx").write_bytes(onnx_bytes)
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "rows.json").write_text(json.dumps({"rows": matrix.astype(np.float32).tolist()}))
    done = subprocess.run(["node", NODE_SCORER, *(folder / name for name in ("model.onnx", "model.json", "rows.json"))],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return np.asarray(json.loads(done.stdout)["p_buy"])


def shoppers_like(rows: int = 800, seed: int = 1) -> pd.DataFrame:
    """A small table shaped like the UCI shoppers data: counts, durations, categories, a bool."""
    rng = np.random.default_rng(seed)
    month = rng.choice(["Feb", "Mar", "May", "Nov", "Dec"], rows)
    visitor = rng.choice(["Returning_Visitor", "New_Visitor", "Other"], rows, p=[.8, .15, .05])
    weekend = rng.random(rows) < 0.25
    pages = rng.poisson(12, rows)
    duration = rng.gamma(2, 300, rows) * (pages + 1) / 12
    value = np.where(rng.random(rows) < 0.3, rng.gamma(2, 15, rows), 0.0)
    score = 0.08 * value + 0.03 * pages + 0.8 * (month == "Nov") + 0.5 * (visitor == "New_Visitor") - 2.5
    revenue = rng.random(rows) < 1 / (1 + np.exp(-score))
    frame = pd.DataFrame({"ProductRelated": pages, "ProductRelated_Duration": duration, "PageValues": value,
                          "Month": month, "VisitorType": visitor, "Weekend": weekend, "Browser": rng.integers(1, 5, rows),
                          "Revenue": revenue})
    frame.loc[rng.choice(rows, 5, replace=False), "ProductRelated"] = np.nan
    return frame


@pytest.fixture(scope="module")
def table():
    return prepare(shoppers_like(), "Revenue", categorical=["Browser"])


@pytest.mark.parametrize("algorithm", ["gbt", "rf", "lr"])
def test_export_matches_spark_on_categorical_table_and_scores_alike_in_node(spark, table, algorithm, tmp_path):
    assert {"Month_Nov", "VisitorType_New_Visitor", "Weekend_True", "Browser_2"} <= set(table.feature_names)
    result = train_from_table(spark, table, fast_settings(algorithm=algorithm, max_depth=4, max_iter=6))
    rows = result.eval_rows
    assert result.parity.passed, result.parity.message()
    assert result.parity.rows == len(rows) == result.meta["rows"]["eval"]
    assert abs(len(rows) - 0.25 * len(table.frame)) <= 2 and result.meta["rows"]["train"] + len(rows) == len(table.frame)
    assert np.abs(rows["p_onnx"] - rows["p_spark"]).max() <= 1e-5
    # The threshold's reported precision is what serving (p_onnx >= threshold) gets on these rows.
    chosen = result.meta["threshold_selection"]
    served = rows["p_onnx"] >= result.meta["threshold"]
    assert rows["label"][served].mean() == pytest.approx(chosen["precision"])
    # What the scorer sets its live scores against (scorer_score_psi): the served scores of these rows.
    reference = result.meta["score_reference"]
    assert reference["buy_rate"] == served.mean() and reference["rows"] == len(rows)
    assert reference_of(result.meta) is not None
    # and the inputs, which tell which one moved when the scores drift (scorer_feature_psi)
    assert feature_reference_of(result.meta).names == table.feature_names
    assert result.meta["feature_reference"]["rows"] == len(rows)
    assert result.meta["metrics"]["roc_auc"] > 0.7
    assert result.meta["onnx"] == {"input": "features", "probability_output": "probability", "positive_index": 1,
                                   "opset": 15, "sha256": hashlib.sha256(result.onnx_bytes).hexdigest()}
    assert [f["name"] for f in result.meta["features"]] == table.feature_names
    # The bundle is portable: onnxruntime for Node, given model.onnx and model.json alone, scores as we do.
    matrix = rows[table.feature_names].to_numpy()
    assert np.abs(node_p_buy(result.onnx_bytes, result.meta, matrix, tmp_path) - rows["p_onnx"]).max() <= 1e-6


@pytest.mark.parametrize("algorithm", ["gbt", "rf", "lr"])
def test_balanced_class_weight_trains_on_weighted_rows_and_exports_like_spark(spark, table, algorithm):
    settings = fast_settings(algorithm=algorithm, max_depth=4, max_iter=6)
    plain = train_from_table(spark, table, settings)
    weighted = train_from_table(spark, table, dataclasses.replace(settings, class_weight="balanced"))
    assert weighted.parity.passed, weighted.parity.message()
    eval_ids = set(weighted.eval_rows["row_id"])
    train_labels = table.frame.loc[~table.frame["row_id"].isin(eval_ids), "label"]
    expected = (train_labels == 0).sum() / (train_labels == 1).sum()
    assert weighted.meta["hyper_parameters"]["class_weight"] == "balanced"
    assert weighted.meta["hyper_parameters"]["buyer_weight"] == pytest.approx(expected, rel=1e-6)
    assert plain.meta["hyper_parameters"]["buyer_weight"] == 1.0
    # Weighting buyers up moves every model's probabilities towards them: what the weights are for.
    assert weighted.eval_rows["p_spark"].mean() > plain.eval_rows["p_spark"].mean() + 0.1
    assert weighted.meta["threshold"] > plain.meta["threshold"]


def test_table_cli_cross_validates_with_parity_and_writes_the_bundle(spark, tmp_path):
    csv = tmp_path / "shoppers.csv"
    shoppers_like(600, seed=3).to_csv(csv, index=False)
    env = {"CLICKSTREAM_MAX_ITER": "3", "CLICKSTREAM_MAX_DEPTH": "3", "CLICKSTREAM_PROGRESS": "false"}
    out = CliRunner().invoke(train_main, ["--table", str(csv), "--label", "Revenue", "--categorical", "Browser",
                                          "--cv", "2", "--out", str(tmp_path / "bundle")], env=env)
    assert out.exit_code == 0, out.output
    assert "dropped 5 rows with missing numeric values" in out.output
    assert "one-hot encoded ['Month', 'VisitorType', 'Weekend', 'Browser']" in out.output
    assert out.output.count("parity ok") == 2 and "2-fold ROC AUC" in out.output
    assert f" for evaluation from {csv}" in out.output
    assert "onnxmltools" not in out.output      # the converter's per-tree chatter drowns the summary
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text(encoding="utf-8"))
    assert meta["parity"]["passed"] and meta["feature_version"].startswith("table-")
    assert "Month_Nov" in [f["name"] for f in meta["features"]]
    assert set(meta["importance_by_column"]) == {"ProductRelated", "ProductRelated_Duration", "PageValues", "Month",
                                                 "VisitorType", "Weekend", "Browser"}
    assert sum(meta["importance_by_column"].values()) == pytest.approx(1.0)
    onnx_bytes = (tmp_path / "bundle" / "model.onnx").read_bytes()
    assert export.session(onnx_bytes).get_inputs()[0].shape[1] == len(meta["features"])
    assert b"data:image/png" in (tmp_path / "bundle" / "report.html").read_bytes()


def test_imputed_table_fills_from_training_rows_and_records_the_medians(spark):
    table = prepare(shoppers_like(300, seed=5), "Revenue", missing="impute")
    assert table.frame["ProductRelated"].isna().sum() == 5          # still missing: each fit fills them
    result = train_from_table(spark, table, fast_settings(algorithm="gbt", max_iter=3, max_depth=3))
    assert result.parity.passed, result.parity.message()
    train = table.frame[~table.frame["row_id"].isin(set(result.eval_rows["row_id"]))]
    expected = float(np.float32(train["ProductRelated"].median()))
    assert result.meta["imputed_medians"] == {"ProductRelated": expected}
    assert not result.eval_rows["ProductRelated"].isna().any()


def test_thresholds_between_float32_neighbours_route_like_spark(spark, tmp_path, monkeypatch):
    """Two adjacent float32 values: Spark splits at their float64 midpoint, which rounds (to even)
    onto the upper value in float32. Unfixed, that value goes the wrong way in ONNX."""
    low = np.nextafter(np.float32(1.0), np.float32(2.0))          # odd mantissa: the tie rounds up
    high = np.nextafter(low, np.float32(2.0))
    rng = np.random.default_rng(0)
    x = np.where(rng.random(400) < 0.5, low, high).astype(np.float64)
    frame = pd.DataFrame({"x": x, "noise": rng.random(400).astype(np.float32), "label": x == float(high)})
    table = prepare(frame, "label")
    settings = fast_settings(algorithm="gbt", max_iter=3, max_depth=2)
    result = train_from_table(spark, table, settings)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-5
    # The same model through the unpatched converter disagrees with Spark on the upper value.
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where it saves every tree, and leaves them
    with contextlib.redirect_stdout(io.StringIO()):
        raw = onnxmltools.convert_sparkml(result.pipeline_model.stages[-1], "raw",
                                          [("features", FloatTensorType([None, 2]))], target_opset=15,
                                          spark_session=spark).SerializeToString()
    matrix = result.eval_rows[table.feature_names].to_numpy()
    unpatched = export.onnx_probabilities(raw, matrix)
    assert np.abs(unpatched - result.eval_rows["p_spark"].to_numpy()).max() > 1e-3


@pytest.mark.parametrize("rows_per_partition", [train_model.ROWS_PER_PARTITION, 1000])
def test_the_model_does_not_depend_on_how_its_rows_are_partitioned(spark, monkeypatch, rows_per_partition):
    # createDataFrame slices a table by the cores and a fit sums per partition: local[1] and local[*] gave
    # other models (and cross-validation AUCs) from the same table and seed. 1000 rows per partition lays
    # these 2400 out in 3, as a large table is.
    monkeypatch.setattr(train_model, "ROWS_PER_PARTITION", rows_per_partition)
    table = prepare(shoppers_like(3000, seed=5), "Revenue", categorical=["Browser"])
    train, evaluation = table.frame.iloc[:2400], table.frame.iloc[2400:]
    settings = fast_settings(max_depth=5, max_iter=20)
    results = [fit_and_export(spark, layout(spark.createDataFrame(train)), spark.createDataFrame(evaluation),
                              table.feature_names, settings, Steps([], enabled=False), id_columns=ID_COLUMNS,
                              row_id="row_id") for layout in (lambda df: df.coalesce(1), lambda df: df.repartition(3))]
    assert results[0].onnx_bytes == results[1].onnx_bytes
    assert results[0].meta["metrics"] == results[1].meta["metrics"]


def test_a_partition_per_rows_per_partition_rows_up_to_the_setting(spark, monkeypatch):
    # A small table's fit is mostly per-task overhead: 10k rows took 72 s in 4 partitions, 50 s in 1.
    monkeypatch.setattr(train_model, "ROWS_PER_PARTITION", 1000)
    rows = spark.range(2500).withColumnRenamed("id", "row_id")
    assert train_model.laid_out(rows, 8, ["row_id"]).rdd.getNumPartitions() == 3
    assert train_model.laid_out(rows, 2, ["row_id"]).rdd.getNumPartitions() == 2
    assert train_model.laid_out(rows.limit(10), 8, ["row_id"]).rdd.getNumPartitions() == 1


def test_the_parity_rows_are_scored_in_batches_of_two_or_more_as_the_scorer_scores():
    # A last batch of one row went down onnxruntime's single-row path, which rounds a logistic regression
    # otherwise: that row's p_onnx, which the threshold is chosen on, was not the scorer's.
    from tests.scorer.helpers import linear_classifier_onnx

    onnx_bytes = linear_classifier_onnx()
    rows = np.random.default_rng(4).uniform(0, 50, size=(41, len(FEATURE_NAMES))).astype(np.float32)
    whole = export.onnx_probabilities(onnx_bytes, rows)
    for batch in range(2, 40):          # each leaves one row for its last batch
        assert list(export.onnx_probabilities(onnx_bytes, rows[:batch + 1], batch=batch)) == list(whole[:batch + 1])


def test_parity_check_names_rows_and_stage():
    p_spark = np.array([0.1, 0.5, 0.9])
    stages = ["VectorAssembler(va)", "GBTClassificationModel(gbt)"]
    failed = export.check(np.zeros(3), p_spark, p_spark + [0, 0.2, 1e-7], ["a", "b", "c"], stages)
    assert not failed.passed and failed.stage == "GBTClassificationModel(gbt)"
    assert failed.worst[0]["row"] == "b" and "worst rows: b" in failed.message()
    drift = export.check(np.array([0, 0.5, 0]), p_spark, p_spark, ["a", "b", "c"], stages)
    assert not drift.passed and drift.stage == "VectorAssembler(va)" and drift.worst[0]["row"] == "b"
    assert export.check(np.zeros(3), p_spark, p_spark + 1e-7, ["a", "b", "c"], stages).passed


def test_spark_measures_how_far_the_assembled_vector_is_from_float32(spark, table):
    """The evaluation rows reach the driver as float32 features, Spark's probability and the input gap
    (worked out in Spark, not by collecting the vectors): a value float32 cannot hold shows there."""
    result = train_from_table(spark, table, fast_settings(algorithm="lr", max_iter=5))
    rows = table.frame.head(3).fillna(0.0).copy()
    first = table.feature_names[0]
    rows[first] = rows[first].astype(np.float64)
    rows.loc[rows.index[1], first] = 2.0 + 1e-9                # not a float32 value
    scored = score_with_spark(result.pipeline_model, spark.createDataFrame(rows), table.feature_names,
                              ["row_id", "label"])
    assert scored[first].dtype == np.float32 and "_assembled" not in scored.columns
    assert scored["_input_diff"].tolist() == pytest.approx([0.0, 1e-9, 0.0], abs=1e-12)
    assert scored["_input_diff"].iloc[1] > 0
    parity = export.check(scored["_input_diff"].to_numpy(), scored["p_spark"].to_numpy(),
                          scored["p_spark"].to_numpy(), scored["row_id"].astype(str).tolist(),
                          ["VectorAssembler(va)", "LogisticRegressionModel(lr)"])
    assert not parity.passed and parity.stage == "VectorAssembler(va)"
    assert parity.worst[0]["row"] == str(rows["row_id"].iloc[1])
