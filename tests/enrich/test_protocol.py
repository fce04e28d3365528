"""The tracker protocol: every event type, encodings, typed fields, timestamps, partition keys."""
from __future__ import annotations

import base64
import gzip
import hashlib
import urllib.parse
import uuid

import orjson
import pytest

from common.badrows import raw_record_of
from enrich.enrichments import Pseudonymiser
from tests.enrich.helpers import (
    KEY,
    b64,
    badrow_shape_problems,
    contexts,
    enricher,
    get_record,
    page_type,
    post_record,
    record,
    unstruct,
)

SID = "0fd0a6d9-7d0d-4a4e-9c51-5e0bd3b8b8b1"
BASE = {"p": "web", "tv": "js-4.1.0", "aid": "shop", "duid": "d1d2d3d4-0000-4000-8000-000000000001", "sid": SID,
        "vid": "3", "url": "https://shop.test/p/42?utm_source=news&utm_medium=email&utm_campaign=bf",
        "refr": "https://www.google.co.uk/search?q=red+shoes", "res": "1920x1080", "vp": "1200x800",
        "ds": "1200x3000", "lang": "en-GB", "cs": "UTF-8", "tz": "Europe/London", "cookie": "1"}


def one(raw: bytes, **settings):
    good, bad = enricher(**settings).process(raw)
    assert bad == [], bad
    assert len(good) == 1
    return good[0]


def test_get_page_view_with_context_is_typed_and_named_canonically():
    ctx = contexts(page_type())
    key, event = one(get_record({**BASE, "e": "pv", "page": "Red shoes", "eid": "c6ef3124-b53a-4b13-a233-0088f79dcbcb",
                                 "dtm": "1764409954000", "stm": "1764409955000", "cx": b64(ctx)}))
    assert key == SID
    assert event["event"] == "page_view" and event["event_name"] == "page_view"
    assert event["event_vendor"] == "com.snowplowanalytics.snowplow" and event["event_version"] == "1-0-0"
    assert event["event_id"] == "c6ef3124-b53a-4b13-a233-0088f79dcbcb"
    assert event["app_id"] == "shop" and event["platform"] == "web" and event["v_tracker"] == "js-4.1.0"
    assert event["page_title"] == "Red shoes"
    assert event["domain_sessionidx"] == 3
    assert (event["dvce_screenwidth"], event["dvce_screenheight"]) == (1920, 1080)
    assert (event["br_viewwidth"], event["br_viewheight"], event["doc_width"], event["doc_height"]) == (1200, 800, 1200, 3000)
    assert event["br_cookies"] is True and event["br_lang"] == "en-GB" and event["os_timezone"] == "Europe/London"
    assert event["contexts"] == ctx["data"] and event["derived_contexts"] == [] and event["unstruct_event"] is None
    assert event["collector_tstamp"] == "2025-11-29T09:52:36.000Z"
    assert event["dvce_created_tstamp"] == "2025-11-29T09:52:34.000Z"
    assert event["dvce_sent_tstamp"] == "2025-11-29T09:52:35.000Z"
    # Device clock corrected by the collector's: created 1 s before sent -> 1 s before collected.
    assert event["derived_tstamp"] == "2025-11-29T09:52:35.000Z"
    assert event["etl_tstamp"].endswith("Z") and len(event["etl_tstamp"]) == 24
    assert event["page_urlhost"] == "shop.test" and event["page_urlpath"] == "/p/42" and event["page_urlport"] == 443
    assert (event["mkt_source"], event["mkt_medium"], event["mkt_campaign"]) == ("news", "email", "bf")
    assert (event["refr_medium"], event["refr_source"], event["refr_term"]) == ("search", "Google", "red shoes")
    assert (event["br_family"], event["os_family"], event["dvce_type"], event["dvce_ismobile"]) == \
        ("Chrome", "Windows", "Computer", False)
    assert event["v_collector"] == "clickstream-collector/0.1.0" and event["v_etl"].startswith("clickstream-enrich-")
    assert len(event["event_fingerprint"]) == 32


def test_values_old_and_server_side_trackers_send_read_as_snowplow_reads_them():
    # An old JavaScript tracker sends "null" for a number it lacks: the event was a bad row.
    _, event = one(get_record({**BASE, "e": "se", "se_ca": "c", "se_ac": "a", "se_va": "null", "vid": "null"}))
    assert event["se_value"] is None and event["domain_sessionidx"] is None
    # A server-side tracker passing on X-Forwarded-For: the IP was "x" (unparsable, so hidden).
    _, event = one(get_record({**BASE, "e": "pv", "ip": "203.0.113.9, 10.0.0.1"}), pseudonymisation=False)
    assert event["user_ipaddress"] == "203.0.113.0"                     # the first, anonymised
    _, event = one(get_record({**BASE, "e": "pv", "cookie": "0"}))
    assert event["br_cookies"] is False
    # Flags are 1 or 0: "true" was stored as False.
    good, bad = enricher().process(get_record({**BASE, "e": "pv", "cookie": "true"}))
    assert good == [] and bad[0]["schema"].split("/")[1] == "enrichment_failures"
    assert bad[0]["data"]["failure"]["messages"][0]["message"] == {"field": "cookie", "value": "true",
                                                                   "expectation": "1 or 0"}


def test_base64_contexts_with_and_without_padding_and_plain_json_agree():
    ctx = contexts(page_type("category", "boots"))
    found = []
    # A payload whose base64 needs padding, so the padded and unpadded forms differ.
    for params in ({"cx": b64(ctx)}, {"cx": b64(ctx, pad=True)}, {"co": orjson.dumps(ctx).decode()},
                   {"cx": base64.b64encode(orjson.dumps(ctx)).decode()}):
        assert b64(ctx) != b64(ctx, pad=True)
        _, event = one(get_record({**BASE, "e": "pv", **params}))
        found.append(event["contexts"])
    assert found == [ctx["data"]] * 4


def test_post_carries_every_event_type_with_typed_values():
    product = unstruct("iglu:com.clickshop/product_view/jsonschema/1-0-0",
                       {"sku": "SKU-1", "category": "shoes", "price": 59.9, "currency": "EUR"})
    cart = unstruct("iglu:com.clickshop/add_to_cart/jsonschema/1-0-0",
                    {"sku": "SKU-1", "category": "shoes", "price": 59.9, "quantity": 2})
    common = {**BASE, "dtm": "1764409950000", "stm": "1764409955000"}
    events = [
        {**common, "e": "pv"},
        {**common, "e": "pp", "pp_mix": "0", "pp_max": "10", "pp_miy": "100", "pp_may": "900"},
        {**common, "e": "se", "se_ca": "nav", "se_ac": "click", "se_la": "menu", "se_pr": "top", "se_va": "1.5"},
        {**common, "e": "ue", "ue_pr": orjson.dumps(product).decode()},
        {**common, "e": "ue", "ue_px": b64(cart)},
        {**common, "e": "tr", "tr_id": "o-1", "tr_af": "web", "tr_tt": "119.8", "tr_tx": "20", "tr_sh": "4.5",
         "tr_ci": "Leeds", "tr_st": "WY", "tr_co": "GB", "tr_cu": "GBP"},
        {**common, "e": "ti", "ti_id": "o-1", "ti_sk": "SKU-1", "ti_nm": "Red shoes", "ti_ca": "shoes",
         "ti_pr": "59.9", "ti_qu": "2", "ti_cu": "GBP"},
    ]
    good, bad = enricher().process(post_record(events))
    assert bad == []
    by_type = {}
    for _, event in good:
        by_type.setdefault(event["event"], []).append(event)
    assert sorted(e["event"] for _, e in good) == ["page_ping", "page_view", "struct", "transaction",
                                                   "transaction_item", "unstruct", "unstruct"]
    ping = by_type["page_ping"][0]
    assert (ping["pp_xoffset_min"], ping["pp_xoffset_max"], ping["pp_yoffset_min"], ping["pp_yoffset_max"]) == (0, 10, 100, 900)
    assert ping["event_name"] == "page_ping"
    struct = by_type["struct"][0]
    assert (struct["se_category"], struct["se_action"], struct["se_label"], struct["se_property"]) == ("nav", "click", "menu", "top")
    assert struct["se_value"] == 1.5 and struct["event_name"] == "event"
    assert struct["event_vendor"] == "com.google.analytics"              # as Snowplow names structured events
    viewed, added = sorted(by_type["unstruct"], key=lambda event: event["event_name"] != "product_view")
    assert viewed["unstruct_event"] == product["data"] and viewed["event_name"] == "product_view"
    assert viewed["event_vendor"] == "com.clickshop" and viewed["event_version"] == "1-0-0"
    assert added["unstruct_event"] == cart["data"] and added["event_name"] == "add_to_cart"
    tr = by_type["transaction"][0]
    assert (tr["tr_orderid"], tr["tr_total"], tr["tr_tax"], tr["tr_shipping"], tr["tr_currency"]) == \
        (Pseudonymiser(KEY)("o-1"), 119.8, 20.0, 4.5, "GBP")          # the order id leads to a customer
    assert isinstance(tr["tr_tax"], float)
    ti = by_type["transaction_item"][0]
    assert (ti["ti_sku"], ti["ti_name"], ti["ti_price"], ti["ti_quantity"]) == ("SKU-1", "Red shoes", 59.9, 2)
    # Every event of the POST gets its own id when the tracker sent none.
    assert len({e["event_id"] for _, e in good}) == 7
    # 5 s of device time between creation and sending, subtracted from the collector's time.
    assert all(e["derived_tstamp"] == "2025-11-29T09:52:31.000Z" for _, e in good)


def test_derived_tstamp_rules():
    def derived(**params):
        return one(get_record({**BASE, "e": "pv", **params}))[1]["derived_tstamp"]

    assert derived() == "2025-11-29T09:52:36.000Z"                                         # collector only
    assert derived(dtm="1764409950000") == "2025-11-29T09:52:36.000Z"                     # no sent time
    assert derived(dtm="1764409950000", stm="1764409950500") == "2025-11-29T09:52:35.500Z"
    assert derived(dtm="1764409960000", stm="1764409950000") == "2025-11-29T09:52:36.000Z"  # created after sent
    assert derived(dtm="1764409950000", stm="1764409955000", ttm="1764400000123") == "2025-11-29T07:06:40.123Z"


def test_partition_key_falls_back_to_the_cookie_user_then_network_user_then_event_id():
    key, event = one(get_record({**{k: v for k, v in BASE.items() if k != "sid"}, "e": "pv"}))
    assert key == event["domain_userid"] == Pseudonymiser(KEY)(BASE["duid"])        # as training sessionises
    no_session = {k: v for k, v in BASE.items() if k not in ("sid", "duid")}
    key, event = one(get_record({**no_session, "e": "pv"}))
    assert key == event["network_userid"] == Pseudonymiser(KEY)("8e2d4b1c-5f7a-4c3e-9a1b-2c3d4e5f6a7b")
    key, event = one(get_record({**no_session, "e": "pv"}, nuid=None))
    assert key == event["event_id"] and event["network_userid"] is None
    nil = "00000000-0000-0000-0000-000000000000"      # SP-Anonymous: all of them would share one shard
    key, event = one(get_record({**no_session, "e": "pv"}, nuid=nil))
    assert key == event["event_id"] and event["network_userid"] == nil


def test_events_without_eid_get_the_same_id_when_their_record_is_read_again():
    raw = post_record([{**BASE, "e": "pv"}, {**BASE, "e": "pp"}])
    first = [event["event_id"] for _, event in enricher().process(raw)[0]]
    again = [event["event_id"] for _, event in enricher().process(raw)[0]]
    other = [event["event_id"] for _, event in enricher().process(post_record([{**BASE, "e": "pv"}], tstamp=1))[0]]
    assert first == again and len(set(first)) == 2 and other[0] not in first
    # Pinned: an enricher of another version reading the record again must derive the same ids.
    digest = hashlib.sha1(raw).hexdigest()
    assert first == [str(uuid.uuid5(uuid.NAMESPACE_OID, f"{digest}:{index}")) for index in range(2)]


def test_redirect_becomes_a_uri_redirect_event():
    raw = orjson.dumps(record(path="/r/tp2", querystring="u=https%3A%2F%2Fpartner.test%2Fdeal%3Fx%3D1&aid=shop"))
    _, event = one(raw)
    assert event["event"] == "unstruct" and event["event_name"] == "uri_redirect"
    assert event["unstruct_event"]["data"] == {"uri": "https://partner.test/deal?x=1"}
    assert event["app_id"] == "shop"


def test_redirect_with_tracker_parameters_keeps_its_target_as_a_context():
    target = urllib.parse.quote("https://partner.test/deal", safe="")
    redirect = {"schema": "iglu:com.snowplowanalytics.snowplow/uri_redirect/jsonschema/1-0-0",
                "data": {"uri": "https://partner.test/deal"}}
    email_link = f"u={target}&e=se&se_ca=email&se_ac=click&aid=news&tv=js-3"      # no p, a tracker's tv
    _, event = one(orjson.dumps(record(path="/r/tp2", querystring=email_link)))
    assert event["event"] == "struct" and event["se_category"] == "email"
    assert event["contexts"] == [redirect] and event["v_tracker"] == "r-tp2" and event["platform"] == "web"
    with_cx = f"u={target}&e=se&se_ca=email&se_ac=click&p=mob&cx={b64(contexts(page_type()))}"
    _, event = one(orjson.dumps(record(path="/r/tp2", querystring=with_cx)))
    assert event["contexts"] == [redirect, page_type()] and event["platform"] == "mob"
    good, bad = enricher().process(orjson.dumps(record(path="/r/tp2", querystring="e=se&se_ca=email&se_ac=click")))
    assert good == [] and bad[0]["schema"].split("/")[1] == "adapter_failures"
    assert "redirect target" in bad[0]["data"]["failure"]["messages"][0]["expectation"]


def test_post_querystring_parameters_apply_to_every_event_and_win_a_clash():
    raw = post_record([{**BASE, "e": "pv", "aid": "body"}, {**BASE, "e": "pp"}], querystring="aid=shop&uid=alice")
    good, bad = enricher(pseudonymisation=False).process(raw)
    assert bad == [] and [(e["app_id"], e["user_id"]) for _, e in good] == [("shop", "alice")] * 2
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2",
                              querystring=urllib.parse.urlencode({**BASE, "e": "pv"})))
    _, event = one(raw)                                                   # no body: the query string is the event
    assert event["event"] == "page_view" and event["app_id"] == "shop"


def test_post_querystring_parameters_payload_data_does_not_list_are_laid_on_after_it():
    # They were laid on before each event was checked against payload_data, which allows no other
    # keys: a proxy adding ?cv=... turned every event of the body into a protocol bad row.
    raw = post_record([{**BASE, "e": "pv"}, {**BASE, "e": "pp"}], querystring="cv=proxy-1.0&aid=shop")
    good, bad = enricher().process(raw)
    assert bad == [] and [e["app_id"] for _, e in good] == ["shop", "shop"]
    _, bad = enricher().process(post_record([{**BASE, "e": "pv", "cv": "in-the-body"}]))
    assert "must not contain {'cv'}" in bad[0]["data"]["failure"]["messages"][0]["expectation"]  # the body still is
    failing = {**BASE, "e": "pv", "vid": "not a number"}
    good, bad = enricher().process(post_record([{**BASE, "e": "pv"}, failing], querystring="cv=proxy-1.0"))
    kept = bad[0]["data"]["payload"]["record"]                            # replayable: the event as it was sent
    assert len(good) == 1 and orjson.loads(kept["body"])["data"] == [failing] and kept["querystring"] == "cv=proxy-1.0"


IGLU = "/com.snowplowanalytics.iglu/v1"
LINK_CLICK = "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"


def test_one_requests_events_come_out_in_the_order_training_folds_them():
    # The lake keeps no trace of a request's order: training folds its events by time, then id
    # (batch.train_features.arrival_order), and so must the scorer, which folds the stream's order.
    # Trackers send events fired in one handler in one millisecond, or a later-stamped one first.
    sent = [{**BASE, "e": "pv", "eid": "c0000000-0000-4000-8000-000000000000", "dtm": "1764409950000"},
            {**BASE, "e": "se", "se_ca": "nav", "se_ac": "click", "eid": "a0000000-0000-4000-8000-000000000000",
             "dtm": "1764409950000"},
            {**BASE, "e": "pp", "eid": "b0000000-0000-4000-8000-000000000000", "dtm": "1764409949997"},
            {**BASE, "e": "se", "se_ca": "nav", "se_ac": "back", "eid": "00000000-0000-4000-8000-000000000000",
             "dtm": "1764409950004"}]
    good, bad = enricher().process(post_record([{**event, "stm": "1764409955000"} for event in sent]))
    assert bad == []
    assert [event["event_id"][0] for _, event in good] == ["b", "a", "c", "0"]
    assert [event["derived_tstamp"][-8:] for _, event in good] == [":30.997Z", ":31.000Z", ":31.000Z", ":31.004Z"]


def test_iglu_webhook_turns_query_form_and_json_bodies_into_self_describing_events():
    query = urllib.parse.urlencode({"schema": LINK_CLICK, "targetUrl": "https://a.test/", "aid": "crm", "p": "srv"})
    _, event = one(orjson.dumps(record(path=IGLU, querystring=query)))
    assert event["event"] == "unstruct" and event["unstruct_event"] == {"schema": LINK_CLICK,
                                                                        "data": {"targetUrl": "https://a.test/"}}
    assert (event["app_id"], event["platform"], event["v_tracker"]) == ("crm", "srv", "com.snowplowanalytics.iglu-v1")
    with_schema = urllib.parse.urlencode({"schema": LINK_CLICK, "aid": "crm"})
    json_list = orjson.dumps([{"targetUrl": "https://a.test/1"}, {"targetUrl": "https://a.test/2"}]).decode()
    good, bad = enricher().process(orjson.dumps(record(method="POST", path=IGLU, querystring=with_schema, body=json_list)))
    assert bad == [] and sorted(e["unstruct_event"]["data"]["targetUrl"] for _, e in good) == \
        ["https://a.test/1", "https://a.test/2"]
    assert {e["platform"] for _, e in good} == {"app"}
    form = record(method="POST", path=IGLU, querystring=with_schema, body="targetUrl=https%3A%2F%2Fa.test%2F",
                  content_type="application/x-www-form-urlencoded")
    _, event = one(orjson.dumps(form))
    assert event["unstruct_event"]["data"] == {"targetUrl": "https://a.test/"} and event["platform"] == "srv"
    self_describing = orjson.dumps({"schema": LINK_CLICK, "data": {"targetUrl": "https://a.test/"}}).decode()
    _, event = one(orjson.dumps(record(method="POST", path=IGLU, body=self_describing)))
    assert event["unstruct_event"]["schema"] == LINK_CLICK


def test_iglu_webhook_bad_input_is_a_typed_bad_row():
    cases = {"adapter_failures": record(method="POST", path=IGLU, body='{"data": 1}'),
             "schema_violations": record(path=IGLU, querystring="schema=" + urllib.parse.quote(LINK_CLICK) + "&x=1")}
    for kind, raw in cases.items():
        good, bad = enricher().process(orjson.dumps(raw))
        assert good == [] and bad[0]["schema"].split("/")[1] == kind


def test_identifiers_longer_than_snowplows_columns_are_bad_rows():
    good, bad = enricher().process(get_record({**BASE, "e": "pv", "sid": "s" * 129, "tnuid": "n" * 129}))
    assert good == [] and bad[0]["schema"].split("/")[1] == "enrichment_failures"
    fields = [m["message"]["field"] for m in bad[0]["data"]["failure"]["messages"]]
    assert fields == ["domain_sessionid"]                       # network_userid is a 64-digit pseudonym by then
    good, bad = enricher(pseudonymisation=False).process(get_record({**BASE, "e": "pv", "tnuid": "n" * 129}))
    assert good == [] and bad[0]["data"]["failure"]["messages"][0]["message"]["field"] == "network_userid"
    assert len(one(get_record({**BASE, "e": "pv", "sid": "s" * 128}))[0]) == 128


def test_non_utf8_body_arrives_base64_and_is_decoded():
    body = orjson.dumps({"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                         "data": [{**BASE, "e": "pv", "page": "Caf\u00e9"}]})
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2",
                              body_base64=base64.b64encode(body).decode()))
    _, event = one(raw)
    assert event["page_title"] == "Caf\u00e9"


def test_pixel_without_url_uses_the_referer_header_as_page():
    _, event = one(get_record({"e": "pv", "p": "web", "tv": "no-js-0.1.0"}, referer="https://shop.test/landing?utm_source=ad"))
    assert event["page_url"] == "https://shop.test/landing?utm_source=ad" and event["mkt_source"] == "ad"


def test_query_string_decoding_matches_urllib():
    title = "Shoes & boots: 50% off + free (returns) \u00e9\u00e8 /?="
    _, event = one(get_record({**BASE, "e": "pv", "page": title}))
    assert event["page_title"] == title
    assert urllib.parse.unquote_plus(urllib.parse.quote_plus(title)) == title


def test_older_payload_data_versions_and_legacy_struct_events_are_accepted():
    events = [{**BASE, "e": "se", "se_ca": "nav", "se_ac": "click"}]
    good, bad = enricher().process(post_record(events, schema="iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-2"))
    assert bad == [] and good[0][1]["se_category"] == "nav"
    _, event = one(get_record({**BASE, "e": "ev", "ev_ca": "nav", "ev_ac": "click", "ev_va": "2"}))
    assert (event["event"], event["se_category"], event["se_action"], event["se_value"]) == ("struct", "nav", "click", 2.0)


def test_a_payload_data_revision_we_do_not_know_is_a_protocol_violation():
    good, [row] = enricher().process(post_record(
        [{**BASE, "e": "pv"}], schema="iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-1-0"))
    assert good == [] and "tracker_protocol_violations" in row["schema"] and "1-0-*" in orjson.dumps(row).decode()


def test_cli_process_enriches_a_file_of_raw_records_offline(tmp_path):
    from click.testing import CliRunner

    from enrich.cli import cli

    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(get_record({**BASE, "e": "pv"}) + b"\n" + b"garbage\n" + get_record({**BASE, "e": "se", "se_ca": "c"}) + b"\n")
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    result = CliRunner(env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY}).invoke(
        cli, ["process", str(raw), "--good", str(good), "--bad", str(bad)])
    assert result.exit_code == 0, result.output
    assert [orjson.loads(line)["event"] for line in good.read_bytes().splitlines()] == ["page_view", "struct"]
    assert b"collector_payload_format_violation" in bad.read_bytes()
    assert "3 records, 0 from bad rows, 0 bad rows without a record, 2 events, 1 bad rows" in result.stderr

    # Bad rows downloaded from the lake (gzip): their raw records, as replay-bad would send them.
    event_level = {"record": orjson.loads(get_record({**BASE, "e": "pv"})), "parameters": {"e": "pv"}}
    schema = "iglu:com.snowplowanalytics.snowplow.badrows/schema_violations/jsonschema/2-0-0"
    rows = [{"schema": schema, "data": {"payload": payload}} for payload in (event_level, {"enriched": {}})]
    rows.append({"schema": schema, "data": ["not", "an", "object"]})        # a damaged row: counted, no traceback
    downloaded = tmp_path / "bad.jsonl.gz"
    downloaded.write_bytes(gzip.compress(b"".join(orjson.dumps(row) + b"\n" for row in rows)))
    again = CliRunner(env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY}).invoke(
        cli, ["process", str(downloaded), "--good", str(good), "--bad", str(bad)])
    assert again.exit_code == 0, again.output
    assert [orjson.loads(line)["event"] for line in good.read_bytes().splitlines()] == ["page_view"]
    assert "1 records, 1 from bad rows, 2 bad rows without a record, 1 events, 0 bad rows" in again.stderr
    refused = CliRunner(env={"CLICKSTREAM_PSEUDONYMISATION_KEY": None}).invoke(cli, ["process", str(raw)])
    assert refused.exit_code == 2 and refused.output.startswith("Error: config error: CLICKSTREAM_PSEUDONYMISATION_KEY")


def test_an_envelope_whose_schema_is_not_a_string_is_a_schema_violation():
    for envelope in ({"schema": ["x"], "data": []}, {"schema": {"a": 1}, "data": {}}):
        good, [row] = enricher().process(get_record({**BASE, "e": "pv", "cx": b64(envelope)}))
        assert good == [] and "/schema_violations/" in row["schema"]


def test_an_unexpected_error_reading_a_record_is_a_bad_row_with_the_record_not_a_crash(monkeypatch, caplog):
    from enrich import protocol

    def broken(record):                 # stands in for a bug in the protocol code
        raise RuntimeError("a bug")

    monkeypatch.setattr(protocol, "split", broken)
    raw = get_record({**BASE, "e": "pv"})
    good, bad = enricher().process(raw)
    assert good == [] and len(bad) == 1
    assert bad[0]["schema"].split("/")[1] == "collector_payload_format_violation"
    assert bad[0]["data"]["failure"]["message"]["error"] == "unexpected error: RuntimeError: a bug"
    assert bad[0]["data"]["payload"] == raw.decode()              # kept whole, for a replay once fixed
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


def test_an_event_nested_too_deep_to_write_back_is_a_bad_row_with_the_record_and_its_siblings_go_on():
    # orjson reads 1,024 levels but writes 254: the event's own bad row cannot be serialized, and
    # raising from there stopped the enricher on this record at every restart.
    from common.consumer import Batch
    from common.streams import Record
    from enrich.worker import Worker

    good_event = orjson.dumps({**BASE, "e": "pv"}).decode()
    deep_event = orjson.dumps({**BASE, "e": "pv"}).decode()[:-1] + ',"x":' + "[" * 300 + "]" * 300 + "}"
    body = '{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":[' \
           f"{good_event},{deep_event},{deep_event}]}}"
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2", body=body))
    good, [row] = enricher().process(raw)          # one row for both: each would carry the whole record
    assert [event["event"] for _, event in good] == ["page_view"]
    assert row["schema"].split("/")[1] == "collector_payload_format_violation"
    assert row["data"]["failure"]["message"]["error"].startswith(
        "event(s) 1 (tracker_protocol_violations), 2 (tracker_protocol_violations) failed")
    assert row["data"]["payload"] == raw.decode()
    batch = Batch("shard-0", [Record(raw, "k", "1", "shard-0", 0)], 0, False, "1")
    written_good, [(_, written_bad)] = Worker(enricher(), consumer=None, good=None, bad=None).outputs(batch)
    assert len(written_good) == 1 and orjson.loads(written_bad)["data"]["payload"] == raw.decode()


def test_an_event_nested_too_deep_past_the_bad_row_budget_is_a_bad_row_not_a_stopped_enricher():
    # Past a record's bad-row budget the failed events share a row, which was written without a check:
    # one event nested 300 deep there raised out of the worker, on this record at every restart.
    from common.consumer import Batch
    from common.streams import Record
    from enrich.pipeline import BAD_ROW_BYTES_PER_RECORD
    from enrich.worker import Worker

    failing = ",".join(["1"] * 400)                   # not objects: each its own protocol violation
    body = '{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":[' \
           f"{failing},{'[' * 300}{']' * 300}]}}"
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2", body=body,
                              headers=["X-Padding: " + "p" * 12_000]))
    batch = Batch("shard-0", [Record(raw, "k", "1", "shard-0", 0)], 0, False, "1")
    good, written = Worker(enricher(), consumer=None, good=None, bad=None).outputs(batch)
    rows = [orjson.loads(data) for _, data in written]
    own = [row for row in rows if "collector_payload_format_violation" not in row["schema"]]
    unwritable, held_back = [row for row in rows if row not in own]
    assert good == [] and sum(len(orjson.dumps(row)) for row in own) > BAD_ROW_BYTES_PER_RECORD
    held = orjson.loads(raw_record_of(held_back["data"]["payload"])["body"])["data"]
    assert len(own) + len(held) == 400 and held == [1] * len(held)
    assert unwritable["data"]["failure"]["message"]["error"].startswith("event(s) 400 (tracker_protocol_violations) failed")
    assert unwritable["data"]["payload"] == raw.decode()


def test_the_events_held_back_past_the_bad_row_budget_are_split_into_rows_that_fit_a_kinesis_record():
    # One row held them all, as text, each event escaped twice: from a 1 MB record it outgrew Kinesis'
    # 1 MiB, and was cut to a size_violation that kept a tenth of them.
    from common.consumer import Batch
    from common.streams import MAX_RECORD_BYTES, Record
    from enrich.worker import Worker

    events = [{"e": "z", "p": "web", "tv": f'say "{n}"'} for n in range(18_000)]      # each a protocol violation
    raw = post_record(events)
    assert len(raw) < MAX_RECORD_BYTES
    batch = Batch("shard-0", [Record(raw, "k", "1", "shard-0", 0)], 0, False, "1")
    _, written = Worker(enricher(dedupe_entries=0), consumer=None, good=None, bad=None).outputs(batch)
    assert max(len(data) for _, data in written) < MAX_RECORD_BYTES
    replayable = [orjson.loads(raw_record_of(orjson.loads(data)["data"]["payload"])["body"])["data"] for _, data in written]
    assert [event for row in replayable for event in row] == events          # every one, once, in order
    assert len(replayable) - sum(len(row) == 1 for row in replayable) > 1


def test_an_iglu_webhook_item_nested_too_deep_fails_alone_and_its_list_goes_on():
    body = '[{"step": 2}, {"step": 3}, ' + "[" * 300 + "]" * 300 + "]"
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.iglu/v1", content_type="application/json",
                              querystring="schema=iglu:com.clickshop/checkout_step/jsonschema/1-0-0", body=body))
    good, [row] = enricher().process(raw)
    assert len(good) == 2 and row["data"]["payload"] == raw.decode()
    assert row["data"]["failure"]["message"]["error"].startswith("event(s) 2 (tracker_protocol_violations) failed")


@pytest.mark.parametrize("path", ["/nope", "/i"], ids=["adapter failure", "protocol violation"])
def test_a_record_nested_too_deep_to_write_back_is_one_bad_row_not_a_stopped_enricher(path):
    """A raw record with a field nested 300 deep (not our collector's): its adapter_failures or
    protocol row holds the record, which orjson cannot write; the worker raised on it, and the
    enricher stopped on that record at every restart."""
    from common.consumer import Batch
    from common.streams import Record
    from enrich.worker import Worker

    raw = orjson.dumps(record(path=path))[:-1] + b',"x":' + b"[" * 300 + b"]" * 300 + b"}"
    batch = Batch("shard-0", [Record(raw, "k", "1", "shard-0", 0)], 0, False, "1")
    good, [(_, written)] = Worker(enricher(), consumer=None, good=None, bad=None).outputs(batch)
    row = orjson.loads(written)
    assert good == [] and row["schema"].split("/")[1] == "collector_payload_format_violation"
    assert row["data"]["payload"] == raw.decode()                         # kept whole, for a replay
    assert "cannot be written as JSON (nested over 254 levels)" in row["data"]["failure"]["message"]["error"]


def test_a_body_nested_too_deep_to_show_is_a_protocol_violation_not_an_unexpected_error(caplog):
    """badrows.message dumped the value and raised: the catch-all logged a traceback per request."""
    body = '{"schema":' + "[" * 300 + "]" * 300 + ',"data":[{}]}'
    raw = orjson.dumps(record(method="POST", path="/com.snowplowanalytics.snowplow/tp2", body=body))
    good, [row] = enricher().process(raw)
    assert good == [] and row["schema"].split("/")[1] == "tracker_protocol_violations"
    assert row["data"]["failure"]["messages"][0]["value"] == "(nested over 254 levels: not shown)"
    assert not any(r.exc_info for r in caplog.records)


def test_an_adapter_failure_for_a_long_unknown_path_stays_within_the_bad_row_schema():
    raw = orjson.dumps(record(path="/" + "v" * 100 + "/" + "x" * 40))
    _, [row] = enricher().process(raw)
    assert row["schema"].split("/")[1] == "adapter_failures"
    assert not badrow_shape_problems(row)
