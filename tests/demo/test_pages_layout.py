"""The live view and the demo shop read well: on a phone (390 px), in colours that reach WCAG AA, and
with readable labels and figures.

The first tests read the served CSS, HTML and JS themselves (no browser: they run in `make test-fast`);
the `browser` ones load the pages in headless Chromium at 390 px and check where things are drawn.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from html.parser import HTMLParser

import pytest

from tests.conftest import ROOT, wait_for
from tests.demo import test_liveview, test_shop
from tests.demo.test_liveview import prediction, publish_model, put, put_offer, state

# Fixtures of the neighbouring modules: a live view on a free port over moto, the shop, chromedriver.
collector_metrics, view_settings, view = test_liveview.collector_metrics, test_liveview.view_settings, test_liveview.view
browser, servers = test_shop.browser, test_shop.servers

LIVEVIEW = ROOT / "demo" / "liveview_static"
SHOP = ROOT / "demo" / "shop"
AA = 4.5                      # WCAG 2 AA, normal-size text
PHONE = 390


# ------------------------------------------------------------------------------------ CSS, read as text


def luminance(colour: str) -> float:
    """WCAG relative luminance of #rgb or #rrggbb."""
    hex_digits = colour.strip().lstrip("#")
    if len(hex_digits) == 3:
        hex_digits = "".join(c * 2 for c in hex_digits)
    assert re.fullmatch(r"[0-9a-fA-F]{6}", hex_digits), colour

    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_digits[i:i + 2], 16) for i in (0, 2, 4))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(foreground: str, background: str) -> float:
    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_contrast_ratio_is_the_wcag_one():
    assert contrast("#000", "#fff") == pytest.approx(21)
    assert contrast("#1a8f4c", "#fff") == pytest.approx(4.14, abs=0.01)
    assert contrast("#fff", "#aaa") == pytest.approx(2.32, abs=0.01)


class Stylesheet:
    """The rules of a plain stylesheet (rules, and rules inside @media), custom properties resolved."""

    def __init__(self, text: str):
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
        self.rules: list[tuple[list[str], dict[str, str], bool]] = []     # selectors, declarations, in @media
        open_blocks: list[tuple[str, int]] = []
        head_start = 0
        for brace in re.finditer(r"[{}]", text):
            if brace.group() == "{":
                open_blocks.append((text[head_start:brace.start()].strip(), brace.end()))
            else:
                head, body_start = open_blocks.pop()
                if not head.startswith("@"):
                    body = text[body_start:brace.start()]
                    declarations = {name.strip(): value.strip() for name, _, value in
                                    (d.partition(":") for d in body.split(";") if ":" in d)}
                    self.rules.append(([s.strip() for s in head.split(",")], declarations, bool(open_blocks)))
            head_start = brace.end()
        self.variables = {k: v for sels, decls, _ in self.rules if ":root" in sels for k, v in decls.items()
                          if k.startswith("--")}

    def value(self, selector: str, prop: str) -> str:
        """The last value of ``prop`` in a rule (outside @media) that names ``selector``."""
        found = [decls[prop] for sels, decls, media in self.rules if selector in sels and prop in decls and not media]
        assert found, f"no {prop} for {selector}"
        return self.resolve(found[-1])

    def resolve(self, value: str) -> str:
        value = value.split()[0] if value.startswith("#") else value
        match = re.fullmatch(r"var\((--[\w-]+)\)", value)
        return self.resolve(self.variables[match.group(1)]) if match else value

    def declarations(self, selector: str, media: bool | None = None) -> dict[str, str]:
        merged: dict[str, str] = {}
        for sels, decls, in_media in self.rules:
            if selector in sels and (media is None or media == in_media):
                merged.update(decls)
        return merged


def liveview_css() -> Stylesheet:
    return Stylesheet((LIVEVIEW / "style.css").read_text(encoding="utf-8"))


def shop_css() -> Stylesheet:
    return Stylesheet((SHOP / "shop.css").read_text(encoding="utf-8"))


def test_live_view_text_colours_reach_aa_on_cards_and_page():
    css = liveview_css()
    card, page = css.value(".card", "background"), css.value("body", "background")
    # Text in the cards (decisions, component states, table heads, labels) and on the page (status line).
    for selector in (".buy", ".defer", ".up", ".down", ".off", ".muted", "th", "dt", "h3", ".tile .name", "body"):
        colour = css.value(selector, "color")
        for background in (card, page):
            assert contrast(colour, background) >= AA, f"{selector} {colour} on {background}"


def test_shop_text_colours_reach_aa_on_their_backgrounds():
    css = shop_css()
    page, card = css.value("body", "background"), css.value(".product", "background")
    prediction_box = css.value(".prediction", "background")
    pairs = {
        "price on a product card": (css.value(".price", "color"), card),
        "price on a product page": (css.value(".price", "color"), page),
        "checkout steps": (css.value(".steps", "color"), page),
        "Remove button": (css.value("button", "color"), css.value("button.secondary", "background")),
        "buttons": (css.value("button", "color"), css.value("button", "background")),
        "prediction buy": (css.value(".prediction .buy", "color"), prediction_box),
        "prediction defer": (css.value(".prediction .defer", "color"), prediction_box),
        "header links": (css.value("header a", "color"), css.value("header", "background")),
        "footer": (css.value("footer", "color"), page),
    }
    for what, (colour, background) in pairs.items():
        assert contrast(colour, background) >= AA, f"{what}: {colour} on {background} = {contrast(colour, background):.2f}"


class Tables(HTMLParser):
    """For each <table id=...>: the classes of its ancestors, and of its <th> cells."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr"})

    def __init__(self):
        super().__init__()
        self.stack: list[set[str]] = []
        self.tables: dict[str, list[set[str]]] = {}
        self.head_cells: dict[str, list[set[str]]] = {}
        self.current = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "table":
            self.current = attrs.get("id")
            self.tables[self.current] = list(self.stack)
            self.head_cells[self.current] = []
        if tag == "th" and self.current:
            self.head_cells[self.current].append(classes)
        if tag not in self.VOID:
            self.stack.append(classes)

    def handle_endtag(self, tag):
        if tag == "table":
            self.current = None
        self.stack.pop()


def test_every_live_view_table_scrolls_sideways_inside_its_card():
    tables = Tables()
    tables.feed((LIVEVIEW / "index.html").read_text(encoding="utf-8"))
    assert set(tables.tables) == {"lag", "components", "sessions", "decisions", "offers"}
    for table_id, ancestors in tables.tables.items():
        assert "table-scroll" in ancestors[-1], f"#{table_id} is not in a .table-scroll wrapper"
    wrapper = liveview_css().declarations(".table-scroll")
    assert wrapper.get("overflow-x") in {"auto", "scroll"}
    # On phones the sparkline column goes, so p_buy, decision, events and offer fit at once.
    assert "spark-col" in tables.head_cells["sessions"][1]
    assert re.search(r"@media \(max-width: 600px\)[^@]*\.spark-col \{ display: none; \}",
                     (LIVEVIEW / "style.css").read_text(encoding="utf-8"))
    assert 'sparkCell(s.points, s.threshold)' in (LIVEVIEW / "app.js").read_text(encoding="utf-8")


def test_shop_header_wraps_and_keeps_the_cart_link():
    css = shop_css()
    assert css.declarations("header", media=False).get("flex-wrap") == "wrap"
    assert css.declarations("nav", media=False).get("flex-wrap") == "wrap"
    assert 'id="go-cart"' in (SHOP / "index.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ app.js under Node


def app_js(expression: str):
    """Evaluate ``expression`` (with ``app`` = app.js's exports) under Node and return its JSON."""
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    script = f"const app = require({json.dumps(str(LIVEVIEW / 'app.js'))}); " \
             f"process.stdout.write(JSON.stringify({expression}));"
    done = subprocess.run([node, "-e", script], check=False, capture_output=True, encoding="utf-8", timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_model_card_shows_counts_as_integers_and_metrics_by_name():
    model = {"name": "buy-propensity", "version": "v1", "roc_auc": 0.92939, "pr_auc": 0.7368, "threshold": 0.3754,
             "algorithm": "gbt", "created_at": "2026-12-05T03:46:11Z",
             "metrics": {"rows": 3079.0, "positives": 477, "base_rate": 0.15492, "roc_auc": 0.92939,
                         "pr_auc": 0.7368, "log_loss": 0.23596, "brier": 0.07056, "lift_top_decile": 5.00886,
                         "calibration": [{"low": 0.0}], "new_figure": 0.5}}
    items = dict(app_js(f"app.modelItems({json.dumps(model)})"))
    assert items["rows"] == "3079" and items["positives"] == "477"
    assert items["ROC AUC"] == "0.9294" and items["PR AUC"] == "0.7368" and items["threshold"] == "0.3754"
    assert items["base rate"] == "0.1549" and items["log loss"] == "0.2360"
    assert items["lift in top 10 %"] == "5.0089" and items["Brier score"] == "0.0706"
    assert items["new figure"] == "0.5000"                  # an unknown key: underscores read as spaces
    assert not {"base_rate", "log_loss", "lift_top_decile", "brier", "roc_auc", "pr_auc", "calibration"} & set(items)


def test_a_component_not_configured_is_neutral_not_down():
    statuses = app_js("""[
        app.componentStatus({url: null, up: false, error: "not configured"}),
        app.componentStatus({url: "http://127.0.0.1:1/metrics", up: false, error: "[Errno 111] Connection refused"}),
        app.componentStatus({url: "http://127.0.0.1:1/metrics", up: true, error: null}),
    ]""")
    assert statuses == [["not configured", "off"], ["down ([Errno 111] Connection refused)", "down"], ["up", "up"]]
    css = liveview_css()
    assert css.value(".off", "color") == css.value(".muted", "color") != css.value(".down", "color")


# ------------------------------------------------------------------------------------ in Chromium at 390 px

# Every element drawing text whose colour on its (first opaque) background is below AA;
# large text (24 px, or 18.66 px bold) needs 3:1.
LOW_CONTRAST_JS = """
function rgb(text) { const m = text.match(/[\\d.]+/g).map(Number); return {r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1}; }
function lum(c) { const f = (v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
                  return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); }
function background(node) {
  for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.a > 0) return c;
  }
  return {r: 255, g: 255, b: 255, a: 1};
}
const low = [];
for (const node of document.querySelectorAll("body *")) {
  if (![...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim())) continue;
  const rect = node.getBoundingClientRect(), style = getComputedStyle(node);
  if (!rect.width || !rect.height || style.visibility !== "visible") continue;
  const fg = rgb(style.color), bg = background(node);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
  const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  if (ratio < needed) low.push(`${node.tagName.toLowerCase()}.${node.className} "${node.textContent.trim().slice(0, 30)}" ${style.color} on rgb(${bg.r}, ${bg.g}, ${bg.b}): ${ratio.toFixed(2)}`);
}
return low;
"""

# Each <th> of each table: can a reader bring it into its card, scrolling only what scrolls (overflow-x
# auto or scroll)? An overflow: hidden card clips for good. Returns the cells that stay out of reach.
UNREACHABLE_JS = """
const out = [];
for (const table of document.querySelectorAll("table")) {
  const card = table.closest(".card");
  for (const th of table.querySelectorAll("th")) {
    if (!th.getClientRects().length) continue;                        // a column hidden on purpose
    for (let n = th.parentElement; n && n !== card; n = n.parentElement) {
      const overflow = getComputedStyle(n).overflowX;
      if (overflow !== "auto" && overflow !== "scroll") continue;
      const cell = th.getBoundingClientRect(), box = n.getBoundingClientRect();
      if (cell.right > box.right) n.scrollLeft += cell.right - box.right;
      if (th.getBoundingClientRect().left < box.left) n.scrollLeft -= box.left - th.getBoundingClientRect().left;
    }
    const cell = th.getBoundingClientRect(), box = card.getBoundingClientRect();
    if (cell.left < box.left - 1 || cell.right > box.right + 1 || cell.right > innerWidth + 1)
      out.push(`#${table.id} ${th.textContent}`);
  }
}
return out;
"""


# Header links drawn (partly) outside the window, which has no horizontal scroll to reach them.
HEADER_OUT_OF_VIEW_JS = """return [...document.querySelectorAll('header a')].filter((a) => {
  const r = a.getBoundingClientRect(); return !r.width || r.left < 0 || r.right > innerWidth; }).map((a) => a.textContent)"""


def phone(driver: test_shop.WebDriver) -> None:
    driver.call("POST", f"/session/{driver.session}/window/rect", {"width": PHONE, "height": 1400})
    assert driver.js("return innerWidth") <= PHONE


def live_data(view, settings) -> list[str]:
    """Sessions with long ids (as the tracker's uuids), both decisions, an offer and a model with metrics."""
    sessions = [str(uuid.uuid4()) for _ in range(3)]
    put(settings, settings.predictions_stream,
        [prediction(s, p, latency_us=812, events=27) for s, p in zip(sessions, (0.1, 0.3, 0.9), strict=True)])
    put_offer(settings, sessions[1], 0.3, "2026-11-29T10:00:01.000Z")
    publish_model(settings, metrics={"roc_auc": 0.8765, "pr_auc": 0.51, "rows": 3079.0, "positives": 477,
                                     "base_rate": 0.1549, "log_loss": 0.2359, "brier": 0.0706,
                                     "lift_top_decile": 5.0089})
    wait_for(lambda: (s := state(view)) and s["model"]["version"] == test_liveview.VERSION
             and len(s["sessions"]) == 3 and s["offers"], what="the view to show the test data")
    return sessions


@pytest.mark.browser
def test_live_view_on_a_phone_reaches_every_column_and_reads_well(browser, view, view_settings):
    sessions = live_data(view, view_settings)
    phone(browser)
    browser.go(view.url + "/")
    browser.wait("return document.querySelectorAll('#sessions td.session-id').length === 3 && "
                 "document.querySelectorAll('#offers td.offer-session').length === 1")

    assert browser.js(UNREACHABLE_JS) == []
    assert browser.js("return document.documentElement.scrollWidth") <= PHONE      # the page never scrolls sideways
    # Under 600 px the live sessions' figures are all in view at once, without scrolling.
    assert browser.js("""const card = document.querySelector('#sessions').closest('.card').getBoundingClientRect();
        return [...document.querySelectorAll('#sessions th')].filter((th) => th.getClientRects().length)
          .every((th) => th.getBoundingClientRect().right <= card.right)""")
    titles = browser.js("return [...document.querySelectorAll('#sessions td.session-id')].map((td) => td.title)")
    assert sorted(titles) == sorted(sessions)                       # cut short on screen, whole on hover

    assert browser.js(LOW_CONTRAST_JS) == []
    model = dict(browser.js("return [...document.querySelectorAll('#model dt')].map((dt) => "
                            "[dt.textContent, dt.nextElementSibling.textContent])"))
    assert model["rows"] == "3079" and model["positives"] == "477" and model["lift in top 10 %"] == "5.0089"
    enrich, grey, scorer_red, label_grey = browser.js("""
        const cell = (name) => [...document.querySelectorAll('#components tr')]
          .find((tr) => tr.cells[0].textContent === name).cells[1];
        return [cell('enrich').textContent, getComputedStyle(cell('enrich')).color,
                getComputedStyle(cell('scorer')).color, getComputedStyle(document.querySelector('dt')).color]""")
    assert enrich == "not configured" and grey == label_grey != scorer_red


@pytest.mark.browser
def test_live_view_sparklines_have_an_accessible_name(browser, view, view_settings):
    live_data(view, view_settings)
    browser.go(view.url + "/")
    browser.wait("return document.querySelectorAll('#sessions svg.spark').length === 3")
    first = browser.call("POST", f"/session/{browser.session}/element",
                         {"using": "css selector", "value": "#sessions svg.spark"})[test_shop.ELEMENT]
    label = browser.call("GET", f"/session/{browser.session}/element/{first}/computedlabel")
    assert label.startswith("p_buy over the session's events")
    assert browser.js("return document.querySelector('#sessions svg.spark').getAttribute('role')") == "img"
    assert browser.js("return [...document.querySelectorAll('#sessions svg.spark')]"
                      ".every((svg) => svg.querySelector('title') && svg.querySelector('title').textContent)")


@pytest.mark.browser
def test_shop_on_a_phone_keeps_categories_and_cart_in_view_and_reads_well(browser, servers):
    collector, shop = servers
    phone(browser)
    browser.go(f"{shop.url}/shop/?collector=http://127.0.0.1:{collector.server_address[1]}")
    browser.wait("return document.title.startsWith('Home') && document.querySelectorAll('#categories a').length")
    assert browser.js(HEADER_OUT_OF_VIEW_JS) == []
    assert browser.js("return document.documentElement.scrollWidth") <= PHONE
    assert browser.js(LOW_CONTRAST_JS) == []                            # prices on the cards

    test_shop.put_a_shoe_in_the_cart(browser)
    assert browser.js(HEADER_OUT_OF_VIEW_JS) == []                      # "Cart (1)" too
    browser.click("#go-cart")
    browser.wait_view("#/cart")
    assert browser.js("""return [...document.querySelectorAll('#view button')].filter((b) => {
        const r = b.getBoundingClientRect(); return r.left < 0 || r.right > innerWidth; }).length""") == 0
    for decision in ("buy", "defer"):                                 # the panel as a prediction paints it
        browser.js(f"const d = document.getElementById('p-decision'); d.textContent = '{decision}'; d.className = '{decision}';")
        assert browser.js(LOW_CONTRAST_JS) == []                        # steps, Remove button, prediction


# ------------------------------------------------------------------------------------ for screen and keyboard readers


class Noscript(HTMLParser):
    """The text inside <noscript>."""

    def __init__(self, page: str):
        super().__init__()
        self.inside, self.text = False, ""
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.inside = self.inside or tag == "noscript"

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "noscript"

    def handle_data(self, data):
        self.text += data if self.inside else ""


def test_both_pages_say_they_need_javascript_without_it():
    for page in (LIVEVIEW / "index.html", SHOP / "index.html"):
        assert "needs JavaScript" in Noscript(page.read_text(encoding="utf-8")).text, page


def test_the_sparkline_threshold_line_stands_out_from_its_card():
    css = liveview_css()
    assert contrast(css.value("svg.spark line", "stroke"), css.value(".card", "background")) >= 3    # WCAG 1.4.11


@pytest.mark.browser
def test_live_view_pauses_its_redraw_from_the_keyboard_and_resumes(browser, view, view_settings):
    """WCAG 2.2.2: the tables were rebuilt every second, with no way to stop them."""
    live_data(view, view_settings)
    browser.go(view.url + "/")
    browser.wait("return document.querySelectorAll('#sessions td.session-id').length === 3")
    assert browser.js("return document.getElementById('pause').tagName") == "BUTTON"
    browser.press_enter("#pause")
    assert browser.text("#pause") == "Resume updates" and browser.text("#status").startswith("paused")
    browser.js("document.querySelector('#sessions tbody tr').dataset.drawn = 'before the pause'")
    later = str(uuid.uuid4())
    put(view_settings, view_settings.predictions_stream, [prediction(later, 0.5)])
    wait_for(lambda: len(state(view)["sessions"]) == 4, what="the new session in /api/state")
    time.sleep(2.5)                                                  # two polls' worth: nothing redrawn
    assert browser.js("return document.querySelectorAll('#sessions td.session-id').length") == 3
    assert browser.js("return document.querySelector('#sessions tbody tr').dataset.drawn") == "before the pause"
    browser.click("#pause")
    browser.wait("return document.querySelectorAll('#sessions td.session-id').length === 4")   # at once, not next poll
    assert browser.text("#pause") == "Pause updates"


@pytest.mark.browser
def test_live_view_announces_failures_and_recoveries_once_but_not_the_clock(browser, view, view_settings):
    browser.go(view.url + "/")
    browser.wait("return document.getElementById('status').textContent.startsWith('updated')")
    assert not browser.live("#status")                              # every second: not read out
    browser.count_changes("connection", "problems")
    browser.js("window.realFetch = window.fetch; window.fetch = () => Promise.reject(new Error('no network'))")
    browser.wait("return document.getElementById('connection').textContent === "
                 "'cannot reach the live view server: no network'")
    assert browser.live("#connection")
    time.sleep(2.5)                                                  # more failed polls, said once
    assert browser.js("return window.changes.connection") == 1
    browser.js("window.fetch = window.realFetch")
    browser.wait("return document.getElementById('connection').textContent === 'connected again'")

    # A source the view cannot read (as /api/state reports it), then read again.
    browser.js("""window.fetch = (...args) => window.realFetch(...args).then((r) => r.json()).then((s) => {
        s.errors = {offers: 'ResourceNotFoundException: no table'}; return new Response(JSON.stringify(s)); })""")
    browser.wait("return !document.getElementById('errors-box').hidden")
    assert browser.live("#errors")
    assert browser.text("#errors") == "offers: ResourceNotFoundException: no table"
    before = browser.js("return window.changes.problems")
    time.sleep(2.5)
    assert browser.js("return window.changes.problems") == before               # the same problem, not repeated
    browser.js("window.fetch = window.realFetch")
    browser.wait("return document.getElementById('errors').textContent.endsWith('every source is read again')")


@pytest.mark.browser
def test_live_view_tables_regions_and_explanations_reach_a_screen_reader(browser, view, view_settings):
    sessions = live_data(view, view_settings)
    browser.go(view.url + "/")
    browser.wait("return document.querySelectorAll('#sessions td.session-id').length === 3 && "
                 "document.querySelectorAll('#components tbody tr').length > 1")
    for table in ("lag", "components"):
        heads = browser.js(f"return [...document.querySelectorAll('#{table} thead th')].map((th) => th.scope)")
        assert heads == ["col", "col"], table
        assert browser.js(f"""return [...document.querySelectorAll('#{table} tbody tr')]
            .every((tr) => tr.cells[0].tagName === 'TH' && tr.cells[0].scope === 'row')"""), table
    assert browser.js("return [...document.querySelectorAll('thead th')].every((th) => th.scope === 'col')")
    # Scrolling boxes: reachable by keyboard, and named when reached.
    regions = browser.js("""return [...document.querySelectorAll('.table-scroll')]
        .map((box) => [box.tabIndex, box.getAttribute('role'), box.getAttribute('aria-label')])""")
    assert len(regions) == 5 and all(tab == 0 and role == "region" and label for tab, role, label in regions)
    assert browser.js("return document.querySelectorAll('main').length === 1 && "
                      "[...document.querySelectorAll('.card')].every((card) => card.closest('main'))")
    # What was only in tooltips is on the page.
    assert browser.js("return [...document.querySelectorAll('.tile')].map((t) => t.innerText.split('\\n').pop())"
                      )[:2] == ["collector /metrics", "raw stream"]
    assert "micro-batch being scored" in browser.text("#time-in-scorer")
    # An id drawn short is read whole.
    cells = browser.call("POST", f"/session/{browser.session}/elements",
                         {"using": "css selector", "value": "#sessions td.session-id"})
    labels = [browser.call("GET", f"/session/{browser.session}/element/{c[test_shop.ELEMENT]}/computedlabel")
              for c in cells]
    assert sorted(labels) == sorted(sessions)
