"""Enricher settings: ``CLICKSTREAM_<FIELD>`` variables or the ``[enrich]`` section of the TOML file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import (
    AwsSettings,
    ConfigError,
    require_at_most,
    require_batch_limit,
    require_non_negative,
    require_positive,
    require_renewed_in_time,
)

# Identifiers inside self-describing events and contexts that are personal data by default:
# the browser tracker's client_session carries the domain user id; mobile contexts carry ad and
# device ids; form tracking carries what people type (names, emails), autofilled values included;
# the shop's purchase carries the order id (as tr_orderid does, pipeline.PSEUDONYMISED_FIELDS), and
# so do the snowplow-ecommerce plugins' transaction and refund entities; their user entity carries the
# shop's user id and email, and their checkout step the addresses and a receipt number.
MIN_KEY_CHARS = 16         # HMAC keys: `openssl rand -hex 32` gives 64

DEFAULT_PII_FIELDS = (
    "com.snowplowanalytics.snowplow/client_session:userId",
    "com.snowplowanalytics.snowplow/submit_form:elements[*].value",
    "com.snowplowanalytics.snowplow/change_form:value",
    "com.snowplowanalytics.snowplow/focus_form:value",
    "com.snowplowanalytics.snowplow/mobile_context:openIdfa",
    "com.snowplowanalytics.snowplow/mobile_context:appleIdfa",
    "com.snowplowanalytics.snowplow/mobile_context:appleIdfv",
    "com.snowplowanalytics.snowplow/mobile_context:androidIdfa",
    "com.snowplowanalytics.snowplow/mobile_context:appSetId",
    "com.clickshop/purchase:order_id",
    "com.snowplowanalytics.snowplow.ecommerce/user:id",
    "com.snowplowanalytics.snowplow.ecommerce/user:email",
    "com.snowplowanalytics.snowplow.ecommerce/transaction:transaction_id",
    "com.snowplowanalytics.snowplow.ecommerce/refund:transaction_id",
    "com.snowplowanalytics.snowplow.ecommerce/checkout_step:shipping_postcode",
    "com.snowplowanalytics.snowplow.ecommerce/checkout_step:billing_postcode",
    "com.snowplowanalytics.snowplow.ecommerce/checkout_step:shipping_full_address",
    "com.snowplowanalytics.snowplow.ecommerce/checkout_step:billing_full_address",
    "com.snowplowanalytics.snowplow.ecommerce/checkout_step:proof_of_payment",
)
# URLs and link texts inside Snowplow's own events and contexts, scanned for email addresses as the
# atomic URL fields are (pipeline.EMAIL_SCANNED_FIELDS): a newsletter's tracked link (/r/tp2?u=…?email=),
# a mailto: link click, an ad's or a deep link's target, a site search for one's own address.
EMAIL_SCANNED_ENTITY_FIELDS = (
    "com.snowplowanalytics.snowplow/uri_redirect:uri",
    "com.snowplowanalytics.snowplow/link_click:targetUrl",
    "com.snowplowanalytics.snowplow/link_click:elementContent",
    "com.snowplowanalytics.snowplow/ad_click:targetUrl",
    "com.snowplowanalytics.snowplow/ad_impression:targetUrl",
    "com.snowplowanalytics.snowplow/social_interaction:target",
    "com.snowplowanalytics.snowplow/site_search:terms[*]",
    "com.snowplowanalytics.mobile/deep_link:url",
    "com.snowplowanalytics.mobile/deep_link:referrer",
    "com.snowplowanalytics.mobile/deep_link_received:url",
    "com.snowplowanalytics.mobile/deep_link_received:referrer",
)
# A device's GPS fix (Snowplow's geolocation_context, any version): latitude and longitude are rounded
# to `geolocation_decimals`; the fields that refine a rounded position (the fix's accuracy radius, the
# altitude that picks out a slope or a floor, and its accuracy) are nulled (nullable in every version).
# Bearing, speed and the fix's time stay: they describe motion, not where someone lives.
GEOLOCATION_ROUNDED = (
    "com.snowplowanalytics.snowplow/geolocation_context:latitude",
    "com.snowplowanalytics.snowplow/geolocation_context:longitude",
)
GEOLOCATION_WITHHELD = (
    "com.snowplowanalytics.snowplow/geolocation_context:latitudeLongitudeAccuracy",
    "com.snowplowanalytics.snowplow/geolocation_context:altitude",
    "com.snowplowanalytics.snowplow/geolocation_context:altitudeAccuracy",
)


def parse_pii_field(entry: str) -> tuple[str, str, tuple[str, ...]]:
    """``vendor/name:path`` -> (vendor, name, the path's steps, ``*`` for every item); raises
    ValueError for anything else. Any schema version matches, so a version in the entry is ignored."""
    schema, _, path = entry.partition(":")
    vendor, _, name = schema.partition("/")
    name = name.split("/")[0]
    steps = path.removeprefix("$").removeprefix(".").replace("[*]", ".*").split(".")
    if not vendor or not name or not any(steps) or any("$" in step or "[" in step for step in steps):
        raise ValueError(f"expected vendor/name:path, got {entry!r}")
    return vendor, name, tuple(step for step in steps if step)


@dataclasses.dataclass(frozen=True)
class EnrichSettings(AwsSettings):
    # Registries in priority order: "embedded", a folder path, or an http(s) base URL.
    registries: tuple[str, ...] = ("embedded",)
    registry_cache_ttl_s: float = 600.0
    registry_miss_ttl_s: float = 60.0       # a schema no registry had: asked for again after this (at most the above)
    pseudonymisation: bool = True
    pseudonymisation_key: str = ""
    # "vendor/name:dotted.path" entries, matched on any version of the schema: added to
    # DEFAULT_PII_FIELDS, which always apply (a list replacing them would put them in clear).
    pii_fields: tuple[str, ...] = ()
    ip_anon_octets: int = 1            # IPv4 octets zeroed from the right (0-4)
    ip_anon_segments: int = 5          # IPv6 16-bit segments zeroed from the right (0-8)
    geolocation_coarsening: bool = True
    # 1 decimal is ~11 km: the town an IP's /24 already reveals; 2 (~1 km) can single out a rural home.
    geolocation_decimals: int = 1      # decimals of latitude/longitude kept (0-6)
    # A collector_tstamp further ahead of the enricher's clock makes the event a bad row: one would move
    # the scorer's event-time watermark forward and end every live session of its shard. Five minutes:
    # well below the scorer's 30-minute session timeout, well above NTP skew between hosts (under a second).
    max_collector_ahead_s: float = 300.0
    internal_domains: tuple[str, ...] = ()
    dedupe_entries: int = 200_000      # bounded memory: oldest (event_id, fingerprint) pairs forgotten first
    dedupe_window_s: float = 600.0
    ua_cache_size: int = 20_000
    max_event_bytes: int = 1_000_000   # an enriched event larger than this becomes a size_violation
    batch_limit: int = 500
    read_interval_s: float = 0.25      # per shard; Kinesis allows 5 GetRecords/s per shard
    lease_ms: int = 10_000
    # PutRecords connect/read timeout of the enriched and bad streams; raised to 2 and 3 times this while
    # a stream answers slowly (common.producer.output_producer)
    output_timeout_s: float = 10.0
    metrics_port: int = 0              # Prometheus /metrics; 0 = off
    metrics_host: str = "127.0.0.1"    # 0.0.0.0 in a container, so the scraper can reach it
    log_level: str = "INFO"

    def validate(self) -> None:
        require_positive(self, "registry_cache_ttl_s", "registry_miss_ttl_s", "dedupe_window_s", "ua_cache_size", "max_event_bytes",
                         "lease_ms", "read_interval_s", "max_collector_ahead_s", "output_timeout_s")
        require_renewed_in_time(self, "lease_ms", "read_interval_s")
        require_batch_limit(self, "batch_limit")
        require_at_most(self, "ua_cache_size", 10_000_000, "user agents parsed and kept in memory")
        if self.pseudonymisation and not self.pseudonymisation_key:
            raise ConfigError("CLICKSTREAM_PSEUDONYMISATION_KEY: required while pseudonymisation is on "
                              "(set a secret key, or CLICKSTREAM_PSEUDONYMISATION=false to turn it off)")
        if self.pseudonymisation and len(self.pseudonymisation_key) < MIN_KEY_CHARS:
            # A short key can be found by trying keys on one known address and its pseudonym, and with
            # it every pseudonym can be matched against guessed addresses.
            raise ConfigError(f"CLICKSTREAM_PSEUDONYMISATION_KEY: at least {MIN_KEY_CHARS} characters, got "
                              f"{len(self.pseudonymisation_key)} (generate one with `openssl rand -hex 32`)")
        if not 0 <= self.ip_anon_octets <= 4:
            raise ConfigError(f"CLICKSTREAM_IP_ANON_OCTETS: expected 0-4, got {self.ip_anon_octets}")
        if not 0 <= self.ip_anon_segments <= 8:
            raise ConfigError(f"CLICKSTREAM_IP_ANON_SEGMENTS: expected 0-8, got {self.ip_anon_segments}")
        if not 0 <= self.geolocation_decimals <= 6:
            raise ConfigError(f"CLICKSTREAM_GEOLOCATION_DECIMALS: expected 0-6, got {self.geolocation_decimals}")
        require_non_negative(self, "dedupe_entries")
        for entry in self.pii_fields:
            try:
                parse_pii_field(entry)
            except ValueError:
                raise ConfigError(f"CLICKSTREAM_PII_FIELDS: expected vendor/name:path entries, got {entry!r}") from None
        if not self.registries:
            raise ConfigError("CLICKSTREAM_REGISTRIES: at least one registry is needed (e.g. embedded)")
        for spec in self.registries:
            # Anything but `embedded` or a URL is a folder: a typo would otherwise make every event bad.
            if spec != "embedded" and "://" not in spec and not Path(spec).is_dir():
                raise ConfigError(f"CLICKSTREAM_REGISTRIES: {spec!r} is neither `embedded`, an http(s) URL "
                                  "nor an existing folder")
            if "://" in spec and not spec.lower().startswith(("http://", "https://")):
                raise ConfigError(f"CLICKSTREAM_REGISTRIES: {spec!r}: only http(s) registries are supported")
