"""Enricher test helpers: raw records as the collector writes them, a capture server that turns real
tracker requests into raw records, a static Iglu registry over HTTP, and stream readers."""
from __future__ import annotations

import base64
import functools
import http.server
import threading
import time
import urllib.parse
from pathlib import Path

import orjson

from common import aws
from common.streams import KinesisStream
from enrich.config import EnrichSettings
from enrich.pipeline import Enricher
from tests.conftest import wait_for  # noqa: F401 - re-exported for the enrich tests

KEY = "test-pseudonymisation-key"
TP2 = "/com.snowplowanalytics.snowplow/tp2"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
UNSTRUCT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")


def settings(**overrides) -> EnrichSettings:
    values = {"pseudonymisation_key": KEY, **overrides}
    values = EnrichSettings(**values)
    values.validate()
    return values


def enricher(**overrides) -> Enricher:
    return Enricher(settings(**overrides))


def record(*, method: str = "GET", path: str = "/i", querystring: str | None = None, body: str | None = None,
           ip: str | None = "203.0.113.7", nuid: str | None = "8e2d4b1c-5f7a-4c3e-9a1b-2c3d4e5f6a7b",
           useragent: str | None = CHROME, referer: str | None = None, tstamp: int = 1_764_409_956_000,
           **extra) -> dict:
    """A raw record exactly as docs/contracts.md describes it."""
    return {"schema": "iglu:com.clickstream/raw_record/jsonschema/1-0-0", "collector_tstamp": tstamp, "ip": ip,
            "useragent": useragent, "referer": referer, "path": path, "querystring": querystring,
            "method": method, "content_type": "application/json; charset=UTF-8" if method == "POST" else None,
            "body": body, "body_base64": None, "headers": ["Host: collector.test"], "network_userid": nuid,
            "collector": "clickstream-collector/0.1.0", "hostname": "collector.test", **extra}


def get_record(params: dict, **kwargs) -> bytes:
    return orjson.dumps(record(querystring=urllib.parse.urlencode(params), **kwargs))


def post_record(events: list, schema: str = PAYLOAD_DATA, **kwargs) -> bytes:
    body = orjson.dumps({"schema": schema, "data": events}).decode()
    return orjson.dumps(record(method="POST", path=TP2, body=body, **kwargs))


def sdj(schema: str, data) -> dict:
    return {"schema": schema, "data": data}


def b64(value, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(orjson.dumps(value)).decode()
    return text if pad else text.rstrip("=")


def contexts(*entries: dict) -> dict:
    return sdj(CONTEXTS, list(entries))


def unstruct(schema: str, data) -> dict:
    return sdj(UNSTRUCT, sdj(schema, data))


def page_type(kind: str = "product", category: str | None = "shoes") -> dict:
    data = {"type": kind} if category is None else {"type": kind, "category": category}
    return sdj("iglu:com.clickshop/page_type/jsonschema/1-0-0", data)


# ------------------------------------------------------------------------------ HTTP servers


class _Server:
    def __init__(self, handler, port: int = 0):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


class CaptureServer(_Server):
    """A stand-in for the collector's request -> raw record step, for tracker tests that need no AWS.

    It answers like the collector (a pixel for GET, ``ok`` for POST) and keeps each request as the raw
    record docs/contracts.md defines."""

    def __init__(self, ip: str = "198.51.100.23", nuid: str = "4b5c6d7e-8f90-4a1b-8c2d-3e4f5a6b7c8d"):
        self.records: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _capture(self, body: bytes | None) -> None:
                path, _, query = self.path.partition("?")
                server.records.append(record(
                    method=self.command, path=path, querystring=query or None,
                    body=body.decode() if body is not None else None, ip=ip, nuid=nuid,
                    useragent=self.headers.get("User-Agent"), referer=self.headers.get("Referer"),
                    tstamp=int(time.time() * 1000)))

            def do_GET(self):
                self._capture(None)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(PIXEL)))
                self._cors()
                self.end_headers()
                self.wfile.write(PIXEL)

            def do_POST(self):
                self._capture(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self._cors()
                self.end_headers()
                self.wfile.write(b"ok")

            def do_OPTIONS(self):
                # A browser's CORS preflight before a JSON POST, answered as the collector does.
                self.send_response(200)
                self._cors()
                self.send_header("Access-Control-Allow-Headers", "Content-Type, SP-Anonymous")
                self.end_headers()

            def _cors(self):
                self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
                self.send_header("Access-Control-Allow-Credentials", "true")

            def log_message(self, *args):
                pass

        super().__init__(Handler)

    def raw(self) -> list[bytes]:
        return [orjson.dumps(item) for item in self.records]


class StaticRegistry(_Server):
    """A static Iglu registry: serves ``root`` over HTTP and counts the requests per path; ``port`` brings a
    stopped one back at the same address."""

    def __init__(self, root: Path, port: int = 0):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        super().__init__(functools.partial(Handler, directory=str(root)), port)


def write_schema(root: Path, key: str, body: dict, description: str = "test schema") -> None:
    vendor, name, fmt, version = key.removeprefix("iglu:").split("/")
    path = root / "schemas" / vendor / name / fmt / version
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = {"$schema": "http://iglucentral.com/schemas/com.snowplowanalytics.self-desc/schema/jsonschema/1-0-0#",
              "description": description, "self": {"vendor": vendor, "name": name, "format": fmt, "version": version},
              **body}
    path.write_bytes(orjson.dumps(schema))


# ------------------------------------------------------------------------------ streams


def read_stream(name: str, region: str = "us-east-1") -> list[tuple[str, bytes]]:
    """Every (partition key, data) in a stream, all shards, from the start."""
    stream = KinesisStream(aws.client("kinesis", region), name)
    out = []
    for shard in stream.list_shards():
        reader = stream.reader(shard.shard_id, None)
        while True:
            result = reader.read(10_000)
            out += [(r.partition_key, r.data) for r in result.records]
            if not result.records:
                break
    return out


# ------------------------------------------------------------------------------ a real tracker

SHOPPER = {"user_id": "alice.shopper@example.com", "duid": "5a2f9c1e-7d3b-4e8a-9f10-2b3c4d5e6f70",
           "sid": "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "ip": "192.0.2.77"}


def track_shop_session(endpoint: str, method: str, batch_size: int = 1) -> int:
    """A shop visit sent by the official Python tracker (PyPI snowplow-tracker); returns how many events.

    ``endpoint`` is ``http://host:port`` of a collector (or the capture server)."""
    import warnings

    from snowplow_tracker import Emitter, SelfDescribingJson, Subject, Tracker
    from snowplow_tracker.events import PageView, SelfDescribing, StructuredEvent

    host, port = endpoint.removeprefix("http://").split(":")
    failures = []
    emitter = Emitter(host, protocol="http", port=int(port), method=method, batch_size=batch_size,
                      on_failure=lambda count, items: failures.append(count))
    subject = (Subject().set_user_id(SHOPPER["user_id"]).set_domain_user_id(SHOPPER["duid"])
               .set_domain_session_id(SHOPPER["sid"]).set_domain_session_index(2).set_ip_address(SHOPPER["ip"])
               .set_screen_resolution(1440, 900).set_viewport(1200, 800).set_lang("en-GB")
               .set_useragent(CHROME))
    tracker = Tracker("shop", emitter, subject=subject, app_id="clickshop")
    session = SelfDescribingJson("iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2", {
        "userId": SHOPPER["duid"], "sessionId": SHOPPER["sid"], "sessionIndex": 2, "storageMechanism": "COOKIE_1"})

    def page(kind: str, category: str | None = None):
        data = {"type": kind, **({"category": category} if category else {})}
        return [SelfDescribingJson("iglu:com.clickshop/page_type/jsonschema/1-0-0", data), session]

    def shop(name: str, data: dict, kind: str):
        return SelfDescribing(SelfDescribingJson(f"iglu:com.clickshop/{name}/jsonschema/1-0-0", data), context=page(kind))

    events = [
        PageView(page_url="https://clickshop.test/?utm_source=newsletter&utm_medium=email", page_title="Home",
                 referrer="https://mail.google.com/mail/u/0/", context=page("home")),
        PageView(page_url="https://clickshop.test/p/sku-1", page_title="Red shoes",
                 referrer="https://clickshop.test/", context=page("product", "shoes")),
        shop("product_view", {"sku": "sku-1", "category": "shoes", "price": 59.9, "currency": "EUR"}, "product"),
        shop("add_to_cart", {"sku": "sku-1", "category": "shoes", "price": 59.9, "quantity": 1, "currency": "EUR"}, "product"),
        StructuredEvent(category="checkout", action="coupon", label="WELCOME10", value=10, context=page("cart")),
        shop("checkout_step", {"step": 1, "name": "cart review"}, "checkout"),
        shop("purchase", {"order_id": "order-1", "total": 53.91, "items": 1, "currency": "EUR"}, "confirmation"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for event in events:
            tracker.track(event)
        tracker.track_ecommerce_transaction("order-1", 53.91, currency="EUR", items=[
            {"sku": "sku-1", "price": 59.9, "quantity": 1, "name": "Red shoes", "category": "shoes"}])
        tracker.flush()
    assert not failures, f"tracker could not send {failures}"
    return len(events) + 2   # the transaction is one tr event plus one ti per item


# ---------------------------------------------------------------- bad rows in Snowplow's shapes

LOOKUP_ERRORS = {"NotFound", "RepoFailure", "ClientFailure"}
NOT_IGLU_ERRORS = {"INVALID_SCHEMAVER", "INVALID_IGLUURI", "INVALID_DATA_PAYLOAD", "INVALID_SCHEMA"}


def _text(value, limit: int | None = None, nullable: bool = False) -> bool:
    return (nullable and value is None) or (isinstance(value, str) and (limit is None or len(value) <= limit))


def _field_message(m: dict) -> bool:
    return set(m) == {"field", "value", "expectation"} and _text(m["field"], 64) and _text(m["value"], nullable=True) \
        and _text(m["expectation"], 256)


def _iglu_message(m: dict) -> bool:
    if set(m) == {"json", "error"}:
        return m["error"] in NOT_IGLU_ERRORS
    if set(m) == {"schemaKey", "schemaCriterion"}:
        return _text(m["schemaKey"]) and _text(m["schemaCriterion"])
    if set(m) != {"schemaKey", "error"} or not _text(m["schemaKey"]):
        return False
    error = m["error"]
    if error.get("error") == "ResolutionError":
        return set(error) == {"error", "lookupHistory"} and len(error["lookupHistory"]) > 0 and all(
            set(item) == {"repository", "errors", "attempts", "lastAttempt"} and isinstance(item["attempts"], int)
            and _text(item["lastAttempt"]) and item["errors"]
            and all(e["error"] in LOOKUP_ERRORS and _text(e.get("message", ""), 256) for e in item["errors"])
            for item in error["lookupHistory"])
    return error.get("error") == "ValidationError" and set(error) == {"error", "dataReports"} and all(
        set(report) == {"message", "path", "keyword", "targets"} for report in error["dataReports"])


def badrow_shape_problems(row: dict) -> list[str]:
    """Where a bad row's processor and failure depart from Snowplow's badrows schemas (our own reading
    of them). Payloads are not checked: ours carry the raw record (docs/contracts.md)."""
    kind = row["schema"].split("/")[1]
    data, problems = row["data"], []
    if set(data) != {"processor", "failure", "payload"} or set(data["processor"]) != {"artifact", "version"}:
        problems.append("data or processor keys")
    failure = data["failure"]
    if not _text(failure.get("timestamp")):
        problems.append("failure.timestamp")
    messages = failure.get("messages", [])
    if kind in ("tracker_protocol_violations", "adapter_failures"):
        if not (_text(failure.get("vendor"), 64) and _text(failure.get("version"), 16)):
            problems.append("vendor or version")
        problems += [f"message {m}" for m in messages if not (_field_message(m) or _iglu_message(m))]
    elif kind == "schema_violations":
        problems += [f"message {m}" for m in messages if not _iglu_message(m)]
    elif kind == "enrichment_failures":
        problems += [f"message {m}" for m in messages if set(m) != {"enrichment", "message"} or not (
            _field_message(m["message"]) or (set(m["message"]) == {"error"} and _text(m["message"]["error"], 512)))]
    elif kind == "size_violation" and not (
            isinstance(failure.get("maximumAllowedSizeBytes"), int) and isinstance(failure.get("actualSizeBytes"), int)
            and _text(failure.get("expectation"), 256) and isinstance(data["payload"], str)):
        problems.append("size fields")
    return problems
