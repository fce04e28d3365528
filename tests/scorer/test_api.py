"""The HTTP API over real HTTP: a `python -m scorer` process against the emulator."""
from __future__ import annotations

import contextlib
import json
import subprocess
import time

import pytest
import requests

from common import aws, registry
from common.features import FEATURE_NAMES, session_features
from common.streams import KinesisStream
from infra.provision import ProvisionSettings, provision
from tests.conftest import unique_settings, wait_for
from tests.scorer.conftest import MODEL, ScorerProcess
from tests.scorer.helpers import logistic_onnx, logistic_reference, model_meta, publish, session_events

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def api(aws_endpoint, tmp_path_factory):
    settings = unique_settings(ProvisionSettings, enriched_shards=1)
    provision(settings)
    s3 = aws.client("s3")
    publish(s3, settings.bucket, MODEL, "v1", logistic_onnx())
    process = ScorerProcess(settings, tmp_path_factory.mktemp("api") / "scorer.log", reload_token=TOKEN,
                            model_poll_s=3600).wait_ready()
    process.settings, process.s3 = settings, s3
    yield process
    process.stop()


ROW = session_features(session_events("api", seed=7, n=9, buyer=True))[-1]
EXPECTED = float(logistic_reference([ROW])[0])


def post(api, path, body=None, *, raw=None, content_type="application/json", headers=None):
    data = raw if raw is not None else ("" if body is None else json.dumps(body))
    return requests.post(api.url + path, data=data, headers={"Content-Type": content_type, **(headers or {})},
                         timeout=10)


def test_ping_and_health(api):
    assert requests.get(api.url + "/ping", timeout=5).json()["model_version"] == "v1"
    assert requests.get(api.url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(api.url + "/v2/health/ready", timeout=5).json() == {"ready": True}


@pytest.mark.parametrize("body", [
    {"dataframe_split": {"columns": list(FEATURE_NAMES), "data": [ROW]}},
    {"dataframe_split": {"columns": list(reversed(FEATURE_NAMES)), "data": [list(reversed(ROW))]}},
    {"dataframe_records": [dict(zip(FEATURE_NAMES, ROW))]},
    {"instances": [ROW]},
    {"instances": [dict(zip(FEATURE_NAMES, ROW))]},
    {"inputs": {name: [value] for name, value in zip(FEATURE_NAMES, ROW)}},
    {"inputs": ROW},
], ids=["split", "split-reordered", "records", "instances", "instances-records", "inputs-columns", "inputs-row"])
def test_invocations_json_conventions_agree(api, body):
    response = post(api, "/invocations", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["predictions"] == [pytest.approx(EXPECTED, abs=1e-5)]
    assert answer["decisions"] == ["buy" if EXPECTED >= 0.5 else "defer"]
    assert answer["model_version"] == "v1"


def test_invocations_csv_with_and_without_header_and_many_rows(api):
    rows = session_features(session_events("csv", seed=8, n=6, buyer=False))
    plain = "\n".join(",".join(repr(v) for v in row) for row in rows)
    header = ",".join(FEATURE_NAMES) + "\n" + plain
    for text in (plain, header):
        response = post(api, "/invocations", raw=text, content_type="text/csv")
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == pytest.approx(list(logistic_reference(rows)), abs=1e-5)


@pytest.mark.parametrize("body, status, words", [
    ({"dataframe_records": [{k: v for k, v in zip(FEATURE_NAMES, ROW) if k != "cart_adds"}]}, 400,
     ["missing", "cart_adds"]),
    ({"dataframe_records": [{**dict(zip(FEATURE_NAMES, ROW)), "cart_adds": "two"}]}, 400,
     ["cart_adds", "number", "str"]),
    ({"dataframe_records": [{**dict(zip(FEATURE_NAMES, ROW)), "shoe_size": 42}]}, 400, ["unknown", "shoe_size"]),
    ({"instances": [ROW[:-1]]}, 400, [f"expected {len(FEATURE_NAMES)} values"]),
    ({"instances": [[*ROW[:-1], None]]}, 400, ["session_index", "null"]),
    ({"rows": [ROW]}, 400, ["dataframe_split"]),
    ([ROW], 400, ["JSON object"]),
], ids=["missing", "wrong-type", "unknown", "short-row", "null", "no-key", "not-object"])
def test_bad_invocations_are_4xx_naming_the_problem(api, body, status, words):
    response = post(api, "/invocations", body)
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["error"]


def test_bad_bodies_and_types_are_4xx(api):
    assert post(api, "/invocations", raw="{oops").status_code == 400
    assert "not a number" in post(api, "/invocations", raw="1,2,x", content_type="text/csv").json()["error"]
    nan_row = ",".join(["nan", *map(str, ROW[1:])])
    assert "finite" in post(api, "/invocations", raw=nan_row, content_type="text/csv").json()["error"]


@pytest.mark.parametrize("value", [1e39, -3.5e38])
def test_a_value_beyond_float32_is_a_400_naming_the_feature_not_an_infinite_input(api, value):
    """Finite for JSON and CSV, yet inf once in the model's float32 input, where it scored without an error."""
    row = [*ROW[:-2], value, ROW[-1]]
    expected = f"row 0: feature {FEATURE_NAMES[-2]!r} is beyond the float32 range"
    for response in (post(api, "/invocations", {"instances": [row]}),
                     post(api, "/invocations", raw=",".join(map(str, row)), content_type="text/csv"),
                     post(api, f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "features", "shape": [1, len(row)],
                                                                   "datatype": "FP32", "data": row}]})):
        assert response.status_code == 400, response.text
        assert expected in response.json()["error"]
    assert post(api, "/invocations", raw="a", content_type="application/xml").status_code == 415
    assert requests.get(api.url + "/nowhere", timeout=5).status_code == 404
    assert requests.get(api.url + "/invocations", timeout=5).status_code == 405
    assert requests.post(api.url + "/sessions/abc/prediction", timeout=5).status_code == 405
    assert requests.delete(api.url + "/sessions/abc/features", timeout=5).status_code == 405
    assert requests.get(api.url + "/sessions/abc/nothing", timeout=5).status_code == 404


def test_a_body_over_4_mib_is_refused_unread_declared_or_chunked(api):
    big = b"[" + b"1," * (2 * 1024 * 1024) + b"1]"
    declared = requests.post(api.url + "/invocations", data=big, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert declared.status_code == 413 and "4,194,304 bytes" in declared.json()["error"]
    chunked = requests.post(api.url + "/nowhere", data=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                            timeout=30)
    assert chunked.status_code == 413
    assert requests.get(api.url + "/ping", timeout=5).status_code == 200


def test_open_inference_protocol_v2(api):
    meta = requests.get(f"{api.url}/v2/models/{MODEL}", timeout=5).json()
    assert meta["name"] == MODEL and meta["versions"] == ["v1"]
    assert meta["inputs"][0]["shape"] == [-1, len(FEATURE_NAMES)]
    assert requests.get(f"{api.url}/v2/models/{MODEL}/ready", timeout=5).json()["ready"] is True
    flat = {"id": "r1", "inputs": [{"name": "features", "shape": [2, len(ROW)], "datatype": "FP32",
                                     "data": ROW + ROW}]}
    answer = post(api, f"/v2/models/{MODEL}/infer", flat).json()
    assert answer["id"] == "r1" and answer["model_version"] == "v1"
    assert answer["outputs"][0]["name"] == "p_buy"
    assert answer["outputs"][0]["data"] == [pytest.approx(EXPECTED, abs=1e-5)] * 2
    per_feature = {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]}
                              for n, v in zip(FEATURE_NAMES, ROW)]}
    assert post(api, f"/v2/models/{MODEL}/infer", per_feature).json()["outputs"][0]["data"] == [
        pytest.approx(EXPECTED, abs=1e-5)]
    unknown = post(api, "/v2/models/nope/infer", flat)
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    assert requests.get(f"{api.url}/v2/models/nope", timeout=5).status_code == 404
    bad_shape = {"inputs": [{"name": "features", "shape": [3, len(ROW)], "datatype": "FP32", "data": ROW}]}
    assert "shape" in post(api, f"/v2/models/{MODEL}/infer", bad_shape).json()["error"]
    assert post(api, f"/v2/models/{MODEL}/infer", {"inputs": "x"}).status_code == 400
    nameless = {"inputs": [{"name": ["features"], "shape": [1, len(ROW)], "datatype": "FP32", "data": ROW}]}
    assert "string name" in post(api, f"/v2/models/{MODEL}/infer", nameless).json()["error"]


def test_v2_versioned_routes_answer_for_the_loaded_version_only(api):
    flat = {"inputs": [{"name": "features", "shape": [1, len(ROW)], "datatype": "FP32", "data": ROW}]}
    loaded = f"{api.url}/v2/models/{MODEL}/versions/v1"
    assert requests.get(loaded, timeout=5).json()["versions"] == ["v1"]
    assert requests.get(loaded + "/ready", timeout=5).json()["ready"] is True
    assert post(api, f"/v2/models/{MODEL}/versions/v1/infer", flat).json()["outputs"][0]["data"] == [
        pytest.approx(EXPECTED, abs=1e-5)]
    for response in (requests.get(f"{api.url}/v2/models/{MODEL}/versions/v0", timeout=5),
                     requests.get(f"{api.url}/v2/models/{MODEL}/versions/v0/ready", timeout=5),
                     post(api, f"/v2/models/{MODEL}/versions/v0/infer", flat)):
        assert response.status_code == 404
        assert response.json()["error"] == f"model {MODEL!r} version 'v0' is not loaded; this scorer serves version 'v1'"


def test_score_session_folds_events_like_the_training_rows(api):
    events = session_events("sess", seed=9, n=10, buyer=False)
    answer = post(api, "/score/session", events).json()
    row = session_features(events)[-1]
    assert answer["features"] == dict(zip(FEATURE_NAMES, row))
    assert answer["p_buy"] == pytest.approx(float(logistic_reference([row])[0]), abs=1e-5)
    assert answer["events_in_session"] == 10 and answer["session_id"] == "sess"
    assert post(api, "/score/session", {"events": events + events[:3]}).json()["events_in_session"] == 10
    broken = [dict(events[0], collector_tstamp="yesterday", derived_tstamp=None)]
    response = post(api, "/score/session", broken)
    assert response.status_code == 400 and "event 0" in response.json()["error"]
    assert post(api, "/score/session", []).status_code == 400
    assert "event_id must be" in post(api, "/score/session", [{"collector_tstamp": 1}]).json()["error"]
    odd = [dict(events[0], event_id=["a"]), dict(events[0], unstruct_event="text", event="unstruct"),
           dict(events[0], contexts={"schema": "iglu:com.clickshop/page_type/jsonschema/1-0-0"}),
           dict(events[0], derived_tstamp=1e300, collector_tstamp=1e300),
           dict(events[0], derived_tstamp=None, collector_tstamp=1e20), dict(events[0], domain_sessionid=["x"])]
    for event in odd:
        response = post(api, "/score/session", [event])
        assert response.status_code == 400 and "event 0" in response.json()["error"], response.text
    # Not text where the fold looks a name up: scored as if the field were absent (it was a 500).
    for field, value in (("dvce_type", ["Computer"]), ("refr_medium", {"a": 1}), ("dvce_type", 7)):
        response = post(api, "/score/session", [dict(events[0], **{field: value})])
        assert response.status_code == 200, response.text
        absent = post(api, "/score/session", [dict(events[0], **{field: None})]).json()["features"]
        assert response.json()["features"] == absent


def test_session_prediction_lookup_reads_the_table(api):
    assert requests.get(api.url + "/sessions/none-such/prediction", timeout=5).status_code == 404
    # An empty or oversized id is no outage (503 would page someone), and a '/' in an id is reachable.
    for odd in ("", "x" * 2049):
        assert requests.get(f"{api.url}/sessions/{odd}/prediction", timeout=5).status_code == 404
    dynamodb = aws.client("dynamodb")
    dynamodb.put_item(TableName=api.settings.predictions_table, Item={
        "session_id": {"S": "tab/2"}, "p_buy": {"N": "0.5"}, "decision": {"S": "buy"}})
    answer = requests.get(api.url + "/sessions/tab%2F2/prediction", timeout=5)
    assert answer.status_code == 200 and answer.json()["session_id"] == "tab/2"
    dynamodb.put_item(TableName=api.settings.predictions_table, Item={
        "session_id": {"S": "known"}, "p_buy": {"N": "0.25"}, "decision": {"S": "defer"},
        "events_in_session": {"N": "3"}, "model_version": {"S": "v1"}, "event_ms": {"N": "5"}})
    answer = requests.get(api.url + "/sessions/known/prediction", timeout=5).json()
    assert answer["p_buy"] == 0.25 and answer["events_in_session"] == 3 and answer["decision"] == "defer"


def test_a_prediction_past_its_expiry_is_not_served_though_dynamodb_still_holds_it(api):
    # DynamoDB deletes rows past their TTL only within about two days, and serves them until then.
    dynamodb = aws.client("dynamodb")
    now = int(time.time())
    for session, expires_at in (("expired", now - 1), ("live", now + 3600)):
        dynamodb.put_item(TableName=api.settings.predictions_table, Item={
            "session_id": {"S": session}, "p_buy": {"N": "0.5"}, "decision": {"S": "buy"},
            "expires_at": {"N": str(expires_at)}})
    assert requests.get(api.url + "/sessions/expired/prediction", timeout=5).status_code == 404
    live = requests.get(api.url + "/sessions/live/prediction", timeout=5)
    assert live.status_code == 200 and live.json()["expires_at"] == now + 3600


def test_reload_needs_the_token_and_refuses_mismatched_models(api):
    assert post(api, "/models/reload").status_code == 401
    assert post(api, "/models/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad_meta = model_meta(MODEL, "v-bad", feature_version="0")
    publish(api.s3, api.settings.bucket, MODEL, "v-bad", logistic_onnx(), bad_meta, current=False)
    refused = post(api, "/models/reload", {"version": "v-bad"}, headers=auth)
    assert refused.status_code == 409 and "feature_version" in refused.json()["error"]
    missing = post(api, "/models/reload", {"version": "v-missing"}, headers=auth)
    assert missing.status_code == 404 and "has no version v-missing" in missing.json()["error"]
    # A body that is not {"version": "<name>"} is refused, never read as "load CURRENT".
    for odd in ([], "", {"foo": 1}, {"version": "v1", "x": 1}, {"version": 5}, {"version": ""},
                {"version": "../v1"}, {}):
        response = post(api, "/models/reload", odd, headers=auth)
        assert response.status_code == 400 and "body must be empty" in response.json()["error"], odd
    assert post(api, "/models/reload", raw="{", headers=auth).status_code == 400
    assert post(api, "/invocations", {"instances": [ROW]}).json()["model_version"] == "v1"
    registry.publish(api.s3, api.settings.bucket, MODEL, "v-cut", {"model.onnx": logistic_onnx(),
                                                                    "model.json": b'{"name": "m", "feat'})
    refused = post(api, "/models/reload", {"version": "v-cut"}, headers=auth)
    assert refused.status_code == 409 and "model.json does not parse" in refused.json()["error"]
    # model.onnx overwritten after publishing: another model would be served under this version's name
    swapped = model_meta(MODEL, "v-swapped", onnx={"input": "features", "probability_output": "probability",
                                                   "sha256": registry.onnx_digest(logistic_onnx())})
    publish(api.s3, api.settings.bucket, MODEL, "v-swapped", logistic_onnx(bias=5.0), swapped, current=False)
    refused = post(api, "/models/reload", {"version": "v-swapped"}, headers=auth)
    assert refused.status_code == 409 and "not the one published" in refused.json()["error"]
    assert post(api, "/invocations", {"instances": [ROW]}).json()["model_version"] == "v1"
    publish(api.s3, api.settings.bucket, MODEL, "v2", logistic_onnx(bias=-1.0))
    answer = post(api, "/models/reload", headers=auth).json()
    assert answer == {"model_name": MODEL, "model_version": "v2", "previous_version": "v1"}
    assert post(api, "/invocations", {"instances": [ROW]}).json()["model_version"] == "v2"
    post(api, "/models/reload", {"version": "v1"}, headers=auth)


def test_a_reload_whose_body_never_arrived_does_nothing(api):
    """The client left before its body: the scorer read the empty part as "load CURRENT", so an
    interrupted rollback to v1 rolled the model forward."""
    import socket
    from urllib.parse import urlsplit

    auth = {"Authorization": f"Bearer {TOKEN}"}
    publish(api.s3, api.settings.bucket, MODEL, "v-next", logistic_onnx(bias=-0.5))      # CURRENT moves on
    assert post(api, "/models/reload", {"version": "v1"}, headers=auth).status_code == 200
    with socket.create_connection((urlsplit(api.url).hostname, urlsplit(api.url).port), timeout=5) as sock:
        sock.sendall(f"POST /models/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 17\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""                            # no answer: there was no request
    time.sleep(0.5)
    assert post(api, "/invocations", {"instances": [ROW]}).json()["model_version"] == "v1"


def test_metrics_and_openapi(api):
    post(api, "/invocations", {"instances": [ROW]})
    text = requests.get(api.url + "/metrics", timeout=5).text
    for name in ("scorer_events_total", "scorer_batch_seconds", "scorer_scoring_seconds_count",
                 "scorer_sessions_live", "scorer_session_evictions_total", "scorer_lag_ms", "scorer_model_info{"):
        assert name in text
    spec = requests.get(api.url + "/openapi.json", timeout=5).json()
    assert spec["openapi"].startswith("3.")
    for path in ("/ping", "/invocations", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", "/score/session",
                 "/sessions/{id}/prediction", "/sessions/{id}/features", "/models/reload", "/metrics",
                 "/openapi.json"):
        assert path in spec["paths"]



def test_a_sigterm_while_the_scorer_starts_up_stops_it(aws_endpoint, tmp_path):
    settings = unique_settings(ProvisionSettings)
    provision(settings)
    process = ScorerProcess(settings, tmp_path / "scorer.log", model_poll_s=3600)
    try:
        # Right after the model check: before uvicorn has put in its own signal handlers.
        wait_for(lambda: "no usable CURRENT" in process.log_path.read_text(encoding="utf-8"), interval=0.005, what="the model check")
        process.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.proc.wait(timeout=20)
        assert process.proc.poll() is not None, "the scorer went on running after SIGTERM"
    finally:
        process.stop()


def test_a_worker_only_scorer_serves_ping_and_its_metrics_and_nothing_else(published, start_scorer):
    # `--no-api` only waited: the process recommended for a tight API p99 had no health check, and its
    # lag, checkpoint age and model were nowhere to be scraped.
    settings = published
    events = session_events("worker-only", seed=9, n=5, buyer=False)
    KinesisStream(aws.client("kinesis"), settings.enriched_stream).put_records(
        [(e["domain_sessionid"], json.dumps(e).encode()) for e in events])
    worker = start_scorer(settings, run_api="false").wait_ready()
    assert requests.get(worker.url + "/ping", timeout=5).json()["worker"] is True

    def scored():
        # Both: a poll counts its events as it folds them and sets the shards owned once it has scored.
        text = requests.get(worker.url + "/metrics", timeout=5).text
        return 'scorer_events_total{mode="live"} 5.0' in text and "scorer_shards_owned 2.0" in text and text
    text = wait_for(scored, what="the worker's events and both shards in its metrics")
    for name in ("scorer_lag_ms", "scorer_checkpoint_age_seconds",
                 'scorer_model_info{name="buy-test",role="champion",version="v1"} 1.0',
                 "scorer_worker_restarts_total 0.0", "scorer_worker_running 1.0"):
        assert name in text
    assert post(worker, "/invocations", {"instances": [ROW]}).status_code == 404      # no API in this process
    assert requests.get(worker.url + "/sessions/worker-only/features", timeout=5).status_code == 404
    assert requests.get(worker.url + "/openapi.json", timeout=5).status_code == 404
