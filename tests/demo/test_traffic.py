"""The traffic generator: reproducible, funnel-shaped, valid tracker payloads, real HTTP."""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fastjsonschema
import pytest
from click.testing import CliRunner

from demo import traffic
from demo.sessions import DEPTH, SessionFactory
from demo.traffic import Plan, schedule

NOW_MS = 1_796_000_000_000          # a fixed "now" so schedules are comparable

# payload_data 1-0-4 from Iglu Central: an array of objects with string values, known keys only.
PAYLOAD_KEYS = ("tna", "aid", "p", "dtm", "tz", "e", "tid", "eid", "tv", "duid", "nuid", "uid", "vid", "ip",
    "res", "url", "page", "refr", "fp", "ctype", "cookie", "lang", "f_pdf", "f_qt", "f_realp", "f_wma",
    "f_dir", "f_fla", "f_java", "f_gears", "f_ag", "cd", "ds", "cs", "vp", "mac", "pp_mix", "pp_max", "pp_miy",
    "pp_may", "ad_ba", "ad_ca", "ad_ad", "ad_uid", "tr_id", "tr_af", "tr_tt", "tr_tx", "tr_sh", "tr_ci",
    "tr_st", "tr_co", "tr_cu", "ti_id", "ti_sk", "ti_nm", "ti_na", "ti_ca", "ti_pr", "ti_qu", "ti_cu", "sa",
    "sn", "st", "sp", "se_ca", "se_ac", "se_la", "se_pr", "se_va", "ue_na", "ue_pr", "ue_px", "co", "cx", "ua",
    "tnuid", "stm", "sid", "ttm")
validate_payload = fastjsonschema.compile({
    "type": "object",
    "properties": {"schema": {"const": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"},
                   "data": {"type": "array", "minItems": 1, "items": {
                       "type": "object", "properties": {k: {"type": "string"} for k in PAYLOAD_KEYS},
                       "required": ["tv", "p", "e"], "additionalProperties": False}}},
    "required": ["schema", "data"]})

# The shop's events and page context exactly as docs/contracts.md defines them.
NUM = {"type": "number", "minimum": 0}
SHOP_SCHEMAS = {name: fastjsonschema.compile({"type": "object", "properties": props, "required": req,
                                              "additionalProperties": False})
                for name, props, req in [
    ("product_view", {"sku": {"type": "string"}, "category": {"type": "string"}, "price": NUM,
                      "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}}, ["sku", "category", "price"]),
    ("add_to_cart", {"sku": {"type": "string"}, "category": {"type": "string"}, "price": NUM,
                     "quantity": {"type": "integer", "minimum": 1}, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     ["sku", "category", "price", "quantity"]),
    ("remove_from_cart", {"sku": {"type": "string"}, "category": {"type": "string"}, "price": NUM,
                          "quantity": {"type": "integer", "minimum": 1}, "currency": {"type": "string"}},
     ["sku", "price", "quantity"]),
    ("checkout_step", {"step": {"type": "integer", "minimum": 1, "maximum": 4}, "name": {"type": "string"}}, ["step"]),
    ("purchase", {"order_id": {"type": "string"}, "total": NUM, "items": {"type": "integer", "minimum": 1},
                  "currency": {"type": "string"}}, ["order_id", "total", "items"]),
    ("page_type", {"type": {"enum": ["home", "category", "product", "search", "cart", "checkout", "confirmation",
                                     "content"]}, "category": {"type": "string"}}, ["type"]),
]}


def unb64(text: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def contexts_of(event: dict) -> dict:
    """The contexts envelope, base64url in `cx` (GET, our generator) or plain JSON in `co` (the JS tracker's POST)."""
    return unb64(event["cx"]) if "cx" in event else json.loads(event["co"])


def shop_event(event: dict) -> tuple[str, dict] | None:
    if event["e"] != "ue":
        return None
    envelope = unb64(event["ue_px"]) if "ue_px" in event else json.loads(event["ue_pr"])
    assert envelope["schema"] == "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
    schema = envelope["data"]["schema"]
    assert schema.startswith("iglu:com.clickshop/") and schema.endswith("/jsonschema/1-0-0")
    return schema.split("/")[1], envelope["data"]["data"]


def sessions(count: int, seed: int = 3, buy_share: float = 0.3):
    factory = SessionFactory(seed, buy_share)
    return [factory.build(NOW_MS + i * 60_000) for i in range(count)]


def encoded(plan: Plan) -> list:
    return [(at, request.encode(0)) for at, request in schedule(plan, NOW_MS)]


def test_same_seed_gives_the_same_traffic_and_another_seed_does_not():
    plan = Plan(sessions=60, seed=42, backfill_days=2)
    first, second = encoded(plan), encoded(plan)
    assert first == second
    assert encoded(Plan(sessions=60, seed=43, backfill_days=2)) != first
    live = Plan(sessions=20, seed=42, speed=50)
    assert encoded(live) == encoded(live)


def test_funnel_purchases_only_after_checkout_step_4_and_abandonment_at_every_step():
    stops = Counter()
    for session in sessions(1500):
        stops[session.stop] += 1
        steps, carted, purchases = [], False, 0
        for event in session.events:
            found = shop_event(event)
            if not found:
                continue
            name, data = found
            if name == "add_to_cart":
                assert not steps, "added to cart during checkout"
                carted = True
            elif name == "checkout_step":
                assert carted, "checkout without a cart"
                steps.append(data["step"])
            elif name == "purchase":
                assert steps == [1, 2, 3, 4], f"purchase after steps {steps}"
                purchases += 1
        assert purchases == (1 if session.buys else 0)
        assert steps == list(range(1, len(steps) + 1))
        # The session stopped where its plan said: its deepest step is the stop.
        if session.stop.startswith("checkout"):
            assert len(steps) == DEPTH[session.stop] - DEPTH["checkout1"] + 1
        dtms = [int(event["dtm"]) for event in session.events]
        assert dtms == sorted(dtms)
    assert set(stops) == set(DEPTH), f"some funnel step never abandoned: {stops}"
    assert 0.2 < stops["purchase"] / 1500 < 0.4


def test_buy_share_is_configurable_and_zero_means_no_purchase():
    none = [s for s in sessions(400, buy_share=0.0) if s.buys]
    assert none == []
    many = sum(s.buys for s in sessions(600, buy_share=0.6)) / 600
    few = sum(s.buys for s in sessions(600, buy_share=0.05)) / 600
    assert few < 0.1
    assert many > 0.4


def test_buyers_differ_only_through_what_the_events_show():
    """Buyers view more products on average, but the two distributions overlap (noise, no planted flag)."""
    views = defaultdict(list)
    for session in sessions(1500):
        if DEPTH[session.stop] >= DEPTH["checkout1"]:
            count = sum(1 for e in session.events if (found := shop_event(e)) and found[0] == "product_view")
            views[session.buys].append(count)
    mean = {buys: sum(v) / len(v) for buys, v in views.items()}
    assert mean[True] > mean[False]
    assert min(views[True]) <= max(views[False]) and min(views[False]) <= max(views[True])


def test_every_payload_is_valid_payload_data_with_the_contract_fields():
    kinds, page_types, mediums, returning, uids = Counter(), Counter(), set(), 0, 0
    for at, request in schedule(Plan(sessions=300, seed=5, backfill_days=1), NOW_MS):
        method, path, body, _headers = request.encode(NOW_MS)
        if method == "POST":
            assert path == "/com.snowplowanalytics.snowplow/tp2"
            payload = json.loads(body)
        else:
            assert path.startswith("/i?")
            payload = {"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                       "data": [dict(urllib.parse.parse_qsl(path[3:]))]}
        validate_payload(payload)
        for event in payload["data"]:
            kinds[event["e"]] += 1
            assert event["tv"].startswith("js-") and event["p"] == "web" and event["aid"] == "clickshop"
            assert event["url"].startswith("https://shop.example.com/")
            assert int(event["dtm"]) < NOW_MS and event["ttm"] == event["dtm"]
            for key in ("eid", "duid", "sid", "vid", "res", "vp", "lang", "tz", "page", "stm"):
                assert event[key], key
            returning += event["vid"] != "1"
            uids += "uid" in event
            contexts = contexts_of(event)
            assert contexts["schema"] == "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
            by_schema = {c["schema"]: c["data"] for c in contexts["data"]}
            assert "id" in by_schema["iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0"]
            page_type = by_schema["iglu:com.clickshop/page_type/jsonschema/1-0-0"]
            SHOP_SCHEMAS["page_type"](page_type)
            page_types[page_type["type"]] += 1
            if found := shop_event(event):
                SHOP_SCHEMAS[found[0]](found[1])
                kinds[found[0]] += 1
            if event["e"] == "pp":
                assert int(event["pp_miy"]) <= int(event["pp_may"])
            query = urllib.parse.urlsplit(event["url"]).query
            if "utm_medium" in query:
                mediums.add(urllib.parse.parse_qs(query)["utm_medium"][0])
    assert {"pv", "pp", "ue", "product_view", "add_to_cart", "checkout_step", "purchase"} <= set(kinds)
    assert set(page_types) >= {"home", "category", "product", "cart", "checkout", "confirmation"}
    assert {"cpc", "email", "social", "display"} <= mediums
    assert returning > 0 and uids > 0


def test_backfill_spreads_history_over_the_days_with_a_daily_pattern():
    starts = traffic.backfill_starts(__import__("random").Random(1), 5000, 3, NOW_MS)
    assert NOW_MS - 3 * 86_400_000 <= starts[0] and starts[-1] < NOW_MS and starts == sorted(starts)
    hours = Counter((at // 3_600_000) % 24 for at in starts)
    assert hours[20] > 3 * hours[3]


class Capture(BaseHTTPRequestHandler):
    """A tiny collector stand-in: records hits, refuses the first ``refuse`` with 503, sets `sp`."""

    server: CaptureServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            if self.server.refuse > 0:
                self.server.refuse -= 1
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.server.hits.append((self.command, self.path, dict(self.headers), body))
        self.send_response(200)
        if "Cookie" not in self.headers:
            self.send_header("Set-Cookie", f"sp=nuid-{len(self.server.hits)}; Path=/; Max-Age=31536000")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


class CaptureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, refuse: int = 0, handler: type[Capture] = Capture):
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.hits: list = []
        self.refuse = refuse

    def events(self) -> list[dict]:
        out = []
        for method, path, _, body in self.hits:
            if method == "POST":
                out.extend(json.loads(body)["data"])
            else:
                out.append(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query)))
        return out


@pytest.fixture
def capture():
    servers = []

    def start(refuse: int = 0) -> CaptureServer:
        server = CaptureServer(refuse)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
        server.server_close()


def test_cli_backfill_sends_every_event_over_http_retrying_503(capture, tmp_path):
    server = capture(refuse=3)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    result = CliRunner().invoke(traffic.main, ["--collector", url, "--sessions", "40", "--seed", "9",
                                               "--backfill-days", "2", "--buy-share", "0.3"])
    assert result.exit_code == 0, result.output
    expected = [e for _, r in schedule(Plan(40, 9, 0.3, backfill_days=2), int(time.time() * 1000)) for e in r.events]
    events = server.events()
    assert sorted(e["eid"] for e in events) == sorted(e["eid"] for e in expected)
    assert f"events sent: {len(expected)}" in result.output and "events NOT sent: 0" in result.output
    assert "(3 retries)" in result.output
    methods = Counter(method for method, *_ in server.hits)
    assert methods["POST"] and methods["GET"]
    assert any(len(json.loads(body)["data"]) > 1 for method, _, _, body in server.hits if method == "POST")
    # A browser sends back the cookie the collector set, and its own user agent and address.
    assert any(headers.get("Cookie", "").startswith("sp=nuid-") for _, _, headers, _ in server.hits)
    assert all(headers.get("User-Agent") and headers.get("X-Forwarded-For") for _, _, headers, _ in server.hits)
    now = time.time() * 1000
    assert all(int(e["ttm"]) < now - 3_000_000 for e in events)
    # Within one session, the collector sees events in the order they happened.
    by_session = defaultdict(list)
    for event in events:
        by_session[event["sid"]].append(int(event["dtm"]))
    assert all(times == sorted(times) for times in by_session.values())


def test_cli_live_mode_stamps_events_now(capture):
    server = capture()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    began = time.time() * 1000
    result = CliRunner().invoke(traffic.main, ["--collector", url, "--sessions", "5", "--rate", "2000",
                                               "--speed", "2000", "--seed", "2"])
    assert result.exit_code == 0, result.output
    events = server.events()
    assert events and all("ttm" not in e for e in events)
    assert all(began - 1000 <= int(e["dtm"]) <= int(e["stm"]) <= time.time() * 1000 + 1000 for e in events)
    assert all(len(json.loads(body)["data"]) == 1 for method, _, _, body in server.hits if method == "POST")


def test_cli_reports_and_keeps_what_could_not_be_sent(capture, tmp_path):
    server = capture(refuse=10**9)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    failed = tmp_path / "failed.jsonl"
    result = CliRunner().invoke(traffic.main, ["--collector", url, "--sessions", "3", "--seed", "4",
                                               "--backfill-days", "1", "--failed-out", str(failed),
                                               "--max-attempts", "2"])
    assert result.exit_code == 1
    expected = sum(len(r.events) for _, r in schedule(Plan(3, 4, backfill_days=1), NOW_MS))
    assert f"events NOT sent: {expected}" in result.output and "HTTP 503" in result.output
    kept = [json.loads(line) for line in failed.read_text(encoding="utf-8").splitlines()]
    assert sum(len(json.loads(k["body"])["data"]) if k["body"] else 1 for k in kept) == expected
    assert server.hits == []


@pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1:99999", "http://127.0.0.1:80a"])
def test_cli_rejects_a_bad_collector_url(url):
    result = CliRunner().invoke(traffic.main, ["--collector", url, "--sessions", "1"])
    assert result.exit_code == 2 and "--collector" in result.output and "Traceback" not in result.output


def test_cli_fails_at_once_when_no_collector_listens():
    # Not after every request has used up its retries (minutes here): before sending anything.
    result = CliRunner().invoke(traffic.main, ["--collector", "http://127.0.0.1:9", "--sessions", "3"])
    assert result.exit_code == 1
    assert "no collector answers at http://127.0.0.1:9" in result.output and "make up" in result.output
    assert "events NOT sent" not in result.output


def test_the_demo_picks_new_sessions_on_a_stack_that_holds_an_earlier_run(monkeypatch):
    from demo.__main__ import demo_seed

    monkeypatch.delenv("DEMO_SEED", raising=False)
    assert demo_seed(stack_was_up=False) == 7                 # the documented run on a fresh stack
    assert demo_seed(stack_was_up=True) != 7                  # same ids again: duplicates, offers already made
    monkeypatch.setenv("DEMO_SEED", "7")
    assert demo_seed(stack_was_up=True) == 7


def test_a_backfill_further_back_than_event_times_may_reach_is_refused():
    """Event times more than 30 days before their collection are taken as the collection time (a
    reset device clock): a 45-day backfill would have put its first two weeks' sessions at "now"."""
    result = CliRunner().invoke(traffic.main, ["--backfill-days", "45"])
    assert result.exit_code == 2 and "--backfill-days" in result.output and "0<=x<=30" in result.output


def test_the_demo_waits_for_the_scorer_to_read_the_history_not_for_its_replays():
    """Live traffic sent while the scorer still reads the history queues behind it (p99 ~100 ms in
    `make demo`'s live-only line); the replays that rebuild sessions after a restart are not new events."""
    from prometheus_client import start_http_server

    from demo.__main__ import scorer_events_read, wait_for_scorer
    from scorer import metrics

    server, _ = start_http_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        before = scorer_events_read(url)
        metrics.EVENTS.labels(mode="replay").inc(50)
        assert scorer_events_read(url) == before
        metrics.EVENTS.labels(mode="live").inc(7)
        assert scorer_events_read(url) == before + 7
        wait_for_scorer(before + 7, url=url, timeout=5)           # caught up: returns at once
        with pytest.raises(SystemExit, match="the scorer did not catch up within 1 s"):
            wait_for_scorer(before + 8, url=url, timeout=1)
    finally:
        server.shutdown()
        server.server_close()
    assert scorer_events_read(url) is None                        # not answering: the wait goes on


def test_the_demo_says_how_far_the_live_scores_are_from_the_models_reference():
    from types import SimpleNamespace

    import numpy as np
    from prometheus_client import start_http_server

    from batch.train_metrics import feature_reference, score_reference
    from demo.__main__ import drift_line
    from scorer.drift import SAMPLE_PER_SLOT, SLOT_S, ScoreDrift

    server, _ = start_http_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        rng, clock = np.random.default_rng(11), [0.0]
        drift = ScoreDrift(3600, clock=lambda: clock[0])

        def rows(n: int, views: float = 3.0) -> np.ndarray:
            return np.c_[rng.gamma(2, views, n), rng.random(n) < 0.3].astype(np.float32)

        model = SimpleNamespace(version="demo", threshold=0.5, meta={
            "features": [{"name": "product_views"}, {"name": "is_mobile"}],
            "score_reference": score_reference(rng.beta(2, 5, 10_000), 0.5),
            "feature_reference": feature_reference(rows(10_000), ["product_views", "is_mobile"])})
        drift.observe(model, np.array([]), rows(0))
        assert drift_line(url) == "  score drift    not measured: no live scores against the model's score_reference yet"
        drift.observe(model, np.full(10, 0.9), rows(10))
        assert drift_line(url) == ("  score drift    under 1,000 scores, too few to say over 10 live scores; "
                                   f"decided buy 100.0%, in training {model.meta['score_reference']['buy_rate']:.1%}")
        for _ in range(5):                                 # five minutes in which visitors view twice as many products
            drift.observe(model, rng.beta(2, 5, SAMPLE_PER_SLOT), rows(SAMPLE_PER_SLOT, views=6.0))
            clock[0] += SLOT_S
        first, second = drift_line(url).split("\n")
        assert "  score drift    PSI 0.0" in first and f"over {10 + 5 * SAMPLE_PER_SLOT:,} live scores" in first
        assert second.startswith("  input drift    moved most: product_views, PSI ")
    finally:
        server.shutdown()
        server.server_close()
    assert "not measured" in drift_line(url)             # the scorer not answering is no crash

