"""Realistic synthetic enriched events (docs/contracts.md shapes) and a lake writer for the tests.

A shopping funnel: home → category pages → product pages (``product_view``) → ``add_to_cart`` →
cart → ``checkout_step`` 1..4 → ``purchase``. A hidden intent per session drives every step, so
buyers view more products and add to cart more, with enough noise that the model has work to do.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from pathlib import Path

from batch import lake

SHOP = "com.clickshop"
CATEGORIES = ("shoes", "jackets", "bags", "watches", "kitchen", "books")
DEVICES = (("Computer", False, 0.55), ("Mobile", True, 0.35), ("Tablet", True, 0.10))
REFERERS = (None, "search", "social", "email", "internal", "unknown", "paid")
ZONES = ("Europe/Berlin", "Europe/London", "America/New_York", "Asia/Tokyo", "UTC")


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def sd(name: str, data: dict) -> dict:
    return {"schema": f"iglu:{SHOP}/{name}/jsonschema/1-0-0", "data": data}


class Session:
    """Builds one session's events, one call per tracker hit."""

    def __init__(self, rng: random.Random, start_ms: int, *, session_id: str | None = None,
                 user: str | None = None):
        self.rng = rng
        self.at = start_ms
        self.user = user or uuid.UUID(int=rng.getrandbits(128)).hex * 2     # a 64-hex pseudonym
        self.session_id = session_id if session_id is not None else str(uuid.UUID(int=rng.getrandbits(128)))
        self.index = rng.choice((1, 1, 1, 2, 3, 5))
        kind, mobile, _ = rng.choices(DEVICES, weights=[d[2] for d in DEVICES])[0]
        self.device, self.mobile = kind, mobile
        self.referer = rng.choice(REFERERS)
        self.campaign = rng.random() < 0.2
        self.zone = rng.choice(ZONES)
        self.events: list[dict] = []

    def _base(self, event: str, path: str, page: str, category: str | None = None) -> dict:
        self.at += int(self.rng.expovariate(1 / 25_000)) + 200
        eid = str(uuid.UUID(int=self.rng.getrandbits(128)))
        return {
            "app_id": "clickshop", "platform": "web", "event": event, "event_id": eid,
            "collector_tstamp": iso(self.at + 40), "dvce_created_tstamp": iso(self.at),
            "derived_tstamp": iso(self.at), "etl_tstamp": iso(self.at + 90),
            "v_tracker": "py-1.1.0", "v_collector": "clickstream-collector/0.1.0", "v_etl": "clickstream-enrich/0.1.0",
            "domain_userid": self.user, "network_userid": self.user[::-1], "user_ipaddress": self.user[:32] * 2,
            "domain_sessionid": self.session_id, "domain_sessionidx": self.index,
            "page_url": f"https://shop.example.com{path}", "page_urlscheme": "https",
            "page_urlhost": "shop.example.com", "page_urlpath": path, "page_title": page.title(),
            "refr_medium": self.referer, "mkt_medium": "cpc" if self.campaign else None,
            "mkt_source": "newsletter" if self.campaign else None,
            "event_vendor": "com.snowplowanalytics.snowplow", "event_name": event, "event_format": "jsonschema",
            "event_version": "1-0-0", "unstruct_event": None,
            "contexts": [sd("page_type", {"type": page, **({"category": category} if category else {})})],
            "derived_contexts": [], "useragent": "Mozilla/5.0", "dvce_type": self.device,
            "dvce_ismobile": self.mobile, "br_viewheight": 800, "br_viewwidth": 1200, "doc_height": 3000,
            "os_timezone": self.zone,
        }

    def page(self, path: str, page: str, category: str | None = None) -> dict:
        event = self._base("page_view", path, page, category)
        self.events.append(event)
        return event

    def ping(self, path: str, page: str, depth: int) -> None:
        event = self._base("page_ping", path, page)
        event.update(pp_xoffset_min=0, pp_xoffset_max=0, pp_yoffset_min=0, pp_yoffset_max=depth)
        self.events.append(event)

    def shop(self, name: str, data: dict, path: str, page: str) -> dict:
        event = self._base("unstruct", path, page)
        event.update(event_vendor=SHOP, event_name=name, unstruct_event=sd(name, data))
        self.events.append(event)
        return event


def session_events(rng: random.Random, start_ms: int, *, buyer: bool | None = None,
                   purchase_total: float | None = None, **kwargs) -> list[dict]:
    """One session's events; ``buyer`` forces the outcome, ``purchase_total`` the purchase's total."""
    s = Session(rng, start_ms, **kwargs)
    intent = rng.betavariate(2, 5)
    if buyer is None:
        buyer = rng.random() < 0.15 + 0.8 * intent ** 1.5
    s.page("/", "home")
    cart: list[tuple[str, float]] = []
    views = 1 + int(rng.expovariate(1 / (2 + 7 * intent + (3 if buyer else 0))))
    for _ in range(views):
        category = rng.choice(CATEGORIES)
        if rng.random() < 0.5:
            s.page(f"/c/{category}", "category", category)
        sku = f"{category[:2].upper()}-{rng.randrange(40):03d}"
        price = round(rng.uniform(8, 300), 2)
        s.page(f"/p/{sku}", "product", category)
        s.shop("product_view", {"sku": sku, "category": category, "price": price, "currency": "EUR"},
               f"/p/{sku}", "product")
        if rng.random() < 0.5:
            s.ping(f"/p/{sku}", "product", rng.randrange(0, 2500))
        if rng.random() < (0.45 if buyer else 0.12):
            s.shop("add_to_cart", {"sku": sku, "category": category, "price": price, "quantity": 1},
                   f"/p/{sku}", "product")
            cart.append((sku, price))
        if cart and rng.random() < 0.05:
            sku, price = cart.pop()
            s.shop("remove_from_cart", {"sku": sku, "price": price, "quantity": 1}, "/cart", "cart")
    if buyer or (cart and rng.random() < 0.3):
        s.page("/cart", "cart")
        last_step = 4 if buyer else rng.randint(1, 2)
        for number in range(1, last_step + 1):
            s.page(f"/checkout/{number}", "checkout")
            s.shop("checkout_step", {"step": number}, f"/checkout/{number}", "checkout")
    if buyer:
        total = purchase_total if purchase_total is not None else round(sum(p for _, p in cart) or 50.0, 2)
        s.shop("purchase", {"order_id": f"o-{rng.getrandbits(40):x}", "total": total,
                            "items": max(1, len(cart)), "currency": "EUR"}, "/checkout/done", "confirmation")
        if rng.random() < 0.3:      # a little browsing after the purchase (must not become examples)
            s.page("/", "home")
    return s.events


def make_events(sessions: int, start: dt.datetime, hours: float = 48, seed: int = 7) -> list[dict]:
    """``sessions`` sessions starting uniformly over ``hours`` from ``start`` (UTC)."""
    rng = random.Random(seed)
    origin = int(start.replace(tzinfo=dt.UTC).timestamp() * 1000)
    events = []
    for _ in range(sessions):
        events += session_events(rng, origin + int(rng.uniform(0, hours * 3_600_000)))
    return events


def lake_objects(events: list[dict], shard: str = "shardId-000000000000") -> dict[str, bytes]:
    """The lake objects (key → Parquet bytes) the loader would write for these events."""
    converted = lake.convert([json.dumps(event).encode() for event in events])
    assert not converted.bad, converted.bad[:1]
    objects = {}
    for hour, table in converted.hours().items():
        objects[lake.enriched_key(hour, lake.object_name(shard, str(hour), str(hour + table.num_rows)))] = \
            lake.parquet_bytes(table)
    return objects


def write_lake_s3(s3, bucket: str, events: list[dict]) -> list[str]:
    keys = []
    for key, body in lake_objects(events).items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        keys.append(key)
    return keys


def write_lake_dir(root: Path, events: list[dict], shard: str = "shardId-000000000000") -> Path:
    """Write the objects under ``root`` (root/enriched/date=…/hour=…/…); returns root/enriched."""
    for key, body in lake_objects(events, shard).items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root / "enriched"
