"""Every bad-row type from a real bad input; bad events never take good ones down; payloads replay."""
from __future__ import annotations

import orjson
import pytest

from tests.enrich.helpers import (
    b64,
    badrow_shape_problems,
    contexts,
    enricher,
    get_record,
    page_type,
    post_record,
    record,
    sdj,
    unstruct,
)

BADROWS = "iglu:com.snowplowanalytics.snowplow.badrows/"
EV = {"p": "web", "tv": "js-4.1.0", "sid": "0fd0a6d9-7d0d-4a4e-9c51-5e0bd3b8b8b1"}
PRODUCT = "iglu:com.clickshop/product_view/jsonschema/1-0-0"
PAYLOAD_1_0 = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-"


def only_bad(raw: bytes, **settings) -> dict:
    good, bad = enricher(**settings).process(raw)
    assert good == [] and len(bad) == 1, (good, bad)
    row = bad[0]
    assert row["data"]["processor"]["artifact"] == "clickstream-enrich"
    assert row["data"]["failure"]["timestamp"].endswith("Z")
    assert badrow_shape_problems(row) == []
    return row


@pytest.mark.parametrize("raw, error", [
    (b"this is not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (orjson.dumps({**record(), "collector_tstamp": "yesterday"}), "collector_tstamp"),
    (orjson.dumps({**record(), "schema": "iglu:com.other/raw/jsonschema/1-0-0"}), "unknown raw record schema"),
    (orjson.dumps({**record(), "ip": 12}), "ip must be a string"),
])
def test_unreadable_raw_records_are_format_violations_keeping_the_bytes(raw, error):
    row = only_bad(raw)
    assert row["schema"] == BADROWS + "collector_payload_format_violation/jsonschema/1-0-0"
    assert error in row["data"]["failure"]["message"]["error"]
    assert row["data"]["payload"] == raw.decode()


@pytest.mark.parametrize("method, path", [("POST", "/com.acme/webhook/v1"), ("GET", "/favicon.ico"), ("PUT", "/i")])
def test_unsupported_endpoints_are_adapter_failures(method, path):
    raw_record = record(method=method, path=path, querystring="e=pv&p=web&tv=x")
    row = only_bad(orjson.dumps(raw_record))
    assert row["schema"] == BADROWS + "adapter_failures/jsonschema/1-0-0"
    assert row["data"]["failure"]["messages"][0]["field"] == "path"
    assert row["data"]["payload"] == raw_record


@pytest.mark.parametrize("raw, field", [
    (orjson.dumps(record(querystring=None)), "querystring"),
    (get_record({"p": "web", "tv": "x"}), "e"),
    (get_record({"e": "zz", "p": "web", "tv": "x"}), "e"),
    (get_record({"e": "pv", "p": "web", "tv": "x", "cx": "%%%not-base64%%%"}), "cx"),
    (get_record({"e": "pv", "p": "web", "tv": "x", "co": "{not json"}), "co"),
    (get_record({"e": "ue", "p": "web", "tv": "x", "ue_pr": "[1,"}), "ue_pr"),
    (get_record({"e": "ue", "p": "web", "tv": "x"}), "ue_pr"),
    (orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2", body="{oops")), "body"),
    (post_record([{"e": "pv", "p": "web", "tv": "x"}], schema="iglu:com.acme/other/jsonschema/1-0-0"), "body.schema"),
    (post_record([]), "body.data"),
    (post_record([{"e": "pv", "p": "web", "tv": "x"}], schema=PAYLOAD_1_0 + "9" * 5000), "body.schema"),  # int() limit
])
def test_protocol_violations(raw, field):
    row = only_bad(raw)
    assert row["schema"] == BADROWS + "tracker_protocol_violations/jsonschema/1-0-0"
    assert row["data"]["failure"]["messages"][0]["field"] == field


def test_a_post_event_breaking_payload_data_fails_alone():
    events = [{**EV, "e": "pv"}, {**EV, "e": "pv", "vid": 3}, {**EV, "e": "pv", "unknown_param": "x"}, {**EV, "e": "se"}]
    good, bad = enricher().process(post_record(events))
    assert len(good) == 2 and len(bad) == 2
    assert {row["schema"] for row in bad} == {BADROWS + "tracker_protocol_violations/jsonschema/1-0-0"}
    assert "payload_data" in bad[0]["data"]["failure"]["messages"][0]["expectation"]
    assert [row["data"]["payload"]["parameters"] for row in bad] == [events[1], events[2]]


@pytest.mark.parametrize("params, expected", [
    ({"e": "ue", "ue_pr": orjson.dumps(unstruct(PRODUCT, {"sku": "A", "category": "c", "price": -1})).decode()}, "ValidationError"),
    ({"e": "pv", "cx": b64(contexts(sdj("iglu:com.clickshop/page_type/jsonschema/1-0-0", {"type": "blog"})))}, "ValidationError"),
    ({"e": "pv", "cx": b64(contexts(sdj("iglu:com.acme/unknown/jsonschema/1-0-0", {})))}, "ResolutionError"),
    ({"e": "pv", "cx": b64(contexts(sdj("not-a-key", {})))}, "ValidationError"),   # the envelope catches it
    ({"e": "pv", "cx": b64(contexts(sdj("iglu:com.acme/x/jsonschema/01-0-0", {})))}, "INVALID_IGLUURI"),
    ({"e": "ue", "ue_pr": orjson.dumps(sdj(PRODUCT, {"sku": "A", "category": "c", "price": 1})).decode()},
     "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-*"),
    ({"e": "pv", "co": '{"data": []}'}, "INVALID_DATA_PAYLOAD"),
])
def test_schema_violations(params, expected):
    """In the shapes of Snowplow's schema_violations 2-0-0 (only_bad checks each row's shape)."""
    row = only_bad(get_record({**EV, **params}))
    assert row["schema"] == BADROWS + "schema_violations/jsonschema/2-0-0"
    message = row["data"]["failure"]["messages"][0]
    error = message.get("error")
    assert expected in (message.get("schemaCriterion"), error if isinstance(error, str) else (error or {}).get("error"))
    assert row["data"]["payload"]["parameters"] == {**EV, **params}


@pytest.mark.parametrize("key", [
    "iglu:com.acme/x/jsonschema/1-0-" + "9" * 5000,              # int() refuses more than 4300 digits
    "iglu:com.acme/" + "x" * 100_000 + "/jsonschema/1-0-0",      # would be cached ~4 times over
])
def test_hostile_schema_keys_are_invalid_key_rows_without_a_traceback_or_a_cache_entry(key, caplog):
    enr = enricher()
    params = {**EV, "e": "pv", "co": orjson.dumps(contexts(sdj(key, {}))).decode()}
    good, bad = enr.process(post_record([params]))
    assert good == [] and len(bad) == 1
    assert bad[0]["schema"] == BADROWS + "schema_violations/jsonschema/2-0-0"
    message = bad[0]["data"]["failure"]["messages"][0]
    assert message["error"] == "INVALID_IGLUURI" and badrow_shape_problems(bad[0]) == []
    assert len(message["json"]) < 400                          # the message quotes only the key's start
    assert [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info] == []
    assert key not in enr.resolver._cache and key not in enr.resolver._misses


def test_schema_violation_reports_every_failing_entity():
    params = {**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(PRODUCT, {"sku": "A"})).decode(),
              "cx": b64(contexts(page_type(), sdj("iglu:com.clickshop/page_type/jsonschema/1-0-0", {"type": 1})))}
    messages = only_bad(get_record(params))["data"]["failure"]["messages"]
    assert len(messages) == 2
    assert {m["schemaKey"] for m in messages} == {"iglu:com.clickshop/page_type/jsonschema/1-0-0", PRODUCT}
    assert all(m["error"]["dataReports"][0]["message"].startswith("data") for m in messages)
    reports = sorted((m["error"]["dataReports"][0]["path"], m["error"]["dataReports"][0]["keyword"]) for m in messages)
    assert reports == [("$", "required"), ("$.type", "type")]


@pytest.mark.parametrize("params, field", [
    ({"se_va": "abc"}, "se_va"), ({"ti_qu": "2.5"}, "ti_qu"), ({"dtm": "yesterday"}, "dtm"),
    ({"dtm": "99999999999999999"}, "dtm"), ({"res": "big"}, "res"), ({"eid": "not-a-uuid"}, "eid"),
    ({"tr_tt": "nan"}, "tr_tt"), ({"vid": "1_000"}, "vid"),
    ({"res": "9" * 5000 + "x1080"}, "res"), ({"vp": "1200x" + "1" * 4301}, "vp"),   # past int()'s digit limit
])
def test_malformed_values_are_enrichment_failures(params, field):
    row = only_bad(get_record({**EV, "e": "pv", **params}))
    assert row["schema"] == BADROWS + "enrichment_failures/jsonschema/2-0-0"
    assert row["data"]["failure"]["messages"][0]["message"]["field"] == field


def test_an_oversized_enriched_event_is_a_size_violation():
    big = contexts(*[page_type("product", "x" * 100) for _ in range(60)])
    row = only_bad(get_record({**EV, "e": "pv", "cx": b64(big)}), max_event_bytes=5000)
    assert row["schema"] == BADROWS + "size_violation/jsonschema/1-0-0"
    failure = row["data"]["failure"]
    assert failure["maximumAllowedSizeBytes"] == 5000 and failure["actualSizeBytes"] > 5000
    assert row["data"]["payload"].startswith('{"schema":"iglu:com.clickstream/raw_record')


def test_one_bad_event_in_a_post_of_many_keeps_the_good_ones_and_replays_alone():
    good_events = [{**EV, "e": "pv", "eid": f"00000000-0000-4000-8000-00000000000{i}"} for i in range(5)]
    broken = {**EV, "e": "ue", "eid": "00000000-0000-4000-8000-000000000009",
              "ue_pr": orjson.dumps(unstruct(PRODUCT, {"sku": "A", "category": "c", "price": "free"})).decode()}
    worker = enricher()
    good, bad = worker.process(post_record(good_events[:2] + [broken] + good_events[2:]))
    assert [e["event_id"] for _, e in good] == [e["eid"] for e in good_events]
    assert len(bad) == 1
    payload = bad[0]["data"]["payload"]
    # The payload is a raw record carrying only the failing event: fix it and replay it.
    assert orjson.loads(payload["record"]["body"])["data"] == [broken]
    fixed = {**broken, "ue_pr": orjson.dumps(unstruct(PRODUCT, {"sku": "A", "category": "c", "price": 9.5})).decode()}
    replay = {**payload["record"], "body": orjson.dumps({"schema": orjson.loads(payload["record"]["body"])["schema"],
                                                         "data": [fixed]}).decode()}
    good, bad = worker.process(orjson.dumps(replay))
    assert bad == [] and good[0][1]["event_id"] == broken["eid"] and good[0][1]["unstruct_event"]["data"]["price"] == 9.5


NOW = 1_764_409_956_000     # the enricher's clock in the tests below (the helpers' collector_tstamp)


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr("enrich.enrichments.utc_now_ms", lambda: NOW)


def replayed(row: dict, **record_fields) -> tuple[list, list]:
    """Replay a bad row's record as replay-bad would, after a fix of its fields."""
    return enricher().process(orjson.dumps({**row["data"]["payload"]["record"], **record_fields}))


@pytest.mark.parametrize("stamp", [NOW * 1000, 253_402_300_800_000], ids=["year 57881", "year 10000"])
def test_a_collector_tstamp_past_2100_is_a_replayable_enrichment_failure_not_a_good_event(stamp):
    row = only_bad(get_record({**EV, "e": "pv"}, tstamp=stamp))
    assert row["schema"] == BADROWS + "enrichment_failures/jsonschema/2-0-0"
    assert row["data"]["failure"]["messages"] == [{"enrichment": None, "message": {
        "field": "collector_tstamp", "value": str(stamp), "expectation": "epoch milliseconds between 1970 and 2100"}}]
    good, bad = replayed(row, collector_tstamp=NOW)
    assert bad == [] and good[0][1]["collector_tstamp"] == "2025-11-29T09:52:36.000Z"


@pytest.mark.usefixtures("clock")
def test_a_collector_tstamp_ahead_of_the_enricher_clock_beyond_the_tolerance_is_a_replayable_enrichment_failure():
    two_hours_ahead = NOW + 2 * 3600_000
    events = [{**EV, "e": "pv", "eid": f"00000000-0000-4000-8000-00000000000{i}"} for i in range(2)]
    good, bad = enricher().process(post_record(events, tstamp=two_hours_ahead))
    assert good == [] and len(bad) == 2          # every event of the record, each replayable alone
    message = bad[0]["data"]["failure"]["messages"][0]["message"]
    assert bad[0]["schema"] == BADROWS + "enrichment_failures/jsonschema/2-0-0"
    assert message == {"field": "collector_tstamp", "value": str(two_hours_ahead), "expectation":
                       "at most 300 s ahead of the enricher's clock (etl_tstamp 2025-11-29T09:52:36.000Z), "
                       "got 2025-11-29T11:52:36.000Z, 7200 s ahead"}
    good, bad = replayed(bad[0], collector_tstamp=NOW)
    assert bad == [] and [e["event_id"] for _, e in good] == [events[0]["eid"]]


@pytest.mark.usefixtures("clock")
def test_collector_clock_skew_up_to_the_tolerance_passes_and_the_tolerance_is_a_setting():
    def bad_rows(tstamp: int, **settings) -> list:
        return enricher(**settings).process(get_record({**EV, "e": "pv"}, tstamp=tstamp))[1]

    assert bad_rows(NOW + 300_000) == [] and len(bad_rows(NOW + 300_001)) == 1
    assert bad_rows(NOW + 2 * 3600_000, max_collector_ahead_s=3 * 3600) == []
    assert bad_rows(NOW - 86_400_000) == []       # a backlog is late, not skewed


def test_a_large_envelope_that_is_no_self_describing_json_is_quoted_by_its_start_only():
    """The whole envelope is in the row's payload already: the message keeps its first 300 characters."""
    huge = {"data": [{"k": "v" * 100} for _ in range(2_000)]}                  # ~200 kB, no schema
    row = only_bad(get_record({**EV, "e": "pv", "co": orjson.dumps(huge).decode()}))
    [message] = row["data"]["failure"]["messages"]
    assert message["error"] == "INVALID_DATA_PAYLOAD" and len(message["json"]) == 301
    assert len(orjson.dumps(row)) < 2.5 * len(orjson.dumps(huge))          # not the envelope twice over


def test_a_record_of_many_failing_events_makes_bounded_bad_rows_and_loses_none():
    """A row per failed event repeats the record's fields: 500,000 one-byte events under big headers
    made gigabytes from one 1 MB record, and the enricher died on it at every restart."""
    from common.badrows import raw_record_of
    from enrich.pipeline import BAD_ROW_BYTES_PER_RECORD

    passing = [{**EV, "e": "pv", "eid": f"00000000-0000-4000-8000-00000000000{i}"} for i in range(2)]
    events = [passing[0], *range(3000), passing[1]]
    headers = ["Host: collector.test", "X-Padding: " + "p" * 8000]
    good, bad = enricher().process(post_record(events, headers=headers))
    assert [e["event_id"] for _, e in good] == [e["eid"] for e in passing]
    *own, held_back = bad
    assert sum(len(orjson.dumps(row)) for row in own) <= BAD_ROW_BYTES_PER_RECORD + 20_000
    assert [orjson.loads(row["data"]["payload"]["record"]["body"])["data"] for row in own] == [[n] for n in range(len(own))]
    assert held_back["schema"] == BADROWS + "collector_payload_format_violation/jsonschema/1-0-0"
    assert badrow_shape_problems(held_back) == []
    held = 3000 - len(own)
    assert held_back["data"]["failure"]["message"]["error"].startswith(
        f"{held} of the {held} event(s) of this record that failed after its bad rows reached 4,000,000 bytes "
        f"(index {len(own) + 1}, ")
    record = raw_record_of(held_back["data"]["payload"])
    assert orjson.loads(record["body"])["data"] == list(range(len(own), 3000))      # each failed event once
    assert record["headers"] == headers


def test_a_failed_item_of_a_webhook_list_replays_alone_not_with_the_whole_list():
    link_click = "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"
    items = [{"targetUrl": "https://a.test/"}, *({"n": n} for n in range(500))]
    good, bad = enricher().process(orjson.dumps(record(
        method="POST", path="/com.snowplowanalytics.iglu/v1", querystring="schema=" + link_click,
        body=orjson.dumps(items).decode())))
    assert len(good) == 1 and len(bad) == 500
    bodies = [row["data"]["payload"]["record"]["body"] for row in bad]
    assert bodies == [orjson.dumps([{"n": n}]).decode() for n in range(500)]
    good, again = replayed(bad[7])
    assert good == [] and [row["data"]["payload"]["record"]["body"] for row in again] == [bodies[7]]
