"""Each enrichment on its own: UA, IP anonymisation, referers, campaigns, fingerprint, dedupe, PII paths, config."""
from __future__ import annotations

import base64
import functools
import gc
import tracemalloc
import uuid

import orjson
import pytest

from common.config import ConfigError, load
from enrich.config import EnrichSettings
from enrich.enrichments import (
    Deduper,
    EtlClock,
    Pseudonymiser,
    RefererClassifier,
    anonymise_ip,
    campaign,
    cross_domain,
    fingerprint,
    make_ua_parser,
)
from tests.enrich.helpers import KEY, b64, contexts, enricher, get_record, post_record, record, sdj, unstruct

EV = {"e": "pv", "p": "web", "tv": "t", "sid": "0fd0a6d9-7d0d-4a4e-9c51-5e0bd3b8b8b1"}


@pytest.mark.parametrize("ua, family, os_family, device, mobile", [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
     "Chrome", "Windows", "Computer", False),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
     "Safari", "Mac OS X", "Computer", False),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
     "Mobile Safari", "iOS", "Mobile", True),
    ("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
     "Mobile Safari", "iOS", "Tablet", True),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
     "Chrome Mobile", "Android", "Mobile", True),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "Googlebot", "Other", "Bot", False),
    ("curl/8.4.0", "curl", "Other", "Unknown", False),
    # crawlers that dress as an Android phone: ByteDance's, and PageSpeed's Lighthouse, which runs the
    # page's JavaScript and so its tracker
    (("Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36 "
     "(compatible; Bytespider; spider-feedback@bytedance.com)"), "Bytespider", "Android", "Bot", False),
    (("Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/119.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse"), "Chrome Mobile", "Android", "Bot", False),
    (("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 "
     "Safari/537.36"), "HeadlessChrome", "Linux", "Bot", False),
    # Android browsers say "Mobile" on phones only: an Android UA without it is a tablet's...
    ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
     "Chrome", "Android", "Tablet", True),
    # ...but for Opera Mini, a phone browser that never says it, and apps' HTTP client
    ("Opera/9.80 (Android; Opera Mini/36.2.2254/119.132; U; id) Presto/2.12.423 Version/12.16",
     "Opera Mini", "Android", "Mobile", True),
    ("Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP1A.240405.002)", "Android", "Android", "Mobile", True),
    # Televisions, consoles and headsets, whose Android builds say no "Mobile" either
    (("Mozilla/5.0 (Linux; Android 9; BRAVIA 4K UR2 Build/PTT1.190515.001.S52) AppleWebKit/537.36 (KHTML, like "
      "Gecko) Chrome/96.0.4664.104 Safari/537.36"), "Chrome", "Android", "TV", False),
    (("Mozilla/5.0 (Linux; Android 11; SHIELD Android TV Build/RQ1A.210105.003; wv) AppleWebKit/537.36 (KHTML, "
      "like Gecko) Version/4.0 Chrome/99.0.4844.88 Safari/537.36"), "Chrome Mobile WebView", "Android", "TV", False),
    (("Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7233; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 "
      "Chrome/88.0.4324.152 Safari/537.36"), "Chrome Mobile WebView", "Android", "TV", False),
    (("Mozilla/5.0 (SMART-TV; LINUX; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) 76.0.3809.146/6.0 TV "
      "Safari/537.36"), "Safari", "Tizen", "TV", False),
    (("Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/79.0.3945.79 Safari/537.36 "
      "WebAppManager"), "Chrome", "Web0S", "TV", False),
    (("Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.0 "
      "Safari/605.1.15"), "Safari", "Other", "Game console", False),
    (("Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox Series X) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/48.0.2564.82 Safari/537.36 Edge/20.02"), "Edge", "Windows", "Game console", False),
    (("Mozilla/5.0 (Linux; Android 12; Quest 2) AppleWebKit/537.36 (KHTML, like Gecko) OculusBrowser/23.0.0.3.50.423 "
      "SamsungBrowser/4.0 Chrome/104.0.5112.97 VR Safari/537.36"), "Oculus Browser", "Android", "VR headset", False),
    # ...and Amazon's tablets are no Fire TVs
    (("Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/120.2.1 like Chrome/120.0.6099.230 "
      "Safari/537.36"), "Amazon Silk", "Android", "Tablet", True),
])
def test_user_agent_parsing(ua, family, os_family, device, mobile):
    parsed = make_ua_parser(16)(ua)
    assert (parsed["br_family"], parsed["os_family"], parsed["dvce_type"], parsed["dvce_ismobile"]) == \
        (family, os_family, device, mobile)


def test_ipad_safari_with_a_macs_user_agent_is_told_by_its_screen():
    """iPadOS Safari sends a Mac's UA; the tracker's screen size (`res`) is one no Mac has."""
    mac_ua = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
              "Version/17.4 Safari/605.1.15")
    kinds = []
    for screen in ("820x1180", "1180x820", "1440x900", None):
        params = {**EV, "res": screen} if screen else EV
        (_, event), = enricher().process(get_record(params, useragent=mac_ua))[0]
        kinds.append((event["dvce_type"], event["dvce_ismobile"]))
    assert kinds == [("Tablet", True), ("Tablet", True), ("Computer", False), ("Computer", False)]


def test_a_mobile_apps_own_user_agent_is_a_mobile_device():
    """The Android tracker's HTTP client sends "snowplow/andr-6.0.0 android/14", no browser's UA."""
    app = get_record({**EV, "p": "mob"}, useragent="snowplow/andr-6.0.0 android/14")
    (_, event), = enricher().process(app)[0]
    assert (event["dvce_type"], event["dvce_ismobile"]) == ("Mobile", True)
    (_, web), = enricher().process(get_record(EV, useragent="snowplow/andr-6.0.0 android/14"))[0]
    assert web["dvce_type"] == "Unknown"


def test_user_agent_results_are_cached():
    parse = make_ua_parser(2)
    first = parse("curl/8.4.0")
    assert parse("curl/8.4.0") is first and parse.cache_info().hits == 1
    parse("a"), parse("b")
    assert parse("curl/8.4.0") is not first   # evicted: the cache is bounded
    huge = "Mozilla/5.0 " + "x" * 10_000
    before = parse.cache_info().currsize
    assert parse(huge)["br_family"] == parse(huge)["br_family"]
    assert parse.cache_info().currsize == before   # hostile long values never enter a cache


def test_long_user_agents_are_not_kept_by_the_ua_library_either():
    """ua_parser.parse has a cache of its own that kept ~3,800 UAs of any length: 3.5 GB of 900 kB ones."""
    import gc
    import tracemalloc

    parse = make_ua_parser(16)
    parse("curl/8.4.0")                                  # the parser is built before measuring
    tracemalloc.start()
    for i in range(40):
        parse(f"Mozilla/5.0 {i} " + "x" * 100_000)
    gc.collect()
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert kept < 1_000_000, f"{kept:,} bytes kept after parsing 4 MB of distinct user agents"


@pytest.mark.parametrize("ip, octets, segments, expected", [
    ("203.0.113.77", 1, 5, "203.0.113.0"),
    ("203.0.113.77", 2, 5, "203.0.0.0"),
    ("203.0.113.77", 0, 5, "203.0.113.77"),
    ("2001:db8:85a3:8d3:1319:8a2e:370:7348", 1, 5, "2001:db8:85a3::"),
    ("2001:db8:85a3:8d3:1319:8a2e:370:7348", 1, 2, "2001:db8:85a3:8d3:1319:8a2e::"),
    ("not an ip", 1, 5, "x"),
    ("::ffff:203.0.113.77", 1, 5, "203.0.113.0"),           # IPv4 seen through a dual-stack socket
    ("203.0.113.77:51234", 1, 5, "203.0.113.0"),            # proxies may add the client's port
    ("[2001:db8::1]:443", 1, 5, "2001:db8::"),
    ("::1", 1, 5, "::"),                                    # stays IPv6, not printed as 0.0.0.0
    ("1.2.3.4:x", 1, 5, "x"),
    ("2002:cb00:714d::1", 1, 5, "203.0.113.0"),             # 6to4 carries the client's whole IPv4
    ("2001:0:4136:e378:8000:63bf:34ff:ffb2", 1, 5, "203.0.0.0"),  # Teredo: its client IPv4, obfuscated
])
def test_ip_anonymisation(ip, octets, segments, expected):
    assert anonymise_ip(ip, octets, segments) == expected


def test_pseudonymisation_is_a_keyed_hmac():
    import hashlib
    import hmac

    assert Pseudonymiser("k1")("alice") == hmac.new(b"k1", b"alice", hashlib.sha256).hexdigest()
    assert Pseudonymiser("k1")("alice") != Pseudonymiser("k2")("alice")


@pytest.mark.parametrize("referer, medium, source, term", [
    (None, None, None, None),
    ("https://www.google.de/search?q=rote+schuhe", "search", "Google", "rote schuhe"),
    ("https://search.yahoo.com/search?p=boots", "search", "Yahoo!", "boots"),
    ("https://duckduckgo.com/", "search", "DuckDuckGo", None),
    ("https://l.facebook.com/l.php?u=x", "social", "Facebook", None),
    ("https://t.co/abc", "social", "Twitter", None),
    # any country's Google, but not its sites that are no search (Snowplow's list says so too)
    ("https://www.google.com.mx/search?q=botas", "search", "Google", "botas"),
    ("https://www.google.co.za/", "search", "Google", None),
    ("https://yahoo.co.jp/search?p=kutsu", "search", "Yahoo!", "kutsu"),
    ("https://www.yandex.com.tr/search/?text=ayakkabi", "search", "Yandex", "ayakkabi"),
    ("https://accounts.google.com/o/oauth2", "unknown", "Google", None),
    ("https://maps.google.de/maps", "unknown", "Google", None),
    ("https://news.yahoo.com/story", "unknown", "Yahoo!", None),
    ("https://uk.mail.yahoo.com/d/folders/1", "email", "Yahoo! Mail", None),
    ("https://google.shop-reviews.io/", "unknown", None, None),
    # apps on Android send their package id as the referer's host
    ("android-app://com.google.android.googlequicksearchbox/https/www.google.com", "search", "Google", None),
    ("android-app://com.google.android.gm/", "email", "Gmail", None),
    ("android-app://com.facebook.katana/", "social", "Facebook", None),
    ("https://mail.google.com/mail/u/0/", "email", "Gmail", None),
    ("https://shop.test/cart", "internal", None, None),
    ("https://blog.shop.test/post", "internal", None, None),
    # the site with and without www. is one site (a shop redirects one to the other)
    ("https://www.shop.test/cart", "internal", None, None),
    ("https://random-blog.test/post", "unknown", None, None),
    # display and native ads: the ad network's server refers the click
    ("https://googleads.g.doubleclick.net/pagead/ads?client=ca-pub-1", "paid", "Google Ads", None),
    ("https://www.googleadservices.com/pagead/aclk?sa=L", "paid", "Google Ads", None),
    ("https://adservice.google.co.uk/ddm/clk/1", "paid", "Google Ads", None),
    ("https://trc.taboola.com/shop/log/3/click", "paid", "Taboola", None),
    ("not a url", "unknown", None, None),
])
def test_referer_classification(referer, medium, source, term):
    classify = RefererClassifier(internal_domains=("blog.shop.test",)).classify
    assert classify(referer, "shop.test") == {"refr_medium": medium, "refr_source": source, "refr_term": term}


def test_the_page_on_www_counts_the_apex_domain_as_internal():
    assert RefererClassifier().classify("https://shop.test/", "www.shop.test")["refr_medium"] == "internal"
    assert RefererClassifier().classify("https://www.other.test/", "www.shop.test")["refr_medium"] == "unknown"


def test_a_referer_host_of_many_labels_is_looked_up_only_as_deep_as_a_listed_domain():
    """Each parent of a host joined its labels again: a referer of "a." * 80,000 took 18 s of one worker."""
    classifier = RefererClassifier()
    lookups = []
    listed = classifier.hosts
    classifier.hosts = type("Counted", (dict,), {"get": lambda self, key: lookups.append(key) or listed.get(key)})()
    found = classifier.classify("https://" + "a." * 10_000 + "news.google.co.uk/search?q=boots", "shop.test")
    assert found == {"refr_medium": "search", "refr_source": "Google", "refr_term": "boots"}
    assert len(lookups) <= 2 * classifier.most_labels <= 12     # each parent, as itself and as "<name>.*"


def test_the_referer_cache_skips_a_call_with_any_long_argument():
    classify = RefererClassifier().classify
    huge_host = "a" * 300_000 + ".example.com"   # the page host, from a hostile POST's url
    google = "https://www.google.com/search?q=x"
    assert classify(google, huge_host)["refr_source"] == "Google"
    assert classify(google, huge_host)["refr_source"] == "Google"
    assert classify.cache_info().currsize == 0   # 300 KB per entry would be 2.5 GB at the 8192 cap
    classify(google, "shop.test")
    assert classify.cache_info().currsize == 1   # short calls are still cached


def test_hostile_long_urls_leave_nothing_behind_in_any_cache():
    """No cache keeps a huge page URL or host: neither ours (classify's second argument) nor the
    stdlib's urlsplit cache (128 entries of any length), though the events are bad rows anyway."""
    def hostile(i):
        event = {**EV, "eid": f"00000000-0000-4000-8000-{i:012d}", "url": f"https://h{i}{'a' * 200_000}.test/p",
                 "refr": "https://www.google.com/search?q=x"}
        return post_record([event])

    enr = enricher()
    enr.process(hostile(0))                    # warm up lazily built state (UA parser) before measuring
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1, 21):
            enr.process(hostile(i))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, f"{held:,} bytes held after 20 events with 200 KB hosts"


def test_campaign_fields_and_click_ids():
    assert campaign("utm_source=google&utm_medium=cpc&utm_term=red+shoes&utm_content=ad1&utm_campaign=bf&gclid=abc") == {
        "mkt_source": "google", "mkt_medium": "cpc", "mkt_term": "red shoes", "mkt_content": "ad1",
        "mkt_campaign": "bf", "mkt_clickid": "abc", "mkt_network": "Google"}
    assert set(campaign(None).values()) == {None}
    # Google's click ids where iOS allows no gclid, and other networks'; gclid first whatever the order
    assert campaign("wbraid=w1")["mkt_network"] == campaign("gbraid=g1")["mkt_network"] == "Google"
    assert (campaign("ttclid=t")["mkt_network"], campaign("li_fat_id=l")["mkt_network"]) == ("TikTok", "LinkedIn")
    assert campaign("fbclid=f&gclid=g")["mkt_clickid"] == "g"


def test_fingerprint_ignores_send_time_and_event_id_only():
    params = {"e": "pv", "eid": "a", "stm": "1", "nuid": "n", "url": "https://x.test/"}
    assert fingerprint(params) == fingerprint({**params, "eid": "b", "stm": "2", "nuid": "m"})
    assert fingerprint(params) != fingerprint({**params, "url": "https://x.test/other"})


def test_a_keys_records_enriched_in_one_millisecond_get_etl_stamps_in_the_order_enriched(monkeypatch):
    now = [1_000]
    monkeypatch.setattr("enrich.enrichments.utc_now_ms", lambda: now[0])
    clock = EtlClock(max_ahead_ms=2)
    assert [clock.stamp(key) for key in ("s1", "s1", "s2", "s1", "s1", "s2")] == \
        [1_000, 1_001, 1_000, 1_002, 1_002, 1_001]         # s1 stops 2 ms ahead: a flood ties again
    now[0] = 1_001                                          # within the bumps: the keys are remembered
    assert clock.stamp("s1") == 1_003 and clock.stamp("s3") == 1_001
    now[0] = 1_004                                          # past them: forgotten, nothing can tie
    assert clock.stamp("s1") == 1_004 and clock.latest == {"s1": 1_004}
    now[0] = 500                                            # the clock stepped back: forgotten too
    assert clock.stamp("s1") == 500 and clock.latest == {"s1": 500}
    # The enricher stamps each raw record by its partition key, the tracker's session id.
    now[0] = 1_764_409_956_000
    worker = enricher()
    first, second, other = (worker.process(get_record({"e": "pv", "p": "web", "tv": "js-4.1.0", "sid": sid,
                                                       "eid": str(uuid.uuid4())}))[0]
                            for sid in ("sid-1", "sid-1", "sid-2"))
    assert [events[0][1]["etl_tstamp"] for events in (first, second, other)] == \
        ["2025-11-29T09:52:36.000Z", "2025-11-29T09:52:36.001Z", "2025-11-29T09:52:36.000Z"]


def test_stamps_for_entries_sent_again_follow_every_stamp_given_and_precede_every_one_after(monkeypatch):
    now = [1_000]
    monkeypatch.setattr("enrich.enrichments.utc_now_ms", lambda: now[0])
    clock = EtlClock()
    assert [clock.stamp("s1"), clock.stamp("s1"), clock.stamp("s2")] == [1_000, 1_001, 1_000]
    assert clock.later(3) == 1_002                          # 1,002 to 1,004: after s1's 1,001
    assert [clock.stamp("s1"), clock.stamp("s3")] == [1_005, 1_005]     # every key after them
    assert clock.later(1) == 1_006
    now[0] = 900                                            # the clock stepped back: still after them
    assert clock.stamp("s4") == 1_007
    now[0] = 5_000                                          # long past them: the clock's own time again
    assert clock.later(2) == 5_000 and clock.stamp("s1") == 5_002


def test_deduper_window_and_capacity():
    now = [0.0]
    dedupe = Deduper(capacity=2, window_s=10, clock=lambda: now[0])
    assert not dedupe.seen("e1", "f") and dedupe.seen("e1", "f")
    assert not dedupe.seen("e1", "other-fingerprint")       # same id, different content: a new event
    now[0] = 11
    assert not dedupe.seen("e1", "f")                        # outside the window
    assert not dedupe.seen("e2", "f") and not dedupe.seen("e3", "f")
    assert not dedupe.seen("e1", "f")                        # forgotten: capacity 2
    assert len(dedupe._seen) <= 2 and dedupe.dropped == 1


def test_a_batch_not_delivered_is_forgotten_and_the_ones_before_it_are_not():
    """Read again, a batch whose delivery failed must not be dropped as repeats of itself."""
    dedupe = Deduper(capacity=100, window_s=600)
    assert not dedupe.seen("delivered", "f")
    before = dedupe.remembered
    assert not dedupe.seen("failed-1", "f") and not dedupe.seen("failed-2", "f")
    dedupe.forget_last(dedupe.remembered - before)
    assert not dedupe.seen("failed-1", "f") and not dedupe.seen("failed-2", "f")
    assert dedupe.seen("delivered", "f")


def test_exact_duplicates_are_dropped_but_same_id_with_other_content_is_kept():
    worker = enricher()
    raw = get_record({**EV, "eid": "11111111-1111-4111-8111-111111111111", "stm": "1764409955000"})
    resent = get_record({**EV, "eid": "11111111-1111-4111-8111-111111111111", "stm": "1764409956000"})
    changed = get_record({**EV, "eid": "11111111-1111-4111-8111-111111111111", "page": "other"})
    assert len(worker.process(raw)[0]) == 1
    assert worker.process(resent) == ([], [])
    assert len(worker.process(changed)[0]) == 1
    off = enricher(dedupe_entries=0)                # one enricher: a duplicate it has seen is kept
    assert len(off.process(raw)[0]) == 1 and len(off.process(raw)[0]) == 1


def test_configured_json_paths_inside_events_and_contexts_are_pseudonymised():
    hmac = Pseudonymiser(KEY)
    signup = "iglu:com.snowplowanalytics.snowplow/submit_form/jsonschema/1-0-0"
    data = {"formId": "signup", "elements": [{"name": "email", "value": "bob@example.com", "nodeName": "INPUT"}]}
    session = sdj("iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1", {
        "userId": "5a2f9c1e-7d3b-4e8a-9f10-2b3c4d5e6f70", "sessionId": "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        "sessionIndex": 1, "previousSessionId": None, "storageMechanism": "COOKIE_1"})
    raw = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(signup, data)).decode(), "cx": b64(contexts(session))})
    # One path of their own: the built-in ones still apply (a list replacing them put form values and
    # user ids in clear), and a built-in path listed again, in another spelling, is pseudonymised once.
    worker = enricher(pii_fields=("com.snowplowanalytics.snowplow/submit_form:formId",
                                  "com.snowplowanalytics.snowplow/submit_form:$.elements[*].value"))
    _, event = worker.process(raw)[0][0]
    assert event["unstruct_event"]["data"]["formId"] == hmac("signup")
    assert event["unstruct_event"]["data"]["elements"][0] == {"name": "email", "value": hmac("bob@example.com"),
                                                             "nodeName": "INPUT"}
    assert event["contexts"][0]["data"]["userId"] == hmac("5a2f9c1e-7d3b-4e8a-9f10-2b3c4d5e6f70")
    assert event["contexts"][0]["data"]["sessionId"] == "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


@pytest.mark.parametrize("configured", ["com.snowplowanalytics.snowplow/submit_form:elements",
                                        "com.snowplowanalytics.snowplow/submit_form:elements[*]",
                                        "com.snowplowanalytics.snowplow/submit_form:*"])
def test_a_configured_path_around_a_built_in_one_pseudonymises_each_value_once(configured):
    """Under the old "replace" reading, covering the built-in form values with a wider path was usual;
    added to them, it pseudonymised the pseudonym."""
    hmac = Pseudonymiser(KEY)
    signup = "iglu:com.snowplowanalytics.snowplow/submit_form/jsonschema/1-0-0"
    data = {"formId": "signup", "elements": [{"name": "email", "value": "bob@example.com", "nodeName": "INPUT"}]}
    raw = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(signup, data)).decode()})
    _, event = enricher(pii_fields=(configured,)).process(raw)[0][0]
    assert event["unstruct_event"]["data"]["elements"][0]["value"] == hmac("bob@example.com")


def test_form_values_are_pseudonymised_by_default():
    signup = "iglu:com.snowplowanalytics.snowplow/submit_form/jsonschema/1-0-0"
    data = {"formId": "signup", "elements": [{"name": "email", "value": "bob@example.com", "nodeName": "INPUT"}]}
    raw = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(signup, data)).decode()})
    _, event = enricher().process(raw)[0][0]
    assert event["unstruct_event"]["data"]["elements"][0]["value"] == Pseudonymiser(KEY)("bob@example.com")


@pytest.mark.parametrize("schema, data, path", [
    ("iglu:com.snowplowanalytics.snowplow/focus_form/jsonschema/1-0-0",
     {"formId": "f", "elementId": "email", "nodeName": "INPUT", "value": "bob@example.com"}, ("value",)),
    ("iglu:com.clickshop/purchase/jsonschema/1-0-0", {"order_id": "order-77", "total": 10.5, "items": 1},
     ("order_id",)),
])
def test_autofilled_form_values_and_order_ids_are_pseudonymised_by_default(schema, data, path):
    raw = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(schema, data)).decode()})
    (_, event), = enricher().process(raw)[0]
    assert event["unstruct_event"]["data"][path[0]] == Pseudonymiser(KEY)(data[path[0]])


def test_mobile_device_ids_are_pseudonymised_by_default():
    from tests.enrich.test_registry import ANDROID, OTHER_ID, SP

    device = sdj(SP.format("mobile_context", "1-0-3"), ANDROID)
    (_, event), = enricher().process(get_record({**EV, "p": "mob", "cx": b64(contexts(device))}))[0]
    data = event["contexts"][0]["data"]
    assert data["androidIdfa"] == data["appSetId"] == Pseudonymiser(KEY)(OTHER_ID)
    assert data["deviceModel"] == "Pixel 8"


def test_a_mobile_trackers_session_context_fills_the_session_fields_it_left_empty():
    """The Android and iOS trackers send no sid, vid or duid: without their client_session, every
    request without the collector's cookie (and every SP-Anonymous one) was a session of its own."""
    hmac = Pseudonymiser(KEY)
    install, app_session = "5a2f9c1e-7d3b-4e8a-9f10-2b3c4d5e6f70", "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
    session = sdj("iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2", {
        "userId": install, "sessionId": app_session, "sessionIndex": 3, "storageMechanism": "SQLITE"})
    mobile = {key: value for key, value in EV.items() if key != "sid"} | {"p": "mob", "cx": b64(contexts(session))}
    (_, event), = enricher().process(get_record(mobile))[0]
    assert (event["domain_sessionid"], event["domain_sessionidx"]) == (app_session, 3)
    assert event["domain_userid"] == event["contexts"][0]["data"]["userId"] == hmac(install)
    (_, web), = enricher().process(get_record({**EV, "vid": "1", "duid": "browser", "cx": b64(contexts(session))}))[0]
    assert (web["domain_sessionid"], web["domain_sessionidx"], web["domain_userid"]) == \
        (EV["sid"], 1, hmac("browser"))                    # what the tracker set stays


def test_numbers_lists_and_objects_at_a_pii_path_are_pseudonymised_not_skipped():
    from enrich.pipeline import _pii_paths, _pseudonym, _replace_at

    hmac = Pseudonymiser(KEY)
    pseudonymise = functools.partial(_pseudonym, hmac=hmac)
    paths = _pii_paths(("com.acme/customer:id", "com.acme/customer:emails", "com.acme/customer:$.address",
                        "com.acme/list:$[*].email"))
    customer = {"id": 424242, "emails": ["a@x.test", "b@x.test"], "address": {"street": "Main 1", "verified": True}}
    for path in paths[("com.acme", "customer")]:
        _replace_at(customer, path, pseudonymise)
    assert customer == {"id": hmac("424242"), "emails": [hmac("a@x.test"), hmac("b@x.test")],
                        "address": {"street": hmac("Main 1"), "verified": True}}
    people = [{"email": "c@x.test"}, {"email": "d@x.test"}]
    for path in paths[("com.acme", "list")]:
        _replace_at(people, path, pseudonymise)
    assert people == [{"email": hmac("c@x.test")}, {"email": hmac("d@x.test")}]



def test_email_addresses_in_urls_titles_and_campaign_fields_become_pseudonyms():
    raw = get_record({**EV, "url": "https://shop.test/users/carol@example.org/orders?email=alice%40example.com&x=1"
                                   "&utm_source=news&utm_medium=email&utm_term=alice%2Bshop%40example.com",
                      "refr": "https://mail.test/read?to=bob@example.net#inbox", "page": "Orders of alice@example.com",
                      "se_la": "dave@example.co.uk"})
    (_, event), = enricher().process(raw)[0]
    text = orjson.dumps(event).decode()
    assert not any(part in text for part in ("alice", "bob@", "carol", "dave", "%40example", "@example"))
    hmac = Pseudonymiser(KEY)
    assert event["page_urlquery"] == f"email={hmac('alice@example.com')}&x=1&utm_source=news&utm_medium=email" \
                                     f"&utm_term={hmac('alice+shop@example.com')}"
    assert event["mkt_term"] == hmac("alice+shop@example.com")          # decoded, then the same pseudonym
    assert event["page_title"] == f"Orders of {hmac('alice@example.com')}"
    assert event["mkt_medium"] == "email" and event["page_urlhost"] == "shop.test"   # no address: untouched
    (_, kept), = enricher(pseudonymisation=False).process(raw)[0]
    assert kept["page_title"] == "Orders of alice@example.com"          # pseudonymisation off keeps them

def test_email_addresses_in_snowplows_own_url_fields_become_pseudonyms():
    """A newsletter's tracked link (the collector's /r/tp2) builds a uri_redirect event of its target;
    a mailto: link click, a deep link's URL and a site search carry addresses in entities, not atomic fields."""
    hmac, sp, mobile = Pseudonymiser(KEY), "iglu:com.snowplowanalytics.snowplow", "iglu:com.snowplowanalytics.mobile"
    redirect = record(path="/r/tp2", querystring="u=https%3A%2F%2Fshop.test%2Fwelcome%3Femail%3Dalice%40example.com")
    link = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(f"{sp}/link_click/jsonschema/1-0-1", {
        "targetUrl": "mailto:bob@example.net", "elementContent": "Write to bob@example.net"})).decode()})
    search = get_record({**EV, "e": "ue", "ue_pr": orjson.dumps(unstruct(f"{sp}/site_search/jsonschema/1-0-0", {
        "terms": ["order", "carol@example.org"]})).decode(),
        "cx": b64(contexts(sdj(f"{mobile}/deep_link/jsonschema/1-0-0", {"url": "app://x?to=dave@example.com"})))})
    events = [event for raw in (orjson.dumps(redirect), link, search) for _, event in enricher().process(raw)[0]]
    assert len(events) == 3
    assert not any(name in orjson.dumps(events).decode() for name in ("alice", "bob", "carol", "dave"))
    assert events[0]["unstruct_event"]["data"]["uri"] == f"https://shop.test/welcome?email={hmac('alice@example.com')}"
    assert events[1]["unstruct_event"]["data"] == {"targetUrl": f"mailto:{hmac('bob@example.net')}",
                                                   "elementContent": f"Write to {hmac('bob@example.net')}"}
    assert events[2]["unstruct_event"]["data"]["terms"] == ["order", hmac("carol@example.org")]
    assert events[2]["contexts"][0]["data"]["url"] == f"app://x?to={hmac('dave@example.com')}"


def test_the_cross_domain_linker_fills_the_linked_id_and_time_and_keeps_no_raw_id_in_urls():
    """The JavaScript tracker's crossDomainLinker adds _sp=<domain_userid>.<ms> to links to the shop's
    other domains: the linked id was nowhere but in page_url and the next page's referrer, in clear."""
    hmac, linked = Pseudonymiser(KEY), "a6b2d0f4-1c3e-4e5f-8a9b-0c1d2e3f4a5b"
    user_id = base64.urlsafe_b64encode(b"alice@example.com").decode().rstrip("=")
    extended = f"{linked}.1764409950123.{uuid.uuid4()}.{user_id}.shop-de.web.bGluaw"     # useExtendedCrossDomainLinker
    landing = get_record({**EV, "e": "pv", "url": f"https://shop.test/cart?_sp={extended}&x=1"})
    after = get_record({**EV, "e": "pv", "url": "https://shop.test/checkout",
                        "refr": f"https://shop.test/cart?_sp={linked}.1764409950123&x=1"})
    (_, first), (_, second) = [event for raw in (landing, after) for event in enricher().process(raw)[0]]
    assert first["refr_domain_userid"] == hmac(linked) and first["refr_dvce_tstamp"] == "2025-11-29T09:52:30.123Z"
    assert first["page_url"] == f"https://shop.test/cart?_sp={hmac(linked)}.1764409950123&x=1"
    assert first["page_urlquery"] == f"_sp={hmac(linked)}.1764409950123&x=1"
    assert second["page_referrer"] == f"https://shop.test/cart?_sp={hmac(linked)}.1764409950123&x=1"
    assert second["refr_urlquery"] == f"_sp={hmac(linked)}.1764409950123&x=1" and second["refr_domain_userid"] is None
    assert linked not in orjson.dumps([first, second]).decode() and user_id not in orjson.dumps(first).decode()
    (_, kept), = enricher(pseudonymisation=False).process(landing)[0]
    assert kept["refr_domain_userid"] == linked and f"_sp={extended}" in kept["page_url"]


@pytest.mark.parametrize(("query", "linked", "clicked"), [
    ("_sp=abc", "abc", None), ("_sp=.1764409950123", None, "2025-11-29T09:52:30.123Z"), ("_sp=", None, None),
    ("_sp=abc.99999999999999999999", "abc", None), ("x_sp=abc.1", None, None), (f"_sp={'a' * 129}.1", None, "1970-01-01T00:00:00.001Z"),
    # leading zeros that put a huge number behind plausible first digits; more digits than int() reads
    ("_sp=abc.00000000000019" + "9" * 20, "abc", None), ("_sp=abc.0000000000001" + "9" * 5000, "abc", None),
])
def test_a_cross_domain_parameter_that_does_not_read_leaves_its_fields_null(query, linked, clicked):
    assert cross_domain(query) == {"refr_domain_userid": linked, "refr_dvce_tstamp": clicked}


def test_the_fingerprint_cannot_be_matched_against_guesses_without_the_key():
    import hashlib

    raw = get_record({**EV, "uid": "alice@example.com"})
    _, event = enricher().process(raw)[0][0]
    params = {k: v for k, v in {**EV, "uid": "alice@example.com"}.items() if k not in ("eid", "stm", "nuid", "cv")}
    plain = hashlib.md5(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert event["event_fingerprint"] != plain and len(event["event_fingerprint"]) == 32
    assert enricher(dedupe_entries=0).process(raw)[0][0][1]["event_fingerprint"] == event["event_fingerprint"]


def test_config_refuses_to_start_without_a_long_enough_key_unless_pseudonymisation_is_off(tmp_path):
    with pytest.raises(ConfigError, match="CLICKSTREAM_PSEUDONYMISATION_KEY"):
        load(EnrichSettings, env={})
    assert load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION": "false"}).pseudonymisation is False
    with pytest.raises(ConfigError, match="CLICKSTREAM_PSEUDONYMISATION_KEY: at least 16 characters, got 6"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": "s3cret"})   # found in minutes from one pair
    loaded = load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY,
                                       "CLICKSTREAM_REGISTRIES": f"embedded, {tmp_path} ,http://iglu.test",
                                       "CLICKSTREAM_IP_ANON_OCTETS": "2"})
    assert loaded.registries == ("embedded", str(tmp_path), "http://iglu.test") and loaded.ip_anon_octets == 2
    for typo in ("embeded", "s3://bucket/iglu", str(tmp_path / "missing")):
        with pytest.raises(ConfigError, match="CLICKSTREAM_REGISTRIES"):
            load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_REGISTRIES": typo})
    with pytest.raises(ConfigError, match="CLICKSTREAM_IP_ANON_OCTETS"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_IP_ANON_OCTETS": "5"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_PII_FIELDS"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_PII_FIELDS": "email"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_PII_FIELDS"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_PII_FIELDS": "com.acme/x:$."})
    with pytest.raises(ConfigError, match="CLICKSTREAM_PII_FIELDS"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_PII_FIELDS": "com.acme/x:a.$b"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_PII_FIELDS"):
        load(EnrichSettings, env={"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, "CLICKSTREAM_PII_FIELDS": "com.acme/:a"})


GEOLOCATION = "iglu:com.snowplowanalytics.snowplow/geolocation_context/jsonschema/{}"
EIFFEL_TOWER = {"latitude": 48.858370, "longitude": 2.294481, "latitudeLongitudeAccuracy": 5.0, "altitude": 35.2,
                "altitudeAccuracy": 3.0, "bearing": 90.0, "speed": 1.4}


def geolocated(version: str, **settings) -> dict:
    data = {**EIFFEL_TOWER, **({"timestamp": 1764409956000} if version == "1-1-0" else {})}
    raw = get_record({**EV, "cx": b64(contexts(sdj(GEOLOCATION.format(version), data)))})
    (_, event), = enricher(**settings).process(raw)[0]
    return event["contexts"][0]["data"]


@pytest.mark.parametrize("version", ["1-0-0", "1-1-0"])
def test_gps_positions_are_coarsened_to_about_11_km_and_their_refinements_withheld_by_default(version):
    data = geolocated(version)
    assert (data["latitude"], data["longitude"]) == (48.9, 2.3)
    assert data["latitudeLongitudeAccuracy"] is data["altitude"] is data["altitudeAccuracy"] is None
    assert (data["bearing"], data["speed"]) == (90.0, 1.4)        # motion, not a place: kept
    assert data.get("timestamp") == (1764409956000 if version == "1-1-0" else None)
    assert enricher().resolver.validate(GEOLOCATION.format(version), data) == []   # consumers may re-validate


def test_gps_coarsening_follows_its_settings_and_does_not_depend_on_pseudonymisation():
    finer = geolocated("1-1-0", geolocation_decimals=2)
    assert (finer["latitude"], finer["longitude"]) == (48.86, 2.29)
    assert geolocated("1-1-0", pseudonymisation=False)["latitude"] == 48.9
    kept = geolocated("1-1-0", geolocation_coarsening=False)
    assert {name: kept[name] for name in EIFFEL_TOWER} == EIFFEL_TOWER


def test_gps_fields_also_listed_as_pii_are_rounded_then_pseudonymised():
    data = geolocated("1-1-0", pii_fields=("com.snowplowanalytics.snowplow/geolocation_context:latitude",))
    assert data["latitude"] == Pseudonymiser(KEY)("48.9")


def test_config_checks_the_geolocation_and_collector_clock_settings():
    env = {"CLICKSTREAM_PSEUDONYMISATION_KEY": KEY}
    loaded = load(EnrichSettings, env={**env, "CLICKSTREAM_GEOLOCATION_DECIMALS": "2",
                                      "CLICKSTREAM_GEOLOCATION_COARSENING": "false",
                                      "CLICKSTREAM_MAX_COLLECTOR_AHEAD_S": "60"})
    assert (loaded.geolocation_decimals, loaded.geolocation_coarsening, loaded.max_collector_ahead_s) == (2, False, 60)
    with pytest.raises(ConfigError, match="CLICKSTREAM_GEOLOCATION_DECIMALS"):
        load(EnrichSettings, env={**env, "CLICKSTREAM_GEOLOCATION_DECIMALS": "7"})
    with pytest.raises(ConfigError, match="MAX_COLLECTOR_AHEAD_S"):
        load(EnrichSettings, env={**env, "CLICKSTREAM_MAX_COLLECTOR_AHEAD_S": "0"})
