"""End to end over the emulator: the official Snowplow tracker -> collector -> enricher -> scorer,
with a hot model reload in the middle of the stream."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
import warnings

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from common.features import CLOCK_FEATURES, FEATURE_NAMES
from common.registry import Bundle
from scorer.model import Model
from tests.conftest import ROOT, settings_env
from tests.scorer.conftest import MODEL
from tests.scorer.helpers import free_port, logistic_onnx, logistic_reference, publish, wait_for
from tests.scorer.test_restart import predictions

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")


def _component(module: str, settings, log, **env) -> subprocess.Popen:
    variables = {**os.environ, **settings_env(settings), **{f"CLICKSTREAM_{k.upper()}": str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=variables, stdout=log,
                            stderr=subprocess.STDOUT)


def track(collector_port: int, session_ids: list[str], part: int) -> int:
    """Send one part of each session with the official Python tracker; returns events sent."""
    from snowplow_tracker import Emitter, SelfDescribingJson, Subject, Tracker
    from snowplow_tracker.events import PageView, SelfDescribing

    def page(kind: str):
        return [SelfDescribingJson("iglu:com.clickshop/page_type/jsonschema/1-0-0", {"type": kind})]

    def shop(name: str, data: dict, kind: str):
        return SelfDescribing(SelfDescribingJson(f"iglu:com.clickshop/{name}/jsonschema/1-0-0", data), context=page(kind))

    sent = 0
    for index, sid in enumerate(session_ids):
        failures = []
        emitter = Emitter("127.0.0.1", protocol="http", port=collector_port, method="post", batch_size=3,
                          on_failure=lambda count, items, failures=failures: failures.append(count))
        subject = (Subject().set_domain_user_id(str(uuid.uuid4())).set_domain_session_id(sid)
                   .set_domain_session_index(1).set_useragent(CHROME).set_viewport(1200, 800))
        tracker = Tracker("shop", emitter, subject=subject, app_id="clickshop")
        sku = f"sku-{index}"
        if part == 1:
            events = [PageView(page_url="https://clickshop.test/", context=page("home")),
                      PageView(page_url=f"https://clickshop.test/p/{sku}", context=page("product")),
                      shop("product_view", {"sku": sku, "category": "shoes", "price": 59.9}, "product")]
        else:
            events = [shop("add_to_cart", {"sku": sku, "category": "shoes", "price": 59.9, "quantity": 2}, "product"),
                      shop("checkout_step", {"step": 1 + index % 4}, "checkout"),
                      PageView(page_url="https://clickshop.test/checkout", context=page("checkout"))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for event in events:
                tracker.track(event)
            tracker.flush()
        assert not failures
        sent += len(events)
    return sent


@pytest.mark.spark
def test_tracker_to_collector_to_enricher_to_scorer_with_a_hot_reload(trained, aws_settings, s3, start_scorer,
                                                                       tmp_path):
    settings = aws_settings
    result, _ = trained
    publish(s3, settings.bucket, MODEL, "trained-v1", result.onnx_bytes, dict(result.meta, version="trained-v1"))
    model_v1 = Model.from_bundle(Bundle(MODEL, "trained-v1", result.onnx_bytes, result.meta))
    collector_port = free_port()
    log = open(tmp_path / "pipeline.log", "ab")  # noqa: SIM115 - shared by the children until the end
    processes = [
        _component("collector", settings, log, port=collector_port, spool_dir=tmp_path / "spool", linger_ms=50),
        _component("enrich", settings, log, pseudonymisation_key="e2e-pseudonymisation-key", lease_ms=3000),
    ]
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{collector_port}/health"), 60, what="collector")
        scorer = start_scorer(settings).wait_ready()
        sessions = [str(uuid.uuid4()) for _ in range(3)]

        sent = track(collector_port, sessions, part=1)
        first = wait_for(lambda: at_least(settings, sent), 90, what="predictions of the first part")
        assert len(first) == sent
        assert {p["session_id"] for p in first} == set(sessions)
        assert {p["model_version"] for p in first} == {"trained-v1"}
        assert sorted(p["events_in_session"] for p in first if p["session_id"] == sessions[0]) == [1, 2, 3]
        for sid in sessions:        # the make-train model's own answer on the live features
            live = requests.get(f"{scorer.url}/sessions/{sid}/features", timeout=5).json()["features"]
            last = max((p for p in first if p["session_id"] == sid), key=lambda p: p["events_in_session"])
            row = np.asarray([[live[n] for n in FEATURE_NAMES]], dtype=np.float32)
            assert last["p_buy"] == pytest.approx(float(model_v1.predict(row)[0]), abs=1e-5)
        drift = unlabelled_gauges(scorer.url)           # every live score is set against the model's reference
        assert drift["scorer_score_window_rows"] == sent
        assert drift["scorer_expected_buy_rate"] == result.meta["score_reference"]["buy_rate"]
        assert drift["scorer_buy_rate"] == sum(p["decision"] == "buy" for p in first) / sent
        assert set(feature_psi(scorer.url)) == set(FEATURE_NAMES) - CLOCK_FEATURES    # NaN under 1,000 rows

        publish(s3, settings.bucket, MODEL, "v2", logistic_onnx(bias=-1.0))      # moves CURRENT
        wait_for(lambda: requests.get(scorer.url + "/ping", timeout=2).json()["model_version"] == "v2", 30,
                 what="hot reload to v2")
        sent += track(collector_port, sessions, part=2)
        everything = wait_for(lambda: at_least(settings, sent), 90, what="predictions of the second part")
        second = everything[len(first):]
        assert len(everything) == sent
        assert {p["model_version"] for p in second} == {"v2"}
        for sid in sessions:
            live = requests.get(f"{scorer.url}/sessions/{sid}/features", timeout=5).json()
            assert live["events_in_session"] == 6                    # the state survived the swap
            assert live["features"]["cart_adds"] == 1 and live["features"]["cart_items"] == 2
            latest = requests.get(f"{scorer.url}/sessions/{sid}/prediction", timeout=5).json()
            assert latest["model_version"] == "v2" and latest["events_in_session"] == 6
            expected = logistic_reference([[live["features"][n] for n in FEATURE_NAMES]], bias=-1.0)[0]
            assert latest["p_buy"] == pytest.approx(float(expected), abs=1e-5)
        drift = unlabelled_gauges(scorer.url)           # v2 has no score_reference: nothing to set its scores against
        assert drift["scorer_score_window_rows"] == 0 and math.isnan(drift["scorer_expected_buy_rate"])
        assert feature_psi(scorer.url) == {}
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def at_least(settings, count: int) -> list[dict] | None:
    got = predictions(settings)
    return got if len(got) >= count else None


def unlabelled_gauges(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def feature_psi(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    return {sample.labels["feature"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "scorer_feature_psi" for sample in family.samples}


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
