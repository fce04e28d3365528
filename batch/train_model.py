"""The learning half shared by both modes: fit a Spark pipeline, score the evaluation rows with Spark
and with the ONNX export, check parity, compute metrics and the threshold, and describe the model."""
from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression, RandomForestClassifier
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from tqdm import tqdm

from batch import export
from batch.train_config import TrainSettings
from batch.train_lake import TrainError
from batch.train_metrics import choose_threshold, evaluate, feature_reference, score_reference
from batch.train_treated import HOLDOUT_WEIGHT
from common.registry import onnx_digest

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
WEIGHT = "class_weight"
# Columns the pipeline adds next to the features: a feature of the same name would be overwritten
# (the weight, which encodes the label) or stop Spark ("column already exists").
PIPELINE_COLUMNS = (WEIGHT, "features", "rawPrediction", "probability", "prediction", "p_spark", "p_onnx",
                    "_assembled", "_input_diff")


@dataclass
class TrainResult:
    pipeline_model: PipelineModel
    onnx_bytes: bytes
    meta: dict                      # model.json, without "version" until published
    eval_rows: pd.DataFrame         # ids, label, features (float32), p_spark, p_onnx
    parity: export.Parity
    timings: dict = field(default_factory=dict)


class Steps:
    """One progress bar over the named steps of a run, so no long step is silent; records timings."""

    def __init__(self, names: list[str], enabled: bool = True):
        self.bar = tqdm(total=len(names), desc="train", unit="step", disable=not enabled)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.bar.set_description(f"train: {name}")
        started = time.perf_counter()
        with self._spark_tasks():
            yield
        self.timings[name] = round(time.perf_counter() - started, 3)
        log.info("step %s done in %.1fs", name, self.timings[name])
        self.bar.update(1)

    @contextlib.contextmanager
    def _spark_tasks(self, every_s: float = 1.0):
        """Beside the step, the running Spark stages' finished and total tasks, so a step of minutes
        (the features of a month of events) shows it is moving."""
        spark = SparkSession.getActiveSession() if not self.bar.disable else None
        if spark is None:
            yield
            return
        tracker, stop = spark.sparkContext.statusTracker(), threading.Event()

        def show():
            while not stop.wait(every_s):
                try:
                    stages = [tracker.getStageInfo(stage) for stage in tracker.getActiveStageIds()]
                except Exception:  # noqa: BLE001 - a JVM going down mid-step: the step itself reports it
                    return
                stages = [stage for stage in stages if stage is not None]
                if stages:
                    done, total = sum(s.numCompletedTasks for s in stages), sum(s.numTasks for s in stages)
                    self.bar.set_postfix_str(f"Spark tasks {done}/{total}")

        thread = threading.Thread(target=show, name="spark-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.bar.set_postfix_str("")

    def close(self) -> None:
        self.bar.close()


def estimator(settings: TrainSettings, label: str = "label", weighted: bool = False):
    common = {"featuresCol": "features", "labelCol": label}
    if weighted:
        common["weightCol"] = WEIGHT
    if settings.algorithm == "gbt":
        return GBTClassifier(**common, maxIter=settings.max_iter, maxDepth=settings.max_depth,
                             stepSize=settings.step_size, subsamplingRate=settings.subsampling_rate,
                             minInstancesPerNode=settings.min_instances_per_node, maxBins=settings.max_bins,
                             seed=settings.seed)
    if settings.algorithm == "rf":
        return RandomForestClassifier(**common, numTrees=settings.num_trees, maxDepth=settings.max_depth,
                                      subsamplingRate=settings.subsampling_rate, maxBins=settings.max_bins,
                                      minInstancesPerNode=settings.min_instances_per_node, seed=settings.seed)
    return LogisticRegression(**common, maxIter=lr_iterations(settings), regParam=settings.reg_param,
                              elasticNetParam=settings.elastic_net)


def lr_iterations(settings: TrainSettings) -> int:
    """LR's iterations: max_iter, at least 100 (GBT's default of 60 trees stops LBFGS short)."""
    return max(settings.max_iter, 100)


def hyper_parameters(settings: TrainSettings) -> dict:
    names = {"gbt": ("max_iter", "max_depth", "step_size", "subsampling_rate", "min_instances_per_node", "max_bins"),
             "rf": ("num_trees", "max_depth", "subsampling_rate", "min_instances_per_node", "max_bins"),
             "lr": ("max_iter", "reg_param", "elastic_net")}[settings.algorithm]
    used = {name: getattr(settings, name) for name in names}
    if settings.algorithm == "lr":
        used["max_iter"] = lr_iterations(settings)      # what the model was fitted with, not what was asked
    return used | {"class_weight": settings.class_weight, "seed": settings.seed}


def weigh(train: DataFrame, label: str, class_weight: str) -> tuple[DataFrame, float]:
    """The training rows with the weight column (WEIGHT) when rows weigh differently, and the weight
    ``balanced`` gives a buying row. A held-out session's rows (HOLDOUT_WEIGHT, batch.train_treated)
    weigh that much more, in the class totals too."""
    held_out = F.col(HOLDOUT_WEIGHT) if HOLDOUT_WEIGHT in train.columns else None
    if class_weight == "none":
        return (train, 1.0) if held_out is None else (train.withColumn(WEIGHT, held_out), 1.0)
    rows = held_out if held_out is not None else F.lit(1.0)
    totals = {row[label]: row["total"] for row in train.groupBy(label).agg(F.sum(rows).alias("total")).collect()}
    buyers, others = totals.get(1, 0), totals.get(0, 0)
    if not buyers or not others:
        raise TrainError(f"class_weight=balanced needs buyers and non-buyers in the training rows; "
                         f"found {buyers:g} and {others:g}")
    weight = others / buyers
    return train.withColumn(WEIGHT, rows * F.when(F.col(label) == 1, F.lit(weight)).otherwise(F.lit(1.0))), weight


def pipeline(settings: TrainSettings, feature_names: list[str], label: str = "label", weighted: bool = False) -> Pipeline:
    """The assembler and the estimator; ``weighted`` when the rows carry WEIGHT (``weigh``)."""
    # handleInvalid="error": a NaN reaching the assembler is a bug upstream, not something to skip.
    assembler = VectorAssembler(inputCols=list(feature_names), outputCol="features", handleInvalid="error")
    return Pipeline(stages=[assembler, estimator(settings, label, weighted)])


def importances(model: PipelineModel, feature_names: list[str]) -> dict[str, float]:
    stage = model.stages[-1]
    if hasattr(stage, "featureImportances"):
        values = stage.featureImportances.toArray()
    else:       # logistic regression: |coefficient|, normalised, as a rough importance
        values = np.abs(stage.coefficients.toArray())
        values = values / values.sum() if values.sum() > 0 else values
    return {name: float(v) for name, v in sorted(zip(feature_names, values), key=lambda item: -item[1])}


def importance_by_column(importances: dict[str, float], one_hot: dict[str, Sequence[str]]) -> dict[str, float]:
    """``importances`` with the values of each one-hot encoded column summed under its name, ranked:
    a column of 20 values otherwise looks 20 times less important than it is."""
    column_of = {name: column for column, names in one_hot.items() for name in names}
    totals: dict[str, float] = {}
    for name, value in importances.items():
        column = column_of.get(name, name)
        totals[column] = totals.get(column, 0.0) + value
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def score_with_spark(model: PipelineModel, rows: DataFrame, feature_names: list[str], id_columns: list[str]) -> pd.DataFrame:
    """The evaluation rows on the driver: ids, the features as float32 (what ONNX scores), Spark's
    probability of class 1, and ``_input_diff``, how far the vector Spark scored is from those float32
    features (0 unless the assembler stage is at fault). The difference is worked out in Spark:
    collecting the assembled vectors too made the driver hold every row twice, in float64."""
    scored = model.transform(rows).withColumn("_assembled", vector_to_array("features"))
    gaps = [F.abs(F.col("_assembled")[i] - F.col(name).cast("float").cast("double"))
            for i, name in enumerate(feature_names)]
    input_diff = F.greatest(*gaps) if len(gaps) > 1 else gaps[0]
    return scored.select(*id_columns, *(F.col(name).cast("float").alias(name) for name in feature_names),
                         vector_to_array("probability")[1].alias("p_spark"), input_diff.alias("_input_diff")).toPandas()


def code_version() -> str:
    """The commit of the training code, ``<commit>-dirty`` when tracked files differ from it (as ``git
    describe --dirty`` says) or git cannot tell: a model trained on uncommitted changes cannot be
    rebuilt from the commit alone."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return head if changes == "" else f"{head}-dirty"


def _git(*args: str) -> str | None:
    """The output of a git command in this checkout, stripped; None when it fails (no git, no checkout)."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


ROWS_PER_PARTITION = 50_000      # measured on 2 cores: 10k UCI rows fit in 50 s in 1 partition, 55 s in 2, 72 s in 4


def laid_out(rows: DataFrame, most_partitions: int, order: list[str]) -> DataFrame:
    """The rows hash-partitioned by ``order`` and sorted by it in each partition, a partition per
    ROWS_PER_PARTITION rows up to ``most_partitions``. A fit sums per partition: rows laid out by the
    machine (createDataFrame slices a table by the cores) gave another model under local[1] than under
    local[2], from the same rows and seed; so the count comes from the rows, never the cores. Each
    partition is a task in every pass of the fit, and a small table's passes are mostly task overhead."""
    partitions = min(most_partitions, max(1, math.ceil(rows.count() / ROWS_PER_PARTITION)))
    return rows.repartition(partitions, *order).sortWithinPartitions(*order)


def fit_and_export(spark, train: DataFrame, evaluation: DataFrame, feature_names: list[str],
                   settings: TrainSettings, steps: Steps, *, id_columns: list[str], row_id: str,
                   label: str = "label") -> TrainResult:
    """Fit on ``train``, score ``evaluation`` with Spark and ONNX, gate on parity, build the meta."""
    order = [column for column in id_columns if column != label]
    with steps("fit"):
        # Cached while fitted: the fit reads its rows many times, and each read shuffled and sorted them again.
        laid = laid_out(train, settings.spark_shuffle_partitions, order).cache()
        try:
            train, buyer_weight = weigh(laid, label, settings.class_weight)
            model = pipeline(settings, feature_names, label, weighted=WEIGHT in train.columns).fit(train)
            train_rows = int(laid.count())
        finally:
            laid.unpersist()
    with steps("evaluate"):
        # Sorted: the metrics' float sums then add the rows in one order, whatever their partitions.
        # A held-out session's rows stand for the offered ones left out (batch.train_treated): so they do
        # in the references the scorer measures its drift against, which are of all its traffic.
        weighed = [HOLDOUT_WEIGHT] if HOLDOUT_WEIGHT in evaluation.columns else []
        scored = score_with_spark(model, evaluation, feature_names, [*id_columns, *weighed]).sort_values(
            order, ignore_index=True)
        if scored[label].nunique() < 2:
            raise TrainError(f"the evaluation set ({len(scored)} rows) has only label {scored[label].iloc[0]!r}: "
                             "AUC is undefined; use a longer window or a larger eval_fraction")
        metrics = evaluate(scored[label], scored["p_spark"])
    with steps("export"):
        onnx_bytes = export.to_onnx(spark, model.stages[-1], len(feature_names), name=settings.model_name)
    with steps("parity"):
        scored["p_onnx"] = export.onnx_probabilities(onnx_bytes, scored[list(feature_names)].to_numpy())
        stages = [f"{type(stage).__name__}({stage.uid})" for stage in model.stages]
        parity = export.check(scored["_input_diff"].to_numpy(), scored["p_spark"].to_numpy(),
                              scored["p_onnx"].to_numpy(), scored[row_id].astype(str).tolist(), stages,
                              settings.parity_tolerance)
    # The scorer decides on ONNX's float32 scores: the threshold is chosen on those, so the many rows
    # a tree model ties at it fall on the same side in serving as in the precision and recall reported.
    threshold = choose_threshold(scored[label], scored["p_onnx"], settings.threshold_objective,
                                 settings.target_precision)
    if threshold.get("target_reached") is False:
        log.warning("no threshold reaches target_precision %g; the most precise one (%.4f) gives %.4f",
                    settings.target_precision, threshold["threshold"], threshold["precision"])
    weights = scored[HOLDOUT_WEIGHT].to_numpy() if weighed else None
    meta = {
        "name": settings.model_name, "version": None, "algorithm": settings.algorithm,
        "hyper_parameters": hyper_parameters(settings) | {"buyer_weight": round(buyer_weight, 6)},
        "features": [{"name": name, "type": "float"} for name in feature_names],
        "onnx": {"input": export.INPUT_NAME, "probability_output": export.PROBABILITY_OUTPUT, "positive_index": 1,
                 "opset": export.TARGET_OPSET, "sha256": onnx_digest(onnx_bytes)},
        "threshold": threshold["threshold"], "threshold_selection": threshold, "metrics": metrics,
        "score_reference": score_reference(scored["p_onnx"], threshold["threshold"], weights=weights),
        "feature_reference": feature_reference(scored[list(feature_names)].to_numpy(), list(feature_names),
                                               weights=weights),
        "feature_importances": importances(model, feature_names),
        "rows": {"train": train_rows, "eval": len(scored)},
        "spark_version": spark.version, "code_version": code_version(), "parity": parity.as_meta(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return TrainResult(model, onnx_bytes, meta, scored.drop(columns=["_input_diff"]), parity, steps.timings)


def utc_text(epoch_ms: int) -> str:
    """An epoch-ms time as the summaries and messages show it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))


def time_split(examples: DataFrame, eval_fraction: float) -> tuple[DataFrame, DataFrame, int]:
    """Train on the sessions that started first, evaluate on the latest ``eval_fraction`` of them:
    the model is judged on the future it will face, never on sessions it has seen."""
    starts = examples.select("session_id", "session_start_ms").distinct()
    (cutoff,) = starts.approxQuantile("session_start_ms", [1 - eval_fraction], 0.0)
    cutoff = int(cutoff)
    train = examples.filter(F.col("session_start_ms") < cutoff)
    evaluation = examples.filter(F.col("session_start_ms") >= cutoff)
    counts = {row["part"]: (row["rows"], row["buyers"]) for row in examples.groupBy(
        (F.col("session_start_ms") < cutoff).alias("part")).agg(
        F.count("*").alias("rows"), F.sum("label").alias("buyers")).collect()}
    for part, name in ((True, "training"), (False, "evaluation")):
        rows, buyers = counts.get(part, (0, 0))
        if not rows or not buyers or buyers == rows:
            raise TrainError(f"the {name} part of the time split (cut at session start "
                             f"{utc_text(cutoff)}) has {rows} rows "
                             f"of which {buyers or 0} from buying sessions: it needs both buyers and non-buyers; "
                             "use a longer window or change eval_fraction")
    return train, evaluation, cutoff
