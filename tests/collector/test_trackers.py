"""The official Python tracker (PyPI snowplow-tracker), unchanged, over GET and POST with batching."""
from __future__ import annotations

import base64
import uuid
from urllib.parse import parse_qsl

import orjson
import pytest
from snowplow_tracker import Emitter, SelfDescribingJson, Tracker
from snowplow_tracker.events import PageView, SelfDescribing, StructuredEvent

from tests.collector.conftest import collector_env, read_stream


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
