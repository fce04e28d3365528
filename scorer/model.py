"""ONNX models from the registry: validation against the fold, scoring, and hot swapping.

A ``Model`` wraps one onnxruntime session. ``Models`` holds the champion (and an optional shadow)
and swaps in new versions by replacing a single attribute, so a reader that took
``models.champion`` once keeps a consistent model for its whole batch or request.
"""
from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from botocore.exceptions import BotoCoreError, ClientError

from common import registry
from common.features import FEATURE_COUNT, FEATURE_NAMES, FEATURE_VERSION
from common.logs import Tally
from common.onnx_runtime import onnxruntime as ort
from scorer import metrics, optimize

log = logging.getLogger("scorer.model")


class ModelRefused(ValueError):
    """The bundle does not fit this scorer (other feature version or feature list); names why."""


def check_meta(meta: dict) -> None:
    """Refuse a model trained on other features: its scores would be silently wrong."""
    if not isinstance(meta, dict):
        raise ModelRefused(f"model.json is not an object but {type(meta).__name__}")
    version = str(meta.get("feature_version"))
    if version != FEATURE_VERSION:
        raise ModelRefused(f"feature_version {version!r} differs from the scorer's {FEATURE_VERSION!r}")
    features = meta.get("features") or []
    if not isinstance(features, list):
        raise ModelRefused(f"features is not a list but {type(features).__name__}")
    names = [item.get("name") if isinstance(item, dict) else item for item in features]
    if names != list(FEATURE_NAMES):
        missing = [n for n in FEATURE_NAMES if n not in names]
        extra = [n for n in names if n not in FEATURE_NAMES]
        if missing or extra:
            raise ModelRefused(f"features differ: missing {missing}, unexpected {extra}")
        first = next(i for i, (a, b) in enumerate(zip(names, FEATURE_NAMES)) if a != b)
        raise ModelRefused(f"features in another order: position {first} is {names[first]!r}, "
                           f"the fold has {FEATURE_NAMES[first]!r}")


def _session(onnx: bytes) -> ort.InferenceSession:
    # One thread, sequential: single rows are latency bound, and the worker and API share two cores.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


_PACK_ROW = struct.Struct(f"={FEATURE_COUNT}f")     # one row as float32, the layout of a numpy row


class _RowBinding(threading.local):
    """One thread's single-row input and output buffers, bound to the session once.

    A single row is latency bound: ``session.run`` converts a dict of inputs and allocates its
    outputs on every call (about 9 µs here); running a prebound pair costs about 6 µs. Per
    thread, because the worker and the API score concurrently and a binding is not thread-safe.
    """

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str, count: int = 1):
        rows = np.zeros((count, FEATURE_COUNT), dtype=np.float32)      # the row, then zeros (Model.min_rows)
        self.row = rows[:1]
        self.out = np.zeros((count, 2), dtype=np.float32)
        self.row_bytes = memoryview(rows).cast("B")
        self.binding = session.io_binding()
        self.binding.bind_cpu_input(input_name, rows)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, [count, 2], self.out.ctypes.data)

    @staticmethod
    def fits(session: ort.InferenceSession, output_name: str) -> bool:
        """Only a float tensor of two columns can be bound (not a ZipMap, not other shapes)."""
        output = next(item for item in session.get_outputs() if item.name == output_name)
        return output.type == "tensor(float)" and len(output.shape) == 2 and output.shape[1] in (2, None)


@dataclass
class Model:
    name: str
    version: str
    threshold: float
    session: ort.InferenceSession
    input_name: str
    output_name: str
    positive_index: int
    meta: dict
    fused_trees: int = 0            # > 0 when the per-tree nodes were fused (optimize.py)
    min_rows: int = 1               # rows every run scores, a lone row padded with zeros (_check_lone_rows)
    _single: _RowBinding | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_bundle(cls, bundle: registry.Bundle) -> Model:
        check_meta(bundle.meta)
        spec = _onnx_spec(bundle.meta)
        try:
            session = _session(bundle.onnx)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ModelRefused(f"model.onnx does not load: {exc}") from None
        inputs = {item.name: item for item in session.get_inputs()}
        input_name = spec.get("input", "features")
        if input_name not in inputs:
            raise ModelRefused(f"model.onnx has no input {input_name!r} (has {sorted(inputs)})")
        width = inputs[input_name].shape[-1]
        if isinstance(width, int) and width != len(FEATURE_NAMES):
            raise ModelRefused(f"model.onnx input {input_name!r} takes {width} columns, the fold makes "
                               f"{len(FEATURE_NAMES)}")
        outputs = [item.name for item in session.get_outputs()]
        output_name = spec.get("probability_output", "probability")
        if output_name not in outputs:
            raise ModelRefused(f"model.onnx has no output {output_name!r} (has {outputs})")
        model = cls(bundle.name, bundle.version, _threshold(bundle.meta), session,
                    input_name, output_name, _positive_index(spec), bundle.meta)
        model._probe()
        model._fuse_trees(bundle.onnx)
        model._check_lone_rows()
        if _RowBinding.fits(model.session, output_name):
            model._single = _RowBinding(model.session, input_name, output_name, model.min_rows)
        return model

    def _probe(self) -> None:
        """Score one row before serving it: a graph or a positive_index that cannot give a
        probability is refused here, not found by every batch of the worker."""
        try:
            p_buy = float(self._run(np.zeros((1, FEATURE_COUNT), dtype=np.float32))[0])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are untyped; an index error is ours
            raise ModelRefused(f"scoring a row failed: {exc!r}") from None
        if not 0.0 <= p_buy <= 1.0:
            raise ModelRefused(f"a row scored {p_buy!r}, not a probability (onnx.positive_index "
                               f"{self.positive_index})")

    def _fuse_trees(self, onnx_bytes: bytes) -> None:
        """Swap in the fused-tree graph when it scores the probe rows like the original (optimize.py)."""
        try:
            original = onnx.load_from_string(onnx_bytes)
            rewritten = optimize.fuse_tree_sum(original)
            if rewritten is None:
                return
            graph, trees = rewritten
            fused = _session(graph.SerializeToString())
            rows = optimize.probe_rows(original, len(FEATURE_NAMES))
            before = self.predict(rows)
            faster = replace(self, session=fused)
            diff = float(np.max(np.abs(faster.predict(rows) - before)))
        except Exception:
            log.warning("model %s: tree fusion failed; serving the graph as exported", self.version, exc_info=True)
            return
        if diff > optimize.TOLERANCE:
            log.warning("model %s: fused trees differ by %.2e on probe rows; serving the graph as exported",
                        self.version, diff)
            return
        self.session, self.fused_trees = fused, trees
        log.info("model %s: fused %d trees into one node (max |dp| %.1e on %d probe rows)", self.version, trees,
                 diff, len(rows), extra={"model_version": self.version})

    def _check_lone_rows(self) -> None:
        """Pad a lone row when the model scores it otherwise than in a batch. onnxruntime runs a batch of one
        on a path of its own for some graphs (LinearClassifier, Spark's logistic regression: a matrix-vector
        product, whose float32 sums round otherwise): the same event's p_buy differed in its 6th decimal
        between a live poll of one record and a replay reading many. Trees score alike, unpadded (faster)."""
        rng = np.random.default_rng(7)      # values of many scales, so some rows score between 0 and 1
        rows = (rng.uniform(0, 1, (256, FEATURE_COUNT)) * 10 ** rng.uniform(-3, 1, (256, 1))).astype(np.float32)
        batch = self._run(rows)
        if any(self._run(rows[i:i + 1])[0] != batch[i] for i in range(len(rows))):
            self.min_rows = 2
            log.info("model %s: scores a lone row otherwise than in a batch; lone rows are padded",
                     self.version, extra={"model_version": self.version})

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """P(buy) for each row of a float32 [n, FEATURE_COUNT] matrix."""
        if self._single is not None and rows.shape[0] == 1:
            self._single.row[0] = rows[0]
            return np.array([self._run_single()])
        return self._run(rows)

    def score_one(self, row: Sequence[float]) -> float:
        """P(buy) for one row of the fold's features (a list), without building a numpy matrix."""
        single = self._single
        if single is not None:
            try:
                _PACK_ROW.pack_into(single.row_bytes, 0, *row)
                return self._run_single()
            except OverflowError:          # beyond float32: numpy's conversion makes it inf, as training would
                pass
        with np.errstate(over="ignore"):
            matrix = np.asarray([row], dtype=np.float32)
        return float(self._run(matrix)[0])

    def _run_single(self) -> float:
        single = self._single
        self.session.run_with_iobinding(single.binding)
        return float(single.out[0, self.positive_index])

    def _run(self, rows: np.ndarray) -> np.ndarray:
        count = len(rows)
        if count < self.min_rows:
            rows = np.concatenate([rows, np.zeros((self.min_rows - count, rows.shape[1]), dtype=rows.dtype)])
        output = self.session.run([self.output_name], {self.input_name: rows})[0][:count]
        if isinstance(output, np.ndarray):
            return output[:, self.positive_index].astype(np.float64)
        # A ZipMap output: one {label: probability} dict per row.
        return np.array([_positive(row, self.positive_index) for row in output], dtype=np.float64)

    def decide(self, p_buy: float) -> str:
        return "buy" if p_buy >= self.threshold else "defer"


def _onnx_spec(meta: dict) -> dict:
    """model.json's ``onnx``: an object whose input and output are names. A hand's edit of another
    shape is refused, not left to fail as a TypeError, which the watcher would neither log as a
    refusal nor fall back from."""
    spec = meta.get("onnx") or {}
    if not isinstance(spec, dict):
        raise ModelRefused(f"onnx is not an object but {type(spec).__name__}")
    for key in ("input", "probability_output"):
        if not isinstance(spec.get(key, ""), str):
            raise ModelRefused(f"onnx.{key} {spec[key]!r} is not a name")
    return spec


def _threshold(meta: dict) -> float:
    value = meta.get("threshold", 0.5)
    if type(value) not in (int, float) or not 0.0 <= value <= 1.0:      # NaN fails the comparison too
        raise ModelRefused(f"threshold {value!r} is not a probability from 0 to 1")
    return float(value)


def _positive_index(spec: dict) -> int:
    value = spec.get("positive_index", 1)
    if type(value) is not int or value < 0:
        raise ModelRefused(f"onnx.positive_index {value!r} is not a column number")
    return value


def _positive(row: dict, index: int) -> float:
    if index in row:
        return float(row[index])
    if str(index) in row:
        return float(row[str(index)])
    return float(row[sorted(row)[index]])


class Models:
    """The champion (decides) and an optional shadow (scored and logged), with hot reloads."""

    def __init__(self, s3, bucket: str, name: str, shadow_version: str = ""):
        self.s3 = s3
        self.bucket = bucket
        self.name = name
        self.shadow_version = shadow_version
        self.champion: Model | None = None
        self.shadow: Model | None = None
        # The CURRENT version last acted on: the watcher loads only when CURRENT moves, so a
        # refused version is not retried every poll and a version pinned by reload is kept.
        self.current_seen: str | None = None
        self.shadow_refused: str | None = None      # the shadow version refused, not downloaded again
        self.shadow_missing: str | None = None      # the shadow version not found, said once
        # CURRENT when neither it nor any earlier CURRENT fits this scorer: nothing is scored, and
        # /ping fails so that a rolling deploy of scorers for other features stops (docs/training.md).
        self.unfit: str | None = None
        # Through an S3 outage every poll fails: a line per 60 s with the count, not one per poll.
        self._check_failures = Tally(every_s=60.0)
        self._lock = threading.RLock()     # _follow holds it across its fallback
        self._stop = threading.Event()

    def load(self, version: str | None = None) -> Model:
        """Load ``version`` (default CURRENT) and make it the champion.

        Raises LookupError when it does not exist and ModelRefused when it does not fit; either
        way the current champion keeps serving.
        """
        with self._lock:
            try:
                bundle = registry.load(self.s3, self.bucket, self.name, version)
            except ValueError as exc:          # model.json is not JSON, or model.onnx is not the one published
                raise self._refused(version or "CURRENT", ModelRefused(str(exc))) from None
            if self.champion and self.champion.version == bundle.version:
                return self.champion
            try:
                model = Model.from_bundle(bundle)
            except ModelRefused as exc:
                raise self._refused(bundle.version, exc) from None
            previous, self.champion, self.unfit = self.champion, model, None
            metrics.model_loaded(model, "champion", previous)
            log.info("model %s version %s is now the champion (was %s)", self.name, model.version,
                     previous.version if previous else None, extra={"model_version": model.version})
            return model

    def _refused(self, version: str, exc: ModelRefused) -> ModelRefused:
        metrics.MODEL_REFUSED.inc()
        log.error("refused model %s version %s: %s; keeping %s", self.name, version, exc,
                  self.champion.version if self.champion else "no model", extra={"model_version": version})
        return exc

    def load_shadow(self) -> None:
        wanted = self.shadow_version
        if not wanted or wanted == self.shadow_refused or (self.shadow and self.shadow.version == wanted):
            return
        try:
            model = Model.from_bundle(registry.load(self.s3, self.bucket, self.name, wanted))
        except LookupError as exc:                          # not published (yet), or pruned: looked for again next poll
            if self.shadow_missing != wanted:               # said once, not at every poll for ever
                log.error("shadow model %s version %s not loaded (looked for again at every poll): %s",
                          self.name, wanted, exc)
                self.shadow_missing = wanted
            return
        except ValueError as exc:           # ModelRefused, or a model.json that does not parse: refused for good
            self.shadow_refused = wanted
            log.error("shadow model %s version %s refused: %s", self.name, wanted, exc)
            return
        previous, self.shadow = self.shadow, model
        metrics.model_loaded(model, "shadow", previous)

    def refresh(self) -> None:
        """Load CURRENT if it moved; failures are logged, never raised (the old model keeps serving)."""
        try:
            version = registry.current_version(self.s3, self.bucket, self.name)
            if version and version != self.current_seen:
                self._follow(version)
            self.load_shadow()
        except ModelRefused as exc:
            log.warning("model %s not updated: %s", self.name, exc)
        except LookupError as exc:
            metrics.MODEL_CHECK_FAILURES.inc()
            log.warning("model %s not updated: %s", self.name, exc)
            return
        except (BotoCoreError, ClientError) as exc:      # S3 away or throttled: one line, not a traceback
            metrics.MODEL_CHECK_FAILURES.inc()
            if count := self._check_failures.add():
                log.warning("model %s: checking CURRENT failed %d times since the last such line, trying again at "
                            "every check: %s", self.name, count, exc)
            return
        except Exception:
            metrics.MODEL_CHECK_FAILURES.inc()
            log.exception("model %s: checking CURRENT failed", self.name)
            return
        # A model served long after the registry stopped answering looks like a current one: alert on this.
        metrics.MODEL_CHECKED.set_to_current_time()

    def _follow(self, version: str) -> None:
        with self._lock:                    # a reload must not land between `champion is None` and the fallback
            self._follow_locked(version)

    def _follow_locked(self, version: str) -> None:
        try:
            self.load(version)
        except ModelRefused:
            self.current_seen = version      # refusal logged once; a missing bundle is retried
            if self.champion is None:
                try:
                    self._fall_back(version, "does not fit this scorer")
                except Exception:
                    self.current_seen = None     # the registry failed, not the versions: again next poll
                    raise
            raise
        except LookupError:
            # A bundle deleted under CURRENT (a prune racing a promote, a hand's delete): looked for
            # again at every poll, and meanwhile a scorer with no model serves the one before it.
            if self.champion is None:
                self._fall_back(version, "is not in the registry")
            raise
        self.current_seen = version

    def _fall_back(self, refused: str, why: str) -> None:
        """Nothing serves and CURRENT does not fit this scorer (a restart while a model for other
        features is rolled out) or is not there: serve the version CURRENT moved from, or the one
        before that, as successive rollbacks would pick, until CURRENT moves or appears."""
        entries = registry.history(self.s3, self.bucket, self.name)
        tried = {refused}
        version = registry.previous_version(entries, refused)
        while version is not None and version not in tried:
            tried.add(version)
            try:
                self.load(version)
            except (LookupError, ModelRefused):
                version = registry.previous_version(entries, version)
                continue
            log.warning("model %s: CURRENT %s %s; serving %s, an earlier CURRENT, until CURRENT moves",
                        self.name, refused, why, version, extra={"model_version": version})
            return
        self.unfit = refused
        log.error("model %s: CURRENT %s %s, nor does any earlier CURRENT fit; serving nothing",
                  self.name, refused, why)

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()
        thread = threading.Thread(target=loop, name="model-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
