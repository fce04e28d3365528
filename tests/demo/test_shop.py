"""The demo shop in headless Chromium: click through to a purchase, see the tracker's hits arrive.

Chromium is driven through chromedriver's W3C WebDriver API (plain HTTP and JSON, no client library);
the hits go to a capture server that answers CORS as the collector does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from demo.liveview import safe_file
from demo.web import ShopServer, WebSettings, catalogue_json
from localstack.emulator import free_port
from tests.conftest import CHROMIUM, CHROMIUM_FLAGS, ROOT, wait_for
from tests.demo import test_liveview
from tests.demo.test_traffic import Capture, CaptureServer, contexts_of, shop_event, validate_payload

# The live view's fixtures (a view on a free port, reading a test-unique predictions stream).
collector_metrics, view_settings, view = test_liveview.collector_metrics, test_liveview.view_settings, test_liveview.view

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class CorsCapture(Capture):
    """Answers the browser's CORS preflight and credentialed POSTs, like the collector."""

    def end_headers(self) -> None:
        origin = self.headers.get("Origin")
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.send_header("Access-Control-Allow-Headers", "Content-Type, SP-Anonymous")
            self.send_header("Access-Control-Allow-Methods", "POST, GET, OPTIONS")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WebDriver:
    """The few W3C WebDriver calls the test needs."""

    def __init__(self, base: str):
        self.base = base
        self.session = ""

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read().decode()[:500]}") from None

    def start(self, user_data: str) -> None:
        options = {"binary": CHROMIUM, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={user_data}"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self.call("POST", "/session", {"capabilities": capabilities})["sessionId"]
        self.call("POST", f"/session/{self.session}/timeouts", {"implicit": 10_000, "script": 10_000})

    def go(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def find(self, css: str) -> str:
        return self.call("POST", f"/session/{self.session}/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self.call("POST", f"/session/{self.session}/element/{self.find(css)}/click", {})

    def text(self, css: str) -> str:
        return self.call("GET", f"/session/{self.session}/element/{self.find(css)}/text")

    def js(self, script: str):
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def wait(self, script: str, timeout: float = 15) -> None:
        """Until ``script`` returns true. One that throws (an element not there yet: once in CI, the shop's
        page was not yet the document when the first check ran) is tried again until the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.js(script):
                    return
                failure = f"timed out waiting for: {script}"
            except AssertionError as exc:
                failure = f"{exc} (at {self.js('return location.href')})"
            assert time.monotonic() < deadline, failure
            time.sleep(0.1)

    def wait_view(self, hash_prefix: str) -> None:
        """Until the shop has rendered the view of a hash starting so: the hash changes before the
        view does, and a click in between would hit the old view's button."""
        self.wait(f"return (document.body.dataset.view || '').startsWith({json.dumps(hash_prefix)})")

    def press_enter(self, css: str) -> None:
        """The Enter key on an element, as a keyboard user presses it (focus, then the key)."""
        self.call("POST", f"/session/{self.session}/element/{self.find(css)}/value", {"text": "\ue007"})

    def live(self, css: str) -> bool:
        """Whether a screen reader announces changes of the element's text (it is in a live region)."""
        return self.js(f"""return !!document.querySelector({json.dumps(css)}).closest(
            '[aria-live]:not([aria-live="off"]), [role="status"], [role="alert"], [role="log"]')""")

    def count_changes(self, *ids: str) -> None:
        """From now on, count the changes of text under each element (in ``window.changes[id]``)."""
        self.js(f"""window.changes = {{}};
            for (const id of {json.dumps(list(ids))}) {{
              window.changes[id] = 0;
              new MutationObserver((records) => {{ window.changes[id] += records.length; }})
                .observe(document.getElementById(id), {{childList: true, characterData: true, subtree: true}});
            }}""")

    def focused(self) -> list:
        """The focused element's tag, tabindex and text."""
        return self.js("const e = document.activeElement; return [e.tagName, e.getAttribute('tabindex'), e.textContent]")

    def quit(self) -> None:
        if self.session:
            self.call("DELETE", f"/session/{self.session}")


@pytest.fixture
def browser(tmp_path) -> Iterator[WebDriver]:
    port = free_port()
    with open(tmp_path / "chromedriver.log", "wb") as log:
        process = subprocess.Popen([shutil.which("chromedriver"), f"--port={port}"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    driver = WebDriver(f"http://127.0.0.1:{port}")
    user_data = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if driver.call("GET", "/status").get("ready"):
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "chromedriver.log").read_text(encoding="utf-8")
            time.sleep(0.2)
        driver.start(user_data)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)


@pytest.fixture
def servers():
    collector = CaptureServer(handler=CorsCapture)
    shop = ShopServer(WebSettings(web_port=0))
    for server in (collector, shop):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield collector, shop
    for server in (collector, shop):
        server.shutdown()
        server.server_close()


def hits_until_purchase(collector: CaptureServer, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        with collector.lock:
            events = collector.events()
        if any((found := shop_event(e)) and found[0] == "purchase" for e in events):
            return events
        assert time.monotonic() < deadline, f"no purchase among {len(events)} hits"
        time.sleep(0.2)


def put_a_shoe_in_the_cart(browser: WebDriver) -> None:
    """From the shop's home page (already loaded) to one shoe in the cart, waiting for each page."""
    browser.wait("return document.title.startsWith('Home')")
    browser.click('[data-nav="shoes"]')
    browser.wait("return document.title.startsWith('Shoes')")
    browser.click(".product a")
    browser.wait_view("#/p/")
    browser.click("#add-to-cart")
    browser.wait("return document.getElementById('cart-count').textContent === '1'")


@pytest.mark.browser
def test_clicking_through_the_shop_sends_the_funnel_with_the_official_tracker(browser, servers):
    collector, shop = servers
    collector_url = f"http://127.0.0.1:{collector.server_address[1]}"
    browser.go(f"{shop.url}/shop/?collector={collector_url}")
    put_a_shoe_in_the_cart(browser)
    browser.click("#go-cart")
    browser.wait_view("#/cart")
    browser.click("#checkout")
    for step in ("shipping", "payment"):
        browser.wait_view(f"#/checkout/{step}")
        browser.click("#next")
    browser.wait_view("#/checkout/review")
    browser.click("#place-order")
    browser.wait_view("#/confirmation")
    order = browser.text("#order-id").removeprefix("Order ")
    session_id = browser.text("#session-id")

    events = hits_until_purchase(collector)
    assert all(method == "POST" for method, *_ in collector.hits)
    for _, _, _, body in collector.hits:
        validate_payload(json.loads(body))
    assert {e["sid"] for e in events} == {session_id}
    assert all(e["tv"] == "js-4.10.1" and e["aid"] == "clickshop" and e["p"] == "web" for e in events)
    page_types = []
    for event in events:
        contexts = {c["schema"]: c["data"] for c in contexts_of(event)["data"]}
        assert "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0" in contexts
        if event["e"] == "pv":
            page_types.append(contexts["iglu:com.clickshop/page_type/jsonschema/1-0-0"]["type"])
    assert page_types == ["home", "category", "product", "cart", "checkout", "checkout", "checkout", "confirmation"]
    shop_events = [found for e in events if (found := shop_event(e))]
    names = [name for name, _ in shop_events]
    assert names == ["product_view", "add_to_cart", "checkout_step", "checkout_step", "checkout_step",
                     "checkout_step", "purchase"]
    assert [data["step"] for name, data in shop_events if name == "checkout_step"] == [1, 2, 3, 4]
    purchase = shop_events[-1][1]
    assert purchase["order_id"] == order and purchase["items"] == 1
    assert purchase["total"] == shop_events[1][1]["price"]


@pytest.mark.browser
def test_a_shop_on_another_origin_shows_its_prediction_from_the_live_view(browser, servers, view, view_settings):
    collector, shop = servers
    # demo.web and the live view listen on different ports, so the page's fetch is cross-origin.
    browser.go(f"{shop.url}/shop/?collector=http://127.0.0.1:{collector.server_address[1]}&liveview={view.url}")
    browser.wait("return document.title.startsWith('Home')")
    session_id = browser.text("#session-id")
    # The fixture's scorer does not answer: the page says so rather than "not scored yet" for ever.
    browser.wait("return document.getElementById('p-buy').textContent === "
                 "'not scored yet: the scorer is not answering'")
    test_liveview.put(view_settings, view_settings.predictions_stream, [test_liveview.prediction(session_id, 0.7)])
    wait_for(lambda: test_liveview.get(f"{view.url}/api/session/{session_id}")[0] == 200)
    browser.wait("return document.getElementById('p-buy').textContent.startsWith('p(buy) 0.700 after 3 events')")
    test_liveview.put_offer(view_settings, session_id, 0.7, "2026-11-29T10:00:01.000Z")
    code = f"SAVE10-{session_id[:8].upper()}"
    browser.wait(f"return document.getElementById('p-decision').textContent.endsWith(', offer {code} (10 % off)')")
    # Read out when it changes, and only then: every poll rewrote the same text, which a reader may repeat.
    assert browser.live("#p-buy") and browser.live("#p-decision")
    browser.count_changes("my-prediction")
    time.sleep(3.5)                                     # two polls
    assert browser.js("return window.changes['my-prediction']") == 0
    view.close()                                        # the live view goes away: the score shown stays
    time.sleep(2)
    assert browser.text("#p-buy").startswith("p(buy) 0.700")


def test_shop_server_serves_the_page_the_tracker_and_nothing_else(servers):
    _, shop = servers
    with urllib.request.urlopen(f"{shop.url}/shop/") as response:
        page = response.read().decode()
    src = "/node_modules/@snowplow/browser-tracker/dist/index.umd.min.js"
    assert src in page
    with urllib.request.urlopen(shop.url + src) as response:
        assert b"snowplowBrowserTracking" in response.read()
    for path in ("/shop/../../pyproject.toml", "/shop/%2e%2e/%2e%2e/pyproject.toml", "/nothing",
                 "/shop/" + "a" * 300, "/node_modules/@snowplow/" + "a" * 300, "/shop/%00"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(shop.url + path)
        assert error.value.code == 404, path
    assert safe_file(ROOT / "demo" / "shop", "../web.py") is None
    assert safe_file(ROOT / "demo" / "shop", "a" * 300) is None            # ENAMETOOLONG is "not there" too


def test_a_folder_whose_index_links_out_of_the_shop_is_not_served(tmp_path):
    """The index.html of a folder was added after the check that the path stays inside the shop."""
    (tmp_path / "shop" / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not for the web")
    (tmp_path / "shop" / "sub" / "index.html").symlink_to(tmp_path / "secret.txt")
    assert safe_file(tmp_path / "shop", "sub/index.html") is None
    assert safe_file(tmp_path / "shop", "sub/") is None and safe_file(tmp_path / "shop", "sub") is None


def test_an_idle_connection_to_the_shop_is_closed(servers):
    """Connections that sent nothing were kept for good, a thread each."""
    import socket
    from urllib.parse import urlsplit

    shop = servers[1]
    with socket.create_connection((urlsplit(shop.url).hostname, urlsplit(shop.url).port), timeout=30) as sock:
        sock.sendall(b"GET /shop/ HTTP/1.1\r\nHost: x\r\n")        # and never the end of the headers
        started = time.monotonic()
        assert sock.recv(100) == b"" and time.monotonic() - started < 20


def test_committed_catalogue_matches_the_generator():
    assert (ROOT / "demo" / "shop" / "catalogue.json").read_text(encoding="utf-8") == catalogue_json()


@pytest.mark.browser
def test_a_shop_whose_live_view_is_down_says_so(browser, servers):
    collector, shop = servers
    closed = f"http://127.0.0.1:{free_port()}"
    browser.go(f"{shop.url}/shop/?collector=http://127.0.0.1:{collector.server_address[1]}&liveview={closed}")
    browser.wait("return document.getElementById('p-buy').textContent === "
                 "'not scored yet: the live view is not answering'")
    browser.count_changes("my-prediction")
    time.sleep(3.5)                                     # two more failed polls: the reason is said once
    assert browser.js("return window.changes['my-prediction']") == 0


@pytest.mark.browser
def test_a_keyboard_and_screen_reader_user_can_shop(browser, servers):
    """Each view replaced <main> and left the focus on nothing; the cart table had no headers and its
    buttons all read "Remove"; Enter in a checkout field did nothing; the step shown was only bold."""
    collector, shop = servers
    browser.go(f"{shop.url}/shop/?collector=http://127.0.0.1:{collector.server_address[1]}")
    browser.wait("return document.title.startsWith('Home')")
    assert browser.focused()[0] == "BODY"                       # the first view leaves the focus where it is
    browser.press_enter('[data-nav="shoes"]')
    browser.wait_view("#/c/shoes")
    assert browser.focused() == ["H1", "-1", "Shoes"]
    browser.press_enter(".product a")
    browser.wait_view("#/p/")
    name = browser.text("#view h1")
    assert browser.focused() == ["H1", "-1", name]
    browser.press_enter("#add-to-cart")
    browser.wait("return document.getElementById('cart-count').textContent === '1'")
    assert browser.live("#cart-count") and browser.text("#go-cart") == "Cart (1)"
    browser.press_enter("#go-cart")
    browser.wait_view("#/cart")
    assert browser.focused() == ["H1", "-1", "Your cart"]
    assert browser.js("return [...document.querySelectorAll('#view thead th')].map((th) => th.scope)") == ["col", "col"]
    assert browser.js("const th = document.querySelector('#view tbody th'); return [th.scope, th.textContent]") == [
        "row", name]
    remove = browser.find("#view .remove")
    assert browser.call("GET", f"/session/{browser.session}/element/{remove}/computedlabel") == f"Remove {name}"
    assert current_step(browser) == ["OL", "cart"]

    browser.js("window.samePage = true")
    browser.click("#checkout")
    browser.wait_view("#/checkout/shipping")
    assert browser.js("return document.querySelector('#view form input').autocomplete") == "street-address"
    browser.press_enter("#view form input")
    browser.wait_view("#/checkout/payment")
    assert browser.focused() == ["H1", "-1", "Checkout"] and current_step(browser) == ["OL", "payment"]
    assert browser.js("return document.querySelector('#view form input').autocomplete") == "cc-number"
    browser.press_enter("#view form input")
    browser.wait_view("#/checkout/review")
    browser.press_enter("#place-order")
    browser.wait_view("#/confirmation")
    assert browser.text("#order-id").startswith("Order ORD-") and browser.text("#go-cart") == "Cart (0)"
    assert browser.js("return window.samePage")                 # Enter moved on in the page, never reloaded it

    browser.click(".brand")                                     # Remove: the focus goes to the emptied cart's heading
    put_a_shoe_in_the_cart(browser)
    browser.click("#go-cart")
    browser.wait_view("#/cart")
    browser.click("#view .remove")
    browser.wait("return document.getElementById('cart-count').textContent === '0'")
    assert browser.focused() == ["H1", "-1", "Your cart"]


def current_step(browser: WebDriver) -> list:
    """The list the checkout steps are in, and the step it marks as the current one."""
    return browser.js("const li = document.querySelector('#view .steps [aria-current=\"step\"]');"
                      "return [li.parentElement.tagName, li.textContent]")
