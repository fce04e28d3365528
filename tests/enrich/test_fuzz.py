"""Fuzzing the protocol parser and the worker's record handling: every input ends as good events or
bad rows, every output serializes, and no exception escapes."""
from __future__ import annotations

import base64
import urllib.parse

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.consumer import Batch
from common.streams import Record
from enrich.worker import Worker
from tests.enrich.helpers import PAYLOAD_DATA, enricher, record

WORKER = Worker(enricher(dedupe_entries=0), consumer=None, good=None, bad=None)
PARAMS = ["e", "p", "tv", "eid", "aid", "dtm", "stm", "ttm", "duid", "sid", "vid", "uid", "url", "refr", "res", "vp",
          "ds", "se_ca", "se_va", "tr_tt", "ti_qu", "pp_mix", "ue_pr", "ue_px", "co", "cx", "ip", "ua", "cookie", "tnuid"]
EVENT_TYPES = st.sampled_from(["pv", "pp", "se", "ue", "tr", "ti", "xx", ""])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
SDJ_SCHEMAS = st.sampled_from(["iglu:com.clickshop/page_type/jsonschema/1-0-0", "iglu:com.clickshop/purchase/jsonschema/1-0-0",
                               "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1",
                               "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
                               "iglu:com.acme/missing/jsonschema/1-0-0", "iglu:bad", "x"])
SDJ = st.recursive(st.fixed_dictionaries({"schema": SDJ_SCHEMAS, "data": JSON}),
                   lambda inner: st.fixed_dictionaries({"schema": SDJ_SCHEMAS, "data": inner | st.lists(inner, max_size=3)}),
                   max_leaves=4)


def encoded_json(value) -> st.SearchStrategy:
    text = orjson.dumps(value)
    return st.sampled_from([text.decode(), base64.urlsafe_b64encode(text).decode().rstrip("="),
                            base64.b64encode(text).decode(), text.decode()[: len(text) // 2]])


VALUES = st.one_of(st.text(max_size=30), st.integers().map(str), SDJ.flatmap(encoded_json),
                   st.sampled_from(["1764409954000", "-1", "1e3", "1920x1080", "x", "nan", "\x00", "%zz"]))
EVENT = st.fixed_dictionaries({"e": EVENT_TYPES, "p": st.just("web"), "tv": st.just("fuzz")},
                              optional={name: VALUES for name in PARAMS if name not in ("e", "p", "tv")})


def check(raw: bytes) -> tuple[list, list]:
    good, bad = WORKER.outputs(Batch("shardId-0", [Record(raw, "k", "1", "shardId-0", 0)], 0, False, "1"))
    assert good or bad
    for key, data in good:
        event = orjson.loads(data)
        assert key and event["event_id"] and event["collector_tstamp"].endswith("Z")
        assert isinstance(event["contexts"], list)
    for _, data in bad:
        row = orjson.loads(data)
        assert row["schema"].startswith("iglu:com.snowplowanalytics.snowplow.badrows/")
        assert "payload" in row["data"]
        # The pipeline's last-resort guards turn a bug into a bad row; expected failures are typed:
        # reading the record, a format violation with its own error; enriching, rows naming a field.
        if "collector_payload_format_violation" in row["schema"]:
            assert not row["data"]["failure"]["message"]["error"].startswith("unexpected error"), row
        if "enrichment_failures" in row["schema"]:
            assert all("field" in m["message"] for m in row["data"]["failure"]["messages"]), row
    return good, bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw):
    check(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENT, st.sampled_from(["/i", "/com.snowplowanalytics.snowplow/tp2", "/r/tp2", "/nope"]))
def test_get_hits(params, path):
    check(orjson.dumps(record(path=path, querystring=urllib.parse.urlencode(params))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_raw_query_strings(query):
    check(orjson.dumps(record(querystring=query)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT | JSON, min_size=1, max_size=6))
def test_post_bodies_account_for_every_event(events):
    good, bad = check(orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2",
                                          body=orjson.dumps({"schema": PAYLOAD_DATA, "data": events}).decode())))
    assert len(good) + len(bad) == len(events)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(record())), JSON, max_size=6))
def test_raw_records_with_wrong_field_types(changes):
    check(orjson.dumps({**record(querystring="e=pv&p=web&tv=t"), **changes}))
