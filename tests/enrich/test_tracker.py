"""Real requests from the official Python tracker, captured as raw records, through the enricher;
and the privacy guarantee: none of the identifiers sent comes out in the enriched output."""
from __future__ import annotations

import orjson
import pytest

from enrich.enrichments import Pseudonymiser
from tests.enrich.helpers import KEY, SHOPPER, CaptureServer, enricher, track_shop_session


def enrich_all(raw: list[bytes], **settings):
    worker = enricher(**settings)
    good, bad = [], []
    for item in raw:
        events, rows = worker.process(item)
        good += events
        bad += rows
    return good, bad


@pytest.mark.parametrize("method", ["get", "post"])
def test_tracker_events_come_out_as_expected_enriched_events(method):
    with CaptureServer() as server:
        sent = track_shop_session(server.url, method, batch_size=1 if method == "get" else 4)
    assert len(server.records) == (sent if method == "get" else 3)
    good, bad = enrich_all(server.raw())
    assert bad == []
    sent = [("page_view", "Home"), ("page_view", "Red shoes"), "product_view", "add_to_cart", "event",
            "checkout_step", "purchase", "transaction", "transaction_item"]

    def position(event: dict) -> int:         # in the order sent: a POST's events created in one ms come
        name = event["event_name"]             # out in the lake's order (time, then id: test_protocol.py)
        return sent.index((name, event["page_title"]) if name == "page_view" else name)
    events = sorted((event for _, event in good), key=position)
    assert [position(event) for event in events] == list(range(len(sent)))
    assert {key for key, _ in good} == {SHOPPER["sid"]}            # one session, one shard
    assert all(e["app_id"] == "clickshop" and e["platform"] == "pc" and e["name_tracker"] == "shop" for e in events)
    assert all(e["v_tracker"].startswith("py-") and e["domain_sessionidx"] == 2 for e in events)
    assert all(e["dvce_screenwidth"] == 1440 and e["br_viewheight"] == 800 and e["br_family"] == "Chrome" for e in events)
    home, product, viewed, added, coupon, step, purchase, transaction, item = events
    assert home["mkt_source"] == "newsletter" and home["mkt_medium"] == "email"
    assert (home["refr_medium"], home["refr_source"]) == ("email", "Gmail")
    assert product["refr_medium"] == "internal" and product["page_title"] == "Red shoes"
    assert product["contexts"][0] == {"schema": "iglu:com.clickshop/page_type/jsonschema/1-0-0",
                                      "data": {"type": "product", "category": "shoes"}}
    assert viewed["unstruct_event"]["data"] == {"sku": "sku-1", "category": "shoes", "price": 59.9, "currency": "EUR"}
    assert added["unstruct_event"]["data"]["quantity"] == 1
    assert (coupon["se_category"], coupon["se_action"], coupon["se_label"], coupon["se_value"]) == \
        ("checkout", "coupon", "WELCOME10", 10.0)
    assert step["unstruct_event"]["data"]["step"] == 1 and purchase["unstruct_event"]["data"]["total"] == 53.91
    assert (transaction["tr_orderid"], transaction["tr_total"], transaction["tr_currency"]) == \
        (Pseudonymiser(KEY)("order-1"), 53.91, "EUR")
    assert item["ti_orderid"] == transaction["tr_orderid"]          # still joins: one pseudonym per order
    assert (item["ti_sku"], item["ti_price"], item["ti_quantity"], item["ti_name"]) == ("sku-1", 59.9, 1, "Red shoes")
    assert all(e["dvce_created_tstamp"] and e["derived_tstamp"] <= e["collector_tstamp"] for e in events)
    if method == "post":
        assert all(e["dvce_sent_tstamp"] for e in events)
    hmac = Pseudonymiser(KEY)
    assert {e["user_id"] for e in events} == {hmac(SHOPPER["user_id"])}
    assert {e["domain_userid"] for e in events} == {hmac(SHOPPER["duid"])}
    # The tracker's own ip= wins over the connection's, then it is anonymised and pseudonymised.
    assert {e["user_ipaddress"] for e in events} == {hmac("192.0.2.0")}


def test_no_raw_identifier_reaches_the_enriched_output():
    with CaptureServer(ip="198.51.100.23", nuid="4b5c6d7e-8f90-4a1b-8c2d-3e4f5a6b7c8d") as server:
        track_shop_session(server.url, "post", batch_size=3)
        track_shop_session(server.url, "get")
    good, bad = enrich_all(server.raw())
    assert bad == [] and len(good) == 18
    output = b"\n".join(key.encode() + b" " + orjson.dumps(event) for key, event in good).lower()
    for secret in (SHOPPER["user_id"], SHOPPER["duid"], SHOPPER["ip"], "192.0.2.", "198.51.100.",
                   "4b5c6d7e-8f90-4a1b-8c2d-3e4f5a6b7c8d", "alice", "order-1"):
        assert secret.lower().encode() not in output, secret
    # The session id is random per session and stays readable (it is the partition key).
    assert SHOPPER["sid"].encode() in output


def test_without_pseudonymisation_identifiers_pass_but_ips_are_still_anonymised():
    with CaptureServer() as server:
        track_shop_session(server.url, "get")
    good, _ = enrich_all(server.raw(), pseudonymisation=False)
    event = good[0][1]
    assert event["user_id"] == SHOPPER["user_id"] and event["domain_userid"] == SHOPPER["duid"]
    assert event["user_ipaddress"] == "192.0.2.0"


def test_the_official_trackers_cart_calls_reach_the_features_with_their_unit_price():
    # track_add_to_cart sends Snowplow's add_to_cart, priced in unitPrice: the fold counted the add
    # but valued the cart at 0 (it read the shop's `price` only).
    import warnings

    from snowplow_tracker import Emitter, Subject, Tracker

    from common.features import FEATURE_NAMES, session_features

    with CaptureServer() as server:
        host, port = server.url.removeprefix("http://").split(":")
        tracker = Tracker("shop", Emitter(host, protocol="http", port=int(port), batch_size=1),
                          subject=Subject().set_domain_session_id(SHOPPER["sid"]), app_id="clickshop")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                      # the cart calls are deprecated, not gone
            tracker.track_add_to_cart("sku-1", 3, name="Red shoes", unit_price=19.9, currency="EUR")
            tracker.track_remove_from_cart("sku-1", 1, unit_price=19.9, currency="EUR")
            tracker.flush()
    good, bad = enrich_all(server.raw())
    assert bad == [] and len(good) == 2
    events = [event for _, event in good]
    assert [(e["event_vendor"], e["event_name"]) for e in events] == [
        ("com.snowplowanalytics.snowplow", "add_to_cart"), ("com.snowplowanalytics.snowplow", "remove_from_cart")]
    row = dict(zip(FEATURE_NAMES, session_features(events)[-1], strict=True))
    assert (row["cart_adds"], row["cart_removes"], row["cart_items"], row["cart_value"]) == (1, 1, 2, 39.8)
