"""The enrichments, each a small pure function or class: UA, IP, HMAC, referer, campaign, time, dedupe."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
import urllib.parse
from collections import OrderedDict
from functools import cache, lru_cache
from pathlib import Path

import orjson
from ua_parser import BestAvailableResolver, Parser, load_lazy_builtins

REFERERS_FILE = Path(__file__).resolve().parent / "referers.json"
MAX_CACHED_CHARS = 2048   # longer inputs are computed every time: a cache must not be a memory bomb
# The stdlib's urlsplit keeps its last 128 inputs and results whatever their length (Python >= 3.11):
# call the function under that cache, or the long URLs short_cache skips would be held there instead.
urlsplit = getattr(urllib.parse.urlsplit, "__wrapped__", urllib.parse.urlsplit)


def short_cache(maxsize: int, max_chars: int = MAX_CACHED_CHARS):
    """``lru_cache`` that skips calls with any string argument longer than ``max_chars``, so hostile
    megabyte-long values cannot fill memory through the cache (every argument is part of the key)."""

    def decorate(function):
        cached = lru_cache(maxsize=maxsize)(function)

        def call(*args):
            for arg in args:
                if isinstance(arg, str) and len(arg) > max_chars:
                    return function(*args)
            return cached(*args)

        call.cache_info = cached.cache_info
        call.__wrapped__ = function
        return call

    return decorate

# ------------------------------------------------------------------------------------------ time


def iso_ms(epoch_ms: int) -> str:
    """Epoch ms -> ``2026-11-29T09:52:34.123Z`` (what Snowplow's analytics SDK emits)."""
    seconds, millis = divmod(int(epoch_ms), 1000)
    return f"{_iso_seconds(seconds)}.{millis:03d}Z"


@lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    # Cached: the timestamps of a batch share a handful of seconds.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def derived_tstamp(collector: int, created: int | None, sent: int | None, true: int | None) -> int:
    """Snowplow's rule: true_tstamp wins; else correct the device clock by the collector's when the
    event was created before it was sent; else the collector's time."""
    if true is not None:
        return true
    if created is not None and sent is not None and created < sent:
        return collector - (sent - created)
    return collector


# ------------------------------------------------------------------------------------------ user agent

_COMPUTER_OS = {"Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "FreeBSD", "Debian", "macOS"}
_MOBILE_OS = {"iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "Symbian OS"}
_TABLET_HINTS = ("iPad", "Tablet", "Kindle", "Nexus 7", "Nexus 9", "SM-T", "Tab")


def _version(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return ".".join(kept) if kept else None


# iPadOS Safari asks for desktop pages with a Mac's user agent. Its screen (the tracker's `res`, CSS
# pixels, either way up) tells: these are iPads' sizes, which no Mac's display has.
IPAD_SCREENS = frozenset({(768, 1024), (810, 1080), (820, 1180), (834, 1112), (834, 1194), (834, 1210),
                          (744, 1133), (1024, 1366), (1032, 1376)})


def ipad_as_mac(os_family: str | None, width: int | None, height: int | None) -> bool:
    return os_family == "Mac OS X" and width is not None and height is not None and \
        (min(width, height), max(width, height)) in IPAD_SCREENS


def _android_tablet(ua: str, os_family: str, device_family: str) -> bool:
    """Android browsers say "Mobile" on phones only; Opera Mini (a phone browser that does not) and
    apps' own HTTP clients (Dalvik, which never does) are taken for the phones they mostly run on."""
    return os_family == "Android" and "Mobile" not in ua and device_family != "Generic Smartphone" \
        and not ua.startswith("Dalvik/")


def _is_bot(ua: str, device_family: str, browser_family: str) -> bool:
    """ua-parser's spiders, and crawlers it takes for the phone they claim to be (Bytespider, and
    PageSpeed's Lighthouse, which runs the page's tracker)."""
    family = browser_family.lower()
    return device_family == "Spider" or "bot" in family or "spider" in family \
        or browser_family == "HeadlessChrome" or "Chrome-Lighthouse" in ua


# Televisions (smart TVs, streaming sticks and boxes), game consoles and VR headsets browse shops too.
# Their Android builds say no "Mobile" and read as tablets, the others as Unknown, an Xbox as a Windows
# PC: they get classes of their own, for which the fold has no device column (as for Unknown).
_OTHER_DEVICES = (
    ("TV", re.compile(r"Android TV|SMART-?TV|Smart ?TV|Google ?TV|Apple ?TV|HbbTV|Web0S|CrKey|Roku|BRAVIA"
                      r"|; AFT[A-Z0-9]+ Build/| TV Safari")),     # AFT…: Amazon's Fire TV models
    ("Game console", re.compile(r"PlayStation|Xbox|Nintendo")),
    ("VR headset", re.compile(r"OculusBrowser|PicoBrowser| VR Safari")),
)


def _device_type(ua: str, os_family: str, device_family: str, browser_family: str) -> str:
    if _is_bot(ua, device_family, browser_family):
        return "Bot"
    for kind, pattern in _OTHER_DEVICES:
        if pattern.search(ua):
            return kind
    if any(hint in device_family for hint in _TABLET_HINTS) or _android_tablet(ua, os_family, device_family):
        return "Tablet"
    if os_family in _MOBILE_OS:
        return "Mobile"
    if os_family in _COMPUTER_OS:
        return "Computer"
    return "Unknown"


@cache
def _uncached_ua_parser() -> Parser:
    """ua-parser without its own cache: ``ua_parser.parse`` keeps its last ~3,800 UAs whatever their
    length (3.5 GB of 900 kB UAs), the memory bomb short_cache keeps out of ours."""
    return Parser(BestAvailableResolver(load_lazy_builtins()))


def make_ua_parser(size: int):
    """A cached UA parser: UA strings repeat a lot and parsing is the slowest enrichment (~0.1-1 ms)."""

    @short_cache(size)
    def parse(ua: str) -> dict:
        result = _uncached_ua_parser().parse(ua)
        agent, os_, device = result.user_agent, result.os, result.device
        br_family = agent.family if agent else "Other"
        os_family = os_.family if os_ else "Other"
        dvce_type = _device_type(ua, os_family, device.family if device else "Other", br_family)
        return {
            "br_name": " ".join(filter(None, (br_family, agent.major if agent else None))),
            "br_family": br_family,
            "br_version": _version(agent.major, agent.minor, agent.patch, agent.patch_minor) if agent else None,
            "os_name": " ".join(filter(None, (os_family, os_.major if os_ else None))),
            "os_family": os_family,
            "dvce_type": dvce_type,
            "dvce_ismobile": dvce_type in ("Mobile", "Tablet"),
        }

    return parse


# ------------------------------------------------------------------------------------------ IP and HMAC


@short_cache(32_768, 64)
def anonymise_ip(ip: str, octets: int, segments: int) -> str:
    """Zero the last ``octets`` of an IPv4 (``segments`` of an IPv6); anything unparsable becomes ``x``."""
    parts = ip.split(".")
    if len(parts) == 4 and all(p.isdigit() and p.isascii() and len(p) <= 3 and int(p) < 256 for p in parts):
        # Fast path for the common case: ipaddress costs ~20 us per call, this ~2 us.
        return ".".join(str(int(p)) for p in parts[:4 - octets]) + ".0" * octets if octets < 4 else "0.0.0.0"
    try:
        address = ipaddress.ip_address(_without_port(ip.strip()))
    except ValueError:
        return "x"  # never pass through something we cannot prove is not an identifier
    if address.version == 6:
        # An IPv4 address inside an IPv6 one is the client's: ::ffff:203.0.113.7 from a dual-stack
        # socket, a 6to4 (2002::/16) or a Teredo (2001::/32) tunnel. Keeping the /48 of a 6to4
        # address would keep the whole IPv4, so these are anonymised as the IPv4 they carry.
        address = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1] or address
    bits = 8 * octets if address.version == 4 else 16 * segments
    mask = (1 << address.max_prefixlen) - (1 << bits)
    kind = ipaddress.IPv4Address if address.version == 4 else ipaddress.IPv6Address
    return str(kind(int(address) & mask))


def _without_port(ip: str) -> str:
    """``203.0.113.7:51234`` and ``[2001:db8::1]:443`` (proxies add ports) without the port."""
    if ip.startswith("["):
        return ip[1:].split("]", 1)[0]
    host, sep, port = ip.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") == 0 else ip


class Pseudonymiser:
    """HMAC-SHA256 keyed from the environment: stable per value (joins still work), not reversible
    without the key, and unlike a salted hash not brute-forceable from a leaked output alone."""

    def __init__(self, key: str, cache_size: int = 32_768):
        self._key = key.encode()
        # A session repeats its ids and IP in every event: cache the pseudonyms (5x faster on a hit).
        self._cached = short_cache(cache_size, 256)(self._digest)

    def _digest(self, value: str) -> str:
        return hmac.digest(self._key, value.encode(), "sha256").hex()  # one-shot OpenSSL: 3x hmac.new

    def __call__(self, value: str) -> str:
        return self._cached(value)

    def digest(self, data: bytes) -> str:
        """The HMAC of ``data``, not cached (for values that rarely repeat)."""
        return hmac.digest(self._key, data, "sha256").hex()


# ------------------------------------------------------------------------------------------ URLs


def _query(query: str) -> dict[str, str]:
    from enrich.protocol import parse_query  # one query parser for the whole package
    return parse_query(query)


@short_cache(8192)
def split_url(url: str | None, prefix: str) -> dict:
    """``page_urlscheme``-style fields of a URL; malformed URLs yield nulls, never an exception.
    Cached because a session repeats its pages; callers copy the result, never mutate it."""
    keys = ("scheme", "host", "port", "path", "query", "fragment")
    if not url:
        return {f"{prefix}{k}": None for k in keys}
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return {f"{prefix}{k}": None for k in keys}
    return {f"{prefix}scheme": parts.scheme or None, f"{prefix}host": parts.hostname or None,
            f"{prefix}port": port, f"{prefix}path": parts.path or None,
            f"{prefix}query": parts.query or None, f"{prefix}fragment": parts.fragment or None}


_CAMPAIGN = {"utm_medium": "mkt_medium", "utm_source": "mkt_source", "utm_term": "mkt_term",
             "utm_content": "mkt_content", "utm_campaign": "mkt_campaign"}
# Ad networks' click ids, first found wins. gbraid/wbraid are Google's where iOS allows no gclid.
# fbclid is not an ad's: Facebook adds it to every outbound link (common.features does not count it).
_CLICK_IDS = {"gclid": "Google", "gbraid": "Google", "wbraid": "Google", "msclkid": "Microsoft",
              "dclid": "DoubleClick", "ttclid": "TikTok", "twclid": "Twitter", "li_fat_id": "LinkedIn",
              "yclid": "Yandex", "fbclid": "Facebook"}


@short_cache(4096)
def campaign(query: str | None) -> dict:
    """``utm_*`` of the page URL -> ``mkt_*``; known click ids -> ``mkt_clickid``/``mkt_network``."""
    out = dict.fromkeys((*_CAMPAIGN.values(), "mkt_clickid", "mkt_network"))
    if not query:
        return out
    params = _query(query)
    for name, field in _CAMPAIGN.items():
        if params.get(name):
            out[field] = params[name]
    for name, network in _CLICK_IDS.items():
        if params.get(name):
            out["mkt_clickid"], out["mkt_network"] = params[name], network
            break
    return out


# The JavaScript tracker's cross-domain linker on a link to another of the shop's domains:
# _sp=<domain_userid>.<epoch ms>, or with useExtendedCrossDomainLinker more dot-separated parts
# after them (session id, base64 user id, source id, platform, reason).
CROSS_DOMAIN = re.compile(r"(?:^|(?<=[?&]))_sp=([^&#]*)")
MAX_LINKED_ID = 128     # domain_userid's own limit
MIN_TSTAMP, MAX_TSTAMP = 0, 4_102_444_800_000     # 1970 .. 2100, in ms
MAX_STAMP_DIGITS = 16         # 2100 has 13; a few leading zeros still read


def _linker_parts(value: str) -> tuple[str, str]:
    """``<id>.<ms>[.…]`` -> (id, ms); the extended linker's further parts are dropped."""
    linked_id, _, rest = value.partition(".")
    return linked_id, rest.partition(".")[0]


def cross_domain(query: str | None) -> dict:
    """``_sp`` of the page URL's query -> ``refr_domain_userid`` (the visitor's id on the domain they
    came from) and ``refr_dvce_tstamp`` (when they clicked there), as Snowplow's enrich fills them;
    a part that does not read is null, never a bad row (it is a URL's parameter)."""
    out = {"refr_domain_userid": None, "refr_dvce_tstamp": None}
    found = CROSS_DOMAIN.search(query) if query and "_sp=" in query else None
    if found is None:
        return out
    linked_id, stamp = _linker_parts(found.group(1))
    if linked_id and len(linked_id) <= MAX_LINKED_ID:
        out["refr_domain_userid"] = linked_id
    # Read whole, and only when short: leading zeros would pass a check of the first digits alone,
    # and int() of thousands of digits raises.
    if stamp.isascii() and stamp.isdigit() and len(stamp) <= MAX_STAMP_DIGITS and MIN_TSTAMP < int(stamp) < MAX_TSTAMP:
        out["refr_dvce_tstamp"] = iso_ms(int(stamp))
    return out


def pseudonymise_cross_domain(text: str, pseudonym) -> str:
    """``_sp=<id>.<ms>[.…]`` in a URL -> ``_sp=<pseudonym of id>.<ms>``: the id is the visitor's raw
    cookie id on the other domain, and the extended linker's parts carry the user id in base64,
    which no email scan finds."""
    def replace(found: re.Match) -> str:
        linked_id, stamp = _linker_parts(found.group(1))
        return "_sp=" + ".".join(part for part in (pseudonym(linked_id) if linked_id else "", stamp) if part)
    return CROSS_DOMAIN.sub(replace, text)


_SECOND_LEVEL = {"com", "co", "org", "net", "ac", "ne", "or", "gob", "gov", "edu"}


def _country_labels(parts: list[str]) -> int:
    """How many of a host's last labels are a country's domain or .com: 2 for co.uk or com.mx, 1 for
    de or com, else 0."""
    if len(parts) >= 3 and parts[-2] in _SECOND_LEVEL and len(parts[-1]) == 2:
        return 2
    return 1 if len(parts) >= 2 and (len(parts[-1]) == 2 or parts[-1] == "com") else 0


class RefererClassifier:
    """Classify a referer by the shipped host list (enrich/referers.json): medium, source and, for
    search engines, the search term."""

    def __init__(self, path: Path = REFERERS_FILE, internal_domains: tuple[str, ...] = ()):
        data = orjson.loads(path.read_bytes())
        self.hosts: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for medium, sources in data.items():
            if medium.startswith("_"):
                continue
            for source, spec in sources.items():
                for domain in spec["domains"]:
                    self.hosts[domain.lower()] = (medium, source, tuple(spec.get("parameters", ())))
        self.internal = {d.lower() for d in internal_domains}
        # "google.*" stands for up to two labels of a country's domain (google.com.mx): one more.
        self.most_labels = max((domain.count(".") + 1 + domain.endswith(".*") for domain in self.hosts), default=0)
        self.classify = short_cache(8192)(self._classify)

    def _lookup(self, host: str):
        # Try the host and each parent domain, most labels first: "news.google.co.uk" matches
        # "google.co.uk", then the same with the country's domain as "*": "maps.google.*" before
        # "google.*". Only as long as a listed domain at most: from all 80,000 parents of a host of
        # "a." * 80,000 (a referer as big as a record allows), the joins cost 18 s of one record.
        parts = host.split(".")
        country = _country_labels(parts)
        for i in range(max(0, len(parts) - self.most_labels), len(parts) - 1):
            found = self.hosts.get(".".join(parts[i:]))
            if not found and country and i < len(parts) - country:
                found = self.hosts.get(".".join(parts[i:-country]) + ".*")
            if found:
                return found
        return None

    def _classify(self, referer: str | None, page_host: str | None) -> dict:
        out = {"refr_medium": None, "refr_source": None, "refr_term": None}
        if not referer:
            return out
        try:
            parts = urlsplit(referer)
            host = (parts.hostname or "").lower()
        except ValueError:
            return {**out, "refr_medium": "unknown"}
        if not host:
            return {**out, "refr_medium": "unknown"}
        site = host.removeprefix("www.")    # the shop with and without www. is one site
        if site == (page_host or "").lower().removeprefix("www.") or host in self.internal:
            return {**out, "refr_medium": "internal"}
        found = self._lookup(site)
        if not found:
            return {**out, "refr_medium": "unknown"}
        medium, source, term_params = found
        term = None
        if term_params and parts.query:
            params = _query(parts.query)
            term = next((params[p] for p in term_params if params.get(p)), None)
        return {"refr_medium": medium, "refr_source": source, "refr_term": term}


# ------------------------------------------------------------------------------------------ dedupe

# Parameters left out of the fingerprint, as in Snowplow's default: they differ between retries
# of the same event (send time, the collector's cookie) without making it another event.
FINGERPRINT_EXCLUDED = frozenset({"eid", "stm", "nuid", "cv"})


def fingerprint(params: dict, keyed: Pseudonymiser | None = None) -> str:
    """A digest of the event's sorted raw parameters (minus the excluded ones): equal for exact
    repeats. Keyed when pseudonymisation is on: the parameters hold user ids and the IP in clear,
    and a plain MD5 of them could be matched against guessed values without any key."""
    kept = {name: value for name, value in params.items() if name not in FINGERPRINT_EXCLUDED}
    blob = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)
    return keyed.digest(blob)[:32] if keyed else hashlib.md5(blob).hexdigest()


class Deduper:
    """Remembers (event_id, fingerprint) pairs for ``window_s``, at most ``capacity`` of them."""

    def __init__(self, capacity: int, window_s: float, clock=time.monotonic):
        self.capacity = capacity
        self.window_s = window_s
        self.clock = clock
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.dropped = 0
        self.remembered = 0         # pairs remembered so far; forget_last takes the latest back

    def seen(self, event_id: str, print_: str) -> bool:
        """True for a repeat within the window; otherwise remembers the pair and returns False."""
        if self.capacity == 0:
            return False
        now = self.clock()
        key = (event_id, print_)
        at = self._seen.get(key)
        if at is not None and now - at <= self.window_s:
            self.dropped += 1
            return True
        self._seen[key] = now
        self._seen.move_to_end(key)
        self.remembered += 1
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        # Expire from the old end; cheap because entries are in insertion (time) order.
        while self._seen:
            oldest_key, oldest_at = next(iter(self._seen.items()))
            if now - oldest_at <= self.window_s:
                break
            del self._seen[oldest_key]
        return False

    def forget_last(self, count: int) -> None:
        """Forget the ``count`` pairs remembered last: their batch was not delivered after all, and
        its events are no repeats when it is read again."""
        for _ in range(min(count, len(self._seen))):
            self._seen.popitem(last=True)


def utc_now_ms() -> int:
    return time.time_ns() // 1_000_000


class EtlClock:
    """The ``etl_tstamp`` of each raw record: the clock's millisecond, but at least one after the
    previous record of the same raw partition key (the tracker's session id: common.rawkey).
    Training folds a session's events by ``etl_tstamp``, then ``collector_tstamp``
    (batch.train_features.arrival_order), and the scorer in the order enriched: two requests of one
    session collected and enriched in the same milliseconds would otherwise be ordered by their events'
    times, which each request's device clock and send time shift. At most ``max_ahead_ms`` ahead of
    the clock: past that, a key sending more than a record per millisecond (a flood) ties again."""

    def __init__(self, max_ahead_ms: int = 1_000):
        self.max_ahead_ms = max_ahead_ms
        self.latest: dict[str, int] = {}        # the last stamp of each key, while one may tie
        self.horizon = -1                       # the latest stamp given since ``latest`` was cleared
        self.floor = -1                         # the last stamp ``later`` gave: every stamp after is later

    def stamp(self, key: str) -> int:
        now = utc_now_ms()
        if not self.horizon - self.max_ahead_ms <= now <= self.horizon:
            # Every stamp given is older than the clock (none can tie), or the clock stepped back
            # further than any bump: forget them, so that ``latest`` holds a millisecond or so of keys.
            self.latest.clear()
            self.horizon = -1
        at = max(now, self.floor + 1, min(self.latest.get(key, now - 1) + 1, now + self.max_ahead_ms))
        self.latest[key] = at
        self.horizon = max(self.horizon, at)
        return at

    def later(self, count: int) -> int:
        """The first of ``count`` consecutive stamps, each later than every stamp given before, and
        earlier than every stamp given after (for whatever key): the stamps of entries sent again."""
        first = max(utc_now_ms(), self.horizon + 1, self.floor + 1)
        self.floor = first + count - 1
        return first
