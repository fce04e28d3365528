"""The live view and the terminal summary, against the emulator over HTTP."""
from __future__ import annotations

import dataclasses
import gzip
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from common import aws, registry
from common.config import AwsSettings
from common.producer import Producer
from common.streams import KinesisStream
from demo import summary
from demo.liveview import Handler, LiveView, LiveViewSettings
from localstack.emulator import free_port
from tests.conftest import CHROMIUM, CHROMIUM_FLAGS, ROOT, settings_env, wait_for

VERSION = "20261129T100000Z"
MODEL_META = {"name": registry.DEFAULT_MODEL, "version": VERSION, "algorithm": "logistic_regression",
              "threshold": 0.42, "metrics": {"roc_auc": 0.8765, "pr_auc": 0.51}, "created_at": "2026-11-29T10:00:00Z"}


def prediction(session: str, p_buy: float, latency_us: int = 40, events: int = 3) -> dict:
    return {"session_id": session, "event_id": str(uuid.uuid4()), "collector_tstamp": "2026-11-29T10:00:00.000Z",
            "derived_tstamp": "2026-11-29T10:00:00.000Z", "scored_at": "2026-11-29T10:00:00.010Z",
            "model_name": registry.DEFAULT_MODEL, "model_version": VERSION, "feature_version": "1",
            "p_buy": p_buy, "decision": "buy" if p_buy >= 0.42 else "defer", "threshold": 0.42,
            "latency_us": latency_us, "events_in_session": events}


def put(settings, stream_name: str, records: list[dict | bytes]) -> None:
    """Put records (dicts as JSON, bytes as they are) in one call, in order."""
    stream = KinesisStream(aws.client("kinesis", settings.region), stream_name)
    entries = [(str(r.get("session_id") or uuid.uuid4()), json.dumps(r).encode()) if isinstance(r, dict)
               else ("odd", r) for r in records]
    assert Producer(stream).send(entries) == []


def publish_model(settings, **meta) -> None:
    s3 = aws.client("s3", settings.region)
    files = {"model.onnx": b"not really onnx", "model.json": json.dumps({**MODEL_META, **meta}).encode()}
    registry.publish(s3, settings.bucket, registry.DEFAULT_MODEL, VERSION, files)
    registry.set_current(s3, settings.bucket, registry.DEFAULT_MODEL, VERSION, reason="test")


def put_offer(settings, session: str, p_buy: float, at: str, kind: str = "offer") -> None:
    """An offer row (or a control group's holdout row) shaped as discount/offers.py writes it, and the
    hour's budget row beside it."""
    dynamodb = aws.client("dynamodb", settings.region)
    dynamodb.put_item(TableName=settings.offers_table, Item={
        "session_id": {"S": session}, "kind": {"S": kind}, "offer_id": {"S": str(uuid.uuid4())},
        "code": {"S": f"SAVE10-{session[:8].upper()}"}, "discount_percent": {"N": "10"},
        "p_buy": {"N": str(p_buy)}, "decision": {"S": "buy"}, "model_name": {"S": registry.DEFAULT_MODEL},
        "model_version": {"S": VERSION}, "event_id": {"S": str(uuid.uuid4())}, "offered_at": {"S": at},
        "hour": {"S": at[:13]}, "expires_at": {"N": str(int(time.time()) + 3600)}})
    dynamodb.put_item(TableName=settings.offers_table, Item={
        "session_id": {"S": f"budget#{at[:13]}"}, "kind": {"S": "budget"}, "offers": {"N": "1"}})


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def cors_header(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError as exc:
        return exc.headers.get("Access-Control-Allow-Origin")


def raw_get(port: int, path: str) -> int:
    """Send a path exactly as written (urllib would normalise '..' away)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def strict_json(body: bytes):
    """Parse as the browser's JSON.parse does: NaN and Infinity are not JSON."""
    def reject(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(body, parse_constant=reject)


def state(view: LiveView) -> dict:
    return strict_json(get(view.url + "/api/state")[2])


def by_id(items: list[dict], key: str = "session_id") -> dict:
    return {item[key]: item for item in items}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def collector_metrics():
    """A real Prometheus endpoint standing in for the collector's /metrics (nothing of AWS is faked)."""
    metrics = CollectorRegistry()
    requests = Counter("collector_requests_total", "hits", ["endpoint", "status"], registry=metrics)
    Gauge("collector_spool_depth_records", "spool", registry=metrics)
    server, _ = start_http_server(free_port(), addr="127.0.0.1", registry=metrics)
    yield requests, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()


@pytest.fixture
def view_settings(aws_settings, collector_metrics, tmp_path) -> LiveViewSettings:
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "index.html").write_text("<h1>the demo shop</h1>")
    (tmp_path / "secret.txt").write_text("outside the shop")
    closed = f"http://127.0.0.1:{free_port()}/metrics"      # nothing listens there: shown as down
    names = {f.name: getattr(aws_settings, f.name) for f in dataclasses.fields(AwsSettings)}
    return LiveViewSettings(**names, port=free_port(), collector_metrics_url=collector_metrics[1],
                            scorer_metrics_url=closed, discount_metrics_url=closed, loader_metrics_url=closed,
                            enrich_metrics_url="", poll_s=0.2, offers_every_s=0.3, model_every_s=0.3,
                            shop_dir=shop)


@pytest.fixture
def view(view_settings):
    started = LiveView(view_settings).start()
    yield started
    started.close()


# ------------------------------------------------------------------------------------ live view


def test_state_shows_sessions_with_p_buy_series_offers_and_model(view_settings, collector_metrics):
    settings = view_settings
    first, second = f"sess-a-{uuid.uuid4().hex[:6]}", f"sess-b-{uuid.uuid4().hex[:6]}"
    # Predictions already on the stream before the view starts are within its look-back.
    put(settings, settings.predictions_stream, [prediction(first, 0.1), prediction(first, 0.4)])
    publish_model(settings)
    put_offer(settings, first, 0.4, "2026-11-29T10:00:01.000Z")
    view = LiveView(settings).start()
    try:
        wait_for(lambda: first in by_id(state(view)["sessions"]))
        put(settings, settings.predictions_stream, [prediction(second, 0.9)])
        put(settings, settings.predictions_stream, [prediction(first, 0.8, latency_us=77)])
        put(settings, settings.raw_stream, [{"n": 1}, {"n": 2}])
        put(settings, settings.enriched_stream, [{"event_id": "e1"}])
        put(settings, settings.bad_stream, [{"schema": "bad"}])
        collector_metrics[0].labels("tp2", "200").inc(5)
        collector_metrics[0].labels("health", "200").inc(100)      # not a tracker hit

        snapshot = wait_for(lambda: (s := state(view)) and len(by_id(s["sessions"]).get(first, {}).get("points", []))
                            == 3 and second in by_id(s["sessions"]) and s["stream_totals"]["bad"] == 1 and s)
        sessions = snapshot["sessions"]
        assert [s["session_id"] for s in sessions] == [first, second]        # most recently scored first
        assert [point["p"] for point in sessions[0]["points"]] == [0.1, 0.4, 0.8]
        assert [point["p"] for point in sessions[1]["points"]] == [0.9]
        assert sessions[0]["offered"] is True and sessions[1]["offered"] is False
        assert sessions[0]["offer"] == {"code": f"SAVE10-{first[:8].upper()}", "discount_percent": 10}
        assert snapshot["decisions"][0]["session_id"] == first and snapshot["decisions"][0]["latency_us"] == 77
        assert [d["decision"] for d in snapshot["decisions"][:2]] == ["buy", "buy"]
        assert snapshot["stream_totals"] == {"raw": 2, "enriched": 1, "bad": 1, "predictions": 4}

        assert [o["session_id"] for o in snapshot["offers"]] == [first]      # the budget row is not an offer
        assert snapshot["offers"][0]["code"].startswith("SAVE10-")
        model = snapshot["model"]
        assert (model["version"], model["roc_auc"], model["threshold"]) == (VERSION, 0.8765, 0.42)

        components = snapshot["components"]
        assert components["collector"]["up"] is True
        assert components["scorer"]["up"] is False and components["discount"]["up"] is False
        assert components["enrich"]["error"] == "not configured"
        assert snapshot["lag_ms"]["liveview (predictions)"] is not None

        # Rates need two scrapes and a window; wait until they show what was sent.
        rated = wait_for(lambda: (s := state(view)) and s["bad_rate"] == 0.5 and s)
        assert rated["stages"][3]["name"] == "bad rows" and rated["stages"][3]["per_s"] > 0
        collector_metrics[0].labels("tp2", "200").inc(50)
        wait_for(lambda: (state(view)["stages"][0]["per_s"] or 0) > 0)
    finally:
        view.close()


def test_session_lookup_for_a_shop_page_even_when_a_source_fails(view_settings):
    # No offers table: that source is reported on the page, everything else keeps working.
    # One session on the page, but a shop page can still look up its own after newer ones arrived.
    view = LiveView(dataclasses.replace(view_settings, offers_table=f"missing-{uuid.uuid4().hex[:6]}",
                                        sessions_shown=1)).start()
    try:
        session, newer = f"shop-{uuid.uuid4().hex[:8]}", f"newer-{uuid.uuid4().hex[:8]}"
        put(view_settings, view_settings.predictions_stream, [prediction(session, 0.3), prediction(session, 0.6)])
        put(view_settings, view_settings.predictions_stream, [prediction(newer, 0.1)])
        wait_for(lambda: [s["session_id"] for s in state(view)["sessions"]] == [newer])
        found = wait_for(lambda: (r := get(f"{view.url}/api/session/{session}"))[0] == 200
                         and len(json.loads(r[2])["points"]) == 2 and json.loads(r[2]))
        assert found["p_buy"] == 0.6 and found["decision"] == "buy"
        status, _, body = get(f"{view.url}/api/session/nobody")
        assert status == 404 and json.loads(body)["error"] == "not scored recently"
        # why not: the fixture's scorer does not answer its metrics scrape
        why = wait_for(lambda: (said := json.loads(get(f"{view.url}/api/session/nobody")[2])["scorer"]) != "unknown"
                       and said)
        assert why == "down"
        assert found["offer"] is None
        # A shop page on another origin (demo.web, ?liveview=) may read both answers.
        for sid in (session, "nobody"):
            assert cors_header(f"{view.url}/api/session/{sid}") == "*"
        assert cors_header(f"{view.url}/api/state") is None
        errors = wait_for(lambda: state(view)["errors"])
        assert "ResourceNotFoundException" in errors["offers"] and "predictions" not in errors
    finally:
        view.close()


def test_non_finite_values_and_records_that_are_not_objects_leave_the_page_readable(view_settings):
    settings = view_settings
    publish_model(settings, threshold=float("nan"))           # json.dumps writes a bare NaN into model.json
    good, later = f"good-{uuid.uuid4().hex[:6]}", f"later-{uuid.uuid4().hex[:6]}"
    put(settings, settings.predictions_stream,
        [prediction(good, 0.4), prediction("nan-p", float("nan")), prediction("inf-p", float("inf")),
         prediction("huge-p", 10**400),
         b"[1, 2]", b"null", b"[" * 100_000, b"not json",
         {**prediction(later, 0.7), "threshold": float("-inf")}])
    view = LiveView(settings).start()
    try:
        # Every answer must parse strictly; the records after the bad ones are still read.
        snapshot = wait_for(lambda: (s := state(view)) and later in by_id(s["sessions"])
                            and s["model"]["version"] == VERSION and s)
        assert set(by_id(snapshot["sessions"])) == {good, later}
        assert snapshot["model"]["threshold"] is None and by_id(snapshot["sessions"])[later]["threshold"] is None
        assert "predictions" not in snapshot["errors"]
        status, _, body = get(f"{view.url}/api/session/{later}")
        assert status == 200 and strict_json(body)["p_buy"] == 0.7
    finally:
        view.close()


def test_pages_shop_and_tracker_are_served_from_one_origin_without_escaping_their_folders(view):
    port = view.server.server_address[1]
    assert get(view.url + "/health")[0] == 200
    status, kind, body = get(view.url + "/")
    assert status == 200 and kind.startswith("text/html") and b"Clickstream live view" in body
    status, kind, body = get(view.url + "/static/app.js")
    assert status == 200 and "javascript" in kind and b"/api/state" in body
    assert get(view.url + "/shop/")[2] == b"<h1>the demo shop</h1>"
    tracker = ROOT / "node_modules/@snowplow/browser-tracker/package.json"
    status, kind, body = get(view.url + "/node_modules/@snowplow/browser-tracker/package.json")
    assert status == 200 and kind.startswith("application/json") and body == tracker.read_bytes()
    assert get(view.url + "/node_modules/@snowplow/browser-tracker/dist/index.umd.min.js")[0] == 200
    for path in ("/shop/../secret.txt", "/shop/%2e%2e/secret.txt", "/node_modules/@snowplow/../../package.json",
                 "/node_modules/@snowplow/%2e%2e/%2e%2e/package.json", "/static/../liveview.py",
                 "/shop/nothing-here.html", "/elsewhere", "/shop/" + "a" * 300, "/static/" + "a" * 300,
                 "/node_modules/@snowplow/" + "a" * 300, "/shop/%00"):
        assert raw_get(port, path) == 404, path


def test_idle_and_half_sent_connections_are_closed_after_the_handler_timeout(view, monkeypatch):
    # Each connection holds a thread: one left open forever by a silent client is a thread leaked.
    assert 0 < (Handler.timeout or 0) <= 60                    # the default bounds every connection
    monkeypatch.setattr(Handler, "timeout", 0.5)               # shortened so the test need not wait for it
    port = view.server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=30) as half:
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")         # the headers never end
        assert idle.recv(1) == b"" and half.recv(1024) == b""        # EOF: the server closed them
    assert get(view.url + "/health")[0] == 200


@pytest.mark.browser
def test_page_renders_sessions_and_model_in_headless_chromium(view, view_settings):
    sessions = [f"chrome-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    put(view_settings, view_settings.predictions_stream, [prediction(s, 0.2 + i / 2) for i, s in enumerate(sessions)])
    publish_model(view_settings)
    wait_for(lambda: (s := state(view)) and s["model"]["version"] == VERSION and len(s["sessions"]) == 2)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", "--virtual-time-budget=5000", view.url + "/"],
            capture_output=True, encoding="utf-8", timeout=120, check=True).stdout
    for session in sessions:
        assert f'<td class="id session-id" title="{session}">{session}</td>' in dom
    assert f'<dd class="model-version">{VERSION}</dd>' in dom
    assert "<polyline" in dom and "0.8765" in dom


def test_module_serves_health_and_stops_on_sigterm(aws_settings):
    port = free_port()
    env = {**os.environ, **settings_env(aws_settings), "CLICKSTREAM_PORT": str(port),
           "CLICKSTREAM_COUNT_STREAMS": "false",
           # Never touch the real stack's ports from a test: no component is scraped here.
           **{f"CLICKSTREAM_{name.upper()}_METRICS_URL": "" for name in LiveViewSettings().metrics_urls()}}
    child = subprocess.Popen([sys.executable, "-m", "demo.liveview"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    def healthy() -> bool:
        if child.poll() is not None:
            pytest.fail(f"demo.liveview exited with {child.returncode}: {child.stdout.read().decode()}")
        try:
            return get(f"http://127.0.0.1:{port}/health")[0] == 200
        except OSError:                    # not listening yet
            return False

    try:
        wait_for(healthy)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# ------------------------------------------------------------------------------------ summary


def parquet_bytes(rows: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"event_id": [str(i) for i in range(rows)]}), buffer, compression="zstd")
    return buffer.getvalue()


def test_summary_counts_every_stage(aws_settings):
    settings = aws_settings
    get_hit = {"method": "GET", "querystring": "e=pv&tv=js-4", "body": None}
    post_hit = {"method": "POST", "body": json.dumps({"schema": "payload_data", "data": [{"e": "pv"}] * 3})}
    put(settings, settings.raw_stream, [get_hit, post_hit, get_hit])                 # 5 events in 3 records
    put(settings, settings.enriched_stream, [{"event_id": str(i)} for i in range(4)])
    put(settings, settings.bad_stream, [{"schema": "bad"}])
    put(settings, settings.predictions_stream,
        [prediction("s1", 0.1, latency_us=10), prediction("s1", 0.5, latency_us=20),
         prediction("s2", 0.2, latency_us=30), prediction("s2", 0.3, latency_us=1000)])
    s3 = aws.client("s3", settings.region)
    s3.put_object(Bucket=settings.bucket, Key="enriched/date=2026-11-29/hour=09/shardId-0-1-5.parquet",
                  Body=parquet_bytes(5))
    s3.put_object(Bucket=settings.bucket, Key="enriched/date=2026-11-29/hour=10/shardId-1-6-8.parquet",
                  Body=parquet_bytes(3))
    s3.put_object(Bucket=settings.bucket, Key="bad/date=2026-11-29/hour=10/shardId-0-1-1.jsonl.gz",
                  Body=gzip.compress(b"{}\n"))
    publish_model(settings)
    put_offer(settings, "s1", 0.5, "2026-11-29T10:00:01.000Z")
    put_offer(settings, "s2", 0.3, "2026-11-29T10:00:02.000Z", kind="holdout")

    steps: list[str] = []
    result = summary.summarize(settings, progress=steps.append)
    assert len(steps) == 8 and steps[0] == "counting the raw stream"
    assert result["sent"] == {"records": 3, "events": 5}
    assert (result["enriched"], result["bad"], result["offers"], result["held_out"]) == (4, 1, 1, 1)
    assert result["lake"] == {"rows": 8, "files": 2}
    assert result["scored"] == {"records": 4, "sessions": 2, "buy": 1, "defer": 3, "skipped": 0,
                                "latency_us": {"p50": 20, "p90": 1000, "p99": 1000, "max": 1000}}
    assert (result["model"]["version"], result["model"]["roc_auc"]) == (VERSION, 0.8765)
    text = summary.render(result)
    assert "events sent               5" in text and VERSION in text and "ROC AUC 0.8765" in text
    assert "p50 20 µs" in text and "max 1.0 ms" in text
    assert "offers made               1  and 1 sessions held out as the control group" in text

    # Counting from a later point in time sees none of it.
    later = summary.summarize(settings, since=time.time() + 5)
    assert later["sent"]["records"] == 0 and later["scored"]["records"] == 0 and later["lake"]["rows"] == 8
    assert (later["enriched"], later["bad"]) == (0, 0)
    assert "time in scorer   n/a (no predictions)" in summary.render(later)


def test_summary_skips_and_counts_prediction_records_it_cannot_read(aws_settings):
    kinesis = aws.client("kinesis", aws_settings.region)
    put(aws_settings, aws_settings.predictions_stream,
        [prediction("a", 0.4, latency_us=10), b"not json", b"[1, 2]", b"null", b"[" * 100_000,
         {**prediction("x", 0.5), "session_id": ["a", "list"]}, {**prediction("y", 0.5), "decision": {"no": 1}},
         {**prediction("z", 0.5), "collector_tstamp": None}, prediction("b", 0.6, latency_us=30)])
    result = summary.count_predictions(kinesis, aws_settings.predictions_stream, None)
    assert result == {"records": 3, "sessions": 3, "buy": 2, "defer": 1, "skipped": 6,
                      "latency_us": {"p50": 30, "p90": 40, "p99": 40, "max": 40}}
    assert summary.latency_of_events_since(kinesis, aws_settings.predictions_stream, 0) == \
        {"p50": 10, "p90": 30, "p99": 30, "max": 30}
    empty = {"sent": {"records": 0, "events": 0}, "enriched": 0, "bad": 0, "lake": {"rows": 0, "files": 0},
             "offers": 0, "model": {"name": registry.DEFAULT_MODEL}}
    assert "(2 buy / 1 defer), 6 unreadable records skipped" in summary.render({**empty, "scored": result})


def test_live_latency_counts_only_events_received_after_the_cut(aws_settings):
    cut = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC).timestamp()
    backlog = {**prediction("old", 0.1, latency_us=250_000), "collector_tstamp": "2026-11-29T09:59:59.999Z"}
    live = [{**prediction("new", 0.1, latency_us=us), "collector_tstamp": "2026-11-29T10:00:00.000Z"} for us in (700, 900)]
    put(aws_settings, aws_settings.predictions_stream, [backlog, *live])
    # Every record arrived after the cut: only the events' own time tells the backlog apart.
    kinesis = aws.client("kinesis", aws_settings.region)
    result = summary.latency_of_events_since(kinesis, aws_settings.predictions_stream, cut)
    assert result == {"p50": 700, "p90": 900, "p99": 900, "max": 900}


def test_collector_requests_count_tracker_hits_only(collector_metrics):
    from demo.liveview import scrape

    requests, url = collector_metrics
    requests.labels("tp2", "200").inc(5)
    requests.labels("pixel", "200").inc(2)
    for probe in ("health", "sink-health", "metrics"):
        requests.labels(probe, "200").inc(100)
    requests.labels("other", "404").inc(7)                  # unknown paths: scanners, typos
    assert scrape(url)["collector_requests_total"] == 7


def test_lag_is_read_from_every_component_naming_of_the_gauge():
    from demo.liveview import lag_ms

    assert lag_ms({"enrich_lag_ms": 5.0, "enrich_events_total": 9.0}) == 5.0
    assert lag_ms({"lake_loader_millis_behind": 1200.0}) == 1200.0     # the lake loader's (Kinesis' own name)
    assert lag_ms({"scorer_lag_ms": 2000.0, "discount_consumer_lag_ms": 10.0}) == 2000.0
    assert lag_ms({"events_total": 1.0}) is None


def test_arrival_rates_keep_a_bounded_window_while_no_page_asks_for_them():
    from demo.liveview import ArrivalRate

    rate = ArrivalRate(window_s=10)
    start_ms = 1_700_000_000_000
    for second in range(86_400):                  # a day of one record a second, nobody polling
        rate.add(start_ms + second * 1000)
    assert len(rate.buckets) <= 61 and rate.total == 86_400
    assert rate.per_s(now=start_ms / 1000 + 86_400) == 1.0
