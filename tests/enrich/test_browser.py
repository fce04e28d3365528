"""The official browser tracker (npm @snowplow/browser-tracker, unchanged) in headless Chromium, with
its default contexts on, and with its snowplow-ecommerce plugin: its requests, captured as raw
records, must all enrich cleanly."""
from __future__ import annotations

import shutil
import time

import orjson
import pytest

from common.features import FEATURE_NAMES, is_purchase, session_features
from enrich.enrichments import Pseudonymiser
from tests.conftest import ROOT, headless_chromium
from tests.enrich.helpers import KEY, CaptureServer, StaticRegistry, enricher

BUNDLE = ROOT / "node_modules" / "@snowplow" / "browser-tracker" / "dist" / "index.umd.min.js"
ECOMMERCE_BUNDLE = ROOT / "node_modules" / "@snowplow" / "browser-plugin-snowplow-ecommerce" / "dist" / "index.umd.min.js"
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


def browse(tmp_path, page: str, events: int) -> list[dict]:
    """The raw records of ``page`` (its ``%(collector)s`` the capturing collector's URL) in Chromium,
    once it has sent ``events`` events (or after a minute)."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(BUNDLE, site / "sp.js")
    shutil.copy(ECOMMERCE_BUNDLE, site / "ecommerce.js")
    with CaptureServer() as collector, StaticRegistry(site) as web:
        (site / "index.html").write_text(page % {"collector": collector.url})
        with headless_chromium(web.url + "/index.html", tmp_path / "profile"):
            deadline = time.monotonic() + 60
            while events_in(collector.records) < events and time.monotonic() < deadline:
                time.sleep(0.2)
        return collector.raw()


def enrich_all(raw: list[dict]) -> tuple[list[dict], list]:
    good, bad = [], []
    worker = enricher()
    for item in raw:
        events, rows = worker.process(item)
        good += [event for _, event in events]
        bad += rows
    return good, bad


def events_in(records: list[dict]) -> int:
    """Tracker events captured so far (a POST may batch several)."""
    return sum(len(orjson.loads(r["body"])["data"]) if r["method"] == "POST" else 1 for r in list(records))


@pytest.mark.browser
@pytest.mark.parametrize("method", ["get", "post"])
def test_browser_tracker_events_with_default_contexts_enrich_cleanly(method, tmp_path):
    raw = browse(tmp_path, PAGE % {"method": method, "collector": "%(collector)s"}, events=3)
    good, bad = enrich_all(raw)
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


ECOMMERCE_PAGE = """<!doctype html>
<html><head><title>Red shoes</title><script src="sp.js"></script><script src="ecommerce.js"></script></head>
<body><p>shop</p>
<script>
  var t = snowplowBrowserTracking, shop = snowplowEcommerceAccelerator;
  t.newTracker("sp", "%(collector)s", {appId: "shop-plugin", eventMethod: "post", bufferSize: 1,
                                        contexts: {webPage: true, session: true},
                                        plugins: [shop.SnowplowEcommercePlugin()]});
  shop.setEcommerceUser({id: "customer-42", email: "carol@example.com", is_guest: false});
  shop.setPageType({type: "product", language: "en", locale: "en-GB"});
  t.trackPageView();
  var shoes = {id: "sku-9", name: "Red shoes", category: "Women/Shoes", price: 79.5, currency: "EUR"};
  shop.trackProductView(shoes);
  shop.trackProductListView({name: "related", products: [
    {id: "sku-1", category: "Women/Shoes", price: 10, currency: "EUR", position: 1}]});
  shop.trackAddToCart({products: [Object.assign({quantity: 2}, shoes)], total_value: 159, currency: "EUR"});
  shop.trackRemoveFromCart({products: [Object.assign({quantity: 1}, shoes)], total_value: 79.5, currency: "EUR"});
  shop.trackCheckoutStep({step: 2, shipping_postcode: "SW1A 1AA", shipping_full_address: "1 Main Street, London",
                          delivery_method: "standard"});
  shop.trackTransaction({transaction_id: "T-1001", revenue: 79.5, currency: "EUR", payment_method: "card",
                         total_quantity: 1, products: [Object.assign({quantity: 1}, shoes)]});
</script></body></html>
"""


@pytest.mark.browser
def test_the_ecommerce_plugins_events_enrich_with_personal_data_pseudonymised_and_reach_the_features(tmp_path):
    # The plugin's schemas were not embedded: every one of its events became a bad row, and the fold
    # read none of them (no product views, cart or checkout features, no purchase to learn from).
    good, bad = enrich_all(browse(tmp_path, ECOMMERCE_PAGE, events=7))
    assert bad == []
    sent = ["page_view", "product_view", "list_view", "add_to_cart", "remove_from_cart", "checkout_step", "transaction"]
    actions = [(e["unstruct_event"] or {}).get("data", {}).get("type", e["event_name"]) for e in good]
    assert sorted(actions) == sorted(sent)
    # The tracker batches events queued while a request is in flight, often created in one millisecond;
    # the enricher hands them on in the lake's order, not the tracker's (test_tracker.py). Here, in the
    # order sent.
    good = [event for _, event in sorted(zip(actions, good, strict=True), key=lambda pair: sent.index(pair[0]))]
    pseudonym = Pseudonymiser(KEY)
    for event in good:
        entities = {c["schema"].split("/")[1]: c["data"] for c in event["contexts"]}
        assert entities["user"] == {"id": pseudonym("customer-42"), "email": pseudonym("carol@example.com"),
                                    "is_guest": False}
        assert entities["page"]["type"] == "product"
    checkout = {c["schema"].split("/")[1]: c["data"] for c in good[5]["contexts"]}["checkout_step"]
    assert checkout["shipping_postcode"] == pseudonym("SW1A 1AA")
    assert checkout["shipping_full_address"] == pseudonym("1 Main Street, London")
    assert checkout["delivery_method"] == "standard"
    transaction = {c["schema"].split("/")[1]: c["data"] for c in good[6]["contexts"]}["transaction"]
    assert transaction["transaction_id"] == pseudonym("T-1001") and transaction["revenue"] == 79.5
    assert [is_purchase(e) for e in good] == [False] * 6 + [True]
    row = dict(zip(FEATURE_NAMES, session_features(good)[-1], strict=True))
    assert (row["product_views"], row["distinct_products"], row["checkout_step_max"]) == (1, 1, 2)
    assert (row["cart_adds"], row["cart_removes"], row["cart_items"], row["cart_value"]) == (1, 1, 1, 79.5)
