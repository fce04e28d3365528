"""Endpoints, identity rules, limits and bad input, against one collector subprocess and the emulator."""
from __future__ import annotations

import base64
import gzip
import time
import uuid
from urllib.parse import quote

import orjson
import pytest

from tests.collector.conftest import (
    Collector,
    collector_env,
    get,
    provision_streams,
    raw_http,
    read_stream,
    with_marker,
)
from tests.conftest import wait_for

TP2 = "/com.snowplowanalytics.snowplow/tp2"
IGLU = "/com.snowplowanalytics.iglu/v1"
NIL = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def setup(aws_endpoint, tmp_path_factory):
    streams = provision_streams()
    folder = tmp_path_factory.mktemp("collector")
    env = collector_env(streams, folder / "spool", dnt_cookie_name="sp_optout", dnt_cookie_value="1",
                        redirect_domains="example.com",
                        custom_paths=f"/custom/collect={TP2},/px=/i",
                        cookie_domains="shop.test,other.test", cookie_fallback_domain="fallback.test",
                        bad_payload_keep_bytes=5000)
    collector = Collector(env, folder / "collector.log").start()
    yield collector, streams
    collector.stop()


def marked(setup, marker: str, count: int = 1, stream: str = "raw") -> list[dict]:
    streams = setup[1]
    name = streams.raw_stream if stream == "raw" else streams.bad_stream
    found = read_stream(name, until=lambda r: len(with_marker(r, marker)) >= count)
    return with_marker(found, marker)


def payload(events: list[dict]) -> bytes:
    return orjson.dumps({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                         "data": events})


@pytest.mark.parametrize("path, canonical", [("/i", "/i"), ("/ice.png", "/ice.png"), (TP2, TP2), ("/px", "/i"),
                                             (IGLU, IGLU)])
def test_get_answers_a_pixel_and_records_the_request_as_received(setup, path, canonical):
    collector, _ = setup
    marker = uuid.uuid4().hex
    query = f"e=pv&url=http%3A%2F%2Fshop.test%2F&aid={marker}"
    status, headers, body = get(f"{collector.url}{path}?{query}", headers={
        "User-Agent": "test-agent/1.0", "Referer": "http://shop.test/a", "X-Forwarded-For": "203.0.113.9, 10.0.0.1",
        "X-Custom": "v1", "Authorization": "Bearer secret", "Cookie": "other=1"})
    assert status == 200
    assert headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
    assert "no-cache" in headers["Cache-Control"]
    [record] = marked(setup, marker)
    assert record["schema"] == "iglu:com.clickstream/raw_record/jsonschema/1-0-0"
    assert record["path"] == canonical and record["querystring"] == query and record["method"] == "GET"
    assert record["ip"] == "10.0.0.1"          # appended by the one trusted proxy; the client wrote 203.0.113.9
    assert record["useragent"] == "test-agent/1.0" and record["referer"] == "http://shop.test/a"
    assert record["body"] is None and record["body_base64"] is None and record["content_type"] is None
    assert "x-custom: v1" in record["headers"]
    assert not [h for h in record["headers"] if h.startswith(("cookie", "authorization"))]
    assert record["hostname"] == f"127.0.0.1:{collector.port}"
    assert record["collector"] == "clickstream-collector/0.1.0"
    assert abs(record["collector_tstamp"] - time.time() * 1000) < 60_000
    cookie = headers["Set-Cookie"]
    assert record["network_userid"] == cookie.split(";")[0].split("=")[1] == record["_key"]


def test_post_answers_ok_and_keeps_the_body(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    body = payload([{"e": "pv", "tv": "t", "p": "web", "aid": marker}, {"e": "se", "tv": "t", "p": "web"}])
    for path in (TP2, "/custom/collect"):
        status, _, answer = get(collector.url + path, data=body, headers={"Content-Type": "application/json"})
        assert (status, answer) == (200, b"ok")
    records = marked(setup, marker, 2)
    assert [r["body"] for r in records] == [body.decode()] * 2
    assert {r["path"] for r in records} == {TP2}
    assert records[0]["content_type"] == "application/json" and records[0]["method"] == "POST"


def test_iglu_webhook_post_is_recorded_whole(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    body = orjson.dumps({"schema": "iglu:com.acme/signup/jsonschema/1-0-0", "data": [{"plan": marker}]})
    status, _, answer = get(collector.url + IGLU, data=body, headers={"Content-Type": "application/json"})
    assert (status, answer) == (200, b"ok")
    [record] = marked(setup, marker)
    assert record["path"] == IGLU and record["body"] == body.decode() and record["method"] == "POST"


def test_cors_preflight_echoes_the_origin_with_credentials(setup):
    collector, _ = setup
    status, headers, _ = get(collector.url + TP2, method="OPTIONS", headers={
        "Origin": "https://www.shop.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, sp-anonymous"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://www.shop.test"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "sp-anonymous"} <= allowed
    status, headers, _ = get(collector.url + TP2, data=payload([]), headers={"Origin": "https://www.shop.test"})
    assert headers["Access-Control-Allow-Origin"] == "https://www.shop.test"


@pytest.mark.parametrize("headers, domain", [
    ({"Origin": "https://www.shop.test"}, "shop.test"),
    ({"Origin": "https://nowhere.test", "Host": "a.other.test"}, "other.test"),
    ({"Host": "unrelated.test"}, "fallback.test"),
])
def test_new_cookie_is_a_uuid_for_a_year_with_the_matching_domain(setup, headers, domain):
    collector, _ = setup
    _, answer, _ = get(f"{collector.url}/i?e=pv", headers=headers)
    attributes = [part.strip() for part in answer["Set-Cookie"].split(";")]
    name, value = attributes[0].split("=")
    assert name == "sp" and uuid.UUID(value).version == 4
    assert f"Domain={domain}" in attributes
    assert {"Secure", "HttpOnly", "SameSite=None", "Max-Age=31536000", "Path=/"} <= set(attributes)


def test_a_cookie_that_is_not_secure_is_same_site_lax_which_browsers_keep(tmp_path):
    """Browsers drop a SameSite=None cookie without Secure: each hit of a plain-HTTP collector got a new id."""
    from collector.app import Collector
    from collector.config import settings

    plain = Collector(settings(env={"CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": str(tmp_path),
                                    "CLICKSTREAM_COOKIE_SECURE": "false"}))
    attributes = [part.strip() for part in plain.cookie("abc", {}).decode().split(";")]
    assert "SameSite=Lax" in attributes and "Secure" not in attributes and "SameSite=None" not in attributes


def test_existing_cookie_is_kept_and_nuid_parameter_wins(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    get(f"{collector.url}/i?e=pv&aid={marker}&n=1", headers={"Cookie": "a=b; sp=known-user-id"})
    _, answer, _ = get(f"{collector.url}/i?e=pv&aid={marker}&n=2&nuid=from-param",
                       headers={"Cookie": "sp=known-user-id"})
    assert answer["Set-Cookie"].startswith("sp=from-param;")
    records = sorted(marked(setup, marker, 2), key=lambda r: r["querystring"])
    assert [r["network_userid"] for r in records] == ["known-user-id", "from-param"]


def keyed_counts(url: str) -> dict[str, float]:
    """collector_hits_keyed_total by its label ``by``."""
    prefix = 'collector_hits_keyed_total{by="'
    lines = get(url + "/metrics")[2].decode().splitlines()
    return {line[len(prefix):].split('"', 1)[0]: float(line.split()[-1]) for line in lines if line.startswith(prefix)}


def test_a_visitor_without_the_cookie_stays_on_one_shard_by_its_session_id(setup):
    """Each request without the cookie gets a new collector id; keyed by it, one session's hits would
    spread over the raw shards and reach the scorer in any order."""
    collector, _ = setup
    marker = uuid.uuid4().hex
    before = keyed_counts(collector.url)
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    get(f"{collector.url}/i?e=pv&aid={marker}&n=1&duid=d-1&sid={sid}")
    get(collector.url + TP2, data=payload([{"e": "pp", "aid": marker, "n": "2", "duid": "d-1", "sid": sid}]),
        headers={"Content-Type": "application/json"})
    get(collector.url + TP2, data=gzip.compress(payload([{"e": "se", "aid": marker, "n": "3", "sid": sid}])),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    get(f"{collector.url}/i?e=pv&aid={marker}&n=4&sid={other}", headers={"SP-Anonymous": "*"})
    get(f"{collector.url}/i?e=pv&aid={marker}&n=5&duid=d-2")
    records = sorted(marked(setup, marker, 5), key=lambda r: r["_seq"])
    assert len({r["network_userid"] for r in records}) == 5         # four new ids and the nil one
    assert [r["_key"] for r in records] == [sid, sid, sid, other, "d-2"]
    after = keyed_counts(collector.url)
    assert {by: after[by] - before[by] for by in after} == {"sid": 4, "duid": 1, "network_userid": 0, "random": 0}


def test_hits_with_no_id_that_outlives_the_request_are_counted_as_keyed_at_random(setup):
    """Those are the hits a session can lose its order by: operators watch their share."""
    collector, _ = setup
    marker = uuid.uuid4().hex
    before = keyed_counts(collector.url)
    get(f"{collector.url}/i?e=pv&aid={marker}&n=1")                                # a crawler: no cookie
    get(f"{collector.url}/i?e=pv&aid={marker}&n=2", headers={"Cookie": "sp=a-b!c"})  # one we refuse
    get(f"{collector.url}/i?e=pv&aid={marker}&n=3", headers={"SP-Anonymous": "*"})
    get(f"{collector.url}/i?e=pv&aid={marker}&n=4", headers={"Cookie": "sp=returning-1"})
    get(f"{collector.url}/i?e=pv&aid={marker}&n=5&nuid=server-side-1")
    records = sorted(marked(setup, marker, 5), key=lambda r: r["querystring"])
    after = keyed_counts(collector.url)
    assert {by: after[by] - before[by] for by in after} == {"sid": 0, "duid": 0, "network_userid": 2, "random": 3}
    assert [r["_key"] for r in records[3:]] == ["returning-1", "server-side-1"]


def test_sp_anonymous_records_no_ip_no_id_and_expires_the_cookie(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    # Proxies and CDNs name the client's address and whereabouts in headers of their own.
    where = {"X-Forwarded-For": "203.0.113.9", "X-Client-IP": "203.0.113.9", "Fastly-Client-IP": "203.0.113.9",
             "CloudFront-Viewer-Address": "203.0.113.9:50123", "CF-Connecting-IPv6": "2001:db8::9",
             "CloudFront-Viewer-Postal-Code": "10115", "X-Envoy-External-Address": "203.0.113.9"}
    _, answer, _ = get(f"{collector.url}/i?e=pv&aid={marker}&n=1", headers={"SP-Anonymous": "*", **where})
    assert "Set-Cookie" not in answer
    _, answer, _ = get(f"{collector.url}/i?e=pv&aid={marker}&n=2", headers={"SP-Anonymous": "*", "Cookie": "sp=old"})
    assert "Max-Age=0" in answer["Set-Cookie"] and answer["Set-Cookie"].startswith("sp=;")
    records = marked(setup, marker, 2)
    assert {r["ip"] for r in records} == {None}
    assert {r["network_userid"] for r in records} == {NIL}
    recorded = [h for r in records for h in r["headers"]]
    assert not [h for h in recorded if "203.0.113" in h or "2001:db8" in h or "10115" in h]
    assert {h.split(":")[0] for h in recorded} >= {"host", "user-agent", "sp-anonymous"}
    assert len({r["_key"] for r in records}) == 2          # random keys, not one hot shard


def test_client_ip_is_the_x_forwarded_for_entry_the_load_balancer_appended(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    get(f"{collector.url}/i?e=pv&aid={marker}&n=1", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.7"})
    get(f"{collector.url}/i?e=pv&aid={marker}&n=2")
    raw_http(collector.port, f"GET /i?e=pv&aid={marker}&n=3 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
                             f"X-Forwarded-For: 203.0.113.8\r\n\r\n".encode())
    records = sorted(marked(setup, marker, 3), key=lambda r: r["querystring"])
    assert [r["ip"] for r in records] == ["203.0.113.7", "127.0.0.1", "203.0.113.8"]


@pytest.mark.parametrize("hops, expected", [(0, "127.0.0.1"), (2, "198.51.100.1")])
def test_trusted_proxy_hops_picks_the_entry_that_many_from_the_right(streams, make_collector, tmp_path, hops,
                                                                     expected):
    collector = make_collector(collector_env(streams, tmp_path / "spool", trusted_proxy_hops=hops))
    marker = uuid.uuid4().hex
    # Two header lines are one list: the second proxy may append its entry as a line of its own.
    raw_http(collector.port, f"GET /i?e=pv&aid={marker}&n=1 HTTP/1.1\r\nHost: x\r\n"
                             f"X-Forwarded-For: 6.6.6.6, 198.51.100.1\r\nX-Forwarded-For: 203.0.113.8\r\n\r\n".encode())
    get(f"{collector.url}/i?e=pv&aid={marker}&n=2", headers={"X-Forwarded-For": "198.51.100.1"})
    records = with_marker(read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 2), marker)
    # Fewer entries than hops: the leftmost, the nearest to the client we have.
    assert [r["ip"] for r in sorted(records, key=lambda r: r["querystring"])] == [expected, expected]


def test_opt_out_cookie_is_answered_but_not_recorded(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    status, answer, body = get(f"{collector.url}/i?e=pv&aid={marker}&n=optout", headers={"Cookie": "sp_optout=1"})
    assert status == 200 and body.startswith(b"GIF89a") and "Set-Cookie" not in answer
    assert get(f"{collector.url}/i?e=pv&aid={marker}&n=kept", headers={"Cookie": "sp_optout=0"})[0] == 200
    time.sleep(0.5)  # both were spooled in order: once the second is there, the first would be too
    records = marked(setup, marker, 1)
    assert [r["querystring"].rsplit("=", 1)[1] for r in records] == ["kept"]


def test_a_malformed_origin_is_recorded_not_a_500(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    assert get(f"{collector.url}/i?e=pv&aid={marker}", headers={"Origin": "http://["})[0] == 200
    assert len(marked(setup, marker)) == 1


def test_opted_out_redirect_still_redirects_and_is_not_recorded(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    optout = {"Cookie": "sp_optout=1"}
    status, answer, _ = get(f"{collector.url}/r/tp2?u=https%3A%2F%2Fexample.com%2Fo&aid={marker}&n=optout",
                            headers=optout)
    assert status == 302 and answer["Location"] == "https://example.com/o" and "Set-Cookie" not in answer
    assert get(f"{collector.url}/r/tp2?u=https%3A%2F%2Fevil.test%2F&aid={marker}", headers=optout)[0] == 400
    assert get(f"{collector.url}/i?e=pv&aid={marker}&n=kept")[0] == 200
    time.sleep(0.5)
    assert [r["querystring"].rsplit("=", 1)[1] for r in marked(setup, marker, 1)] == ["kept"]


def test_redirect_only_to_allowed_domains(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    status, answer, _ = get(f"{collector.url}/r/tp2?u=https%3A%2F%2Fwww.example.com%2Fx&aid={marker}")
    assert status == 302 and answer["Location"] == "https://www.example.com/x"
    status, _, _ = get(f"{collector.url}/r/tp2?u=https%3A%2F%2Fevil.test%2F&aid={marker}-evil")
    assert status == 400
    for other_scheme in ("javascript://www.example.com/%0Aalert(1)", "data://example.com/x", "ms-officecmd://example.com/"):
        assert get(f"{collector.url}/r/tp2?u={quote(other_scheme, safe='')}&aid={marker}-scheme")[0] == 400
    assert get(f"{collector.url}/r/tp2?aid={marker}-missing")[0] == 400
    records = marked(setup, marker)
    assert [r["path"] for r in records] == ["/r/tp2"]


def test_big_post_is_split_into_records_under_the_limit(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    events = [{"e": "pv", "tv": "t", "p": "web", "aid": marker, "n": str(i), "page": "x" * 5000, "sid": "big-1"}
              for i in range(300)]
    body = payload(events)
    assert 1_000_000 < len(body) < 2 * 1024 * 1024
    assert get(collector.url + TP2, data=body, headers={"Content-Type": "application/json"})[0] == 200
    records = marked(setup, marker, 2)
    records = read_stream(setup[1].raw_stream, until=lambda r: sum(
        len(orjson.loads(x["body"])["data"]) for x in with_marker(r, marker)) >= 300)
    records = with_marker(records, marker)
    assert len(records) >= 2
    for record in records:
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        assert len(orjson.dumps(clean)) <= 1_000_000
    got = [event for r in records for event in orjson.loads(r["body"])["data"]]
    assert sorted(got, key=lambda e: int(e["n"])) == events
    assert {r["_key"] for r in records} == {"big-1"}        # the parts of a request stay on one shard


def test_oversized_unsplittable_payload_becomes_a_size_violation(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    body = (marker + "y" * 1_200_000).encode()
    assert get(collector.url + TP2, data=body, headers={"Content-Type": "text/plain"})[0] == 200
    streams = setup[1]
    bad = read_stream(streams.bad_stream, until=lambda rows: any(marker in r["data"]["payload"] for r in rows))
    [row] = [r for r in bad if marker in r["data"]["payload"]]
    assert row["schema"] == "iglu:com.snowplowanalytics.snowplow.badrows/size_violation/jsonschema/1-0-0"
    assert row["data"]["processor"]["artifact"] == "clickstream-collector"
    assert row["data"]["failure"]["maximumAllowedSizeBytes"] == 1_000_000
    assert row["data"]["failure"]["actualSizeBytes"] > 1_200_000
    assert len(row["data"]["payload"]) == 5000


def test_oversized_post_with_an_event_nested_too_deep_to_split_is_a_bad_row_not_a_500(setup):
    # orjson reads 1,024 levels but writes only 254: the split could not write this event back.
    collector, streams = setup
    marker = uuid.uuid4().hex
    deep = "[" * 300 + "1" + "]" * 300
    body = (f'{{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":['
            f'{{"e":"pv","aid":"{marker}","deep":{deep}}},{{"e":"pv","pad":"{"a" * 1_050_000}"}}]}}').encode()
    status, _, answer = get(collector.url + TP2, data=body, headers={"Content-Type": "application/json"})
    assert (status, answer) == (200, b"ok")
    bad = read_stream(streams.bad_stream, until=lambda rows: any(marker in r["data"]["payload"] for r in rows))
    [row] = [r for r in bad if marker in r["data"]["payload"]]
    assert row["schema"] == "iglu:com.snowplowanalytics.snowplow.badrows/size_violation/jsonschema/1-0-0"
    assert row["data"]["failure"]["actualSizeBytes"] > len(body)


def test_over_two_megabytes_is_413(setup):
    collector, _ = setup
    status, answer, _ = get(collector.url + TP2, data=b"z" * (2 * 1024 * 1024 + 1),
                            headers={"Content-Type": "text/plain", "Origin": "https://shop.test"})
    assert status == 413 and answer["Access-Control-Allow-Origin"] == "https://shop.test"
    bomb = gzip.compress(b"0" * (3 * 1024 * 1024))
    status, _, _ = get(collector.url + TP2, data=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413


def test_gzip_bodies_are_decoded_and_broken_gzip_is_kept_as_received(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    body = payload([{"e": "pv", "tv": "t", "p": "web", "aid": marker}])
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    assert get(collector.url + TP2, data=gzip.compress(body), headers=headers)[0] == 200
    truncated = gzip.compress(body.replace(b"pv", b"pp"))[:-12]
    assert get(collector.url + TP2, data=truncated, headers=headers)[0] == 200
    [good] = marked(setup, marker)
    assert good["body"] == body.decode()
    broken = read_stream(setup[1].raw_stream, until=lambda rows: any(
        r.get("body_base64") == base64.b64encode(truncated).decode() for r in rows))
    assert [r for r in broken if r.get("body_base64") == base64.b64encode(truncated).decode()]


def test_bad_input_is_never_a_500_and_is_recorded_exactly(setup):
    collector, streams = setup
    marker = uuid.uuid4().hex
    port = collector.port
    cases = {
        "malformed-query": (f"GET /i?aid={marker}&%zz&&==&e=%E0%A4%A HTTP/1.1\r\nHost: x\r\n\r\n".encode(), None),
        "invalid-utf8-query": (b"GET /i?aid=" + marker.encode() + b"&v=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", None),
        "broken-json": (None, b'{"schema": "x", "data": [{"e": "pv", ' + marker.encode()),
        "invalid-utf8-body": (None, marker.encode() + b"\xff\xfe\x00binary"),
        "wrong-content-type": (None, marker.encode() + b"<xml/>"),
        "huge-cookie": (f"GET /i?aid={marker}&n=cookie HTTP/1.1\r\nHost: x\r\nCookie: sp={'c' * 6000}; "
                        f"junk={'j' * 6000}\r\n\r\n".encode(), None),
        "huge-header": (f"GET /i?aid={marker}&n=header HTTP/1.1\r\nHost: x\r\nX-Big: {'h' * 12000}\r\n\r\n".encode(),
                        None),
    }
    statuses = {}
    for name, (request, body) in cases.items():
        if request is None:
            request = (f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        answer = raw_http(port, request)
        statuses[name] = int(answer.split(b" ", 2)[1])
    assert all(status < 500 for status in statuses.values()), statuses
    assert get(collector.url + "/health")[0] == 200
    accepted = [name for name, status in statuses.items() if status == 200]
    assert {"broken-json", "invalid-utf8-body", "wrong-content-type", "huge-cookie"} <= set(accepted)
    records = read_stream(streams.raw_stream, until=lambda r: len(
        [x for x in r if marker in (x.get("querystring") or "") + (x.get("body") or "")
         + base64.b64decode(x.get("body_base64") or "").decode("latin-1")]) >= len(accepted))
    mine = [x for x in records if marker in (x.get("querystring") or "") + (x.get("body") or "")
            + base64.b64decode(x.get("body_base64") or "").decode("latin-1")]
    assert len(mine) == len(accepted)
    bodies = {r["body"] for r in mine if r["body"]}
    assert cases["broken-json"][1].decode() in bodies
    assert (marker + "<xml/>") in bodies
    binary = [base64.b64decode(r["body_base64"]) for r in mine if r["body_base64"]]
    assert binary == [cases["invalid-utf8-body"][1]]
    queries = {r["querystring"] for r in mine if r["querystring"]}
    if statuses["malformed-query"] == 200:
        assert f"aid={marker}&%zz&&==&e=%E0%A4%A" in queries
    if statuses["invalid-utf8-query"] == 200:
        assert f"aid={marker}&v=%FF%FE" in queries
    [cookie_hit] = [r for r in mine if (r["querystring"] or "").endswith("n=cookie")]
    assert cookie_hit["network_userid"] != "sp=" and len(cookie_hit["network_userid"]) == 36


def test_health_metrics_and_unknown_paths(setup):
    collector, _ = setup
    assert get(collector.url + "/health")[:3:2] == (200, b"ok")
    assert get(collector.url + "/sink-health")[0] == 200
    assert get(collector.url + "/nope")[0] == 404
    assert get(collector.url + "/robots.txt")[:3:2] == (200, b"User-agent: *\nDisallow: /\n")   # as Snowplow's
    assert get(collector.url + "/i", data=b"x")[0] == 405
    text = get(collector.url + "/metrics")[2].decode()
    for name in ("collector_requests_total", "collector_records_produced_total", "collector_spool_depth_records",
                 "collector_spool_depth_bytes", "collector_sink_latency_seconds_bucket"):
        assert name in text
    assert 'collector_requests_total{endpoint="other",status="404"}' in text


def test_header_injection_through_nuid_or_redirect_target_is_neutralised(setup):
    collector, _ = setup
    marker = uuid.uuid4().hex
    status, answer, _ = get(f"{collector.url}/i?e=pv&aid={marker}&nuid=evil%0D%0ASet-Cookie:%20x=1")
    assert status == 200
    cookie = answer["Set-Cookie"]
    assert uuid.UUID(cookie.split(";")[0].split("=")[1]).version == 4 and "x=1" not in cookie
    status, answer, _ = get(f"{collector.url}/r/tp2?aid={marker}&u=https%3A%2F%2Fexample.com%2F%0D%0AX-Evil:%201")
    assert status == 302
    assert answer["Location"] == "https://example.com/%0D%0AX-Evil:%201" and "X-Evil" not in answer
    records = marked(setup, marker, 2)
    assert {r["path"] for r in records} == {"/i", "/r/tp2"}


def test_percent_encoded_paths_do_not_reach_the_internal_endpoints(setup):
    """/%6Detrics answered the metrics: a load balancer rule keeping /metrics from the internet
    matches the path as sent, so the encoded one walked around it."""
    collector, _ = setup
    for path in ("/%6Detrics", "/%73ink-health", "/%68ealth"):
        answer = raw_http(collector.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 404"), (path, answer[:100])


def test_slow_or_abandoned_bodies_free_their_slots_and_are_never_recorded(streams, make_collector, tmp_path):
    """Requests that stopped sending their body held a max_concurrent_requests slot for good: that
    many shut out every hit and /health. And a body cut off by a disconnect was recorded as a hit."""
    import socket

    collector = make_collector(collector_env(streams, tmp_path / "spool", max_concurrent_requests=4,
                                             body_timeout_s=1))
    cut, whole = uuid.uuid4().hex, uuid.uuid4().hex
    stalled = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
        sock.sendall(f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"m\":\"{cut}\"".encode())
        stalled.append(sock)
    time.sleep(2.5)
    assert get(collector.url + "/health")[0] == 200                   # the slots are free again
    for sock in stalled:
        assert sock.recv(200).startswith(b"HTTP/1.1 408")
        sock.close()
    with socket.create_connection(("127.0.0.1", collector.port), timeout=10) as sock:     # gone mid-body
        sock.sendall(f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"m\":\"{cut}\"".encode())
        time.sleep(0.3)
    assert get(collector.url + TP2, data=payload([{"e": "pv", "aid": whole}]))[0] == 200
    records = read_stream(streams.raw_stream, until=lambda r: with_marker(r, whole))
    assert len(with_marker(records, whole)) == 1 and not with_marker(records, cut)
    # The disconnect is counted once the server notices it: waited for, not raced against the read above.
    metrics = wait_for(lambda: (text := get(collector.url + "/metrics")[2].decode())
                       and 'collector_requests_total{endpoint="tp2",status="499"} 1.0' in text and text,
                       timeout=10, interval=0.1, what="the disconnect counted as 499")
    assert 'collector_requests_total{endpoint="tp2",status="408"} 5.0' in metrics


@pytest.mark.parametrize("chunks", [b"5\r\nabc\r\n0\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n"], ids=["short chunk", "bad size"])
def test_a_malformed_chunked_body_is_answered_400_not_500(streams, make_collector, tmp_path, chunks):
    """granian reports it as a disconnect; the client, still there, got granian's 500, which trackers retry."""
    import socket

    collector = make_collector(collector_env(streams, tmp_path / "spool"))
    with socket.create_connection(("127.0.0.1", collector.port), timeout=10) as sock:
        sock.sendall(f"POST {TP2} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks)
        assert sock.recv(200).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", collector.port), timeout=10) as sock:     # and one truly gone
        sock.sendall(f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
    assert get(collector.url + "/health")[0] == 200
    # Counted once the server notices the disconnect: waited for (a fixed 0.3 s raced it on a loaded machine).
    wait_for(lambda: 'collector_requests_total{endpoint="tp2",status="499"} 2.0' in get(collector.url + "/metrics")[2].decode(),
             timeout=10, interval=0.1, what="both disconnects counted as 499")
    assert "Traceback" not in collector.log.read_text(encoding="utf-8")
