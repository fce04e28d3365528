"""Load-time graph rewrite: one TreeEnsembleRegressor instead of one per tree.

onnxmltools exports a Spark GBT as one TreeEnsembleRegressor node per tree, a Concat and a MatMul
with the tree weights. For a single row, onnxruntime's per-node overhead then dominates (100 nodes
for a 100-tree model). The same sum fits one node: every tree with its own tree id and its leaf
weights multiplied by the tree's weight, aggregated with SUM. The scorer only uses the rewrite when
it scores probe rows like the original, within ``TOLERANCE`` (``Model._fuse_trees``), so a
converter change can never make it serve different numbers.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

NODE_LISTS = ("nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values", "nodes_truenodeids",
              "nodes_falsenodeids", "nodes_missing_value_tracks_true", "nodes_hitrates")
TOLERANCE = 1e-6


def _attributes(node) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _merge(trees: list, weights: np.ndarray, output: str, inputs) -> onnx.NodeProto | None:
    merged: dict[str, list] = {"nodes_treeids": [], "target_treeids": [], "target_nodeids": [], "target_ids": [],
                               "target_weights": []}
    present = None
    base = 0.0
    for index, (tree, weight) in enumerate(zip(trees, weights.tolist())):
        attrs = _attributes(tree)
        if attrs.get("n_targets", 1) != 1 or _text(attrs.get("post_transform", "NONE")) != "NONE" \
                or _text(attrs.get("aggregate_function", "SUM")) != "SUM" \
                or any(name.endswith("_as_tensor") for name in attrs):
            return None
        keys = tuple(key for key in NODE_LISTS if key in attrs)
        if present is None:
            present = keys
        elif keys != present:
            return None
        merged["nodes_treeids"] += [index] * len(attrs["nodes_nodeids"])
        for key in keys:
            merged.setdefault(key, []).extend(attrs[key])
        merged["target_treeids"] += [index] * len(attrs["target_nodeids"])
        merged["target_nodeids"] += list(attrs["target_nodeids"])
        merged["target_ids"] += list(attrs["target_ids"])
        merged["target_weights"] += [value * weight for value in attrs["target_weights"]]
        base += weight * float((attrs.get("base_values") or [0.0])[0])
    return helper.make_node("TreeEnsembleRegressor", list(inputs), [output], domain="ai.onnx.ml",
                            name="fused_tree_sum", n_targets=1, aggregate_function="SUM", post_transform="NONE",
                            base_values=[base], **merged)


def fuse_tree_sum(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int] | None:
    """A copy of ``model`` with its per-tree regressors fused, and the tree count; None if no match."""
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {item.name: item for item in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.input[1] not in initializers:
            continue
        concat = producers.get(matmul.input[0])
        if concat is None or concat.op_type != "Concat" or consumers.get(concat.output[0]) != 1:
            continue
        trees = [producers.get(name) for name in concat.input]
        if len(trees) < 2 or any(t is None or t.op_type != "TreeEnsembleRegressor" or consumers.get(t.output[0]) != 1
                                 for t in trees) or len({tuple(t.input) for t in trees}) != 1:
            continue
        weights = numpy_helper.to_array(initializers[matmul.input[1]]).reshape(-1).astype(np.float64)
        if len(weights) != len(trees):
            continue
        fused = _merge(trees, weights, matmul.output[0], trees[0].input)
        if fused is None:
            return None
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        drop = {id(node) for node in (*trees, concat, matmul)}
        kept = []
        for node in graph.node:
            if node is trees[0]:
                kept.append(fused)
            elif id(node) not in drop:
                kept.append(node)
        del copy.graph.node[:]
        copy.graph.node.extend(kept)
        used = {name for node in kept for name in node.input}
        initial = [item for item in copy.graph.initializer if item.name in used]
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(initial)
        return copy, len(trees)
    return None


def probe_rows(model: onnx.ModelProto, width: int, count: int = 512, seed: int = 7) -> np.ndarray:
    """Rows that reach both sides of the trees' splits: values just below and above the thresholds."""
    rng = np.random.default_rng(seed)
    thresholds: dict[int, list[float]] = {}
    for node in model.graph.node:
        if node.op_type == "TreeEnsembleRegressor":
            attrs = _attributes(node)
            for feature, value, mode in zip(attrs["nodes_featureids"], attrs["nodes_values"], attrs["nodes_modes"]):
                if _text(mode) != "LEAF":
                    thresholds.setdefault(feature, []).append(value)
    rows = rng.uniform(0, 10, size=(count, width)).astype(np.float32)
    for feature, values in thresholds.items():
        picks = rng.choice(np.asarray(values, dtype=np.float64), size=count)
        offsets = rng.choice([-1.0, 1.0], size=count) * (np.abs(picks) * 1e-3 + 1e-3)
        rows[:, feature] = (picks + offsets).astype(np.float32)
    return rows
