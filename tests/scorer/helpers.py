"""Test material for the scorer: synthetic enriched sessions and small ONNX models."""
from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime

import numpy as np
import onnx
from onnx import TensorProto, helper

from common import registry
from common.features import FEATURE_NAMES, FEATURE_VERSION
from localstack.emulator import free_port  # noqa: F401 - re-exported for the scorer tests
from tests.conftest import wait_for  # noqa: F401 - re-exported for the scorer tests

SHOP = "iglu:com.clickshop/{}/jsonschema/1-0-0"
T0 = 1_795_000_000_000          # 2026-11-17, a fixed event-time origin


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(session_id: str, at_ms: int, kind: str = "page_view", *, path: str = "/", shop: str | None = None,
          data: dict | None = None, rng: random.Random | None = None, **extra) -> dict:
    rng = rng or random
    base = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))), "app_id": "shop", "platform": "web",
        "event": kind, "collector_tstamp": iso(at_ms), "derived_tstamp": iso(at_ms),
        "domain_sessionid": session_id, "domain_sessionidx": 1, "dvce_type": "Computer",
        "os_timezone": "Europe/Berlin", "refr_medium": None, "page_urlpath": path,
        "unstruct_event": None, "contexts": [], "event_vendor": "com.snowplowanalytics.snowplow",
        "event_name": kind,
    }
    if shop:
        base.update(event="unstruct", unstruct_event={"schema": SHOP.format(shop), "data": data or {}},
                    event_vendor="com.clickshop", event_name=shop)
    base.update(extra)
    return base


def session_events(session_id: str, seed: int, n: int = 12, buyer: bool | None = None,
                   start_ms: int = T0) -> list[dict]:
    """One browsing session of about ``n`` events; buyers add to cart, check out and purchase."""
    rng = random.Random(seed)
    buyer = rng.random() < 0.4 if buyer is None else buyer
    at = start_ms
    out = [event(session_id, at, path="/", rng=rng, dvce_type=rng.choice(["Computer", "Mobile", "Tablet"]),
                 refr_medium=rng.choice([None, "search", "social", "email"]))]
    for i in range(n - 1):
        at += rng.randint(2_000, 40_000)
        choice = rng.random()
        if buyer and i >= n - 7:
            step = i - (n - 7)
            if step == 0:
                out.append(event(session_id, at, shop="add_to_cart", rng=rng,
                                 data={"sku": f"SH-{rng.randint(1, 12):04d}", "category": "shoes",
                                       "price": round(rng.uniform(20, 200), 2), "quantity": rng.randint(1, 3)}))
            elif step <= 4:
                out.append(event(session_id, at, shop="checkout_step", rng=rng, data={"step": step}))
            else:
                out.append(event(session_id, at, shop="purchase", rng=rng,
                                 data={"order_id": f"o-{seed}", "total": 99.0, "items": 1}))
        elif choice < 0.35:
            out.append(event(session_id, at, path=f"/p/SH-{rng.randint(1, 12):04d}", rng=rng))
        elif choice < 0.6:
            out.append(event(session_id, at, shop="product_view", rng=rng,
                             data={"sku": f"SH-{rng.randint(1, 12):04d}", "category": "shoes",
                                   "price": round(rng.uniform(20, 200), 2)}))
        elif choice < 0.8:
            out.append(event(session_id, at, "page_ping", rng=rng, pp_yoffset_max=rng.randint(0, 3000),
                             br_viewheight=800, doc_height=4000))
        elif choice < 0.9:
            out.append(event(session_id, at, shop="add_to_cart", rng=rng,
                             data={"sku": f"SH-{rng.randint(1, 12):04d}", "category": "shoes",
                                   "price": round(rng.uniform(20, 200), 2), "quantity": 1}))
        else:
            out.append(event(session_id, at, path="/c/shoes", rng=rng))
    return out


# ----------------------------------------------------------------------------- ONNX models

WEIGHTS = {"cart_adds": 1.2, "checkout_step_max": 0.9, "product_views": 0.15, "events": 0.05,
           "cart_value": 0.004, "device_mobile": -0.4, "max_scroll_depth": 0.5}


def logistic_onnx(weights: dict[str, float] | None = None, bias: float = -3.0, zipmap: bool = False,
                  width: int = len(FEATURE_NAMES)) -> bytes:
    """A logistic regression as ONNX, shaped like onnxmltools' Spark export (probability [N, 2])."""
    weights = WEIGHTS if weights is None else weights
    w = np.array([[weights.get(name, 0.0)] for name in FEATURE_NAMES[:width]], dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probability"], axis=1),
        helper.make_node("ArgMax", ["probability"], ["prediction"], axis=1, keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info("prediction", TensorProto.INT64, [None])]
    if zipmap:
        nodes.append(helper.make_node("ZipMap", ["probability"], ["probability_map"], domain="ai.onnx.ml",
                                      classlabels_int64s=[0, 1]))
        outputs.append(helper.make_value_info("probability_map", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))))
    else:
        outputs.append(helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 2]))
    graph = helper.make_graph(
        nodes, "buy", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])], outputs,
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
                     helper.make_tensor("B", TensorProto.FLOAT, [1], [bias]),
                     helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_classifier_onnx(seed: int = 3) -> bytes:
    """A logistic regression shaped like onnxmltools' export of Spark's (LinearClassifier, then Normalizer),
    with dense weights: onnxruntime scores a lone row of it on a path of its own."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, len(FEATURE_NAMES)).astype(np.float32)
    nodes = [helper.make_node("LinearClassifier", ["features"], ["prediction", "probability_tensor"], domain="ai.onnx.ml",
                              classlabels_ints=[0, 1], coefficients=[*(-w).tolist(), *w.tolist()],
                              intercepts=[0.5, -0.5], multi_class=1, post_transform="LOGISTIC"),
             helper.make_node("Normalizer", ["probability_tensor"], ["probability"], domain="ai.onnx.ml", norm="L1")]
    graph = helper.make_graph(
        nodes, "buy", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, len(FEATURE_NAMES)])],
        [helper.make_tensor_value_info("prediction", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def logistic_reference(rows: list[list[float]], weights: dict[str, float] | None = None, bias: float = -3.0):
    weights = WEIGHTS if weights is None else weights
    w = np.array([weights.get(name, 0.0) for name in FEATURE_NAMES], dtype=np.float64)
    z = np.asarray(rows, dtype=np.float32).astype(np.float64) @ w + bias
    return 1 / (1 + np.exp(-z))


def model_meta(name: str, version: str, *, output: str = "probability", threshold: float = 0.5, **overrides) -> dict:
    meta = {"name": name, "version": version, "algorithm": "logistic_regression", "feature_version": FEATURE_VERSION,
            "features": [{"name": n, "type": "double"} for n in FEATURE_NAMES],
            "onnx": {"input": "features", "probability_output": output, "positive_index": 1},
            "threshold": threshold, "metrics": {}, "parity": {"max_abs_diff": 0.0}}
    meta.update(overrides)
    return meta


def publish(s3, bucket: str, name: str, version: str, onnx_bytes: bytes, meta: dict | None = None,
            current: bool = True) -> None:
    meta = meta or model_meta(name, version)
    registry.publish(s3, bucket, name, version, {"model.onnx": onnx_bytes, "model.json": json.dumps(meta).encode()})
    if current:
        registry.set_current(s3, bucket, name, version, reason="test")




def stumps_onnx(stumps: list[tuple[int, float, float, float]], weights: list[float]) -> bytes:
    """A tree sum shaped like onnxmltools' Spark GBT export: one TreeEnsembleRegressor per tree
    (here stumps: feature, threshold, left value, right value), Concat, MatMul with the tree weights,
    then the probability [N, 2] from the sum."""
    nodes, names = [], []
    for i, (feature, threshold, left, right) in enumerate(stumps):
        names.append(f"tree{i}")
        nodes.append(helper.make_node(
            "TreeEnsembleRegressor", ["features"], [f"tree{i}"], domain="ai.onnx.ml", n_targets=1,
            nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[feature, 0, 0],
            nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_values=[threshold, 0.0, 0.0],
            nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0], nodes_missing_value_tracks_true=[0, 0, 0],
            target_treeids=[0, 0], target_nodeids=[1, 2], target_ids=[0, 0], target_weights=[left, right]))
    nodes += [
        helper.make_node("Concat", names, ["all"], axis=1),
        helper.make_node("MatMul", ["all", "W"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probability"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "stumps", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, len(FEATURE_NAMES)])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 2])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [len(weights), 1], weights),
                     helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
