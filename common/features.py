"""The one feature definition: a fold over a session's enriched events.

``step(state, event)`` folds one enriched event into a session's state and ``features(state)``
reads the model's inputs from it. The scorer runs it online, event by event; training runs the
very same functions inside Spark (``applyInArrow``), so online and offline features cannot drift.

Rules that keep the model honest:
- No personal data: only counts, amounts, durations and coarse categories.
- Purchases (the label) never reach the features: a purchase or transaction event (the shop's, the
  classic trackers', the e-commerce plugins'), or the order confirmation page, sets
  ``state.purchased`` and nothing else.
- Categorical inputs are plain numeric columns (one-hot or ordinal), so exported trees never see a
  Spark categorical split (the ONNX converter reads those wrongly).
- Memory per session is bounded whatever its length (distinct products are capped).

Bump ``FEATURE_VERSION`` whenever the meaning or order of a feature changes: a model whose
``model.json`` names another version is refused by the scorer.
"""
from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from zoneinfo import ZoneInfo

from common.rawkey import NIL_UUID

FEATURE_VERSION = "6"
SHOP_VENDOR = "com.clickshop"
# The official trackers' trackAddToCart / trackRemoveFromCart send Snowplow's own cart events: the
# same actions, priced in unitPrice. Any other vendor's events of those names are not the shop's.
CART_PRICE_FIELD = {SHOP_VENDOR: "price", "com.snowplowanalytics.snowplow": "unitPrice"}
# The snowplow-ecommerce tracker plugins send one event, snowplow_ecommerce_action, whose `type` says
# what happened (product_view, add_to_cart, checkout_step, transaction, ...), with what it happened
# to in entities (contexts): the products, the checkout step, the transaction.
ECOMMERCE_VENDOR = "com.snowplowanalytics.snowplow.ecommerce"
ECOMMERCE_ACTION = "snowplow_ecommerce_action"
# The fold reads the fields of major version 1 of each schema (1-*-*: additions only). A new major
# may rename or retype them (a price becomes an object): read as version 1 they were wrong or 0 with
# no word said. Its events count by name (an add to cart is one whatever its fields), its fields
# unread, until the fold learns that major under a new FEATURE_VERSION; `enrich.cli lint` names
# such schemas (FOLD_SCHEMAS).
READ_MAJOR = "1-"
PAGE_TYPE_SCHEMA = f"iglu:{SHOP_VENDOR}/page_type/jsonschema/{READ_MAJOR}"
MAX_TRACKED_PRODUCTS = 512
# A longer product id is kept as a 16-byte digest: schemas allow 4,096 characters, and 512 such ids
# made one session 2 MB of the scorer's memory.
MAX_KEPT_SKU_CHARS = 64
NIL_USER = NIL_UUID                                   # network_userid of SP-Anonymous hits
NUMBER_LIMIT = 1e9          # any number read from an event: beyond every real quantity, price or index

PAGE_TYPES = ("home", "category", "product", "search", "cart", "checkout", "content")
# Bots (the enricher's dvce_type from the user agent) are a class of their own: never buyers, and
# not to be mistaken for a visitor whose user agent said nothing (Unknown, all zeros).
DEVICES = ("Computer", "Mobile", "Tablet", "Bot")
REFERERS = ("search", "social", "email", "paid", "internal", "unknown")      # refr_medium; since version 6: paid
# The one-hot groups among the features (at most one is 1): the training report sums each group's importances.
ONE_HOT_GROUPS: dict[str, tuple[str, ...]] = {
    "device": tuple(f"device_{device.lower()}" for device in DEVICES),
    "referer": (*(f"referer_{referer}" for referer in REFERERS), "referer_direct"),
}

FEATURE_NAMES: tuple[str, ...] = (
    "events", "page_views", "page_pings", "struct_events",
    "product_views", "distinct_products", "cart_adds", "cart_removes", "cart_value", "cart_items",
    "checkout_step_max",
    *(f"pages_{page}" for page in PAGE_TYPES),
    "session_seconds", "seconds_on_page", "mean_seconds_per_page",
    "seconds_since_last_cart_action", "max_scroll_depth",
    *ONE_HOT_GROUPS["device"],
    "local_hour", "local_weekday",
    *ONE_HOT_GROUPS["referer"],
    "campaign", "returning", "session_index",
)
FEATURE_COUNT = len(FEATURE_NAMES)
# Features whose spread follows the clock: an hour of live traffic holds one hour and one weekday,
# training's evaluation rows days of them, so their drift (scorer_feature_psi) would always be high.
CLOCK_FEATURES = frozenset({"local_hour", "local_weekday"})
# Every enriched-event field the fold reads (training passes only these to it, to keep Spark's
# per-session frames narrow). Add a field here when a feature starts reading it; the
# online/offline parity test fails if one is missing.
EVENT_FIELDS: tuple[str, ...] = (
    "event_id", "event", "collector_tstamp", "derived_tstamp", "domain_sessionid", "network_userid",
    "domain_sessionidx", "os_timezone", "dvce_type", "refr_medium", "mkt_medium", "mkt_source", "mkt_campaign",
    "mkt_term", "mkt_content", "mkt_clickid", "mkt_network",
    "page_urlpath", "contexts", "unstruct_event", "event_vendor", "doc_height", "pp_yoffset_max", "br_viewheight",
)
_PAGE_INDEX = {page: i for i, page in enumerate(PAGE_TYPES)}


class SessionState:
    __slots__ = (
        "campaign",
        "cart_adds",
        "cart_items",
        "cart_removes",
        "cart_value",
        "checkout_step_max",
        "device",
        "distinct_products",
        "events",
        "last_cart_ms",
        "last_ms",
        "last_page_ms",
        "local_hour",
        "local_weekday",
        "max_scroll_depth",
        "page_pings",
        "page_views",
        "pages",
        "product_views",
        "products",
        "purchased",
        "referer",
        "seen_ms",
        "session_id",
        "session_index",
        "start_ms",
        "struct_events",
    )

    def __init__(self, session_id: str = ""):
        self.session_id = session_id
        self.start_ms = self.last_ms = self.last_page_ms = self.last_cart_ms = -1
        self.seen_ms = -1       # the latest event of any kind, a purchase included: what idles a session
        self.events = self.page_views = self.page_pings = self.struct_events = 0
        self.product_views = self.distinct_products = self.cart_adds = self.cart_removes = 0
        self.cart_value = 0.0
        self.cart_items = self.checkout_step_max = 0
        self.products: set[str | bytes] = set()       # product ids seen, long ones as digests
        self.pages = [0] * len(PAGE_TYPES)
        self.max_scroll_depth = 0.0
        self.device = self.referer = None
        self.local_hour = self.local_weekday = -1
        self.campaign = False
        self.session_index = 0
        self.purchased = False


# ------------------------------------------------------------------------------ event readers

LAST_MS = 253_402_214_400_000        # 9999-12-31T24:00Z
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How much earlier than its collection an event may have happened. Snowplow's mobile trackers drop
# queued events after 30 days (their default maxEventStoreAge), and backfills send their history's
# true times (docs/operations.md: a week): an older derived time is a clock fault, not a late event.
MAX_EVENT_AGE_MS = 30 * 86_400_000


def parse_ms(value) -> int:
    """ISO 8601 (with or without 'Z') or epoch milliseconds to epoch milliseconds."""
    if isinstance(value, (int, float)):
        return int(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # In integers: timestamp() * 1000 is a float product, 1 ms short for one string in 160, where
    # Spark (training) reads the same string exactly.
    since = moment - EPOCH
    return (since.days * 86_400 + since.seconds) * 1000 + since.microseconds // 1000


def event_time_ms(event: dict) -> int:
    """When the event happened: Snowplow's derived timestamp, else the collector's; never later than
    the collector's, since nothing happens after it is received. A tracker may send any true
    timestamp (``ttm``): one dated decades ahead would otherwise start a session there, and the
    scorer's watermark would expire every other session of its shard. Nor more than MAX_EVENT_AGE_MS
    earlier: a derived time from a reset device clock, or from ``dtm`` sent in seconds with ``stm``
    in ms (1970), would be folded into the live session online but sorted into a session of its own
    offline."""
    collected, derived = event["collector_tstamp"], event.get("derived_tstamp")
    if not derived:
        return parse_ms(collected)
    if type(derived) is str and type(collected) is str and len(derived) == len(collected) and derived[-1] == "Z" \
            and collected[-1] == "Z" and derived[4:20:3] == "--T::." == collected[4:20:3]:
        # Same-shaped UTC ISO strings (the enricher's) sort as times do: parse only one (~1 µs) when
        # the derived time is not earlier, or earlier but on the same UTC day, well within the bound.
        # The separators are checked: parse_ms also reads a ' ' for 'T', a ',' for '.', week dates
        # and basic times, which do not sort as times among these.
        if derived >= collected:
            return parse_ms(collected)
        if derived[:10] == collected[:10]:
            return parse_ms(derived)
    derived_ms, collected_ms = parse_ms(derived), parse_ms(collected)
    return derived_ms if collected_ms - MAX_EVENT_AGE_MS <= derived_ms <= collected_ms else collected_ms


def request_order(event: dict) -> tuple[int, str]:
    """The order of one request's events, which share ``etl_tstamp`` and ``collector_tstamp``: by
    event time, then id. Not the tracker's (the lake keeps no trace of it): the enricher writes them
    so, and training folds them so (batch.train_features.arrival_order)."""
    return event_time_ms(event), event["event_id"]


def in_calendar(event_ms: int) -> bool:
    """Whether an event time can be folded: from 1970 (a negative start means "not started") to the
    end of 9999 (later times have no calendar date). The scorer skips other events, and so does training."""
    return 0 <= event_ms < LAST_MS


def self_describing(event: dict) -> tuple[str, str, dict]:
    """(vendor, name, data) of a self-describing event; ("", "", {}) otherwise. The data of a major
    version the fold does not read (READ_MAJOR) is {}."""
    unstruct = event.get("unstruct_event")
    schema = unstruct.get("schema") if isinstance(unstruct, dict) else None
    if not isinstance(schema, str):
        return "", "", {}
    # iglu:vendor/name/jsonschema/1-0-0
    parts = schema[5:].split("/")
    if len(parts) != 4:
        return "", "", {}
    return parts[0], parts[1], _object(unstruct.get("data")) if parts[3].startswith(READ_MAJOR) else {}


def is_purchase(event: dict) -> bool:
    """The order is placed: a purchase or transaction event (the e-commerce plugins' transaction
    action included), or the order confirmation page, which exists only once the order does (the
    shop sends its view before the purchase event)."""
    if event.get("event") in ("transaction", "transaction_item"):
        return True
    if event.get("event") == "page_view":
        return _page_context(event) == "confirmation"
    vendor, name, data = self_describing(event)
    if vendor == SHOP_VENDOR:
        return name == "purchase"
    return vendor == ECOMMERCE_VENDOR and name == ECOMMERCE_ACTION and data.get("type") == "transaction"


# The fold reads what the enricher validated, but the scoring API takes events from anyone: a value of
# another JSON type than the schema's reads as absent, so that folding an event never fails half-way
# (it would leave the session with part of it) and training reads the same event alike.

def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _contexts(event: dict):
    contexts = event.get("contexts")
    return contexts if isinstance(contexts, list) else ()


def _schema(context) -> str:
    schema = context.get("schema") if isinstance(context, dict) else None
    return schema if isinstance(schema, str) else ""


def _page_context(event: dict) -> str | None:
    """The shop's page_type context's type, if the event carries one."""
    # Inline, not _entities and the helpers: called twice per event, their calls added 5-10 % to the fold.
    contexts = event.get("contexts")
    for context in contexts if isinstance(contexts, list) else ():
        schema = context.get("schema") if isinstance(context, dict) else None
        if isinstance(schema, str) and schema.startswith(PAGE_TYPE_SCHEMA):
            data = context.get("data")
            return _text(data.get("type")) if isinstance(data, dict) else None
    return None


def _entities(event: dict, schema_prefix: str):
    """The data of each context whose schema starts with ``schema_prefix`` (which names the major version)."""
    for context in _contexts(event):
        if _schema(context).startswith(schema_prefix):
            yield _object(context.get("data"))


# The page type from the URL's first folder, for shops that send no page_type context. Whole folders
# only: /cartier-watches is no cart page.
_PATH_PAGE_TYPES = {"c": "category", "category": "category", "categories": "category", "p": "product",
                    "product": "product", "products": "product", "search": "search", "cart": "cart",
                    "checkout": "checkout"}
_LOCALE = re.compile(r"[a-z]{2}(?:[-_][a-z]{2})?")


def page_type(event: dict) -> str:
    kind = _page_context(event)
    if kind in _PAGE_INDEX:
        return kind
    path = event.get("page_urlpath")
    segments = [part for part in path.lower().split("/") if part] if isinstance(path, str) else []
    if segments and _LOCALE.fullmatch(segments[0]):       # /de/p/123, /en-gb/cart: the shop's languages
        segments = segments[1:]
    if not segments:
        return "home"
    return _PATH_PAGE_TYPES.get(segments[0], "content")


# Zones come from the pinned tzdata package, not the host's database: the scorer and training read
# the same rules wherever they run (zones change them: Paraguay and Kazakhstan in 2024), and names
# that are not zones ("localtime": the host's own; "posixrules") cannot make features host-dependent.
_ZONE_NAMES = frozenset(resources.files("tzdata").joinpath("zones").read_text().split()) - {"Factory"}


def _zone(name: str):
    """The tracker's time zone (``os_timezone``); UTC for a name tzdata does not list."""
    # Checked before the cache: a cache keyed by any name the tracker sends kept megabyte-long ones.
    return _listed_zone(name) if isinstance(name, str) and name in _ZONE_NAMES else UTC


@cache                             # at most the ~600 names tzdata lists
def _listed_zone(name: str):
    with resources.files("tzdata.zoneinfo").joinpath(*name.split("/")).open("rb") as data:
        return ZoneInfo.from_file(data, key=name)


def _number(value, default=0.0) -> float:
    """``value`` as a number within ±NUMBER_LIMIT; ``default`` when it is none (or NaN). Schemas
    bound few numbers, and an unbounded one (a quantity of 1e308) would overflow a sum or reach
    the model as inf; below the limit nothing changes."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    if math.isnan(number):
        return default
    return max(-NUMBER_LIMIT, min(NUMBER_LIMIT, number))


# ------------------------------------------------------------------------------ the fold


def _start(state: SessionState, event: dict, at_ms: int) -> None:
    state.start_ms = at_ms
    try:
        moment = datetime.fromtimestamp(at_ms / 1000, _zone(event.get("os_timezone") or "UTC"))
    except (OverflowError, ValueError, OSError):     # the last hours of 9999 have no local date east of UTC
        moment = datetime.fromtimestamp(at_ms / 1000, UTC)
    state.local_hour, state.local_weekday = moment.hour, moment.weekday()
    state.device = _text(event.get("dvce_type"))
    state.referer = _text(event.get("refr_medium"))
    state.campaign = _from_campaign(event)
    state.session_index = int(_number(event.get("domain_sessionidx"), 1))


_UTM_FIELDS = ("mkt_medium", "mkt_source", "mkt_campaign", "mkt_term", "mkt_content")


def _from_campaign(event: dict) -> bool:
    """Any utm_* field, or an ad network's click id alone (Google Ads' auto-tagging sends gclid and no
    utm_*). Not Facebook's fbclid: Facebook adds it to every link followed from it, paid or not."""
    return any(event.get(name) for name in _UTM_FIELDS) or \
        bool(event.get("mkt_clickid") and event.get("mkt_network") != "Facebook")


def _text(value) -> str | None:
    # Looked up in dicts by features(): a list sent to the scoring API would fail there, unhashable.
    return value if isinstance(value, str) else None


def _self_describing_event(state: SessionState, event: dict, at_ms: int) -> None:
    vendor, name, data = self_describing(event)
    if vendor == ECOMMERCE_VENDOR:
        if name == ECOMMERCE_ACTION:
            _ecommerce_action(state, event, data.get("type"), at_ms)
    elif name == "product_view" and vendor == SHOP_VENDOR:
        _product_viewed(state, (data.get("sku"),))
    elif name in ("add_to_cart", "remove_from_cart") and vendor in CART_PRICE_FIELD:
        quantity = int(_number(data.get("quantity"), 1))
        amount = _number(data.get(CART_PRICE_FIELD[vendor])) * quantity
        _cart_changed(state, name == "add_to_cart", quantity, amount, at_ms)
    elif name == "checkout_step" and vendor == SHOP_VENDOR:
        _checkout_reached(state, data.get("step"))


_PRODUCT = f"iglu:{ECOMMERCE_VENDOR}/product/jsonschema/{READ_MAJOR}"
_CHECKOUT_STEP = f"iglu:{ECOMMERCE_VENDOR}/checkout_step/jsonschema/{READ_MAJOR}"
# The schemas whose fields the fold reads, as (vendor, name).
FOLD_SCHEMAS = frozenset({(SHOP_VENDOR, "page_type"), (SHOP_VENDOR, "product_view"),
                          (SHOP_VENDOR, "checkout_step"), (ECOMMERCE_VENDOR, ECOMMERCE_ACTION),
                          (ECOMMERCE_VENDOR, "product"), (ECOMMERCE_VENDOR, "checkout_step")}
                         | {(vendor, name) for vendor in CART_PRICE_FIELD for name in ("add_to_cart", "remove_from_cart")})


def _ecommerce_action(state: SessionState, event: dict, action: str | None, at_ms: int) -> None:
    """A snowplow-ecommerce action; other actions (list and promotion views, refunds) are only events."""
    if action == "product_view":
        _product_viewed(state, [product.get("id") for product in _entities(event, _PRODUCT)])
    elif action in ("add_to_cart", "remove_from_cart"):
        quantity, amount = 0, 0.0
        for product in _entities(event, _PRODUCT):      # one event may add several products
            count = int(_number(product.get("quantity"), 1))
            quantity += count
            amount += _number(product.get("price")) * count
        _cart_changed(state, action == "add_to_cart", quantity, amount, at_ms)
    elif action == "checkout_step":
        for checkout in _entities(event, _CHECKOUT_STEP):
            _checkout_reached(state, checkout.get("step"))


def _product_viewed(state: SessionState, skus) -> None:
    state.product_views += 1
    for sku in skus:
        if sku and type(sku) is str and len(state.products) < MAX_TRACKED_PRODUCTS:
            if len(sku) > MAX_KEPT_SKU_CHARS:
                sku = hashlib.blake2b(sku.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            state.products.add(sku)
            state.distinct_products = len(state.products)


def _cart_changed(state: SessionState, added: bool, quantity: int, amount: float, at_ms: int) -> None:
    if added:
        state.cart_adds += 1
        state.cart_items += quantity
        state.cart_value += amount
    else:
        state.cart_removes += 1
        state.cart_items = max(0, state.cart_items - quantity)
        state.cart_value = max(0.0, state.cart_value - amount)
    state.last_cart_ms = at_ms


def _checkout_reached(state: SessionState, step) -> None:
    state.checkout_step_max = max(state.checkout_step_max, int(_number(step)))


def step(state: SessionState, event: dict, at_ms: int | None = None) -> SessionState:
    """Fold one enriched event into the state (in place, returned for convenience).
    ``at_ms`` is the event's time when the caller has already read it (event_time_ms)."""
    if at_ms is None:
        at_ms = event_time_ms(event)
    # A purchase is activity too: the session goes on after it, unscored, as long as training's does.
    state.seen_ms = max(state.seen_ms, at_ms)
    if is_purchase(event):
        state.purchased = True          # the label; deliberately not a feature
        return state
    if state.start_ms < 0:
        _start(state, event, at_ms)
    state.events += 1
    state.last_ms = max(state.last_ms, at_ms)
    kind = event.get("event")
    if kind == "page_view":
        state.page_views += 1
        state.pages[_PAGE_INDEX[page_type(event)]] += 1
        state.last_page_ms = at_ms
    elif kind == "page_ping":
        state.page_pings += 1
        height = _number(event.get("doc_height"))
        if height > 0:
            depth = (_number(event.get("pp_yoffset_max")) + _number(event.get("br_viewheight"))) / height
            state.max_scroll_depth = max(state.max_scroll_depth, min(1.0, depth))
    elif kind == "struct":
        state.struct_events += 1
    elif kind == "unstruct":
        _self_describing_event(state, event, at_ms)
    return state


def _one_hot(values: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    return {value: tuple(1.0 if value == other else 0.0 for other in values) for value in values}


# Prebuilt one-hot tuples: features() runs on every scored event, and generators there cost µs.
_DEVICE_ONE_HOT = _one_hot(DEVICES)
_NO_DEVICE = (0.0,) * len(DEVICES)
_REFERER_ONE_HOT = {kind: (*row, 0.0) for kind, row in _one_hot(REFERERS).items()}
_OTHER_REFERER = (0.0,) * (len(REFERERS) + 1)          # a medium outside REFERERS
_DIRECT = (*(0.0,) * len(REFERERS), 1.0)                # no referer at all


def features(state: SessionState, now_ms: int | None = None) -> list[float]:
    """The model's inputs, in FEATURE_NAMES order, as seen right after the last folded event."""
    at = state.last_ms if now_ms is None else now_ms
    seconds = max(0.0, (at - state.start_ms) / 1000) if state.start_ms >= 0 else 0.0
    since_cart = (at - state.last_cart_ms) / 1000 if state.last_cart_ms >= 0 else -1.0
    since_page = (at - state.last_page_ms) / 1000 if state.last_page_ms >= 0 else -1.0
    per_page = seconds / state.page_views if state.page_views else 0.0
    referer = state.referer
    return [
        float(state.events), float(state.page_views), float(state.page_pings), float(state.struct_events),
        float(state.product_views), float(state.distinct_products), float(state.cart_adds),
        float(state.cart_removes), round(state.cart_value, 2), float(state.cart_items),
        float(state.checkout_step_max),
        *map(float, state.pages),
        seconds, since_page, per_page, since_cart, state.max_scroll_depth,
        *_DEVICE_ONE_HOT.get(state.device, _NO_DEVICE),
        float(state.local_hour), float(state.local_weekday),
        *(_REFERER_ONE_HOT.get(referer, _OTHER_REFERER) if referer else _DIRECT),
        1.0 if state.campaign else 0.0, 1.0 if state.session_index > 1 else 0.0, float(state.session_index),
    ]


def session_prefixes(events):
    """Yield ``(event, features)`` after each event of one session (in arrival order, as the scorer
    folds them), up to (not including) the first purchase: the training examples, with the event
    that ends each prefix."""
    state = SessionState()
    for event in events:
        if is_purchase(event):
            return
        step(state, event)
        yield event, features(state)


def session_features(events) -> list[list[float]]:
    """Prefix rows of one session (events in arrival order): the features after each event, up to
    (not including) the first purchase. For tests and benchmarks; training runs ``session_prefixes``."""
    return [row for _, row in session_prefixes(events)]


def session_key(event: dict) -> str:
    """The session an event belongs to: its session id, else its user (the tracker's cookie id, else
    the shop's user id, else the collector's cookie id), else itself, as training sessionises. Never
    the nil user id of SP-Anonymous hits, which would make every anonymous visitor one session. The
    user id comes before the collector's cookie: a server-side tracker sends no cookie, so the
    collector gives each request one id of its own, shared by every user's events in its batch."""
    network = event.get("network_userid")
    return (event.get("domain_sessionid") or event.get("domain_userid") or event.get("user_id")
            or (network if network != NIL_USER else None) or event["event_id"])
