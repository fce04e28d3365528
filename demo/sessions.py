"""Shop sessions as the Snowplow JavaScript tracker would record them, seeded and reproducible.

A session walks the shop's funnel: landing page -> category -> product -> add to cart -> checkout
steps 1..4 -> purchase, stopping early at any step. Whether a session buys is drawn when it starts
(share ``buy_share``, nudged by device, channel and returning visits, as in any shop's analytics);
every difference a model can learn is visible in the events themselves: how deep the session went,
how many products it looked at, how long it stayed. Nothing hidden is planted for our features.

The output is plain tracker parameters (``payload_data`` items, all strings), with ``dtm`` set;
``stm`` is added by whoever sends them.
"""
from __future__ import annotations

import base64
import json
import math
import random
import uuid
from collections import deque
from dataclasses import dataclass, field

from demo import catalogue as cat
from demo.catalogue import SHOP, Device, Product

TRACKER_VERSION = "js-4.10.1"
APP_ID = "clickshop"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0"
UNSTRUCT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
WEB_PAGE = "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0"
PAGE_TYPE = "iglu:com.clickshop/page_type/jsonschema/1-0-0"
SHOP_EVENTS = {name: f"iglu:com.clickshop/{name}/jsonschema/1-0-0"
               for name in ("product_view", "add_to_cart", "remove_from_cart", "checkout_step", "purchase")}

# Where a non-buying session stops, and how often (the rest of the funnel has buyers only).
STOPS = ("landing", "category", "product", "cart", "checkout1", "checkout2", "checkout3", "checkout4")
STOP_WEIGHTS = (0.30, 0.18, 0.28, 0.10, 0.06, 0.04, 0.02, 0.02)
DEPTH = {name: rank for rank, name in enumerate((*STOPS, "purchase"))}
# Median seconds on a page by page type; dwell is log-normal around it.
DWELL = {"home": 12, "category": 20, "search": 18, "product": 35, "cart": 25, "checkout": 45,
         "confirmation": 20, "content": 30}
PING_FIRST_S, PING_EVERY_S = 5, 10          # the tracker's enableActivityTracking defaults in the shop
BOT_SHARE = 0.02
RETURNING_SHARE = 0.3
GET_SHARE = 0.15                            # some trackers are configured for GET /i
RETURNING_BOOST = 1.6                       # returning visitors convert better, as in any shop


def _mean(pairs) -> float:
    pairs = list(pairs)
    return sum(w * f for w, f in pairs) / sum(w for w, _ in pairs)


# The buy factors' mean over the traffic mix (bots never buy): dividing by it keeps the share of
# buying sessions near ``buy_share`` whatever the mix.
MEAN_BUY_FACTOR = ((1 - BOT_SHARE) * _mean((d.weight, d.buy_factor) for d in cat.DEVICES)
                   * _mean(cat.MEDIUMS.values())
                   * (RETURNING_SHARE * RETURNING_BOOST + 1 - RETURNING_SHARE))


def b64url(data: object) -> str:
    """Base64url without padding, exactly as the JS tracker encodes ``cx`` and ``ue_px``."""
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _documentation_ip(rng: random.Random) -> str:
    """IPs from the ranges reserved for documentation (RFC 5737 / 3849): realistic shape, nobody's."""
    if rng.random() < 0.15:
        return f"2001:db8:{rng.randrange(0x10000):x}::{rng.randrange(1, 0x10000):x}"
    return f"{rng.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rng.randrange(1, 255)}"


@dataclass
class Visitor:
    duid: str
    device: Device
    res: str
    lang: str
    tz: str
    ip: str
    customer_id: str | None
    visits: int = 0
    cookie: str | None = None               # the collector's `sp` cookie, once it set one


@dataclass
class Session:
    index: int
    visitor: Visitor
    sid: str
    vid: int
    start_ms: int
    method: str                             # POST (batched) or GET
    medium: str
    buys: bool
    stop: str
    events: list[dict[str, str]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.sid


class _Builder:
    """Accumulates one session's events page by page, advancing its own clock."""

    def __init__(self, rng: random.Random, session: Session, referrer: str, landing_query: str,
                 time_scale: float, logged_in: bool):
        self.rng = rng
        self.session = session
        self.now = float(session.start_ms)
        self.referrer = referrer
        self.landing_query = landing_query
        self.time_scale = time_scale
        self.logged_in = logged_in
        self.pages = 0

    def _common(self, at_ms: float, url: str, title: str, contexts: list[dict]) -> dict[str, str]:
        visitor = self.session.visitor
        width, height = visitor.res.split("x")
        params = {
            "tv": TRACKER_VERSION, "tna": "sp", "aid": APP_ID, "p": "web",
            "eid": rand_uuid(self.rng), "dtm": str(int(at_ms)),
            "duid": visitor.duid, "sid": self.session.sid, "vid": str(self.session.vid),
            "url": url, "page": title, "res": visitor.res,
            "vp": f"{width}x{int(int(height) * 0.85)}", "ds": f"{width}x{int(height) * 3}",
            "lang": visitor.lang, "tz": visitor.tz, "cs": "UTF-8", "cd": "24",
            "cookie": "0" if visitor.device.kind == "bot" else "1",
            "cx": b64url({"schema": CONTEXTS, "data": contexts}),
        }
        if self.referrer:
            params["refr"] = self.referrer
        if self.logged_in and visitor.customer_id:
            params["uid"] = visitor.customer_id
        return params

    def _after(self, seconds: float) -> float:
        return self.now + seconds * 1000 * self.time_scale

    def page(self, path: str, title: str, page_type: str, category: str | None = None,
             events: tuple[tuple[str, dict], ...] = ()) -> None:
        """A page view, the shop's events on it, page pings while the visitor stays, then leave."""
        query = self.landing_query if self.pages == 0 else ""
        url = SHOP + path + (("&" if "?" in path else "?") + query if query else "")
        type_data = {"type": page_type, **({"category": category} if category else {})}
        contexts = [{"schema": WEB_PAGE, "data": {"id": rand_uuid(self.rng)}},
                    {"schema": PAGE_TYPE, "data": type_data}]
        dwell = self._dwell(page_type)
        on_page = [{**self._common(self.now, url, title, contexts), "e": "pv"}]
        for name, data in events:
            # Views and steps fire as the page loads; an add to cart comes after reading the page.
            delay = dwell * self.rng.uniform(0.3, 0.8) if name == "add_to_cart" else self.rng.uniform(0.05, 0.3)
            envelope = {"schema": UNSTRUCT, "data": {"schema": SHOP_EVENTS[name], "data": data}}
            on_page.append({**self._common(self._after(delay), url, title, contexts),
                            "e": "ue", "ue_px": b64url(envelope)})
        if self.session.visitor.device.kind != "bot":
            on_page.extend(self._pings(url, title, contexts, dwell))
        self.session.events.extend(sorted(on_page, key=lambda event: int(event["dtm"])))
        self.now = self._after(dwell + self.rng.uniform(0.3, 2.0))   # dwell, then the next page's load
        self.referrer = url
        self.pages += 1

    def _dwell(self, page_type: str) -> float:
        median = DWELL[page_type] * (1.2 if self.session.buys and page_type == "product" else 1.0)
        if self.session.visitor.device.kind == "bot":
            median = 1.0
        return min(600.0, max(2.0, self.rng.lognormvariate(math.log(median), 0.6)))

    def _pings(self, url: str, title: str, contexts: list[dict], dwell: float) -> list[dict[str, str]]:
        width, height = (int(v) for v in self.session.visitor.res.split("x"))
        pings, offset, at = [], 0, PING_FIRST_S
        while at < dwell:
            low, offset = offset, min(height * 3, offset + self.rng.randrange(0, height))
            pings.append({**self._common(self._after(at), url, title, contexts), "e": "pp",
                          "pp_mix": "0", "pp_max": str(self.rng.choice((0, 0, width // 10))),
                          "pp_miy": str(low), "pp_may": str(offset)})
            at += PING_EVERY_S
        return pings


class SessionFactory:
    """Builds sessions in order; visitors return (vid > 1) from a bounded pool of earlier ones."""

    def __init__(self, seed: int, buy_share: float, *, time_scale: float = 1.0, pool_size: int = 5000):
        if not 0 <= buy_share <= 1:
            raise ValueError(f"buy share must be within 0..1, got {buy_share}")
        self.seed = seed
        self.buy_share = buy_share
        self.time_scale = time_scale
        self.rng = random.Random(f"{seed}:visitors")
        self.pool: deque[Visitor] = deque(maxlen=pool_size)
        self.count = 0

    def _visitor(self) -> Visitor:
        rng = self.rng
        if self.pool and rng.random() < RETURNING_SHARE:
            return rng.choice(self.pool)
        if rng.random() < BOT_SHARE:
            device = cat.BOT
        else:
            device = rng.choices(cat.DEVICES, [d.weight for d in cat.DEVICES])[0]
        lang, tz, _ = rng.choices(cat.LOCALES, [w for *_, w in cat.LOCALES])[0]
        customer = f"customer-{rng.randrange(10**6):06d}" if rng.random() < 0.35 and device.kind != "bot" else None
        visitor = Visitor(rand_uuid(rng), device, rng.choice(device.resolutions), lang, tz,
                          _documentation_ip(rng), customer)
        if device.kind != "bot":
            self.pool.append(visitor)
        return visitor

    def build(self, start_ms: int) -> Session:
        """The next session, starting at ``start_ms``; the same seed gives the same sessions."""
        visitor = self._visitor()
        visitor.visits += 1
        index = self.count
        self.count += 1
        rng = random.Random(f"{self.seed}:session:{index}")
        medium = "direct" if visitor.device.kind == "bot" else rng.choices(
            list(cat.MEDIUMS), [w for w, _ in cat.MEDIUMS.values()])[0]
        buys = visitor.device.kind != "bot" and rng.random() < self._buy_probability(visitor, medium)
        stop = "purchase" if buys else rng.choices(STOPS, STOP_WEIGHTS)[0]
        if visitor.device.kind == "bot":
            stop = rng.choice(("landing", "category"))     # crawlers read pages, they never shop
        method = "GET" if visitor.device.kind == "bot" or rng.random() < GET_SHARE else "POST"
        session = Session(index, visitor, rand_uuid(rng), visitor.visits, start_ms, method, medium, buys, stop)
        referrer, query = _arrival(rng, medium)
        logged_in = visitor.visits > 1 and rng.random() < 0.7
        _walk(_Builder(rng, session, referrer, query, self.time_scale, logged_in), rng)
        return session

    def _buy_probability(self, visitor: Visitor, medium: str) -> float:
        factor = visitor.device.buy_factor * cat.MEDIUMS[medium][1] * (RETURNING_BOOST if visitor.visits > 1 else 1.0)
        return min(0.95, self.buy_share * factor / MEAN_BUY_FACTOR)


def _arrival(rng: random.Random, medium: str) -> tuple[str, str]:
    """(referrer URL, utm query for the landing URL) for a traffic channel."""
    query = ""
    if medium in cat.CAMPAIGNS:
        source, campaign = rng.choice(cat.CAMPAIGNS[medium])
        query = f"utm_source={source}&utm_medium={medium}&utm_campaign={campaign}"
    term = rng.choice(("running+shoes", "rain+jacket", "chef+knife", "leather+bag", "field+watch"))
    referrer = {
        "direct": "", "email": "",
        "search": rng.choice(cat.SEARCH_ENGINES).format(q=term),
        "cpc": rng.choice(cat.SEARCH_ENGINES).format(q=term),
        "social": rng.choice(cat.SOCIAL_SITES),
        "internal": SHOP + rng.choice(("/", "/c/shoes", "/cart")),
        "referral": rng.choice(cat.REFERRAL_SITES),
        "display": rng.choice(cat.AD_SERVERS),
    }[medium]
    return referrer, query


def _pick_product(rng: random.Random, category: str) -> Product:
    return rng.choices(cat.BY_CATEGORY[category], cat.POPULARITY)[0]


def _product_event(product: Product) -> tuple[str, dict]:
    return "product_view", {"sku": product.sku, "category": product.category, "price": product.price,
                            "currency": cat.CURRENCY}


def _walk(page: _Builder, rng: random.Random) -> None:
    """Walk the funnel as far as the session's stop; every step may loop back a little."""
    session = page.session
    depth = DEPTH[session.stop]
    category = rng.choice(list(cat.CATEGORIES))
    landing = rng.choices(("home", "category", "product"),
                          (0.3, 0.4, 0.3) if session.medium in ("search", "cpc", "email") else (0.7, 0.2, 0.1))[0]
    if session.visitor.device.kind == "bot":
        landing = "home"
    viewed: list[Product] = []

    def view_product() -> None:
        product = _pick_product(rng, category)
        viewed.append(product)
        page.page(f"/p/{product.sku}", f"{product.name} | ClickShop", "product", category,
                  (_product_event(product),))

    if landing == "home":
        page.page("/", "ClickShop", "home")
    elif landing == "category":
        _category_page(page, category)
    else:
        view_product()
    if depth == DEPTH["landing"]:
        if rng.random() < 0.15:
            page.page(rng.choice(cat.CONTENT_PAGES), "Help | ClickShop", "content")
        return
    if landing != "category":
        _category_page(page, category)
    if rng.random() < 0.2:
        page.page(f"/search?q={category}", "Search | ClickShop", "search")
    if depth == DEPTH["category"]:
        if rng.random() < 0.4:
            category = rng.choice(list(cat.CATEGORIES))
            _category_page(page, category)
        return
    # Buyers compare a little more on average; the two distributions overlap widely.
    extra = min(12, int(rng.expovariate(1 / (2.5 if session.buys else 1.6))))
    for _ in range(1 + extra - (1 if landing == "product" else 0)):
        if rng.random() < 0.15:
            category = rng.choice(list(cat.CATEGORIES))
            _category_page(page, category)
        view_product()
    if depth == DEPTH["product"]:
        return
    _check_out(page, rng, viewed, category, depth)


def _category_page(page: _Builder, category: str) -> None:
    page.page(f"/c/{category}", f"{category.title()} | ClickShop", "category", category)


def _check_out(page: _Builder, rng: random.Random, viewed: list[Product], category: str, depth: int) -> None:
    """Fill the cart, walk the checkout steps up to the session's stop, and buy if it does."""
    cart = _fill_cart(page, rng, viewed, category)
    for step, name, path, page_type in cat.CHECKOUT_STEPS:
        if depth < DEPTH[f"checkout{step}"]:
            return
        page.page(path, f"{name.title()} | ClickShop", page_type,
                  events=(("checkout_step", {"step": step, "name": name}),))
    if not page.session.buys:
        return
    subtotal = sum(p.price * q for p, q in cart)
    total = round(subtotal + (0 if subtotal > 50 else 4.95), 2)   # shipping is free over 50
    order = {"order_id": f"ORD-{rng.getrandbits(40):010x}", "total": total,
             "items": sum(q for _, q in cart), "currency": cat.CURRENCY}
    page.page("/checkout/confirmation", "Thank you | ClickShop", "confirmation", events=(("purchase", order),))


def _fill_cart(page: _Builder, rng: random.Random, viewed: list[Product], category: str) -> list[tuple[Product, int]]:
    """Add one to three items from the product pages (on those pages); sometimes remove one."""
    cart: list[tuple[Product, int]] = []
    wanted = rng.choices((1, 2, 3), (0.65, 0.25, 0.10))[0]
    for position in range(wanted):
        product = viewed[-1] if position == 0 else _pick_product(rng, category)
        quantity = 1 if rng.random() < 0.85 else 2
        add = ("add_to_cart", {"sku": product.sku, "category": product.category, "price": product.price,
                               "quantity": quantity, "currency": cat.CURRENCY})
        page.page(f"/p/{product.sku}", f"{product.name} | ClickShop", "product", product.category,
                  (_product_event(product), add))
        cart.append((product, quantity))
    if len(cart) > 1 and rng.random() < 0.3:
        product, quantity = cart.pop(rng.randrange(len(cart)))
        remove = ("remove_from_cart", {"sku": product.sku, "price": product.price, "quantity": quantity,
                                       "category": product.category, "currency": cat.CURRENCY})
        page.page("/cart", "Cart | ClickShop", "cart", events=(remove,))
    return cart
