"""Spark-trained test models: VectorAssembler -> GBT / LogisticRegression on folded synthetic
sessions, exported with onnxmltools exactly as training does (input "features", opset 15)."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from common.features import FEATURE_NAMES, session_features
from tests.scorer.helpers import session_events


def training_rows(sessions: int = 300, seed: int = 1000) -> tuple[list[list[float]], list[float]]:
    """Prefix rows of synthetic sessions, labelled 1 when the session later buys."""
    rows, labels = [], []
    for i in range(sessions):
        events = session_events(f"train{i}", seed=seed + i, n=8 + i % 8)
        bought = any(e.get("event_name") == "purchase" for e in events)
        for row in session_features(events):
            rows.append(row)
            labels.append(1.0 if bought else 0.0)
    return rows, labels


@contextmanager
def converter_scratch() -> Iterator[None]:
    """Stock onnxmltools saves every tree of a Spark ensemble under tempfile.tempdir and never removes
    them (200 folders in /tmp a bench run): give it a folder of its own while it converts."""
    with tempfile.TemporaryDirectory(prefix="stock-export-") as scratch, mock.patch.object(tempfile, "tempdir", scratch):
        yield


def train(spark, algorithm: str = "gbt", trees: int = 20, depth: int = 3, sessions: int = 300):
    """(PipelineModel, ONNX bytes) of a classifier on FEATURE_NAMES columns."""
    from onnxmltools import convert_sparkml
    from onnxmltools.convert.common.data_types import FloatTensorType
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import GBTClassifier, LogisticRegression
    from pyspark.ml.feature import VectorAssembler

    rows, labels = training_rows(sessions)
    frame = spark.createDataFrame([(*row, label) for row, label in zip(rows, labels)], [*FEATURE_NAMES, "label"])
    assembler = VectorAssembler(inputCols=list(FEATURE_NAMES), outputCol="features")
    if algorithm == "gbt":
        classifier = GBTClassifier(featuresCol="features", maxIter=trees, maxDepth=depth, seed=7)
    else:
        classifier = LogisticRegression(featuresCol="features", maxIter=50)
    model = Pipeline(stages=[assembler, classifier]).fit(frame)
    with converter_scratch():
        onnx_model = convert_sparkml(model.stages[-1], "buy", [("features", FloatTensorType([None, len(FEATURE_NAMES)]))],
                                     target_opset=15, spark_session=spark)
    return model, onnx_model.SerializeToString()
