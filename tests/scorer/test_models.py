"""Model loading: validation against the fold, both ONNX output shapes, and the CURRENT watcher."""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from botocore.config import Config
from prometheus_client import REGISTRY

from common import aws
from common.features import FEATURE_NAMES, session_features
from common.onnx_runtime import onnxruntime as ort
from common.registry import Bundle
from scorer.api import ScorerApp
from scorer.model import Model, ModelRefused, Models, check_meta
from tests.faults import FaultProxy
from tests.scorer.conftest import MODEL
from tests.scorer.helpers import (
    linear_classifier_onnx,
    logistic_onnx,
    logistic_reference,
    model_meta,
    publish,
    session_events,
    stumps_onnx,
)

ROWS = session_features(session_events("m", seed=5, n=10, buyer=True))


@pytest.mark.parametrize("zipmap", [False, True], ids=["tensor", "zipmap"])
def test_both_probability_output_shapes_score_alike(zipmap):
    meta = model_meta("m", "v1", output="probability_map" if zipmap else "probability")
    model = Model.from_bundle(Bundle("m", "v1", logistic_onnx(zipmap=zipmap), meta))
    assert model.predict(np.asarray(ROWS, dtype=np.float32)) == pytest.approx(logistic_reference(ROWS), abs=1e-5)


@pytest.mark.parametrize("change, words", [
    ({"feature_version": "0"}, ["feature_version '0'"]),
    ({"features": [{"name": n} for n in FEATURE_NAMES[:-1]]}, ["missing", FEATURE_NAMES[-1]]),
    ({"features": [{"name": n} for n in (FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:])]},
     ["order", "position 0", FEATURE_NAMES[1]]),
    ({"features": [{"name": n} for n in (*FEATURE_NAMES, "shoe_size")]}, ["unexpected", "shoe_size"]),
])
def test_a_model_for_other_features_is_refused_with_the_difference_named(change, words):
    with pytest.raises(ModelRefused) as refused:
        check_meta(model_meta("m", "v", **change))
    for word in words:
        assert word in str(refused.value)


def test_a_model_file_that_does_not_match_its_metadata_is_refused():
    with pytest.raises(ModelRefused, match="takes 5 columns"):
        Model.from_bundle(Bundle("m", "v", logistic_onnx(width=5), model_meta("m", "v")))
    with pytest.raises(ModelRefused, match="no output 'proba'"):
        Model.from_bundle(Bundle("m", "v", logistic_onnx(), model_meta("m", "v", output="proba")))
    with pytest.raises(ModelRefused, match="does not load"):
        Model.from_bundle(Bundle("m", "v", b"not onnx", model_meta("m", "v")))


@pytest.mark.parametrize("change, words", [
    ({"onnx": {"input": "features", "probability_output": "probability", "positive_index": 2}}, "scoring a row failed"),
    ({"onnx": {"input": "features", "probability_output": "probability", "positive_index": "1"}}, "not a column"),
    ({"threshold": float("nan")}, "threshold nan is not a probability"),
    ({"threshold": 1.5}, "threshold 1.5"),
    ({"threshold": "0.5"}, "threshold '0.5'"),
])
def test_a_bundle_that_would_fail_every_batch_is_refused_at_load(change, words):
    """Refused at load, the old model keeps serving; accepted, each batch would fail or each
    decision be "defer" and each table write be refused (DynamoDB takes no NaN)."""
    with pytest.raises(ModelRefused, match=words):
        Model.from_bundle(Bundle("m", "v", logistic_onnx(), model_meta("m", "v", **change)))
    with pytest.raises(ModelRefused, match="not an object"):
        check_meta([model_meta("m", "v")])


@pytest.mark.parametrize("change, words", [
    ({"features": 5}, "features is not a list but int"),
    ({"features": {"name": FEATURE_NAMES[0]}}, "features is not a list but dict"),
    ({"onnx": "features"}, "onnx is not an object but str"),
    ({"onnx": {"input": ["features"], "probability_output": "probability"}}, r"onnx.input \['features'\] is not a name"),
    ({"onnx": {"input": "features", "probability_output": 1}}, "onnx.probability_output 1 is not a name"),
])
def test_a_model_json_of_another_shape_is_refused_naming_the_key(change, words):
    """A hand's edit the trainer never writes: a TypeError instead escaped the watcher's refusal and fallback."""
    with pytest.raises(ModelRefused, match=words):
        Model.from_bundle(Bundle("m", "v", logistic_onnx(), model_meta("m", "v", **change)))


@pytest.mark.parametrize("change", [{"features": 5}, {"onnx": "features"}], ids=["features", "onnx"])
def test_a_scorer_starting_while_currents_model_json_is_misshapen_serves_the_current_before_it(
        published, s3, caplog, change):
    """It served nothing and downloaded the bundle at every poll; a reload of it answered 500, not 409."""
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(), model_meta(MODEL, "v2", **change))
    models = Models(s3, published.bucket, MODEL)
    with caplog.at_level(logging.ERROR, logger="scorer.model"):
        models.refresh()
        models.refresh()
    assert models.champion.version == "v1" and models.current_seen == "v2"
    refusals = [r.getMessage() for r in caplog.records if "refused model" in r.getMessage()]
    assert len(refusals) == 1 and f"{next(iter(change))} is not" in refusals[0]
    with pytest.raises(ModelRefused):           # what POST /models/reload answers 409 to
        models.load("v2")
    assert models.champion.version == "v1"


def test_watcher_swaps_in_current_and_keeps_serving_when_the_new_one_is_refused(published, s3, caplog):
    models = Models(s3, published.bucket, MODEL)
    models.refresh()
    assert models.champion.version == "v1"
    reordered = model_meta(MODEL, "v2", features=[{"name": n} for n in reversed(FEATURE_NAMES)])
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(), reordered)
    with caplog.at_level(logging.ERROR, logger="scorer.model"):
        models.refresh()
        models.refresh()            # refused once, not reloaded and re-logged on every poll
    assert models.champion.version == "v1"
    refusals = [r.getMessage() for r in caplog.records if "refused model" in r.getMessage()]
    assert len(refusals) == 1 and "v2" in refusals[0] and "order" in refusals[0] and "keeping v1" in refusals[0]
    publish(s3, published.bucket, MODEL, "v3", logistic_onnx(bias=-1.0))
    models.refresh()
    assert models.champion.version == "v3"


def test_a_scorer_starting_while_current_does_not_fit_serves_the_current_before_it(published, s3, caplog):
    # It started with no model at all (and its worker never read the stream), though v1 still fitted.
    publish(s3, published.bucket, MODEL, "v1b", logistic_onnx(bias=-1.0))
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(), model_meta(MODEL, "v2", feature_version="0"))
    publish(s3, published.bucket, MODEL, "v3", logistic_onnx(), model_meta(MODEL, "v3", feature_version="0"))
    models = Models(s3, published.bucket, MODEL)
    with caplog.at_level(logging.WARNING, logger="scorer.model"):
        models.refresh()
        models.refresh()
    assert models.champion.version == "v1b"
    fallbacks = [r.getMessage() for r in caplog.records if "does not fit this scorer" in r.getMessage()]
    assert len(fallbacks) == 1 and "CURRENT v3" in fallbacks[0] and "serving v1b" in fallbacks[0]
    publish(s3, published.bucket, MODEL, "v4", logistic_onnx(bias=0.5))
    models.refresh()
    assert models.champion.version == "v4"


def test_a_scrape_during_a_model_swap_always_sees_a_champion(monkeypatch):
    # The old series was removed before the new one was set: a scrape between them (the API thread)
    # saw no champion, and an absent() alert or a join on model_version misfired.
    from scorer import metrics as scorer_metrics

    def champions() -> list:
        return [s for metric in REGISTRY.collect() for s in metric.samples
                if s.name == "scorer_model_info" and s.labels["role"] == "champion" and s.labels["name"] == "swap"]

    seen_at_removal = []
    remove = scorer_metrics.MODEL_INFO.remove
    monkeypatch.setattr(scorer_metrics.MODEL_INFO, "remove",
                        lambda *labels: (seen_at_removal.append(len(champions())), remove(*labels)))
    old, new = (SimpleNamespace(name="swap", version=v, meta={}) for v in ("v1", "v2"))
    scorer_metrics.model_loaded(old, "champion", None)
    scorer_metrics.model_loaded(new, "champion", old)
    assert seen_at_removal == [2] and [s.labels["version"] for s in champions()] == ["v2"]
    scorer_metrics.model_loaded(new, "champion", new)            # the same version again: still there
    assert [s.labels["version"] for s in champions()] == ["v2"]


def test_a_reload_while_the_scorer_falls_back_is_not_replaced_by_the_fallback(published, s3, monkeypatch):
    """The watcher saw no model and fell back, reading HISTORY; an operator's reload of v1b landed
    during that read, was answered 200, then the fallback loaded v1b over it, for good."""
    import scorer.model as scorer_model

    publish(s3, published.bucket, MODEL, "v1b", logistic_onnx(bias=-1.0))
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(), model_meta(MODEL, "v2", feature_version="0"))
    models = Models(s3, published.bucket, MODEL)
    reading, reloaded = threading.Event(), threading.Event()
    history = scorer_model.registry.history

    def slow_history(*args):
        reading.set()
        reloaded.wait(1)                    # the GET of HISTORY in flight while the operator reloads
        return history(*args)

    monkeypatch.setattr(scorer_model.registry, "history", slow_history)
    operator = threading.Thread(target=lambda: (reading.wait(5), models.load("v1"), reloaded.set()))
    operator.start()
    models.refresh()                        # v2 does not fit: falls back to v1b, the CURRENT before it
    operator.join(5)
    assert reloaded.is_set() and models.champion.version == "v1"      # the operator's, applied last
    models.refresh()
    assert models.champion.version == "v1"


def test_a_scorer_starting_while_currents_bundle_is_missing_serves_the_current_before_it(published, s3, caplog):
    """A prune racing a promote can delete the bundle CURRENT names: a running scorer keeps its model,
    but one starting then served nothing, its health check passing, until CURRENT moved."""
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(bias=-1.0))
    saved = s3.get_object(Bucket=published.bucket, Key=f"models/{MODEL}/v2/model.onnx")["Body"].read()
    s3.delete_object(Bucket=published.bucket, Key=f"models/{MODEL}/v2/model.onnx")
    models = Models(s3, published.bucket, MODEL)
    with caplog.at_level(logging.WARNING, logger="scorer.model"):
        models.refresh()
    assert models.champion.version == "v1"
    assert any("CURRENT v2 is not in the registry; serving v1" in r.getMessage() for r in caplog.records)
    s3.put_object(Bucket=published.bucket, Key=f"models/{MODEL}/v2/model.onnx", Body=saved)
    models.refresh()                                    # looked for again at every poll
    assert models.champion.version == "v2"


def test_a_scorer_for_which_no_current_fits_fails_its_health_check(published, s3):
    # Scorers for new features deployed before their model was promoted served nothing, yet /ping
    # (the container health check) said 200: the rolling deploy replaced every working scorer.
    other = "other-features"
    for version in ("v1", "v2"):
        publish(s3, published.bucket, other, version, logistic_onnx(), model_meta(other, version, feature_version="0"))
    models = Models(s3, published.bucket, other)
    app = ScorerApp(models, worker=SimpleNamespace(running=True))
    models.refresh()
    answer = app.ping({}, b"")
    assert models.champion is None and answer.status == 503 and b"CURRENT v2" in answer.body
    publish(s3, published.bucket, other, "v3", logistic_onnx())
    models.refresh()
    assert models.champion.version == "v3" and app.ping({}, b"").status == 200


def test_a_fallback_cut_short_by_the_registry_is_tried_again_at_the_next_poll(published, s3, monkeypatch):
    # CURRENT was marked seen first: one failed read of HISTORY left the scorer without a model for good.
    from botocore.exceptions import EndpointConnectionError

    from common import registry
    publish(s3, published.bucket, MODEL, "v2", logistic_onnx(), model_meta(MODEL, "v2", feature_version="0"))
    reads = []

    def flaky_history(*args, **kwargs):
        reads.append(1)
        if len(reads) == 1:
            raise EndpointConnectionError(endpoint_url="http://registry")
        return real_history(*args, **kwargs)
    real_history = registry.history
    monkeypatch.setattr(registry, "history", flaky_history)
    models = Models(s3, published.bucket, MODEL)
    models.refresh()
    assert models.champion is None
    models.refresh()
    assert models.champion.version == "v1" and len(reads) == 2


def test_a_shadow_version_that_does_not_fit_is_refused_once_not_on_every_poll(published, s3, caplog):
    publish(s3, published.bucket, MODEL, "odd", logistic_onnx(), model_meta(MODEL, "odd", feature_version="0"),
            current=False)
    models = Models(s3, published.bucket, MODEL, shadow_version="odd")
    with caplog.at_level(logging.ERROR, logger="scorer.model"):
        for _ in range(4):
            models.refresh()
    assert models.champion.version == "v1" and models.shadow is None
    assert sum("shadow model" in r.getMessage() for r in caplog.records) == 1


def test_a_shadow_version_not_in_the_registry_is_said_once_and_loaded_once_published(published, s3, caplog):
    """A pruned (or not yet published) shadow version logged an ERROR at every poll, for ever."""
    models = Models(s3, published.bucket, MODEL, shadow_version="later")
    with caplog.at_level(logging.ERROR, logger="scorer.model"):
        for _ in range(4):
            models.refresh()
    assert models.shadow is None
    assert sum("shadow model" in r.getMessage() for r in caplog.records) == 1
    publish(s3, published.bucket, MODEL, "later", logistic_onnx(), current=False)
    models.refresh()
    assert models.shadow.version == "later" and models.champion.version == "v1"


def test_an_unreachable_registry_shows_in_the_metrics_not_only_in_the_log(published, caplog):
    # The old model served on with nothing but a traceback per poll to say the registry was away; then
    # with a WARNING per poll. Now one line a minute, with the count.
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy, caplog.at_level(logging.WARNING, logger="scorer.model"):
        s3 = aws.session().client("s3", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
        models = Models(s3, published.bucket, MODEL)
        models.refresh()
        checked = REGISTRY.get_sample_value("scorer_model_checked_timestamp_seconds")
        failures = REGISTRY.get_sample_value("scorer_model_check_failures_total")
        assert models.champion.version == "v1" and checked == pytest.approx(time.time(), abs=5)
        proxy.down = True
        for _ in range(3):
            models.refresh()
    assert REGISTRY.get_sample_value("scorer_model_check_failures_total") == failures + 3
    assert [r.getMessage().partition(": An error")[0] for r in caplog.records] == [
        f"model {MODEL}: checking CURRENT failed 1 times since the last such line, trying again at every check"]
    assert REGISTRY.get_sample_value("scorer_model_checked_timestamp_seconds") == checked


def test_a_version_pinned_by_reload_is_kept_until_current_moves(published, s3):
    publish(s3, published.bucket, MODEL, "pinned", logistic_onnx(bias=-1.0), current=False)
    models = Models(s3, published.bucket, MODEL)
    models.refresh()
    models.load("pinned")
    models.refresh()
    assert models.champion.version == "pinned"
    publish(s3, published.bucket, MODEL, "newer", logistic_onnx(bias=0.5))
    models.refresh()
    assert models.champion.version == "newer"


def test_shadow_model_is_loaded_beside_the_champion(published, s3):
    publish(s3, published.bucket, MODEL, "challenger", logistic_onnx(bias=-1.0), current=False)
    models = Models(s3, published.bucket, MODEL, shadow_version="challenger")
    models.refresh()
    assert (models.champion.version, models.shadow.version) == ("v1", "challenger")


def test_per_tree_nodes_are_fused_into_one_and_score_exactly_like_the_export():
    stumps = [(FEATURE_NAMES.index("cart_adds"), 0.5, -1.0, 1.5), (FEATURE_NAMES.index("events"), 4.5, -0.5, 0.25),
              (FEATURE_NAMES.index("checkout_step_max"), 1.5, 0.0, 2.0)]
    exported = stumps_onnx(stumps, [0.5, 1.0, 2.0])
    model = Model.from_bundle(Bundle("m", "v", exported, model_meta("m", "v")))
    assert model.fused_trees == 3
    rows = np.asarray(ROWS, dtype=np.float32)
    original = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    expected = original.run(["probability"], {"features": rows})[0][:, 1]
    assert model.predict(rows) == pytest.approx(expected, abs=1e-7)
    by_hand = [1 / (1 + np.exp(-(0.5 * (-1.0 if r[stumps[0][0]] <= 0.5 else 1.5)
                                 + (-0.5 if r[stumps[1][0]] <= 4.5 else 0.25)
                                 + 2.0 * (0.0 if r[stumps[2][0]] <= 1.5 else 2.0)))) for r in ROWS]
    assert model.predict(rows) == pytest.approx(by_hand, abs=1e-6)


def test_models_without_a_tree_sum_are_served_as_exported():
    assert Model.from_bundle(Bundle("m", "v", logistic_onnx(), model_meta("m", "v"))).fused_trees == 0


@pytest.mark.parametrize("zipmap", [False, True], ids=["tensor", "zipmap"])
def test_a_single_row_scores_exactly_like_the_batch_path(zipmap):
    meta = model_meta("m", "v1", output="probability_map" if zipmap else "probability")
    model = Model.from_bundle(Bundle("m", "v1", logistic_onnx(zipmap=zipmap), meta))
    assert (model._single is None) == zipmap       # a ZipMap output cannot be bound: the plain path serves it
    rows = [*ROWS, [1e39] * len(FEATURE_NAMES), [float("nan")] * len(FEATURE_NAMES)]   # beyond float32; missing
    with np.errstate(over="ignore"):
        matrices = [np.asarray([row], dtype=np.float32) for row in rows]
    batch = model.predict(np.concatenate(matrices))
    one_by_one = [model.score_one(row) for row in rows]
    assert one_by_one == pytest.approx(list(batch), abs=0, nan_ok=True)
    assert [float(model.predict(matrix)[0]) for matrix in matrices] == pytest.approx(one_by_one, abs=0, nan_ok=True)


def test_a_row_scores_the_same_alone_as_in_a_batch_with_sparks_logistic_regression():
    # onnxruntime's LinearClassifier sums a lone row otherwise: one event's p_buy differed in its 6th decimal
    # between a poll of one record and a replay reading many (1 event in 55 of synthetic sessions).
    model = Model.from_bundle(Bundle("m", "v1", linear_classifier_onnx(), model_meta("m", "v1")))
    rows = np.random.default_rng(4).uniform(0, 3, size=(300, len(FEATURE_NAMES))).astype(np.float32)
    batch = model.predict(rows)
    assert [model.score_one(row) for row in rows.tolist()] == list(batch)
    assert [float(model.predict(rows[i:i + 1])[0]) for i in range(len(rows))] == list(batch)
    assert list(model._run(rows[:1])) == list(batch[:1])
    trees = stumps_onnx([(0, 2.5, -0.5, 0.5), (3, 1.5, 0.2, -0.1)], [1.0, 0.5])
    assert Model.from_bundle(Bundle("m", "v2", trees, model_meta("m", "v2"))).min_rows == 1     # alike alone: unpadded


def test_threads_scoring_single_rows_at_once_each_get_their_own_answer():
    model = Model.from_bundle(Bundle("m", "v1", logistic_onnx(), model_meta("m", "v1")))
    expected = [model.score_one(row) for row in ROWS]

    def score_many(_):
        return [[model.score_one(row) for row in ROWS] for _ in range(200)]
    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(score_many, range(4)):
            assert all(result == expected for result in results)


def test_the_served_models_training_time_is_a_metric_so_a_stale_model_can_be_alerted_on(published, s3):
    # Nothing showed that nightly training had kept failing its gates: the same model served for days.
    meta = model_meta(MODEL, "v9", created_at="2026-11-30T02:00:00Z")
    publish(s3, published.bucket, MODEL, "v9", logistic_onnx(), meta)
    Models(s3, published.bucket, MODEL).refresh()
    created = REGISTRY.get_sample_value("scorer_model_created_timestamp_seconds", {"role": "champion"})
    assert created == dt.datetime(2026, 11, 30, 2, tzinfo=dt.UTC).timestamp()


def test_a_predictions_table_outage_answers_503_and_logs_once_not_once_per_lookup(published, s3, caplog):
    """A WARNING per lookup while the table was down: 1.6 GB of log a day at 100 lookups a second."""
    import asyncio

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.down = True
        dynamodb = aws.session().client("dynamodb", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
        app = ScorerApp(Models(s3, published.bucket, MODEL), dynamodb=dynamodb, table="clickstream-predictions")
        with caplog.at_level(logging.WARNING, logger="scorer.api"):
            answers = [asyncio.run(app.session_prediction(f"s{i}")) for i in range(20)]
    assert {answer.status for answer in answers} == {503}
    [line] = [r.getMessage() for r in caplog.records if r.name == "scorer.api"]
    assert line.startswith("predictions table reads failed 1 times since the last such line")
    assert app.table_failures.count == 19


def test_lookups_waiting_on_a_slow_table_hold_up_no_other_route_and_are_capped(published, s3, monkeypatch):
    """Lookups read the table on asyncio's default threads (6 on 2 cores): with the table answering in
    2 s, 60 lookups held a features request or a reload 20 s behind them, and they queued without
    bound. Past the cap a lookup is answered 503 at once."""
    import asyncio

    from scorer import api as api_module

    monkeypatch.setattr(api_module, "LOOKUPS_WAITING_MAX", 12, raising=False)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        dynamodb = aws.session().client("dynamodb", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
        app = ScorerApp(Models(s3, published.bucket, MODEL), dynamodb=dynamodb, table=published.predictions_table)
        proxy.delay_s = 3.0

        async def run():
            lookups = [asyncio.create_task(app.session_prediction(f"s{i}")) for i in range(12)]
            await asyncio.sleep(0.2)                           # all twelve are waiting for the table
            beyond = await app.session_prediction("one-more")
            features = await asyncio.wait_for(asyncio.to_thread(app.session_features, "s0"), 30)
            still_waiting = sum(not lookup.done() for lookup in lookups)
            return beyond, features, still_waiting, await asyncio.gather(*lookups)

        beyond, features, still_waiting, answered = asyncio.run(run())
    assert beyond.status == 503 and b"too many lookups waiting" in beyond.body
    assert features.status == 404 and still_waiting == 12        # answered while every lookup still waited
    assert {answer.status for answer in answered} == {404} and app.lookups_waiting == 0
