"""Raw record building and splitting, without a server."""
from __future__ import annotations

import dataclasses

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.records import Hit, build, record
from common.rawkey import keyed, partition_key, record_key

PAYLOAD = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"


def hit(body: bytes | None, nuid: str | None = "user-1") -> Hit:
    return Hit(1, "1.2.3.4", "ua", None, "/com.snowplowanalytics.snowplow/tp2", None, "POST", "application/json",
               body, ["host: x"], nuid, "x")


def test_record_has_exactly_the_contract_fields():
    assert list(record(hit(b"{}"), b"{}")) == [
        "schema", "collector_tstamp", "ip", "useragent", "referer", "path", "querystring", "method", "content_type",
        "body", "body_base64", "headers", "network_userid", "collector", "hostname"]


def test_invalid_utf8_body_is_base64_of_the_exact_bytes():
    import base64

    made = record(hit(b"\xff\x00a"), b"\xff\x00a")
    assert made["body"] is None and base64.b64decode(made["body_base64"]) == b"\xff\x00a"


def test_split_keeps_every_event_once_and_each_record_under_the_limit():
    events = [{"e": "pv", "n": str(i), "page": 'q"\\' * 300} for i in range(200)]
    body = orjson.dumps({"schema": PAYLOAD, "data": events})
    records, bad = build(hit(body), 50_000, 1000)
    assert not bad and len(records) > 1
    assert all(len(r) <= 50_000 for r in records)
    bodies = [orjson.loads(orjson.loads(r)["body"]) for r in records]
    assert {b["schema"] for b in bodies} == {PAYLOAD}
    assert [e for b in bodies for e in b["data"]] == events


def test_one_event_too_big_becomes_a_bad_row_and_the_rest_is_kept():
    events = [{"e": "pv", "n": "0"}, {"e": "pv", "n": "1", "page": "x" * 60_000}, {"e": "pv", "n": "2"}]
    records, bad = build(hit(orjson.dumps({"schema": PAYLOAD, "data": events})), 50_000, 1000)
    kept = [e["n"] for r in records for e in orjson.loads(orjson.loads(r)["body"])["data"]]
    assert kept == ["0", "2"]
    assert len(bad) == 1 and len(bad[0]["data"]["payload"]) == 1000
    assert bad[0]["data"]["failure"]["actualSizeBytes"] > 60_000


def test_an_oversized_body_that_cannot_be_split_whole_is_a_bad_row_not_dropped():
    empty = orjson.dumps({"schema": PAYLOAD, "data": []})[:-1] + b', "pad": "' + b"x" * 1_200_000 + b'"}'
    other_keys = orjson.dumps({"schema": PAYLOAD, "data": [{"e": "pv"}], "note": "y" * 1_200_000})
    for body in (empty, other_keys):
        records, [row] = build(hit(body), 1_000_000, 1000)
        assert records == [] and row["data"]["failure"]["actualSizeBytes"] > 1_200_000


def test_an_oversized_body_with_an_event_too_deep_to_write_back_whole_is_a_bad_row():
    # orjson reads 1,024 levels of nesting but writes only 254.
    body = (b'{"schema": "' + PAYLOAD.encode() + b'", "data": [{"e": "pv", "deep": ' + b"[" * 300 + b"]" * 300
            + b'}, {"e": "pv", "pad": "' + b"x" * 1_200_000 + b'"}]}')
    records, [row] = build(hit(body), 1_000_000, 1000)
    assert records == [] and row["data"]["failure"]["actualSizeBytes"] > 1_200_000


def test_a_request_whose_own_fields_fill_half_a_record_is_one_bad_row_not_one_per_event():
    """Each part of a split repeats the headers: 700,000 tiny events under a 250 kB user agent of quotes
    (escaped twice) made a 1 MB bad row per event, 35 GB, the event loop blocked for 45 minutes."""
    events = [{"e": "pv", "n": str(i)} for i in range(20_000)]
    request = hit(orjson.dumps({"schema": PAYLOAD, "data": events}))
    for quotes in (30_000, 60_000):                     # the fields take over half a record; over a whole one
        records, [row] = build(dataclasses.replace(request, useragent='"' * quotes), 100_000, 1000)
        assert records == [] and row["data"]["failure"]["actualSizeBytes"] > 100_000 + len(events) * 10
        assert len(row["data"]["payload"]) == 1000                # cut to bad_payload_keep_bytes

    lighter = dataclasses.replace(request, useragent='"' * 20_000)  # under half a record: split as ever
    records, bad = build(lighter, 100_000, 1000)
    assert not bad and [e for r in records for e in orjson.loads(orjson.loads(r)["body"])["data"]] == events


def payload(events: list[dict]) -> bytes:
    return orjson.dumps({"schema": PAYLOAD, "data": events})


def test_partition_key_is_the_session_then_the_tracker_cookie_then_the_user_id_or_random():
    nil = "00000000-0000-0000-0000-000000000000"
    assert partition_key("e=pv&sid=s-1&duid=d-1", None, "user-1") == "s-1"
    assert partition_key("e=pv&duid=d-1", None, "user-1") == "d-1"
    assert partition_key("e=pv&xsid=s-1&sid=&uid=u", None, "user-1") == "user-1"       # no sid of its own
    assert partition_key("e=pv&sid=" + "s" * 129, None, "user-1") == "user-1"           # not a tracker's id
    # A key a client chose is held to the collector's own rule for ids: no control characters.
    assert partition_key("e=pv&sid=a%0Ab&duid=d%00", None, "user-1") == "user-1"
    assert partition_key(None, b'{"data":[{"sid":"a\nb","duid":"\x01"},{"sid":"s-4"}]}', None) == "s-4"
    # A batch is keyed by its first event; a context's own "sid" is an escaped string, not a field.
    context = orjson.dumps({"data": [{"sid": "from-a-context"}]}).decode()
    body = payload([{"e": "pv", "co": context, "duid": "d-1"}, {"e": "pv", "sid": "s-2"}, {"e": "pv", "sid": "s-3"}])
    assert partition_key(None, body, nil) == "s-2"
    assert partition_key(None, payload([{"e": "pv", "co": context}]), "user-1") == "user-1"
    assert partition_key(None, b'{"data": [{"sid" : "spaced"}]}', None) == "spaced"
    assert partition_key("sid=from-query", payload([{"sid": "from-body"}]), None) == "from-query"
    keys = {partition_key(None, payload([{"e": "pv"}]), nil) for _ in range(3)} | {partition_key(None, None, None)}
    assert len(keys) == 4                       # the nil id of SP-Anonymous hits would be one hot shard


def test_keyed_says_what_the_key_was_taken_from():
    assert keyed("e=pv&sid=s-1", None, "user-1") == ("s-1", "sid")
    assert keyed(None, payload([{"e": "pv", "duid": "d-1"}]), "user-1") == ("d-1", "duid")
    assert keyed("e=pv", None, "user-1") == ("user-1", "network_userid")
    key, by = keyed("e=pv", payload([{"e": "pv"}]), "00000000-0000-0000-0000-000000000000")
    assert by == "random" and len(key) == 36


def test_a_replayed_record_gets_the_key_its_hit_got():
    body = payload([{"e": "pv", "sid": "s-1"}])
    for request in (hit(body), dataclasses.replace(hit(None), querystring="e=pv&sid=s-1", method="GET")):
        assert record_key(orjson.loads(orjson.dumps(record(request, request.body)))) == "s-1"
    latin = hit(b'{"data":[{"sid":"s-1","page":"\xe9"}]}')        # not UTF-8: kept as base64
    written = record(latin, latin.body)
    assert written["body_base64"] and record_key(written) == "s-1"
    assert record_key({**written, "body_base64": "not base64!"}) == "user-1"



EVENT = st.dictionaries(st.sampled_from(["e", "page", "url", "co", "n"]), st.text(max_size=3000), min_size=1)


@settings(max_examples=60, deadline=None)
@given(events=st.lists(EVENT, max_size=40), limit=st.integers(2_000, 40_000))
def test_split_never_loses_or_reorders_an_event(events, limit):
    body = orjson.dumps({"schema": PAYLOAD, "data": events})
    records, bad = build(hit(body), limit, 100_000)
    assert all(len(r) <= limit for r in records)
    if len(records) == 1 and not bad and orjson.loads(records[0])["body"] == body.decode():
        return                                            # fitted whole: kept byte for byte
    kept = [e for r in records for e in orjson.loads(orjson.loads(r)["body"])["data"]]
    dropped = [orjson.loads(orjson.loads(row["data"]["payload"])["body"])["data"][0] for row in bad]
    assert len(kept) + len(dropped) == len(events)
    assert kept == [e for e in events if e not in dropped]


def test_gunzip_reads_every_member_and_keeps_trailing_junk_as_received():
    import gzip

    import pytest

    from collector.app import TooLarge, gunzip

    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 100) == b"abcd"
    assert gunzip(gzip.compress(b"ab") + b"junk", 100) is None
    assert gunzip(gzip.compress(b"ab")[:-3], 100) is None
    with pytest.raises(TooLarge):
        gunzip(gzip.compress(b"a" * 60) + gzip.compress(b"b" * 60), 100)
    # Thousands of tiny members cost quadratic copying on the event loop: beyond 16 the body is kept as sent.
    assert gunzip(gzip.compress(b"a") * 16, 100) == b"a" * 16
    assert gunzip(gzip.compress(b"a") * 17, 100) is None
