"""Prometheus metrics of the worker and the API (served at /metrics)."""
from __future__ import annotations

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from common.features import parse_ms
from common.service import TIME_TO_ACT_BUCKETS

_FAST = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class BatchHistogram(Histogram):
    """A histogram that also counts a whole batch in one call. ``observe`` per event cost the worker
    ~10 % of its events/s (python -m bench scorer): two locked increments and a bucket walk each."""

    def observe_all(self, amounts: np.ndarray) -> None:
        """``observe`` of each amount, as one bucket increment per bucket reached and one to the sum.
        Reads prometheus_client's own fields (pinned; tests/scorer compares it with ``observe``)."""
        self._raise_if_not_observable()
        if not len(amounts):
            return
        # observe() takes the first bound >= amount; so does searchsorted's left side.
        per_bucket = np.bincount(np.searchsorted(self._upper_bounds, amounts, side="left"),
                                 minlength=len(self._upper_bounds))
        for bucket, count in zip(self._buckets, per_bucket.tolist()):
            if count:
                bucket.inc(count)
        self._sum.inc(float(amounts.sum()))


_BATCH = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

EVENTS = Counter("scorer_events_total", "Enriched events folded (rate() gives events/s)", ["mode"])
DUPLICATES = Counter("scorer_duplicate_events_total", "Redelivered events dropped by event_id")
BAD_RECORDS = Counter("scorer_bad_records_total", "Records that are not enriched events (logged with shard/sequence)")
PREDICTIONS = Counter("scorer_predictions_total", "Predictions written")
WRITE_FAILURES = Counter("scorer_write_failures_total", "Prediction writes that failed (batch retried)")
BATCH_SECONDS = Histogram("scorer_batch_seconds", "Time from a micro-batch's read to its predictions being durable (buffering included)", buckets=_BATCH)
# The time to act up to the prediction: from the collector's receipt of the click to its scoring (the
# collector's linger, the enricher's and the scorer's read intervals, any lag). Clocks of two hosts.
EVENT_AGE_SECONDS = BatchHistogram("scorer_event_age_seconds", "Age of a live event when scored: scored_at minus its "
                                   "collector_tstamp", buckets=TIME_TO_ACT_BUCKETS)
SCORING_SECONDS = Histogram("scorer_scoring_seconds", "One onnxruntime run of the worker (all rows of a batch)",
                            buckets=_FAST)
REQUEST_SECONDS = Histogram("scorer_request_seconds", "HTTP handling time", ["route"], buckets=_FAST)
SESSIONS_LIVE = Gauge("scorer_sessions_live", "Sessions held in memory")
EVICTIONS = Counter("scorer_session_evictions_total", "Sessions dropped from memory", ["reason"])
LAG_MS = Gauge("scorer_lag_ms", "MillisBehindLatest of the slowest owned shard")
CHECKPOINT_AGE = Gauge("scorer_checkpoint_age_seconds",
                       "How long the oldest events read have waited for a checkpoint (grows during a quiet replay)")
# /ping says 503 once the worker thread has ended, but the lag and checkpoint gauges then read an idle
# consumer's zeros: without this an orchestrator that ignores /ping shows a dead worker as healthy.
WORKER_RUNNING = Gauge("scorer_worker_running", "1 while this process's worker thread runs, 0 once it has ended "
                       "(restart the process); NaN in an API-only process, so `== 0` never fires for it")
WORKER_RUNNING.set(float("nan"))
WORKER_RESTARTS = Counter("scorer_worker_restarts_total",
                          "Worker restarts after an unexpected batch error (in-memory state dropped, shards re-read)")
SHARDS_OWNED = Gauge("scorer_shards_owned", "Shards this worker holds leases for")
MODEL_INFO = Gauge("scorer_model_info", "Loaded models (value 1)", ["name", "version", "role"])
# A model served for days means nightly training keeps failing or its gates keep refusing: alert on it.
MODEL_CREATED = Gauge("scorer_model_created_timestamp_seconds", "When the served model was trained (model.json "
                      "created_at; 0 when it has none)", ["role"])
MODEL_REFUSED = Counter("scorer_model_refused_total", "Model versions refused (feature mismatch, bad file)")
MODEL_CHECK_FAILURES = Counter("scorer_model_check_failures_total",
                               "Checks of the registry's CURRENT that failed (registry unreachable, bundle missing)")
MODEL_CHECKED = Gauge("scorer_model_checked_timestamp_seconds",
                      "Unix time of the last check of the registry's CURRENT that worked")
SHADOW_DISAGREEMENTS = Counter("scorer_shadow_disagreements_total", "Rows where the shadow decided otherwise")
SHADOW_ROWS = Counter("scorer_shadow_rows_total", "Rows the shadow model scored")
# The served scores against those the model was chosen on (scorer/drift.py); NaN until measurable.
SCORE_PSI = Gauge("scorer_score_psi", "Population stability index of the live P(buy) of the last drift_window_s "
                  "against model.json's score_reference (0.1-0.25 some drift, above 0.25 much); NaN under 1,000 "
                  "scores or without a reference")
SCORES_IN_WINDOW = Gauge("scorer_score_window_rows", "Live scores in the drift window")
BUY_RATE = Gauge("scorer_buy_rate", "Share of the live scores of the drift window decided buy")
EXPECTED_BUY_RATE = Gauge("scorer_expected_buy_rate", "Share of the evaluation rows decided buy in training "
                          "(model.json score_reference.buy_rate)")
for _gauge in (SCORE_PSI, BUY_RATE, EXPECTED_BUY_RATE):
    _gauge.set(float("nan"))


class _FeaturePsi:
    """scorer_feature_psi{feature}: all features computed at once when scraped, by ``read`` (set by
    scorer/drift.py), rather than a labelled gauge's function per feature each summing the window."""

    def __init__(self):
        self.read = dict

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily("scorer_feature_psi", "Population stability index of each input of the live "
                                   "scores (a uniform sample of up to 500 rows a minute over drift_window_s) against "
                                   "model.json's feature_reference: which input moved when scorer_score_psi "
                                   "rises; NaN under 1,000 sampled rows", labels=["feature"])
        for feature, value in self.read().items():
            family.add_metric([feature], value)
        yield family


FEATURE_PSI = _FeaturePsi()
REGISTRY.register(FEATURE_PSI)


def model_loaded(model, role: str, previous) -> None:
    MODEL_INFO.labels(model.name, model.version, role).set(1)      # the new series first: never none
    if previous is not None and (previous.name, previous.version) != (model.name, model.version):
        try:
            MODEL_INFO.remove(previous.name, previous.version, role)
        except KeyError:
            pass
    MODEL_CREATED.labels(role).set(_created_at(model.meta))


def _created_at(meta: dict) -> float:
    """model.json's created_at in epoch seconds; 0 when absent or odd."""
    try:
        return parse_ms(str(meta.get("created_at"))) / 1000
    except ValueError:
        return 0.0


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
