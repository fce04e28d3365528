"""Export a fitted Spark classifier to ONNX and prove it scores like Spark (the parity gate).

The ONNX model takes one float32 tensor ``features`` of shape [None, n] (the VectorAssembler's
output, in FEATURE_NAMES order) and has an output ``probability`` of shape [None, 2].

Why the tree thresholds are rewritten: Spark splits a continuous feature at the midpoint of two
observed values, in float64; ONNX stores thresholds as float32, rounded to nearest. A midpoint can
round *up* onto the next observed value b, and then b goes left in ONNX but right in Spark. Since
every input is already a float32 value (train_features rounds them), ``x <= t`` is exactly
``x <= largest float32 not above t``: we store that instead, and the two sides route identically.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.onnx_runtime import onnxruntime as ort

TARGET_OPSET = 15
INPUT_NAME = "features"
PROBABILITY_OUTPUT = "probability"
_TREE_MODULES = ("decision_tree_classifier", "decision_tree_regressor", "random_forest_classifier",
                 "random_forest_regressor")


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not score like Spark."""


def floor32(value: float) -> float:
    """The largest float32 value that is <= ``value`` (as a Python float)."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _read_trees(classifier) -> dict:
    """Every tree of a fitted ensemble, read in one go: uid -> nodes (pandas).

    onnxmltools saves and re-reads each tree with several Spark jobs; for a 300-tree GBT that is
    ~1,000 jobs and minutes. Saving the whole model once and reading its Parquet with pyarrow
    takes a second, and the parity gate still checks the result.
    """
    import pyarrow.parquet as pq
    from pyspark import SparkContext

    from batch.train_config import in_process

    trees = list(classifier.trees)
    if not in_process(SparkContext._active_spark_context.master):
        # On a cluster the executors write the saved model's files to their own disks, and the
        # driver's folder stayed empty (KeyError 'nodeData'): walk the driver JVM's trees instead.
        return {tree.uid: _jvm_nodes(tree._java_obj.rootNode()) for tree in trees}
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as folder:
        classifier.write().overwrite().save(f"{folder}/model")
        data = pq.read_table(f"{folder}/model/data").to_pandas()
    flat = pd.json_normalize(data["nodeData"].tolist())
    flat.columns = [c.replace("split.", "split_") for c in flat.columns]
    flat["treeID"] = data["treeID"].to_numpy()
    nodes = {tree_id: frame for tree_id, frame in flat.groupby("treeID")}
    return {tree.uid: nodes[i] for i, tree in enumerate(trees)}


def _jvm_nodes(root) -> pd.DataFrame:
    """One tree's nodes from its JVM objects, numbered as Spark's NodeData.build saves them (preorder):
    a few py4j calls a node (~10 s for 4,000 nodes against ~3 s for save and read)."""
    rows: list[dict] = []

    def walk(node, nid: int) -> int:
        row = {"id": nid, "prediction": node.prediction(), "impurityStats": list(node.impurityStats().stats()),
               "leftChild": -1, "rightChild": -1, "split_featureIndex": -1,
               "split_leftCategoriesOrThreshold": [], "split_numCategories": -1}
        rows.append(row)
        if node.getClass().getSimpleName() != "InternalNode":
            return nid
        split = node.split()
        row["split_featureIndex"] = split.featureIndex()
        if split.getClass().getSimpleName() == "ContinuousSplit":
            row["split_leftCategoriesOrThreshold"] = [split.threshold()]
        else:
            row["split_leftCategoriesOrThreshold"] = list(split.leftCategories())
            row["split_numCategories"] = split.numCategories()
        left_last = walk(node.leftChild(), nid + 1)
        row["leftChild"], row["rightChild"] = nid + 1, left_last + 1
        return walk(node.rightChild(), left_last + 1)

    walk(root, 0)
    return pd.DataFrame(rows)


def _tree(nodes: pd.DataFrame, is_classifier: bool):
    """The converter's tree structure from one tree's nodes, with float32-safe thresholds."""
    from onnxmltools.convert.sparkml.operator_converters.tree_ensemble_common import SparkMLTree

    nodes = nodes.sort_values("id")
    if (nodes["split_numCategories"].fillna(-1) != -1).any():
        raise ExportError("the model has a categorical split, which the ONNX converter reads wrongly: "
                          "encode categorical inputs as numeric (one-hot) columns before Spark")
    tree = SparkMLTree()
    tree.nodes_ids = nodes["id"].tolist()
    tree.children_left = nodes["leftChild"].tolist()
    tree.children_right = nodes["rightChild"].tolist()
    values = nodes["impurityStats"].tolist() if is_classifier else nodes["prediction"].tolist()
    tree.value = np.asarray(np.array(values), dtype=np.float32)
    tree.feature = nodes["split_featureIndex"].tolist()
    tree.threshold = [floor32(t[0]) if len(t) else -1.0 for t in nodes["split_leftCategoriesOrThreshold"]]
    tree.node_count = len(nodes)
    return tree


@contextlib.contextmanager
def _tree_reader(classifier):
    """Patch onnxmltools' per-tree reader with ours (one read, float32-floored thresholds)."""
    base = "onnxmltools.convert.sparkml.operator_converters."
    modules = [importlib.import_module(base + name) for name in _TREE_MODULES]
    saved = [(m, m.save_read_sparkml_model_data, m.sparkml_tree_dataset_to_sklearn) for m in modules]
    by_uid = _read_trees(classifier) if hasattr(classifier, "trees") else {}   # GBT, RF; not LR

    def save_read(_spark, model):
        if model.uid not in by_uid:
            raise ExportError(f"tree {model.uid} was not read from the model")
        return by_uid[model.uid]

    for module in modules:
        module.save_read_sparkml_model_data = save_read
        module.sparkml_tree_dataset_to_sklearn = _tree
    try:
        yield
    finally:
        for module, read, convert in saved:
            module.save_read_sparkml_model_data = read
            module.sparkml_tree_dataset_to_sklearn = convert


def to_onnx(spark, classifier, n_features: int, name: str = "model") -> bytes:
    """The fitted classifier stage (not the assembler) as ONNX bytes."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    with _tree_reader(classifier), contextlib.redirect_stdout(io.StringIO()):   # the LR converter prints
        model = onnxmltools.convert_sparkml(classifier, name, [(INPUT_NAME, FloatTensorType([None, n_features]))],
                                            target_opset=TARGET_OPSET, spark_session=spark)
    outputs = [output.name for output in model.graph.output]
    if PROBABILITY_OUTPUT not in outputs:
        raise ExportError(f"exported model has no {PROBABILITY_OUTPUT!r} output (outputs: {outputs})")
    return model.SerializeToString()


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(onnx_bytes: bytes, matrix: np.ndarray, batch: int = 65_536) -> np.ndarray:
    """P(class 1) for every row of ``matrix`` (cast to float32, as the scorer does)."""
    sess = session(onnx_bytes)
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    cuts = list(range(batch, len(x), batch))
    if cuts and len(x) - cuts[-1] == 1:
        cuts.pop()          # a lone last row may score otherwise (scorer.model.Model._check_lone_rows)
    parts = [sess.run([PROBABILITY_OUTPUT], {INPUT_NAME: part})[0][:, 1] for part in np.split(x, cuts) if len(part)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


@dataclass
class Parity:
    passed: bool
    max_abs_diff: float
    rows: int
    tolerance: float
    stage: str | None = None
    worst: list[dict] | None = None

    def as_meta(self) -> dict:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "rows": self.rows,
                "tolerance": self.tolerance, **({"stage": self.stage, "worst": self.worst} if not self.passed else {})}

    def message(self) -> str:
        rows = ", ".join(f"{w['row']} (p_spark={w['p_spark']:.6f}, p_onnx={w['p_onnx']:.6f})" for w in self.worst or [])
        return (f"export parity failed at stage {self.stage}: max |p_onnx - p_spark| = {self.max_abs_diff:.3g} "
                f"> {self.tolerance:g} on {self.rows} evaluation rows; worst rows: {rows}")


def check(input_diff: np.ndarray, p_spark: np.ndarray, p_onnx: np.ndarray, row_ids: list[str],
          stages: list[str], tolerance: float = 1e-5) -> Parity:
    """Compare stage by stage: the assembled vector Spark scored must be the float32 input ONNX
    scored (``input_diff``, per row, else the assembler stage is at fault); then the probabilities
    (the classifier stage)."""
    input_diff = np.asarray(input_diff, dtype=np.float64)
    diff = np.abs(p_onnx - p_spark)
    assembler_at_fault = bool(len(input_diff) and input_diff.max() > 0)
    stage, per_row = (stages[0], input_diff) if assembler_at_fault else (stages[-1], diff)
    worst_rows = np.argsort(-per_row, kind="stable")[:5]
    max_diff = float(diff.max()) if len(diff) else 0.0
    passed = max_diff <= tolerance and not assembler_at_fault
    worst = [{"row": row_ids[i], "p_spark": float(p_spark[i]), "p_onnx": float(p_onnx[i]),
              "abs_diff": float(diff[i])} for i in worst_rows]
    return Parity(passed, max_diff, len(diff), tolerance, None if passed else stage,
                  None if passed else worst)
