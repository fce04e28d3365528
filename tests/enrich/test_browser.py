"""The official browser tracker (npm @snowplow/browser-tracker, unchanged) in headless Chromium, with
its default contexts on: its requests, captured as raw records, must all enrich cleanly."""
from __future__ import annotations

import shutil
import subprocess
import time

import orjson
import pytest

from enrich.enrichments import Pseudonymiser
from tests.conftest import ROOT
from tests.enrich.helpers import KEY, CaptureServer, StaticRegistry, enricher

BUNDLE = ROOT / "node_modules" / "@snowplow" / "browser-tracker" / "dist" / "index.umd.min.js"
CHROMIUM = "/usr/bin/chromium"
PAGE = """<!doctype html>
<html><head><title>Red shoes</title><script src="sp.js"></script></head><body><p>shop</p>
<script>
  var t = snowplowBrowserTracking;
  var options = {appId: "shop-%(method)s", eventMethod: "%(method)s", bufferSize: 1,
                 contexts: {webPage: true, session: true, browser: true}};
  t.newTracker("%(method)s", "%(collector)s", options);
  var pageType = [{schema: "iglu:com.clickshop/page_type/jsonschema/1-0-0", data: {type: "product", category: "shoes"}}];
  t.setUserId("carol@example.com");
  t.trackPageView({context: pageType});
  t.trackSelfDescribingEvent({event: {schema: "iglu:com.clickshop/product_view/jsonschema/1-0-0",
                                      data: {sku: "sku-9", category: "shoes", price: 79.5, currency: "EUR"}},
                              context: pageType});
  t.trackStructEvent({category: "shop", action: "zoom", label: "sku-9", value: 1});
</script></body></html>
"""


def events_in(records: list[dict]) -> int:
    """Tracker events captured so far (a POST may batch several)."""
    return sum(len(orjson.loads(r["body"])["data"]) if r["method"] == "POST" else 1 for r in list(records))


@pytest.mark.browser
@pytest.mark.parametrize("method", ["get", "post"])
def test_browser_tracker_events_with_default_contexts_enrich_cleanly(method, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(BUNDLE, site / "sp.js")
    with CaptureServer() as collector, StaticRegistry(site) as web:
        (site / "index.html").write_text(PAGE % {"method": method, "collector": collector.url})
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0", web.url + "/index.html"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while events_in(collector.records) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            browser.kill()
            browser.wait(10)
        raw = collector.raw()
    good, bad = [], []
    worker = enricher()
    for item in raw:
        events, rows = worker.process(item)
        good += [event for _, event in events]
        bad += rows
    assert bad == []
    assert sorted(e["event_name"] for e in good) == ["event", "page_view", "product_view"]
    for event in good:
        assert event["app_id"] == f"shop-{method}" and event["v_tracker"].startswith("js-")
        schemas = {c["schema"].split("/")[1]: c for c in event["contexts"]}
        assert {"web_page", "client_session", "browser_context"} <= set(schemas)
        assert ("page_type" in schemas) == (event["event_name"] != "event")
        session = schemas["client_session"]["data"]
        assert event["domain_sessionid"] == session["sessionId"]
        # The session context repeats the cookie id: it is pseudonymised like domain_userid.
        assert session["userId"] == event["domain_userid"] and len(session["userId"]) == 64
        assert event["user_id"] == Pseudonymiser(KEY)("carol@example.com")
        assert event["br_family"] and event["dvce_screenwidth"] and event["br_viewwidth"]
