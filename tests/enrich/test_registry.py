"""The Iglu resolver: registries in priority order, SchemaVer versions, TTL caching, lint and the CLI."""
from __future__ import annotations

import logging

import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from common.config import ConfigError
from enrich.cli import cli
from enrich.pipeline import Enricher
from enrich.registry import EMBEDDED, FolderRegistry, HttpRegistry, Resolver, SchemaKey, SchemaKeyError, lint
from localstack.emulator import free_port
from tests.enrich.helpers import StaticRegistry, enricher, get_record, settings, unstruct, write_schema

SIGNUP = "iglu:com.acme/signup/jsonschema/"
PROPS = {"email_domain": {"type": "string"}}


def signup_registries(folder, served):
    """1-0-0 in the folder, 1-0-1 (adds optional plan) over HTTP, 2-0-0 (plan required int) in both,
    but lenient over HTTP, so priority order decides which 2-0-0 wins."""
    write_schema(folder, SIGNUP + "1-0-0", {"type": "object", "properties": PROPS, "required": ["email_domain"],
                                            "additionalProperties": False})
    write_schema(served, SIGNUP + "1-0-1", {"type": "object", "properties": {**PROPS, "plan": {"type": "string"}},
                                            "required": ["email_domain"], "additionalProperties": False})
    write_schema(folder, SIGNUP + "2-0-0", {"type": "object", "properties": {**PROPS, "plan": {"type": "integer"}},
                                            "required": ["email_domain", "plan"], "additionalProperties": False})
    write_schema(served, SIGNUP + "2-0-0", {"type": "object", "additionalProperties": True})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_schema_key_parsing():
    key = SchemaKey.parse("iglu:com.acme/signup/jsonschema/1-0-12")
    assert (key.vendor, key.name, key.format, key.model, key.revision, key.addition) == ("com.acme", "signup", "jsonschema", 1, 0, 12)
    assert str(key) == "iglu:com.acme/signup/jsonschema/1-0-12"
    assert key.path == "schemas/com.acme/signup/jsonschema/1-0-12"
    for bad in ("com.acme/signup/jsonschema/1-0-0", "iglu:com.acme/signup/jsonschema/1-0", "iglu:a/b/c/01-0-0", 42, None,
                "iglu:../private/notes/1-0-0", "iglu:com..acme/x/jsonschema/1-0-0", "iglu:.acme/x/jsonschema/1-0-0",
                "iglu:com.acme/signup/jsonschema/1-0-0\n"):     # a path step out of the registry tree; a second key
        with pytest.raises(SchemaKeyError):
            SchemaKey.parse(bad)


def test_versions_resolve_across_folder_and_http_registries(tmp_path):
    folder, served = tmp_path / "folder", tmp_path / "served"
    signup_registries(folder, served)
    with StaticRegistry(served) as http:
        resolver = Resolver([FolderRegistry(EMBEDDED, "embedded"), FolderRegistry(folder), HttpRegistry(http.url)])
        assert resolver.validate(SIGNUP + "1-0-0", {"email_domain": "a.test"}) == []
        assert resolver.validate(SIGNUP + "1-0-0", {"email_domain": "a.test", "plan": "pro"}) != []
        assert resolver.validate(SIGNUP + "1-0-1", {"email_domain": "a.test", "plan": "pro"}) == []
        # 2-0-0 exists in both: the folder comes first, so its stricter definition wins...
        assert resolver.validate(SIGNUP + "2-0-0", {"email_domain": "a.test", "plan": 3}) == []
        assert resolver.validate(SIGNUP + "2-0-0", {"email_domain": "a.test", "plan": "pro"}) != []
        # ...and with the HTTP registry first, its lenient one does.
        reversed_order = Resolver([HttpRegistry(http.url), FolderRegistry(folder)])
        assert reversed_order.validate(SIGNUP + "2-0-0", {"email_domain": "a.test", "plan": "pro"}) == []
        history = resolver.lookup(SIGNUP + "1-0-1").history
        assert [h["repository"] for h in history] == ["embedded", f"folder:{folder}"]
        assert all(h["errors"][0]["error"] == "NotFound" for h in history)


def test_a_file_that_is_not_the_schema_it_is_served_as_is_no_schema(tmp_path):
    """A copy of another schema at this path, or a registry's error page answered with 200, validated
    events against the wrong rules (an empty object: everything)."""
    write_schema(tmp_path, SIGNUP + "1-0-0", {"type": "object", "properties": {"plan": {"type": "string"}}})
    copied = tmp_path / "schemas/com.acme/signup/jsonschema/1-0-1"
    copied.write_bytes((tmp_path / "schemas/com.acme/signup/jsonschema/1-0-0").read_bytes())
    (tmp_path / "schemas/com.acme/signup/jsonschema/2-0-0").write_bytes(b'{"message": "Schema not found"}')
    resolver = Resolver([FolderRegistry(tmp_path)])
    for version, said in (("1-0-1", "self says iglu:com.acme/signup/jsonschema/1-0-0, not"), ("2-0-0", "self must hold")):
        with pytest.raises(LookupError) as refused:
            resolver.validate(SIGNUP + version, {"plan": 3})
        assert said in refused.value.args[0][0]["errors"][0]["message"]
    assert resolver.validate(SIGNUP + "1-0-0", {"plan": "pro"}) == []


def test_validation_leaves_the_data_as_sent_and_fetches_nothing(tmp_path):
    """fastjsonschema wrote each missing property's default into the event (a quantity 0 that the
    schema's own minimum refuses), and fetched a remote $ref with no timeout, holding the worker."""
    write_schema(tmp_path, SIGNUP + "1-0-0", {"type": "object", "properties": {
        "quantity": {"type": "integer", "minimum": 1, "default": 0}, "gift": {"type": "boolean", "default": False}}})
    hung = free_port()                        # nothing listens: a fetch would be refused, not refused by us
    write_schema(tmp_path, SIGNUP + "1-0-1", {"type": "object", "properties": {
        "price": {"$ref": f"http://127.0.0.1:{hung}/schemas/com.acme/money/jsonschema/1-0-0#"}}})
    resolver = Resolver([FolderRegistry(tmp_path)])
    data = {"plan": "pro"}
    assert resolver.validate(SIGNUP + "1-0-0", data) == [] and data == {"plan": "pro"}
    with pytest.raises(LookupError) as refused:
        resolver.validate(SIGNUP + "1-0-1", {"price": 3})
    assert "points outside the schema" in refused.value.args[0][0]["errors"][0]["message"]


def test_hits_and_misses_are_cached_for_the_ttl(tmp_path):
    signup_registries(tmp_path / "folder", tmp_path / "served")
    clock = Clock()
    with StaticRegistry(tmp_path / "served") as http:
        resolver = Resolver([HttpRegistry(http.url)], ttl=60, clock=clock)
        for _ in range(3):
            assert resolver.lookup(SIGNUP + "1-0-1").validate is not None
            assert resolver.lookup(SIGNUP + "9-0-0").validate is None
        assert sorted(http.requests) == ["/schemas/com.acme/signup/jsonschema/1-0-1",
                                         "/schemas/com.acme/signup/jsonschema/9-0-0"]
        validator = resolver.lookup(SIGNUP + "1-0-1").validate
        clock.now += 61
        assert resolver.lookup(SIGNUP + "1-0-1").validate is not validator   # fetched and compiled again
        assert resolver.lookup(SIGNUP + "9-0-0").validate is None
        assert len(http.requests) == 4


def test_a_schema_published_after_a_miss_is_found_after_the_miss_ttl_not_the_whole_ttl(tmp_path):
    """"Publish the schema, then replay" made the same bad rows again for the 600 s a miss was cached."""
    signup_registries(tmp_path / "folder", tmp_path / "served")
    clock = Clock()
    resolver = Resolver([FolderRegistry(tmp_path / "folder")], ttl=600, miss_ttl=60, clock=clock)
    assert resolver.lookup(SIGNUP + "9-0-0").validate is None
    write_schema(tmp_path / "folder", SIGNUP + "9-0-0", {"type": "object"})          # published now
    clock.now += 59
    assert resolver.lookup(SIGNUP + "9-0-0").validate is None
    clock.now += 2
    assert resolver.lookup(SIGNUP + "9-0-0").validate is not None


def test_an_unreachable_registry_is_skipped_and_retried_sooner(tmp_path):
    signup_registries(tmp_path / "folder", tmp_path / "served")
    clock = Clock()
    dead = HttpRegistry(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    resolver = Resolver([dead, FolderRegistry(tmp_path / "folder")], ttl=600, error_ttl=5, clock=clock)
    found = resolver.lookup(SIGNUP + "1-0-0")
    assert found.validate is not None
    assert found.history[0]["errors"][0]["error"] == "RepoFailure"
    missing = resolver.lookup(SIGNUP + "3-0-0")
    assert missing.validate is None and missing.expires == clock.now + 5


def test_a_registry_outage_is_counted_and_logged_once_per_interval_not_once_per_event(tmp_path, caplog):
    # Without this the only sign of a dead registry is schema_violations bad rows, as from a broken tracker.
    served = tmp_path / "served"
    for n in range(30):
        write_schema(served, f"{SIGNUP}1-0-{n}", {"type": "object", "additionalProperties": True})
    clock = Clock()
    server = StaticRegistry(served).__enter__()
    port, dead = server.httpd.server_address[1], HttpRegistry(server.url, timeout=0.5)
    worker = Enricher(settings(), Resolver([FolderRegistry(EMBEDDED, "embedded"), dead], clock=clock))

    def signup(n):
        return worker.process(get_record({"e": "ue", "p": "web", "tv": "t", "ue_pr": orjson.dumps(
            unstruct(f"{SIGNUP}1-0-{n}", {})).decode()}))

    def errors():
        return REGISTRY.get_sample_value("enrich_registry_errors_total", {"registry": dead.name}) or 0

    def lines(level):
        return [r.getMessage() for r in caplog.records if r.name == "enrich.registry" and r.levelno == level]

    caplog.set_level(logging.INFO, logger="enrich.registry")
    assert signup(0)[1] == [] and errors() == 0
    server.__exit__()                                                   # connection refused from now on
    bad = [row for n in range(1, 21) for row in signup(n)[1]]
    assert [row["schema"].split("/")[1] for row in bad] == ["schema_violations"] * 20
    assert errors() == 20                                               # one per failed fetch
    assert len(lines(logging.WARNING)) == 1                             # not one per event
    assert dead.name in lines(logging.WARNING)[0] and "1 fetch(es) failed" in lines(logging.WARNING)[0]
    clock.now += 31                                                     # the default log_interval is 30 s
    signup(21)
    assert errors() == 21 and len(lines(logging.WARNING)) == 2
    assert "20 fetch(es) failed since the last report" in lines(logging.WARNING)[1]
    with StaticRegistry(served, port=port):                             # back at the same address
        assert signup(22)[1] == []
        assert signup(23)[1] == []
    assert len(lines(logging.INFO)) == 1 and f"{dead.name} answers again" in lines(logging.INFO)[0]
    assert errors() == 21 and len(lines(logging.WARNING)) == 2


def test_a_registry_that_breaks_off_its_answer_is_skipped_like_an_unreachable_one(tmp_path, monkeypatch):
    import http.client
    import urllib.request

    def broken_answer(*args, **kwargs):
        raise http.client.IncompleteRead(b"{")

    signup_registries(tmp_path / "folder", tmp_path / "served")
    monkeypatch.setattr(urllib.request, "urlopen", broken_answer)
    resolver = Resolver([HttpRegistry("http://iglu.test"), FolderRegistry(tmp_path / "folder")], clock=Clock())
    found = resolver.lookup(SIGNUP + "1-0-0")
    assert found.validate is not None and found.history[0]["errors"][0]["error"] == "RepoFailure"


def test_the_cache_is_bounded_so_made_up_keys_cannot_grow_memory_nor_push_real_schemas_out(tmp_path):
    signup_registries(tmp_path / "folder", tmp_path / "served")
    resolver = Resolver([FolderRegistry(tmp_path / "folder")], clock=Clock(), max_entries=50, max_misses=50)
    assert resolver.lookup(SIGNUP + "1-0-0").validate is not None
    for n in range(200):
        resolver.lookup(f"iglu:com.acme/made_up_{n}/jsonschema/1-0-0")
    assert len(resolver._misses) == 50
    assert list(resolver._cache) == [SIGNUP + "1-0-0"]       # not fetched and compiled again


class SlowRegistry(FolderRegistry):
    """A folder registry whose every fetch takes half a second of the test's clock (a slow HTTP one)."""

    def __init__(self, root, clock):
        super().__init__(root)
        self.clock, self.fetches = clock, 0

    def fetch(self, key):
        self.fetches += 1
        self.clock.now += 0.5
        return super().fetch(key)


def test_made_up_keys_may_take_a_fifth_of_the_time_in_fetches_and_cached_schemas_go_on(tmp_path, caplog):
    # Each key not in the cache was fetched on the worker's thread: one record naming 1,500 made-up
    # schemas stalled the enricher for 36 s against a registry answering in 20 ms.
    signup_registries(tmp_path / "folder", tmp_path / "served")
    clock = Clock()
    registry = SlowRegistry(tmp_path / "folder", clock)
    resolver = Resolver([registry], clock=clock)
    assert resolver.lookup(SIGNUP + "1-0-0").validate is not None          # found: never counted
    with caplog.at_level(logging.WARNING, logger="enrich.registry"):
        answers = [resolver.lookup(f"iglu:com.acme/made_up_{n}/jsonschema/1-0-0") for n in range(100)]
    made_up = (registry.fetches - 1) * 0.5                                  # seconds spent on them
    assert 2.0 <= made_up <= 2.0 + 0.2 * made_up + 0.5    # the 2 s burst, a fifth of the time since, one more
    skipped = answers[-1].history[0]["errors"][0]
    assert skipped["error"] == "RepoFailure" and "was not looked up" in skipped["message"]
    [line] = [r.getMessage() for r in caplog.records]                         # one line, not one per key
    assert line.endswith("1 lookups skipped since the last such line")
    clock.now += 700                                                         # its TTL is over meanwhile:
    fetched = registry.fetches
    assert resolver.lookup(SIGNUP + "1-0-0").validate is not None            # refetched, the budget refilled
    assert registry.fetches == fetched + 1


def test_a_cold_start_from_a_slow_registry_is_not_taken_for_made_up_keys(tmp_path):
    # Successful fetches counted against the budget: 23 % of a cold start's events became bad rows.
    clock = Clock()
    for n in range(40):
        write_schema(tmp_path / "folder", f"{SIGNUP}1-0-{n}", {"type": "object"})
    registry = SlowRegistry(tmp_path / "folder", clock)
    resolver = Resolver([registry], clock=clock)
    assert all(resolver.lookup(f"{SIGNUP}1-0-{n}").validate is not None for n in range(40))   # 20 s of fetches


def test_a_schema_in_use_stays_in_use_while_the_registries_cannot_be_asked(tmp_path):
    # Its TTL ran out during a registry outage: every event needing it became a bad row.
    signup_registries(tmp_path / "folder", tmp_path / "served")
    clock = Clock()
    with StaticRegistry(tmp_path / "served") as server:
        resolver = Resolver([HttpRegistry(server.url, timeout=0.5)], clock=clock)
        assert resolver.lookup(SIGNUP + "1-0-1").validate is not None
    clock.now += 601                                                         # past the 600 s TTL, registry down
    stale = resolver.lookup(SIGNUP + "1-0-1")
    assert stale.validate is not None and stale.expires == clock.now + 10    # asked again after error_ttl
    assert resolver.validate(SIGNUP + "1-0-1", {"email_domain": "x", "plan": "pro"}) == []


def test_overlong_schema_keys_are_refused_and_never_cached():
    longest = "iglu:com.acme/" + "n" * (512 - len("iglu:com.acme//jsonschema/1-0-0")) + "/jsonschema/1-0-0"
    assert SchemaKey.parse(longest).format == "jsonschema"
    resolver = Resolver()
    hostile = "iglu:com.acme/" + "n" * 400_000 + "/jsonschema/1-0-0"
    with pytest.raises(SchemaKeyError, match="at most 512 characters, this one has 400031"):
        resolver.lookup(hostile)
    assert not resolver._cache and not resolver._misses   # a made-up 400 KB key cost 1.6 MB per cached miss


def test_a_version_too_long_for_int_is_a_schema_key_error():
    # int() raises a plain ValueError above 4300 digits: it escaped `except SchemaKeyError`.
    for key in ("iglu:com.acme/x/jsonschema/1-0-" + "9" * 5000, "iglu:com.acme/x/jsonschema/" + "1" * 4301 + "-0-0"):
        with pytest.raises(SchemaKeyError):
            SchemaKey.parse(key)


def test_enricher_uses_the_configured_registries_and_reports_the_lookup_history(tmp_path):
    folder, served = tmp_path / "folder", tmp_path / "served"
    signup_registries(folder, served)
    with StaticRegistry(served) as http:
        worker = enricher(registries=("embedded", str(folder), http.url))
        ok = get_record({"e": "ue", "p": "web", "tv": "t", "ue_pr": orjson.dumps(
            unstruct(SIGNUP + "1-0-1", {"email_domain": "a.test", "plan": "pro"})).decode()})
        good, bad = worker.process(ok)
        assert bad == [] and good[0][1]["event_name"] == "signup" and good[0][1]["event_version"] == "1-0-1"
        unknown = get_record({"e": "ue", "p": "web", "tv": "t", "ue_pr": orjson.dumps(
            unstruct("iglu:com.acme/nothing/jsonschema/1-0-0", {})).decode()})
        good, bad = worker.process(unknown)
        assert good == []
        failure = bad[0]["data"]["failure"]["messages"][0]
        assert bad[0]["schema"].endswith("/schema_violations/jsonschema/2-0-0")
        assert failure["error"]["error"] == "ResolutionError"
        assert [h["repository"] for h in failure["error"]["lookupHistory"]] == \
            ["embedded", f"folder:{folder}", f"http:{http.url}"]


def test_embedded_registry_lints_clean_and_holds_the_tracker_and_shop_schemas():
    problems = {str(key): lint(orjson.loads((EMBEDDED / key.path).read_bytes()), key)
                for key in FolderRegistry(EMBEDDED).schemas()}
    assert {k: v for k, v in problems.items() if v} == {}
    for needed in ("com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
                   "com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1",
                   "com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-1",
                   "com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2",
                   "com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1",
                   "com.snowplowanalytics.snowplow/browser_context/jsonschema/2-0-0",
                   "com.clickshop/product_view/jsonschema/1-0-0", "com.clickshop/add_to_cart/jsonschema/1-0-0",
                   "com.clickshop/remove_from_cart/jsonschema/1-0-0", "com.clickshop/checkout_step/jsonschema/1-0-0",
                   "com.clickshop/purchase/jsonschema/1-0-0", "com.clickshop/page_type/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/mobile_context/jsonschema/1-0-3",
                   "com.snowplowanalytics.snowplow/desktop_context/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/screen/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/application/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/application_install/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/application_lifecycle/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/application_foreground/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/application_background/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/screen_end/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/screen_summary/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/deep_link_received/jsonschema/1-0-0",
                   "com.snowplowanalytics.mobile/deep_link/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/application_error/jsonschema/1-0-0",
                   "com.snowplowanalytics.snowplow/application_error/jsonschema/1-0-1",
                   "com.snowplowanalytics.snowplow/gdpr/jsonschema/1-0-0"):
        assert f"iglu:{needed}" in problems


SP = "iglu:com.snowplowanalytics.snowplow/{}/jsonschema/{}"
MOBILE = "iglu:com.snowplowanalytics.mobile/{}/jsonschema/{}"
SCREEN_ID, OTHER_ID = "5e1c9b1e-8d0f-4a4e-9c55-0c4ef3a1d2b7", "0f6a2c3d-1b4e-4f5a-8c9d-7e6f5a4b3c2d"
ANDROID = {"osType": "android", "osVersion": "14", "deviceManufacturer": "Google", "deviceModel": "Pixel 8",
           "carrier": "Vodafone", "networkType": "mobile", "networkTechnology": "LTE", "androidIdfa": OTHER_ID,
           "physicalMemory": 7834136576, "systemAvailableMemory": 3221225472, "batteryLevel": 82,
           "batteryState": "charging", "availableStorage": 52613349376, "totalStorage": 118111600640,
           "isPortrait": True, "resolution": "1080x2400", "scale": 2.625, "language": "en",
           "appSetId": OTHER_ID, "appSetIdScope": "developer"}
MAC = {"osType": "macos", "osVersion": "14.2.1", "deviceManufacturer": "Apple Inc.", "deviceModel": "MacBookPro18,3"}
CRASH = {"programmingLanguage": "JAVA", "message": "Attempt to invoke virtual method on a null object reference",
         "stackTrace": "java.lang.NullPointerException\n\tat com.clickshop.CartActivity.onCreate(CartActivity.kt:42)",
         "threadName": "main", "threadId": 2, "lineNumber": 42, "className": "com.clickshop.CartActivity",
         "exceptionName": "java.lang.NullPointerException", "isFatal": True}
JS_ERROR = {"programmingLanguage": "JAVASCRIPT", "message": "Uncaught TypeError: cart is undefined",
            "stackTrace": "TypeError: cart is undefined\n    at checkout (https://shop.test/app.js:12:7)",
            "lineNumber": 12, "lineColumn": 7, "fileName": "https://shop.test/app.js"}
DEEP_LINK = {"url": "clickshop://product/A-1?utm_source=newsletter", "referrer": "android-app://com.google.android.gm"}
# (key, what the tracker sends, a payload Iglu Central refuses): Android/iOS defaults (platform, screen,
# application, install, lifecycle, screen engagement, deep links, crash reporting) and the browser plugins'.
TRACKER_DEFAULTS = (
    (SP.format("mobile_context", "1-0-3"), ANDROID, {**ANDROID, "osVersion": 14}),
    (SP.format("desktop_context", "1-0-0"), MAC, {**MAC, "osVersion": None}),
    (MOBILE.format("screen", "1-0-0"), {"id": SCREEN_ID, "name": "CartActivity", "activity": "CartActivity"},
     {"id": "screen-1", "name": "CartActivity"}),
    (MOBILE.format("application", "1-0-0"), {"version": "2.3.1", "build": "231"}, {"version": "2.3.1", "build": 231}),
    (MOBILE.format("application_install", "1-0-0"), {}, {"installTimestamp": 1700000000000}),
    (MOBILE.format("application_lifecycle", "1-0-0"), {"isVisible": True, "index": 2}, {"isVisible": "true"}),
    (SP.format("application_foreground", "1-0-0"), {"foregroundIndex": 3}, {"foregroundIndex": -1}),
    (SP.format("application_background", "1-0-0"), {"backgroundIndex": 2}, {"backgroundIndex": "2"}),
    (MOBILE.format("screen_end", "1-0-0"), {}, {"id": SCREEN_ID}),
    (MOBILE.format("screen_summary", "1-0-0"), {"foreground_sec": 12.5, "background_sec": 0.0, "last_item_index": 7,
                                                 "items_count": 40, "max_y_offset": 1200, "content_height": 3400},
     {"foreground_sec": "12.5"}),
    (MOBILE.format("deep_link_received", "1-0-0"), DEEP_LINK, {"referrer": DEEP_LINK["referrer"]}),
    (MOBILE.format("deep_link", "1-0-0"), DEEP_LINK, {"url": "not a link"}),
    (SP.format("application_error", "1-0-0"), CRASH, {**CRASH, "message": None}),
    (SP.format("application_error", "1-0-1"), JS_ERROR, {**JS_ERROR, "lineColumn": "7"}),
    (SP.format("gdpr", "1-0-0"), {"basisForProcessing": "consent", "documentId": "privacy-policy",
                                  "documentVersion": "1.2", "documentDescription": None},
     {"basisForProcessing": "legitimateInterests"}),
)


def test_tracker_default_schemas_accept_what_the_trackers_send():
    resolver = Resolver()
    for key, good, bad in TRACKER_DEFAULTS:
        assert resolver.validate(key, good) == [], key
        assert resolver.validate(key, bad) != [], key


def test_shop_schemas_follow_the_contract():
    resolver = Resolver()
    shop = "iglu:com.clickshop/{}/jsonschema/1-0-0"
    assert resolver.validate(shop.format("product_view"), {"sku": "A", "category": "c", "price": 0, "currency": "EUR"}) == []
    assert resolver.validate(shop.format("product_view"), {"sku": "A", "category": "c", "price": -1}) != []
    assert resolver.validate(shop.format("product_view"), {"sku": "A", "category": "c", "price": 1, "currency": "euro"}) != []
    assert resolver.validate(shop.format("add_to_cart"), {"sku": "A", "category": "c", "price": 1, "quantity": 0}) != []
    assert resolver.validate(shop.format("remove_from_cart"), {"sku": "A", "price": 1, "quantity": 1}) == []
    assert resolver.validate(shop.format("checkout_step"), {"step": 4, "name": "review"}) == []
    assert resolver.validate(shop.format("checkout_step"), {"step": 5}) != []
    assert resolver.validate(shop.format("purchase"), {"order_id": "o", "total": 10.5, "items": 1}) == []
    assert resolver.validate(shop.format("purchase"), {"order_id": "o", "total": 10.5, "items": 1.5}) != []
    assert resolver.validate(shop.format("page_type"), {"type": "checkout"}) == []
    assert resolver.validate(shop.format("page_type"), {"type": "blog"}) != []
    assert resolver.validate(shop.format("page_type"), {"type": "home", "extra": 1}) != []


def test_lint_names_each_problem(tmp_path):
    key = SchemaKey.parse(SIGNUP + "1-0-0")
    assert lint({"type": "object"}, key) == [
        "$schema must be http://iglucentral.com/schemas/com.snowplowanalytics.self-desc/schema/jsonschema/1-0-0#",
        "self must hold vendor, name, format and version strings", "no description",
        "object schema without additionalProperties: unknown fields would pass silently"]
    write_schema(tmp_path, SIGNUP + "1-0-1", {"type": "strnig", "additionalProperties": False})
    problems = lint(orjson.loads((tmp_path / "schemas/com.acme/signup/jsonschema/1-0-1").read_bytes()), key)
    assert problems[0] == "self says iglu:com.acme/signup/jsonschema/1-0-1 but the file is at iglu:com.acme/signup/jsonschema/1-0-0"
    assert problems[1].startswith("schema does not compile")


def test_lint_catches_an_unknown_format_and_a_file_the_registry_would_never_serve(tmp_path):
    write_schema(tmp_path, SIGNUP + "1-0-0", {"type": "object", "additionalProperties": False,
                                              "properties": {"email": {"type": "string", "format": "emial"},
                                                             "format": {"type": "string", "format": "email"}}})
    problems = lint(orjson.loads((tmp_path / "schemas/com.acme/signup/jsonschema/1-0-0").read_bytes()))
    assert problems == ["unknown format 'emial': it would validate anything"]
    (tmp_path / "schemas/com.acme/signup/jsonschema/1-0-0").rename(tmp_path / "schemas/com.acme/signup/jsonschema/1-0-0.json")
    result = CliRunner().invoke(cli, ["lint", str(tmp_path)])
    assert result.exit_code == 1 and "1-0-0.json: not at schemas/<vendor>" in result.output
    empty = CliRunner().invoke(cli, ["lint", str(tmp_path / "schemas")])       # the schemas/ folder itself
    assert empty.exit_code == 1 and "no schema files under" in empty.output


def test_lint_notes_a_new_major_version_of_a_schema_the_feature_fold_reads(tmp_path):
    body = {"type": "object", "additionalProperties": True, "properties": {}}
    write_schema(tmp_path, "iglu:com.clickshop/add_to_cart/jsonschema/2-0-0", body)
    write_schema(tmp_path, "iglu:com.clickshop/add_to_cart/jsonschema/1-1-0", body)
    result = CliRunner().invoke(cli, ["lint", str(tmp_path)])
    assert result.exit_code == 0, result.output                  # a note, not a problem of the schema
    notes = [line for line in result.output.splitlines() if "note:" in line]
    assert len(notes) == 1 and "2-0-0: note: the feature fold reads the fields of version 1-*-*" in notes[0]


def test_schemas_are_draft_04_as_in_iglu_and_lint_names_later_draft_keywords(tmp_path):
    bounds = {"type": "object", "additionalProperties": False, "description": "bounds",
              "properties": {"price": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                             "qty": {"type": "integer", "maximum": 10, "exclusiveMaximum": True},
                             "const": {"enum": [{"const": 1}]}}}           # names and data, not keywords
    write_schema(tmp_path, SIGNUP + "1-0-0", bounds)
    resolver = Resolver([FolderRegistry(tmp_path)])
    key = "iglu:com.acme/signup/jsonschema/1-0-0"
    assert resolver.validate(key, {"price": 0.5, "qty": 9}) == []
    assert resolver.validate(key, {"price": 0}) and resolver.validate(key, {"qty": 10})
    assert lint(orjson.loads((tmp_path / "schemas/com.acme/signup/jsonschema/1-0-0").read_bytes())) == []
    later = {"type": "object", "additionalProperties": False, "description": "draft-07 words",
             "properties": {"kind": {"const": "a"}, "n": {"type": "number", "exclusiveMinimum": 3}}}
    write_schema(tmp_path, SIGNUP + "1-0-1", later)
    assert lint(orjson.loads((tmp_path / "schemas/com.acme/signup/jsonschema/1-0-1").read_bytes())) == [
        "'const' is not draft-04 (Iglu's draft): it would be ignored",
        "exclusiveMinimum must be true or false in draft-04, with minimum the bound"]


def test_cli_lists_lints_and_validates(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(cli, ["schemas", "--registries", "embedded"])
    assert listed.exit_code == 0 and "iglu:com.clickshop/purchase/jsonschema/1-0-0\tembedded" in listed.output
    assert runner.invoke(cli, ["lint"]).exit_code == 0
    write_schema(tmp_path, SIGNUP + "1-0-0", {"type": "object"})
    broken = runner.invoke(cli, ["lint", str(tmp_path)])
    assert broken.exit_code == 1 and "additionalProperties" in broken.output
    key = "iglu:com.clickshop/checkout_step/jsonschema/1-0-0"
    assert runner.invoke(cli, ["validate", key, '{"step": 2}', "--registries", "embedded"]).output == "valid\n"
    invalid = runner.invoke(cli, ["validate", key, '{"step": 9}', "--registries", "embedded"])
    assert invalid.exit_code == 1 and "invalid: data.step must be smaller than or equal to 4" in invalid.output
    (tmp_path / "empty").mkdir()
    missing = runner.invoke(cli, ["validate", SIGNUP + "1-0-0", "{}", "--registries", f"embedded,{tmp_path}/empty"])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_cli_names_a_mistyped_registry_or_an_unreadable_data_file_in_one_line(tmp_path):
    runner = CliRunner()
    mistyped = runner.invoke(cli, ["schemas", "--registries", "embeded"])
    assert mistyped.exit_code == 2 and "--registries: 'embeded' is neither" in mistyped.output
    missing = runner.invoke(cli, ["validate", "iglu:com.clickshop/checkout_step/jsonschema/1-0-0", f"@{tmp_path}/none"])
    assert missing.exit_code == 1 and f"cannot read {tmp_path}/none" in missing.output
    assert not isinstance(mistyped.exception, ConfigError) and not isinstance(missing.exception, OSError)
