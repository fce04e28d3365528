"""The official browser tracker (npm @snowplow/browser-tracker, unchanged) in headless Chromium."""
from __future__ import annotations

import functools
import shutil
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import orjson
import pytest

from tests.collector.conftest import collector_env, read_stream
from tests.conftest import ROOT, headless_chromium

BUNDLE = ROOT / "node_modules" / "@snowplow" / "browser-tracker" / "dist" / "index.umd.min.js"

PAGE = """<!doctype html>
<html><head><title>Product page</title><script src="sp.js"></script></head>
<body><p>shop</p>
<script>
  var t = snowplowBrowserTracking;
  t.newTracker("post", "http://127.0.0.1:{port}", {{appId: "{app}-post", eventMethod: "post", bufferSize: 1}});
  t.newTracker("get", "http://127.0.0.1:{port}", {{appId: "{app}-get", eventMethod: "get"}});
  t.trackPageView({{context: [{{schema: "iglu:com.clickshop/page_type/jsonschema/1-0-0", data: {{type: "product"}}}}]}});
  t.trackStructEvent({{category: "shop", action: "add-to-cart", label: "sku-1", value: 2}});
</script></body></html>
"""


def events_of(record: dict) -> list[dict]:
    if record["method"] == "GET":
        return [dict(parse_qsl(record["querystring"]))]
    return orjson.loads(record["body"])["data"]


@pytest.fixture
def site(tmp_path):
    """A local web server for the shop page; returns (folder, url)."""
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(BUNDLE, folder / "sp.js")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.browser
def test_browser_tracker_page_view_reaches_the_raw_stream(streams, make_collector, tmp_path, site):
    collector = make_collector(collector_env(streams, tmp_path / "spool"))
    folder, url = site
    app = f"web-{uuid.uuid4().hex[:8]}"
    (folder / "index.html").write_text(PAGE.format(port=collector.port, app=app))
    def mine(records):
        return [(r, e) for r in records for e in events_of(r) if e.get("aid", "").startswith(app)]

    with headless_chromium(url, tmp_path / "profile"):
        found = mine(read_stream(streams.raw_stream, until=lambda r: len(mine(r)) >= 4, timeout=60))
    kinds = sorted((e["aid"].rsplit("-", 1)[1], e["e"]) for _, e in found)
    assert kinds == [("get", "pv"), ("get", "se"), ("post", "pv"), ("post", "se")]
    for record, event in found:
        assert event["tv"].startswith("js-") and event["p"] == "web"
        assert record["useragent"] and "Chrome" in record["useragent"]
        # Chromium's default referrer policy sends only the origin to another origin.
        assert record["referer"] == url.rsplit("/", 1)[0] + "/"
        assert record["_key"] == event["sid"]          # a session's hits stay on one raw shard
        if event["e"] == "pv":
            assert event["page"] == "Product page" and event["url"] == url
    posted = [r for r, _ in found if r["method"] == "POST"]
    assert {r["path"] for r in posted} == {"/com.snowplowanalytics.snowplow/tp2"}
    assert all(r["content_type"].startswith("application/json") for r in posted)
