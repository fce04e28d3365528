"""`python -m demo.liveview`: a live page of the whole pipeline on http://127.0.0.1:8082/ (docs/liveview.md).

Two background threads gather the state and the HTTP handlers only copy it, so any number of open
pages costs AWS nothing extra:

- the stream thread reads the predictions stream with its own consumer (app ``liveview``, starting
  ``lookback_s`` back so a fresh page is not empty) into per-session ``p_buy`` series, and tails the
  raw, enriched and bad streams just to count records per second (by arrival time);
- the sources thread scrapes each component's Prometheus ``/metrics`` (a missing one is "down",
  never an error), scans the offers table and reads the current model from the registry.

The same origin also serves ``demo/shop/`` under ``/shop/`` and the Snowplow tracker from
``node_modules/@snowplow`` under ``/node_modules/@snowplow/``, so a shop page can load it locally.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import mimetypes
import threading
import time
import urllib.request
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from urllib.parse import unquote, urlsplit

from prometheus_client.parser import text_string_to_metric_families

from common import aws, logs, registry
from common.cli import run_command
from common.config import AwsSettings, ConfigError, require_non_negative, require_positive
from common.consumer import Consumer
from common.leases import DynamoLeaseTable
from common.service import listening, settings_or_exit, stop_on_signals
from common.streams import KinesisShardReader, KinesisStream, TimedShardReader
from demo.summary import model_info

log = logging.getLogger("liveview")
ROOT = Path(__file__).resolve().parent.parent
STATIC = Path(__file__).resolve().parent / "liveview_static"
APP = "liveview"
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/json", ".map")
# Collector routes that are not tracker hits, left out of "collector requests/s": probes, and
# "other", the collector's label for unknown paths (scanners, typos) answered 404.
NOT_HITS = {"health", "sink-health", "metrics", "other"}


@dataclasses.dataclass(frozen=True)
class LiveViewSettings(AwsSettings):
    host: str = "127.0.0.1"
    port: int = 8082
    # Prometheus endpoints; an empty URL means "not deployed", an unreachable one is shown as down.
    collector_metrics_url: str = "http://127.0.0.1:8080/metrics"
    enrich_metrics_url: str = "http://127.0.0.1:9101/metrics"
    scorer_metrics_url: str = "http://127.0.0.1:8081/metrics"
    loader_metrics_url: str = "http://127.0.0.1:9102/metrics"
    discount_metrics_url: str = "http://127.0.0.1:9104/metrics"
    model_name: str = registry.DEFAULT_MODEL
    poll_s: float = 1.0                 # how often streams and metrics are read
    lookback_s: int = 600               # predictions already on the stream when the view starts
    rate_window_s: int = 10             # events/s are averaged over this many seconds
    sessions_shown: int = 30
    sessions_kept: int = 5000           # for /api/session/<id>: a shop page looks up its own session
    points_per_session: int = 60
    decisions_shown: int = 40
    offers_shown: int = 30
    offers_scan_limit: int = 2000       # items read per offers scan, so a big table stays cheap
    offers_every_s: float = 3.0
    model_every_s: float = 10.0
    count_streams: bool = True          # tail raw/enriched/bad to count records/s (one GetRecords/shard/poll)
    shop_dir: Path = ROOT / "demo" / "shop"
    tracker_dir: Path = ROOT / "node_modules" / "@snowplow"
    log_level: str = "INFO"

    def validate(self) -> None:
        require_positive(self, "poll_s", "rate_window_s", "sessions_shown", "sessions_kept", "points_per_session",
                         "decisions_shown", "offers_shown", "offers_scan_limit", "offers_every_s", "model_every_s")
        require_non_negative(self, "lookback_s")
        if self.sessions_kept < self.sessions_shown:
            raise ConfigError("CLICKSTREAM_SESSIONS_KEPT: must be at least CLICKSTREAM_SESSIONS_SHOWN "
                              f"({self.sessions_kept} < {self.sessions_shown})")

    def metrics_urls(self) -> dict[str, str]:
        return {"collector": self.collector_metrics_url, "enrich": self.enrich_metrics_url,
                "scorer": self.scorer_metrics_url, "loader": self.loader_metrics_url,
                "discount": self.discount_metrics_url}


# ------------------------------------------------------------------------------------ rates


class ArrivalRate:
    """Records per second over a sliding window, bucketed by each record's arrival second.

    Counting by arrival (not by when we read) keeps a catch-up read at start-up from showing a spike.
    """

    def __init__(self, window_s: int):
        self.window_s = window_s
        self.buckets: dict[int, int] = {}
        self.total = 0

    def add(self, arrival_ms: int, count: int = 1) -> None:
        second = arrival_ms // 1000
        if second not in self.buckets:       # here too, not only in per_s: no page may be open for days
            self._drop_before(second - self.window_s * 6)
        self.buckets[second] = self.buckets.get(second, 0) + count
        self.total += count

    def per_s(self, now: float | None = None) -> float:
        # The window ends a second ago: the current second's records may not have been read yet.
        end = int(time.time() if now is None else now) - 1
        self._drop_before(end - self.window_s * 6)
        return sum(n for s, n in self.buckets.items() if end - self.window_s <= s < end) / self.window_s

    def _drop_before(self, oldest: int) -> None:
        for second in [s for s in self.buckets if s < oldest]:
            del self.buckets[second]


class CounterRate:
    """Per-second increase of a Prometheus counter from successive scrapes (a reset starts over)."""

    def __init__(self, window_s: int):
        self.samples: deque[tuple[float, float]] = deque()
        self.window_s = window_s

    def add(self, value: float, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        if self.samples and value < self.samples[-1][1]:
            self.samples.clear()
        self.samples.append((at, value))
        while len(self.samples) > 2 and at - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


# ------------------------------------------------------------------------------------ metrics


def scrape(url: str, timeout: float = 0.5) -> dict[str, float]:
    """Sum every sample of a /metrics page by sample name (labels summed), tracker hits apart."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("endpoint") in NOT_HITS:
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def lag_ms(totals: dict[str, float]) -> float | None:
    """The largest consumer lag a component reports (gauges named *lag_ms, or *millis_behind as the
    lake loader's)."""
    found = [value for name, value in totals.items() if name.endswith(("lag_ms", "millis_behind"))]
    return max(found) if found else None


# ------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class Session:
    points: deque                     # (arrival_ms, p_buy, event_id)
    latest: dict


class LiveState:
    """Everything the page shows; written by the two threads, read (copied) by the handlers."""

    def __init__(self, settings: LiveViewSettings):
        self.settings = settings
        self.lock = threading.Lock()
        self.started = time.time()
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.decisions: deque[dict] = deque(maxlen=settings.decisions_shown)
        self.streams = {name: ArrivalRate(settings.rate_window_s)
                        for name in ("raw", "enriched", "bad", "predictions")}
        self.counters = {name: CounterRate(settings.rate_window_s) for name in ("collector", "offers")}
        self.components: dict[str, dict] = {}
        self.stream_lag_ms: int | None = None
        self.offers: list[dict] = []
        self.offered: dict[str, dict] = {}         # session id -> its offer's code and discount
        self.model: dict = {"name": settings.model_name, "version": None}
        self.errors: dict[str, str] = {}

    def add_prediction(self, prediction: dict, arrival_ms: int) -> None:
        session_id = str(prediction.get("session_id") or "")
        p_buy = prediction.get("p_buy")
        # A probability: NaN (fails both comparisons), Infinity or a huge int (float() would raise)
        # is not a score the 0..1 sparkline can show, nor JSON the page can parse.
        if not session_id or not isinstance(p_buy, (int, float)) or not 0 <= p_buy <= 1:
            return
        event_id = prediction.get("event_id")
        with self.lock:
            session = self.sessions.pop(session_id, None) or Session(
                deque(maxlen=self.settings.points_per_session), {})
            self.sessions[session_id] = session           # most recently scored last
            while len(self.sessions) > self.settings.sessions_kept:
                self.sessions.popitem(last=False)
            # A lease moving between workers re-reads a little; one point per event is enough.
            if event_id and any(point[2] == event_id for point in session.points):
                return
            self.streams["predictions"].add(arrival_ms)
            session.points.append((arrival_ms, float(prediction["p_buy"]), event_id))
            session.latest = prediction
            self.decisions.appendleft(decision_row(prediction, arrival_ms))

    def session_json(self, session_id: str, session: Session) -> dict:
        latest = session.latest
        return {"session_id": session_id, "p_buy": latest.get("p_buy"), "decision": latest.get("decision"),
                "events": latest.get("events_in_session"), "model_version": latest.get("model_version"),
                "threshold": latest.get("threshold"), "offered": session_id in self.offered,
                "offer": self.offered.get(session_id),
                "points": [{"t": t, "p": p} for t, p, _ in session.points]}

    def snapshot(self) -> dict:
        with self.lock:
            rates = {name: rate.per_s() for name, rate in self.streams.items()}
            totals = {name: rate.total for name, rate in self.streams.items()}
            checked = rates["enriched"] + rates["bad"]
            return {
                "generated_at": int(time.time() * 1000),
                "uptime_s": round(time.time() - self.started, 1),
                "stages": [
                    {"name": "collector requests", "per_s": self.counters["collector"].per_s(),
                     "source": "collector /metrics"},
                    {"name": "raw records", "per_s": rates["raw"], "source": "raw stream"},
                    {"name": "enriched events", "per_s": rates["enriched"], "source": "enriched stream"},
                    {"name": "bad rows", "per_s": rates["bad"], "source": "bad stream"},
                    {"name": "predictions", "per_s": rates["predictions"], "source": "predictions stream"},
                    {"name": "offers", "per_s": self.counters["offers"].per_s(), "source": "discount /metrics"},
                ],
                "stream_totals": totals,
                "bad_rate": rates["bad"] / checked if checked else None,
                "lag_ms": {"liveview (predictions)": self.stream_lag_ms,
                           **{name: c.get("lag_ms") for name, c in self.components.items() if c.get("up")}},
                "components": dict(self.components),
                "sessions": [self.session_json(sid, s) for sid, s in
                             islice(reversed(self.sessions.items()), self.settings.sessions_shown)],
                "decisions": list(self.decisions),
                "offers": list(self.offers),
                "model": dict(self.model),
                "errors": dict(self.errors),
            }

    def session_lookup(self, session_id: str) -> dict | None:
        with self.lock:
            session = self.sessions.get(session_id)
            return self.session_json(session_id, session) if session else None

    def scorer_status(self) -> str:
        """Whether the scorer answers its metrics scrape: why a session may have no score yet."""
        with self.lock:
            scorer = self.components.get("scorer")
        if scorer is None:
            return "unknown"
        return "up" if scorer["up"] else "not configured" if scorer["url"] is None else "down"


def finite(value):
    """``value`` with NaN and Infinity (which Python's json accepts, e.g. in a model.json) as None:
    the page's JSON.parse rejects them, and one would break the page for every viewer."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def decision_row(prediction: dict, arrival_ms: int) -> dict:
    return {"session_id": prediction.get("session_id"), "p_buy": prediction.get("p_buy"),
            "decision": prediction.get("decision"), "at": arrival_ms, "model_version": prediction.get("model_version"),
            "latency_us": prediction.get("latency_us"), "events": prediction.get("events_in_session")}


# ------------------------------------------------------------------------------------ streams


class LookbackStream(KinesisStream):
    """A Kinesis stream whose readers without a position start ``lookback_s`` ago, not at the horizon."""

    def __init__(self, client, name: str, lookback_s: float):
        super().__init__(client, name)
        self.lookback_s = lookback_s

    def reader(self, shard_id: str, after_sequence: str | None):
        if after_sequence:
            return KinesisShardReader(self, shard_id, after_sequence)
        return TimedShardReader(self, shard_id, time.time() - self.lookback_s)


class StreamTail:
    """Counts the records arriving on a stream, reading every shard from where it was at start-up."""

    def __init__(self, client, name: str, rate: ArrivalRate, window_s: int, lock: threading.Lock):
        self.stream = LookbackStream(client, name, window_s)
        self.rate = rate
        self.lock = lock                                     # the state's: the page reads the rate
        self.readers: dict[str, object] = {}
        self.listed_at = 0.0

    def read(self) -> None:
        if time.monotonic() - self.listed_at > 30:           # pick up new shards after a reshard
            for shard in self.stream.list_shards():
                self.readers.setdefault(shard.shard_id, self.stream.reader(shard.shard_id, None))
            self.listed_at = time.monotonic()
        for reader in self.readers.values():
            records = reader.read(10_000).records
            with self.lock:
                for record in records:
                    self.rate.add(record.arrival_ms)


def prediction_consumer(settings: LiveViewSettings) -> Consumer:
    """Our own consumer of the predictions stream; it ignores checkpoints and always starts recent."""
    stream = LookbackStream(aws.client("kinesis", settings.region), settings.predictions_stream, settings.lookback_s)
    leases = DynamoLeaseTable(aws.client("dynamodb", settings.region), settings.lease_table,
                              f"{APP}#{settings.predictions_stream}")
    return Consumer(stream, leases, batch_limit=1000, start_after=lambda lease: None)


def watch_streams(state: LiveState, stop: threading.Event) -> None:
    settings = state.settings
    consumer = prediction_consumer(settings)
    kinesis = aws.client("kinesis", settings.region)
    tails = [StreamTail(kinesis, getattr(settings, f"{name}_stream"), state.streams[name], settings.rate_window_s,
                        state.lock)
             for name in ("raw", "enriched", "bad")] if settings.count_streams else []
    try:
        while True:
            guarded(state, "predictions", lambda: read_predictions(state, consumer))
            guarded(state, "stream counts", lambda: [tail.read() for tail in tails])
            if stop.wait(settings.poll_s):
                return
    finally:
        guarded(state, "predictions", consumer.close)


def read_predictions(state: LiveState, consumer: Consumer) -> None:
    for batch in consumer.poll():
        for record in batch.records:
            try:
                prediction = json.loads(record.data)
            except (ValueError, RecursionError):          # RecursionError: absurdly nested JSON
                prediction = None
            # Skip, not raise: an exception here would drop every later record of this poll.
            if not isinstance(prediction, dict):
                log.warning("skipping a record that is not a JSON object on shard %s", batch.shard_id)
                continue
            state.add_prediction(prediction, record.arrival_ms)
        if batch.shard_end:
            consumer.checkpoint(batch)     # a finished parent lets its children become readable
    state.stream_lag_ms = consumer.max_lag_ms        # one attribute store: no lock needed


def guarded(state: LiveState, source: str, work) -> None:
    """Run one round of a source; a failure is shown on the page and retried next round."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the view keeps showing what it can; the thread must not die
        with state.lock:
            state.errors[source] = f"{type(exc).__name__}: {exc}"
        log.warning("%s: %s", source, exc)
        return
    with state.lock:
        state.errors.pop(source, None)


# ------------------------------------------------------------------------------------ sources


def scrape_components(state: LiveState) -> None:
    found = {}
    for name, url in state.settings.metrics_urls().items():
        found[name] = scrape_one(url)
        counter = {"collector": "collector_requests_total", "discount": "discount_offers_total"}.get(name)
        totals = found[name].pop("totals", {})
        if counter in totals:
            with state.lock:
                state.counters["collector" if name == "collector" else "offers"].add(totals[counter])
    with state.lock:
        state.components = found


def scrape_one(url: str) -> dict:
    if not url:
        return {"url": None, "up": False, "error": "not configured"}
    try:
        totals = scrape(url)
    except (OSError, ValueError) as exc:
        return {"url": url, "up": False, "error": str(getattr(exc, "reason", exc))}
    return {"url": url, "up": True, "error": None, "lag_ms": lag_ms(totals), "totals": totals}


def plain(item: dict) -> dict:
    """A DynamoDB item as plain JSON values."""
    return {key: float(value["N"]) if "N" in value else value.get("S", value.get("BOOL"))
            for key, value in item.items()}


def scan_offers(dynamodb, table: str, limit: int) -> list[dict]:
    """Up to ``limit`` offer items (the budget rows share the table and are left out)."""
    offers, start, scanned = [], None, 0
    while scanned < limit:
        kwargs = {"TableName": table, "Limit": min(500, limit - scanned), "FilterExpression": "#k = :offer",
                  "ExpressionAttributeNames": {"#k": "kind"}, "ExpressionAttributeValues": {":offer": {"S": "offer"}}}
        if start:
            kwargs["ExclusiveStartKey"] = start
        response = dynamodb.scan(**kwargs)
        offers += [plain(item) for item in response["Items"]]
        scanned += response["ScannedCount"]
        start = response.get("LastEvaluatedKey")
        if not start:
            break
    return offers


def read_offers(state: LiveState, dynamodb) -> None:
    offers = scan_offers(dynamodb, state.settings.offers_table, state.settings.offers_scan_limit)
    offers.sort(key=lambda offer: str(offer.get("offered_at", "")), reverse=True)
    with state.lock:
        state.offers = offers[: state.settings.offers_shown]
        state.offered = {str(offer.get("session_id")): {"code": offer.get("code"),
                                                         "discount_percent": offer.get("discount_percent")}
                         for offer in offers}


def read_model(state: LiveState, s3) -> None:
    settings = state.settings
    version = registry.current_version(s3, settings.bucket, settings.model_name)
    if version != state.model.get("version") or "error" in state.model:
        info = model_info(s3, settings.bucket, settings.model_name)
        with state.lock:
            state.model = info


def watch_sources(state: LiveState, stop: threading.Event) -> None:
    settings = state.settings
    dynamodb, s3 = aws.client("dynamodb", settings.region), aws.client("s3", settings.region)
    due = {"offers": 0.0, "model": 0.0}
    while True:
        guarded(state, "metrics", lambda: scrape_components(state))
        if time.monotonic() >= due["offers"]:
            guarded(state, "offers", lambda: read_offers(state, dynamodb))
            due["offers"] = time.monotonic() + settings.offers_every_s
        if time.monotonic() >= due["model"]:
            guarded(state, "model", lambda: read_model(state, s3))
            due["model"] = time.monotonic() + settings.model_every_s
        if stop.wait(settings.poll_s):
            return


# ------------------------------------------------------------------------------------ HTTP


def safe_file(base: Path, relative: str) -> Path | None:
    """The file under ``base`` that a URL path names, or None (missing, a directory, or outside base)."""
    if "\x00" in relative:
        return None
    base = base.resolve()
    try:
        target = (base / relative.lstrip("/")).resolve()
        if target.is_dir():
            target = (target / "index.html").resolve()      # checked after: it may be a link out of base too
        if not target.is_relative_to(base):
            return None
        return target if target.is_file() else None
    except OSError:              # e.g. a name over 255 bytes (ENAMETOOLONG): no such file either
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "clickstream-liveview"
    server: LiveViewServer
    # Seconds a connection may stay silent: each one holds a thread, so idle or half-sent requests are closed.
    timeout = 10

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        settings = self.server.state.settings
        if path == "/health":
            self.send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/api/state":
            self.send_json(self.server.state.snapshot())
        elif path.startswith("/api/session/"):
            self.send_session(path.removeprefix("/api/session/"))
        elif path in ("/", "/index.html"):
            self.send_file(STATIC, "index.html")
        elif path.startswith("/static/"):
            self.send_file(STATIC, path.removeprefix("/static/"))
        elif path == "/shop":
            self.redirect("/shop/")
        elif path.startswith("/shop/"):
            self.send_file(settings.shop_dir, path.removeprefix("/shop/"))
        elif path.startswith("/node_modules/@snowplow/"):
            self.send_file(settings.tracker_dir, path.removeprefix("/node_modules/@snowplow/"))
        else:
            self.send(404, b"not found\n", "text/plain; charset=utf-8")

    def send_session(self, session_id: str) -> None:
        # A shop page served elsewhere (demo.web, ?liveview=) reads this cross-origin. Any origin may:
        # the answer is one pseudonymous session's score, read-only and fetched without credentials,
        # and the shop's origin is not among the settings.
        cors = {"Access-Control-Allow-Origin": "*"}
        found = self.server.state.session_lookup(session_id)
        if found is None:
            self.send_json({"session_id": session_id, "error": "not scored recently",
                            "scorer": self.server.state.scorer_status()}, 404, cors)
        else:
            self.send_json(found, 200, cors)

    def send_file(self, base: Path, relative: str) -> None:
        target = safe_file(base, relative)
        if target is None:
            self.send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/json":
            kind += "; charset=utf-8"
        self.send(200, target.read_bytes(), kind)

    def send_json(self, value: dict, status: int = 200, headers: dict[str, str] | None = None) -> None:
        # allow_nan=False: finite() must have caught every NaN; a miss fails loudly here, not in every page.
        body = json.dumps(finite(value), default=str, allow_nan=False).encode()
        self.send(status, body, "application/json", headers)

    def redirect(self, location: str) -> None:
        self.send_response(301)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class LiveViewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: LiveViewSettings, state: LiveState):
        super().__init__((settings.host, settings.port), Handler)
        self.state = state


class LiveView:
    """The server and its two gathering threads; ``start()`` then ``close()``."""

    def __init__(self, settings: LiveViewSettings):
        self.state = LiveState(settings)
        self.server = LiveViewServer(settings, self.state)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=watch_streams, args=(self.state, self.stop), name="streams", daemon=True),
                        threading.Thread(target=watch_sources, args=(self.state, self.stop), name="sources", daemon=True),
                        threading.Thread(target=self.server.serve_forever, name="http", daemon=True)]

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LiveView:
        for thread in self.threads:
            thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self.threads:
            thread.join(timeout=15)


def main() -> int:
    """Serve a live page of the whole pipeline (events/s per stage, stream lag, live sessions with
    their buy probability, offers, the current model) until SIGTERM or Ctrl-C.

    Settings come from CLICKSTREAM_* variables and the [liveview] section of the TOML file named
    by CLICKSTREAM_CONFIG (docs/liveview.md).
    """
    settings = settings_or_exit(LiveViewSettings, "liveview")
    logs.setup(settings.log_level)
    stopping = stop_on_signals()
    with listening("host, port", settings.host, settings.port):
        view = LiveView(settings).start()
    log.info("live view on %s (predictions from %s, model %s)", view.url, settings.predictions_stream,
             settings.model_name)
    stopping.wait()
    view.close()
    log.info("live view stopped")
    return 0


if __name__ == "__main__":
    run_command(main)
