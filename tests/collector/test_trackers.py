"""The official Python tracker (PyPI snowplow-tracker) and Node.js tracker (npm @snowplow/node-tracker),
unchanged, over GET and POST."""
from __future__ import annotations

import base64
import subprocess
import uuid
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import pytest
from snowplow_tracker import Emitter, SelfDescribingJson, Tracker
from snowplow_tracker.events import PageView, SelfDescribing, StructuredEvent

from common.features import FEATURE_NAMES, session_features
from enrich.enrichments import Pseudonymiser
from tests.collector.conftest import collector_env, read_stream
from tests.enrich.helpers import KEY, enricher

NODE_TRACKER = Path(__file__).with_name("node_tracker.mjs")


def events_of(record: dict) -> list[dict]:
    """The tracker events carried by one raw record (GET query string or POST payload_data body)."""
    if record["method"] == "GET":
        return [dict(parse_qsl(record["querystring"]))]
    return orjson.loads(record["body"])["data"]


def unpack(value: str) -> dict:
    return orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


@pytest.mark.parametrize("method, batch", [("get", 1), ("post", 1), ("post", 3)])
def test_python_tracker_events_arrive(streams, make_collector, tmp_path, method, batch):
    collector = make_collector(collector_env(streams, tmp_path / "spool"))
    failures = []
    emitter = Emitter("127.0.0.1", protocol="http", port=collector.port, method=method, batch_size=batch,
                      on_failure=lambda count, events: failures.append(count))
    app_id = f"shop-{uuid.uuid4().hex[:8]}"
    tracker = Tracker("test", emitter, app_id=app_id)
    context = SelfDescribingJson("iglu:com.clickshop/page_type/jsonschema/1-0-0", {"type": "product"})
    tracker.track(PageView(page_url="http://shop.test/p/1", page_title="Product 1", context=[context]))
    tracker.track(StructuredEvent(category="shop", action="add", label="sku-1", property_="size", value=2))
    tracker.track(SelfDescribing(SelfDescribingJson(
        "iglu:com.clickshop/add_to_cart/jsonschema/1-0-0",
        {"sku": "sku-1", "category": "shoes", "price": 49.5, "quantity": 1})))
    tracker.flush()
    assert not failures

    def mine(records):
        return [e for r in records for e in events_of(r) if e.get("aid") == app_id]

    records = read_stream(streams.raw_stream, until=lambda r: len(mine(r)) >= 3)
    events = mine(records)
    per_record = sorted(len(events_of(r)) for r in records if mine([r]))
    assert per_record == ([3] if batch == 3 else [1, 1, 1])
    assert sorted(e["e"] for e in events) == ["pv", "se", "ue"]
    by_type = {e["e"]: e for e in events}
    assert by_type["pv"]["url"] == "http://shop.test/p/1" and by_type["pv"]["page"] == "Product 1"
    assert unpack(by_type["pv"]["cx"])["data"][0]["data"] == {"type": "product"}
    assert (by_type["se"]["se_ca"], by_type["se"]["se_ac"], by_type["se"]["se_va"]) == ("shop", "add", "2")
    unstruct = unpack(by_type["ue"]["ue_px"])["data"]
    assert unstruct["schema"] == "iglu:com.clickshop/add_to_cart/jsonschema/1-0-0"
    assert unstruct["data"]["sku"] == "sku-1"
    assert all(e["tv"].startswith("py-") and e["p"] for e in events)


@pytest.mark.parametrize("method", ["get", "post"])
def test_node_tracker_session_is_enriched_and_folded(streams, make_collector, tmp_path, method):
    """A shop's backend tracking with the official Node.js tracker: its events reach the raw stream,
    enrich without a bad row, and fold into the features of the session it names."""
    collector = make_collector(collector_env(streams, tmp_path / "spool"))
    app_id, session_id = f"backend-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    duid, user_id = str(uuid.uuid4()), "carol@example.com"
    sent = subprocess.run(["node", str(NODE_TRACKER), f"http://127.0.0.1:{collector.port}", method, "3", app_id,
                           session_id, duid, user_id], capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "6"

    def mine(records):
        return [e for r in records for e in events_of(r) if e.get("aid") == app_id]

    records = [r for r in read_stream(streams.raw_stream, until=lambda r: len(mine(r)) >= 6) if mine([r])]
    worker, good, bad = enricher(), [], []
    for item in records:
        events, rows = worker.process(orjson.dumps({k: v for k, v in item.items() if not k.startswith("_")}))
        good += events
        bad += rows
    assert bad == [] and {key for key, _ in good} == {session_id}

    order = ["page_view", "product_view", "add_to_cart", "event", "transaction", "transaction_item"]
    events = sorted((event for _, event in good), key=lambda event: order.index(event["event_name"]))
    assert [e["event_name"] for e in events] == order
    hmac = Pseudonymiser(KEY)
    assert all(e["platform"] == "srv" and e["v_tracker"] == "node-4.8.0" and e["name_tracker"] == "backend"
               for e in events)
    assert all((e["domain_sessionid"], e["domain_sessionidx"]) == (session_id, 3) for e in events)
    assert {(e["domain_userid"], e["user_id"], e["user_ipaddress"]) for e in events} == {
        (hmac(duid), hmac(user_id), hmac("192.0.2.0"))}
    assert events[0]["contexts"][0]["data"] == {"type": "product", "category": "shoes"}
    added = events[2]["unstruct_event"]
    assert added["schema"].startswith("iglu:com.snowplowanalytics.snowplow/add_to_cart/")
    assert (events[4]["tr_orderid"], events[5]["ti_orderid"]) == (hmac("order-7"),) * 2

    folded = dict(zip(FEATURE_NAMES, session_features(events)[-1], strict=True))
    assert {name: folded[name] for name in ("page_views", "product_views", "cart_adds", "cart_value", "cart_items",
                                            "struct_events", "pages_product", "session_index", "device_computer")} == {
        "page_views": 1, "product_views": 1, "cart_adds": 1, "cart_value": 119.8, "cart_items": 2,
        "struct_events": 1, "pages_product": 1, "session_index": 3, "device_computer": 1}
