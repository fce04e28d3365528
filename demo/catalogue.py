"""The demo shop's catalogue and the world its visitors come from.

Everything here is fixed data (or derived from a fixed seed), so two runs of the traffic generator
with the same seed see the same shop. The traffic generator picks from these lists; nothing here
knows about the model.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SHOP = "https://shop.example.com"
CURRENCY = "EUR"


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    category: str
    price: float


@dataclass(frozen=True)
class Device:
    """A browser profile: what the user agent says and the screen it reports."""

    kind: str                   # desktop, mobile, tablet, bot
    useragent: str
    resolutions: tuple[str, ...]
    weight: float
    buy_factor: float           # mobile shoppers convert less, as in real shops


# category -> (product nouns, price range in EUR)
CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[float, float]]] = {
    "shoes": (("Runner", "Trail Shoe", "Sneaker", "Loafer", "Boot", "Sandal"), (39.0, 189.0)),
    "jackets": (("Rain Jacket", "Parka", "Denim Jacket", "Fleece", "Blazer", "Windbreaker"), (49.0, 299.0)),
    "bags": (("Backpack", "Tote", "Duffel", "Messenger Bag", "Wallet", "Weekender"), (19.0, 229.0)),
    "watches": (("Field Watch", "Diver", "Chronograph", "Smartwatch Band", "Dress Watch"), (59.0, 449.0)),
    "kitchen": (("Chef Knife", "Skillet", "Kettle", "Coffee Grinder", "Cutting Board", "Mug Set"), (12.0, 159.0)),
    "books": (("Cookbook", "Travel Guide", "Novel", "Atlas", "Field Guide"), (8.0, 45.0)),
}
ADJECTIVES = ("Classic", "Urban", "Alpine", "Coastal", "Nordic", "Studio", "Everyday", "Heritage")


def _build_products(seed: int = 20261129) -> tuple[Product, ...]:
    rng = random.Random(seed)
    products, names = [], set()
    for prefix, (category, (nouns, (low, high))) in zip(("SH", "JK", "BG", "WT", "KT", "BK"), CATEGORIES.items()):
        for number in range(1, 13):
            name = f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)}"
            while name in names:                  # every product gets its own name
                name = f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)}"
            names.add(name)
            price = round(rng.uniform(low, high)) - 0.01
            products.append(Product(f"{prefix}-{number:04d}", name, category, price))
    return tuple(products)


PRODUCTS = _build_products()
BY_CATEGORY: dict[str, tuple[Product, ...]] = {
    category: tuple(p for p in PRODUCTS if p.category == category) for category in CATEGORIES
}
# Popularity falls off like a Zipf law within a category: the first products sell most.
POPULARITY = tuple(1 / rank for rank in range(1, 13))

DEVICES: tuple[Device, ...] = (
    Device("desktop", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/131.0.0.0 Safari/537.36", ("1920x1080", "1366x768", "2560x1440"), 0.30, 1.2),
    Device("desktop", "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                      "Version/18.1 Safari/605.1.15", ("1440x900", "2560x1600", "1728x1117"), 0.12, 1.3),
    Device("desktop", "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
           ("1920x1080", "1600x900"), 0.05, 1.1),
    Device("mobile", "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                     "Version/18.1 Mobile/15E148 Safari/604.1", ("390x844", "430x932", "375x667"), 0.25, 0.7),
    Device("mobile", "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                     "Chrome/131.0.0.0 Mobile Safari/537.36", ("412x915", "360x800"), 0.18, 0.6),
    Device("tablet", "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                     "Version/17.6 Mobile/15E148 Safari/604.1", ("820x1180", "1024x1366"), 0.07, 1.0),
)
BOT = Device("bot", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", ("1024x768",), 0.0, 0.0)

# (language, time zone, weight)
LOCALES: tuple[tuple[str, str, float], ...] = (
    ("en-GB", "Europe/London", 0.30), ("de-DE", "Europe/Berlin", 0.25), ("fr-FR", "Europe/Paris", 0.15),
    ("nl-NL", "Europe/Amsterdam", 0.10), ("en-US", "America/New_York", 0.12), ("es-ES", "Europe/Madrid", 0.08),
)

# How a session arrives. medium -> (weight, buy factor). A newsletter reader converts better than a
# social-media visitor, which any shop's own analytics shows; the model may learn it from mkt_/refr_.
MEDIUMS: dict[str, tuple[float, float]] = {
    "direct": (0.23, 1.1), "search": (0.28, 1.0), "cpc": (0.12, 1.1), "social": (0.15, 0.6),
    "email": (0.08, 1.5), "internal": (0.05, 1.0), "referral": (0.05, 0.9), "display": (0.04, 0.5),
}
SEARCH_ENGINES = ("https://www.google.com/search?q={q}", "https://www.bing.com/search?q={q}",
                  "https://duckduckgo.com/?q={q}")
SOCIAL_SITES = ("https://www.facebook.com/", "https://t.co/x7Qk2", "https://www.instagram.com/",
                "https://www.pinterest.com/")
# A display or native ad's click comes from the ad network's server (the enricher's medium "paid").
AD_SERVERS = ("https://googleads.g.doubleclick.net/pagead/ads?client=ca-pub-0000000000000000",
              "https://trc.taboola.com/clickshop/log/3/click")
REFERRAL_SITES = ("https://www.example-blog.org/best-gifts-2026", "https://forum.example.net/t/what-to-buy/1234")
CAMPAIGNS = {
    "cpc": (("google", "brand"), ("google", "generic-shoes"), ("bing", "brand")),
    "email": (("newsletter", "winter-sale"), ("newsletter", "weekly"), ("crm", "cart-reminder")),
    "social": (("instagram", "new-season"), ("facebook", "winter-sale")),
    "display": (("google", "retargeting"), ("taboola", "native-winter")),
}

# Share of sessions started in each UTC hour: quiet nights, a lunch bump, an evening peak.
HOUR_WEIGHTS = (1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 3.8, 4, 4.5, 4.2, 3.8, 3.6, 3.8, 4.2, 5, 6, 6.5, 5.5, 3.5, 2)

CHECKOUT_STEPS = ((1, "cart", "/cart", "cart"), (2, "shipping", "/checkout/shipping", "checkout"),
                  (3, "payment", "/checkout/payment", "checkout"), (4, "review", "/checkout/review", "checkout"))
CONTENT_PAGES = ("/help/shipping", "/help/returns", "/about")
