"""The enricher's pure logic: ``Enricher(settings, resolver).process(raw_bytes) -> (good, bad)``.

No AWS here, so the worker, the tests and the benchmarks all run the same code.
Each event goes through: protocol checks -> typed fields -> schema validation of its self-describing
event and contexts -> enrichments -> pseudonymisation, GPS coarsening -> size check -> dedupe. Any failure turns that
one event into a bad row; nothing escapes as an exception (a last-resort guard turns an unexpected
error into an ``enrichment_failures`` row, or for the record as a whole a
``collector_payload_format_violation`` row, so one poison record cannot stall a shard).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Callable

import fastjsonschema
import orjson

from common import emails, jsonbytes
from common.features import NIL_USER, request_order, session_key
from common.logs import first_few
from common.rawkey import record_key
from enrich import __version__, badrows, protocol
from enrich.config import (
    DEFAULT_PII_FIELDS,
    EMAIL_SCANNED_ENTITY_FIELDS,
    GEOLOCATION_ROUNDED,
    GEOLOCATION_WITHHELD,
    EnrichSettings,
    parse_pii_field,
)
from enrich.enrichments import (
    MAX_TSTAMP,
    MIN_TSTAMP,
    Deduper,
    EtlClock,
    Pseudonymiser,
    RefererClassifier,
    anonymise_ip,
    campaign,
    cross_domain,
    derived_tstamp,
    fingerprint,
    ipad_as_mac,
    iso_ms,
    make_ua_parser,
    pseudonymise_cross_domain,
    split_url,
)
from enrich.registry import Resolver, SchemaKey, SchemaKeyError

log = logging.getLogger(__name__)

V_ETL = f"clickstream-enrich-{__version__}"
EVENT_TYPES = {"pv": "page_view", "pp": "page_ping", "se": "struct", "ev": "struct", "ue": "unstruct",
               "tr": "transaction", "ti": "transaction_item"}
SNOWPLOW = "com.snowplowanalytics.snowplow"
# event_vendor/event_name of built-in events, as Snowplow's enrich names them (structured events
# keep the Google Analytics vendor they came from).
BUILTIN_NAMES = {"page_view": (SNOWPLOW, "page_view"), "page_ping": (SNOWPLOW, "page_ping"),
                 "struct": ("com.google.analytics", "event"), "transaction": (SNOWPLOW, "transaction"),
                 "transaction_item": (SNOWPLOW, "transaction_item")}
CONTEXTS_KEYS = {"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
                 "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"}
UNSTRUCT_KEY = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
# Plain string parameters -> canonical names.
STRINGS = {"aid": "app_id", "p": "platform", "tv": "v_tracker", "tna": "name_tracker", "sid": "domain_sessionid",
           "url": "page_url", "page": "page_title", "refr": "page_referrer", "lang": "br_lang", "tz": "os_timezone",
           "cs": "doc_charset", "cd": "br_colordepth", "se_ca": "se_category", "se_ac": "se_action",
           "se_la": "se_label", "se_pr": "se_property", "tr_id": "tr_orderid", "tr_af": "tr_affiliation",
           "tr_ci": "tr_city", "tr_st": "tr_state", "tr_co": "tr_country", "tr_cu": "tr_currency",
           "ti_id": "ti_orderid", "ti_sk": "ti_sku", "ti_nm": "ti_name", "ti_ca": "ti_category",
           "ti_cu": "ti_currency",
           # Legacy structured events (e=ev) name their fields ev_*.
           "ev_ca": "se_category", "ev_ac": "se_action", "ev_la": "se_label", "ev_pr": "se_property"}
FLOATS = {"se_va": "se_value", "ev_va": "se_value", "tr_tt": "tr_total", "tr_tx": "tr_tax", "tr_sh": "tr_shipping", "ti_pr": "ti_price"}
INTS = {"vid": "domain_sessionidx", "ti_qu": "ti_quantity", "pp_mix": "pp_xoffset_min", "pp_max": "pp_xoffset_max",
        "pp_miy": "pp_yoffset_min", "pp_may": "pp_yoffset_max"}
DIMENSIONS = {"res": ("dvce_screenwidth", "dvce_screenheight"), "vp": ("br_viewwidth", "br_viewheight"),
              "ds": ("doc_width", "doc_height")}
TIMESTAMPS = {"dtm": "dvce_created_tstamp", "stm": "dvce_sent_tstamp", "ttm": "true_tstamp"}
# Atomic fields that identify a person, or lead to one: an order id joins to a named customer in
# the shop's own database, so it is as personal as the customer id.
PSEUDONYMISED_FIELDS = ("user_id", "domain_userid", "refr_domain_userid", "user_ipaddress", "user_fingerprint",
                        "mac_address", "tr_orderid", "ti_orderid")
# Where the cross-domain linker's _sp=<domain_userid>... can be: the landing page, and the next
# page's referrer.
CROSS_DOMAIN_FIELDS = ("page_url", "page_urlquery", "page_referrer", "refr_urlquery")
# URL and free-text fields where a site or a mail campaign may put an email address (`?email=`, a
# newsletter's utm_term, a path /users/alice@…, a title): with pseudonymisation on, every address in
# them becomes its pseudonym, as user_id does. So do Snowplow's own URL fields in events and contexts
# (config.EMAIL_SCANNED_ENTITY_FIELDS); other free text in contexts is not scanned (docs/data-protection.md).
EMAIL_SCANNED_FIELDS = ("page_url", "page_urlpath", "page_urlquery", "page_urlfragment", "page_title",
                        "page_referrer", "refr_urlpath", "refr_urlquery", "refr_urlfragment", "refr_term",
                        "mkt_term", "mkt_content", "mkt_campaign", "mkt_source", "mkt_medium", "se_label",
                        "se_property")
# Identifier lengths of Snowplow's atomic event: these fields key streams (Kinesis partition keys
# stop at 256 characters) and tables, so a longer value is a bad row, not a stalled shard.
CLIENT_SESSION = "iglu:com.snowplowanalytics.snowplow/client_session/"
ID_LIMITS = {"domain_sessionid": 128, "domain_userid": 128, "network_userid": 128, "user_id": 255}
FEATURES = {"f_pdf": "br_features_pdf", "f_qt": "br_features_quicktime", "f_realp": "br_features_realplayer",
            "f_wma": "br_features_windowsmedia", "f_dir": "br_features_director", "f_fla": "br_features_flash",
            "f_java": "br_features_java", "f_gears": "br_features_gears", "f_ag": "br_features_silverlight",
            "cookie": "br_cookies"}
FLAG, DIMS = object(), object()
KINDS = {**{name: (str, canonical) for name, canonical in STRINGS.items()},
         **{name: (float, canonical) for name, canonical in FLOATS.items()},
         **{name: (int, canonical) for name, canonical in INTS.items()},
         **{name: (DIMS, pair) for name, pair in DIMENSIONS.items()},
         **{name: (FLAG, canonical) for name, canonical in FEATURES.items()},
         **{name: (int, None) for name in TIMESTAMPS}}
# Every typed field, null unless the tracker sent it: copied per event, faster than building it.
TEMPLATE = dict.fromkeys([*STRINGS.values(), *FLOATS.values(), *INTS.values(),
                          *(f for pair in DIMENSIONS.values() for f in pair), *FEATURES.values()])
TSTAMP_RANGE = "epoch milliseconds between 1970 and 2100"
INT_LIMIT = 2_147_483_647
# A bad row per failed event repeats its record's fields (headers above all): 500,000 one-byte events
# failing in a 1 MB record would make gigabytes, and kill the enricher on it at every restart. Past
# this many bytes of a record's bad rows, its remaining failed events share one row.
BAD_ROW_BYTES_PER_RECORD = 4_000_000
# Those events' row carries its record as text, and so each event escaped twice: a quote doubles
# twice. This many bytes of events a row keep it, headers and all, within Kinesis' 1 MiB.
HELD_BACK_EVENT_BYTES = 150_000
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def derived_event_id(record_digest: Callable[[], str], index: int) -> str:
    """The id of the ``index``-th event of a raw record that sent no ``eid`` (old pixel trackers,
    webhooks): derived from the record's digest, not random, so a re-read record gives the same ids
    and consumers' dedupe by ``event_id`` still holds."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{record_digest()}:{index}"))


class EventFailure(Exception):
    def __init__(self, kind: str, messages: list[dict]):
        super().__init__(kind)
        self.kind = kind
        self.messages = messages


def _pii_paths(entries: tuple[str, ...]) -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """The paths to protect per schema, each value under one path only: a path listed twice (or spelt
    two ways), or inside another (`elements[*].value` inside `elements`), would pseudonymise a
    pseudonym, which matches the identifier nowhere else (an erasure would miss it)."""
    paths: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for entry in entries:
        vendor, name, steps = parse_pii_field(entry)
        paths.setdefault((vendor, name), []).append(steps)
    return {key: [path for index, path in enumerate(found)
                  if not any(_covers(other, path) and (other != path or earlier < index)
                             for earlier, other in enumerate(found))]
            for key, found in paths.items()}


def _covers(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether every value at ``inner`` lies at or under ``outer`` (``*`` matching any one step)."""
    return len(outer) <= len(inner) and all(a == b or a == "*" for a, b in zip(outer, inner, strict=False))


Rules = dict[tuple[str, str], list[tuple[tuple[str, ...], Callable[[object], object]]]]


def _entity_rules(settings: EnrichSettings, hmac: Pseudonymiser | None) -> Rules:
    """(vendor, name) -> the (path, transform) pairs for its events and contexts. Geolocation comes
    first, so a position also listed in pii_fields is rounded before it is pseudonymised."""
    rules: Rules = {}

    def add(entries: tuple[str, ...], transform: Callable[[object], object]) -> None:
        for key, paths in _pii_paths(entries).items():
            rules.setdefault(key, []).extend((path, transform) for path in paths)

    if settings.geolocation_coarsening:
        add(GEOLOCATION_ROUNDED, functools.partial(_rounded, decimals=settings.geolocation_decimals))
        add(GEOLOCATION_WITHHELD, _withheld)
    if hmac is not None:
        add(EMAIL_SCANNED_ENTITY_FIELDS, functools.partial(_emails_pseudonymised, hmac=hmac))
        add(DEFAULT_PII_FIELDS + settings.pii_fields, functools.partial(_pseudonym, hmac=hmac))
    return rules


def collector_tstamp_errors(collector: int, etl_ms: int, max_ahead_ms: int) -> list[dict]:
    """The collector's timestamp gets the device timestamps' range, and may not be ahead of the
    enricher's clock by more than ``max_ahead_ms``: the scorer's event-time watermark would jump to it."""
    if not MIN_TSTAMP < collector < MAX_TSTAMP:
        return [badrows.message("collector_tstamp", collector, TSTAMP_RANGE)]
    if collector - etl_ms > max_ahead_ms:
        return [badrows.message("collector_tstamp", collector, (
            f"at most {max_ahead_ms / 1000:g} s ahead of the enricher's clock (etl_tstamp {iso_ms(etl_ms)}), "
            f"got {iso_ms(collector)}, {(collector - etl_ms) / 1000:g} s ahead"))]
    return []


def _held_back_bytes(hit: protocol.Hit, index: int) -> int | None:
    """What a failed event adds to a held-back record, or None when orjson cannot write it there."""
    try:
        alone = protocol.events_body(hit, [index])
    except orjson.JSONEncodeError:
        return None
    return len(alone or "") - len(protocol.events_body(hit, []) or "") + 1      # its body, less the envelope


def _held_back_rows(hit: protocol.Hit, held_back: list[tuple[int, int]]) -> list[dict]:
    """Rows for the failed events past the record's bad-row budget, as few as fit in a Kinesis record
    each: a record of just those events, which replay enriches again (each then gets its own row, or
    goes through once fixed)."""
    chunks, chunk, size = [], [], 0
    for index, event_bytes in held_back:
        if chunk and size + event_bytes > HELD_BACK_EVENT_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(index)
        size += event_bytes
    chunks.append(chunk)
    return [badrows.format_violation(
        orjson.dumps(protocol.events_record(hit, indices)),
        f"{len(indices)} of the {len(held_back)} event(s) of this record that failed after its bad rows reached "
        f"{BAD_ROW_BYTES_PER_RECORD:,} bytes (index {first_few(indices, 20)}); this row holds them as one record, "
        "replayable") for indices in chunks]


class Enricher:
    def __init__(self, settings: EnrichSettings, resolver: Resolver | None = None):
        self.settings = settings
        self.resolver = resolver or Resolver.from_specs(settings.registries, ttl=settings.registry_cache_ttl_s,
                                                          miss_ttl=settings.registry_miss_ttl_s)
        self.hmac = Pseudonymiser(settings.pseudonymisation_key) if settings.pseudonymisation else None
        self.entity_rules = _entity_rules(settings, self.hmac)
        self.max_collector_ahead_ms = int(settings.max_collector_ahead_s * 1000)
        self.ua = make_ua_parser(settings.ua_cache_size)
        self.referers = RefererClassifier(internal_domains=settings.internal_domains)
        self.deduper = Deduper(settings.dedupe_entries, settings.dedupe_window_s)
        self.etl_clock = EtlClock()

    # ------------------------------------------------------------------ records

    def process(self, raw: bytes) -> tuple[list[tuple[str, dict]], list[dict]]:
        """Good events as (partition key, event) and bad rows, for one raw record."""
        good, bad = self._process(raw)
        return [(key, event) for key, event, _ in good], bad

    def process_serialized(self, raw: bytes) -> tuple[list[tuple[str, bytes]], list[dict]]:
        """As ``process``, with each good event already serialized (the size check had to anyway)."""
        good, bad = self._process(raw)
        return [(key, data) for key, _, data in good], bad

    def restamp(self, entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Good events to send again, each with a new ``etl_tstamp``: later than every stamp given
        before, and in each session (partition key) in the order of ``entries``, a request's events
        sharing one. PutRecords writes a call's entries one by one, and the stream may refuse some
        (throttled) and take later ones of their session: sent again, they land after those, which
        is the order the scorer folds them in and training must (batch.train_features.arrival_order)."""
        events = [(key, orjson.loads(data)) for key, data in entries]
        offsets, requests = [], {}
        for key, event in events:
            request = (event["etl_tstamp"], event["collector_tstamp"])
            previous, offset = requests.get(key, (None, -1))
            offset += request != previous
            requests[key] = (request, offset)
            offsets.append(offset)
        first = self.etl_clock.later(max(offsets, default=-1) + 1)
        for (_, event), offset in zip(events, offsets):
            event["etl_tstamp"] = iso_ms(first + offset)
        return [(key, jsonbytes.dumps(event)) for key, event in events]

    def _process(self, raw: bytes) -> tuple[list[tuple[str, dict, bytes]], list[dict]]:
        try:
            record = protocol.parse_record(raw)
            hit = protocol.split(record)
        except protocol.RecordError as exc:
            return [], [_writable(exc.row, raw)]
        except Exception as exc:  # a bug must cost one bad row, not a stalled shard (the raw record kept)
            log.exception("unexpected error reading a raw record")
            return [], [badrows.format_violation(raw, f"unexpected error: {type(exc).__name__}: {exc}")]
        good, bad, unwritable, held_back = [], [], [], []
        bad_bytes = 0
        etl_ms = self.etl_clock.stamp(record_key(record))
        etl_tstamp = iso_ms(etl_ms)
        # Once per record: its events share the collector's timestamp, and its digest (hashing the
        # record per event took seconds for a webhook list of thousands of events without ids).
        collector_errors = collector_tstamp_errors(record["collector_tstamp"], etl_ms, self.max_collector_ahead_ms)
        record_digest = functools.cache(lambda: hashlib.sha1(raw).hexdigest())
        for index in range(len(hit.events)):
            try:
                found = self._event(hit, index, etl_tstamp, collector_errors,
                                    functools.partial(derived_event_id, record_digest, index))
            except EventFailure as exc:
                failure = exc
            except Exception as exc:  # a bug must cost one bad row, not a stalled shard
                log.exception("unexpected error enriching an event")
                failure = EventFailure("enrichment_failures", [
                    {"enrichment": None, "message": {"error": f"{type(exc).__name__}: {exc}"[:512]}}])
            else:
                if found is not None:
                    event, data = found
                    # The scorer's session key: a session's events stay in order on one shard.
                    good.append((session_key(event), event, data))
                continue
            if bad_bytes <= BAD_ROW_BYTES_PER_RECORD:
                bad_bytes += self._add_bad_row(bad, unwritable, index, failure, hit)
            elif (event_bytes := _held_back_bytes(hit, index)) is None:
                unwritable.append(f"{index} ({failure.kind})")
            else:
                held_back.append((index, event_bytes))
        if unwritable:
            # One row for all of them, each copy of the record would repeat it (and its good events on replay).
            bad.append(badrows.format_violation(raw, f"event(s) {', '.join(unwritable)} failed and their bad rows "
                                                     "cannot be written as JSON (nested over 254 levels)"))
        if held_back:
            bad.extend(_held_back_rows(hit, held_back))
        if len(good) > 1:
            # The order training folds them in: the lake keeps no trace of the request's own, and a
            # tracker queues events fired in one handler in one millisecond, or a later-stamped one first.
            good.sort(key=lambda item: request_order(item[1]))
        return good, bad

    def _add_bad_row(self, bad: list[dict], unwritable: list[str], index: int, failure: EventFailure,
                     hit: protocol.Hit) -> int:
        """The event's bad row, and its size, or, when that row cannot be written as JSON, note it for
        one row that keeps the whole raw record: orjson reads 1,024 levels of nesting but writes only
        254, and a row raising later would stop the enricher on that record at every restart."""
        try:
            row = self._bad_row(failure, hit, index)
            size = len(orjson.dumps(row))
        except orjson.JSONEncodeError:
            unwritable.append(f"{index} ({failure.kind})")
            return 0
        bad.append(row)
        return size

    def _bad_row(self, failure: EventFailure, hit: protocol.Hit, index: int) -> dict:
        record, params = protocol.events_record(hit, [index]), hit.params(index)
        parameters = params if isinstance(params, dict) else {"_": params}
        if failure.kind == "tracker_protocol_violations":
            return badrows.protocol_violation(record, failure.messages, parameters)
        if failure.kind == "schema_violations":
            return badrows.schema_violation(record, parameters, failure.messages)
        if failure.kind == "size_violation":
            return failure.messages[0]
        return badrows.enrichment_failure(record, parameters, failure.messages)

    # ------------------------------------------------------------------ one event

    def _event(self, hit: protocol.Hit, index: int, etl_tstamp: str, collector_errors: list[dict],
               fallback_id) -> tuple[dict, bytes] | None:
        params = hit.params(index)
        problems = protocol.check_event(hit, index, params, self.resolver)
        kind = params.get("e") if isinstance(params, dict) else None
        event_type = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
        if not problems and event_type is None:
            problems = [badrows.message("e", params.get("e"), f"one of {', '.join(EVENT_TYPES)}")]
        if problems:
            raise EventFailure("tracker_protocol_violations", problems)
        record = hit.record
        event = self._typed(params, record, collector_errors, fallback_id)
        event["event"] = event_type
        event["etl_tstamp"] = etl_tstamp
        self._self_describing(params, event, event_type)
        _session_from_context(event)
        self._enrich(event)
        if self.hmac is not None:
            self._pseudonymise(event)
        self._protect_entities(event)
        too_long = [badrows.message(name, event[name], f"at most {limit} characters")
                    for name, limit in ID_LIMITS.items() if event[name] is not None and len(event[name]) > limit]
        if too_long:
            raise EventFailure("enrichment_failures", [{"enrichment": None, "message": m} for m in too_long])
        event["event_fingerprint"] = fingerprint(params, self.hmac)
        data = jsonbytes.dumps(event)
        size = len(data)
        if size > self.settings.max_event_bytes:
            raise EventFailure("size_violation", [badrows.size_violation(
                orjson.dumps(protocol.events_record(hit, [index])), self.settings.max_event_bytes,
                f"an enriched event of at most {self.settings.max_event_bytes} bytes, got {size}")])
        if self.deduper.seen(event["event_id"], event["event_fingerprint"]):
            return None
        return event, data

    def _typed(self, params: dict, record: dict, collector_errors: list[dict], fallback_id) -> dict:
        """Canonical fields with typed values; every malformed value is reported, not just the first."""
        errors = [*collector_errors]
        event, stamps = _parse_params(params, errors)
        if event["ti_name"] is None and params.get("ti_na"):
            event["ti_name"] = params["ti_na"]   # ti_na: older trackers' name for the item name
        event_id = params.get("eid") or fallback_id()
        if not _is_uuid(event_id):
            errors.append(badrows.message("eid", event_id, "a UUID"))
        if errors:
            raise EventFailure("enrichment_failures", [{"enrichment": None, "message": m} for m in errors])
        collector = record["collector_tstamp"]
        event.update({
            "event_id": event_id.lower(),
            "collector_tstamp": iso_ms(collector),
            "dvce_created_tstamp": _iso(stamps["dtm"]),
            "dvce_sent_tstamp": _iso(stamps["stm"]),
            "true_tstamp": _iso(stamps["ttm"]),
            "derived_tstamp": iso_ms(derived_tstamp(collector, stamps["dtm"], stamps["stm"], stamps["ttm"])),
            "v_collector": record.get("collector"),
            "v_etl": V_ETL,
            "user_id": params.get("uid") or None,
            "domain_userid": params.get("duid") or None,
            # A tracker may set the network id itself (tnuid/nuid), e.g. server-side trackers.
            "network_userid": params.get("tnuid") or record.get("network_userid") or params.get("nuid") or None,
            # A server-side tracker passing on X-Forwarded-For sends a list: the client's comes first.
            "user_ipaddress": params.get("ip", "").split(",", 1)[0].strip() or record.get("ip") or None,
            "user_fingerprint": params.get("fp") or None,
            "mac_address": params.get("mac") or None,
            "useragent": params.get("ua") or record.get("useragent") or None,
        })
        if event["page_url"] is None and record.get("referer"):
            event["page_url"] = record["referer"]   # pixel hits without url=: the page is the referer
        return event

    def _self_describing(self, params: dict, event: dict, event_type: str) -> None:
        """Decode, resolve and validate ``ue_*`` and ``co``/``cx``; all failures reported together."""
        messages: list[dict] = []
        protocol_errors: list[dict] = []
        contexts, error = protocol.decode_json(params, "co", "cx")
        if error:
            protocol_errors.append(error)
        unstruct = None
        if event_type == "unstruct":
            unstruct, error = protocol.decode_json(params, "ue_pr", "ue_px")
            if error:
                protocol_errors.append(error)
            elif unstruct is None:
                protocol_errors.append(badrows.message("ue_pr", None, "a self-describing event (ue_pr or ue_px)"))
        if protocol_errors:
            raise EventFailure("tracker_protocol_violations", protocol_errors)
        event["contexts"] = self._contexts(contexts, messages)
        event["derived_contexts"] = []
        event["unstruct_event"] = self._unstruct(unstruct, messages) if event_type == "unstruct" else None
        if messages:
            raise EventFailure("schema_violations", messages)
        if event["unstruct_event"] is not None:
            key = SchemaKey.parse(event["unstruct_event"]["schema"])
            event.update(event_vendor=key.vendor, event_name=key.name, event_format=key.format,
                         event_version=key.version)
        else:
            vendor, name = BUILTIN_NAMES[event_type]
            event.update(event_vendor=vendor, event_name=name, event_format="jsonschema", event_version="1-0-0")

    def _contexts(self, envelope: object, messages: list[dict]) -> list[dict]:
        if envelope is None:
            return []
        entries = self._envelope(envelope, CONTEXTS_KEYS, messages)
        if entries is None:
            return []
        if not isinstance(entries, list):
            return []
        for entry in entries:
            self._check(entry, messages)
        return entries

    def _unstruct(self, envelope: object, messages: list[dict]) -> dict | None:
        inner = self._envelope(envelope, {UNSTRUCT_KEY}, messages)
        if inner is not None:
            self._check(inner, messages)
        return inner

    def _envelope(self, envelope: object, allowed: set[str], messages: list[dict]):
        """Validate the outer self-describing wrapper (contexts or unstruct_event) and return its data."""
        if not isinstance(envelope, dict) or "schema" not in envelope or "data" not in envelope:
            messages.append(_not_iglu(envelope, "INVALID_DATA_PAYLOAD"))
            return None
        if not isinstance(envelope["schema"], str):
            messages.append(_not_iglu(envelope, "INVALID_IGLUURI"))
            return None
        if envelope["schema"] not in allowed:
            # Snowplow's criterion form: iglu:vendor/name/jsonschema/1-0-*
            criterion = min(allowed).rsplit("-", 1)[0] + "-*"
            messages.append({"schemaKey": envelope["schema"], "schemaCriterion": criterion})
            return None
        before = len(messages)
        self._check(envelope, messages)
        return envelope["data"] if len(messages) == before else None

    def _check(self, sdj: object, messages: list[dict]) -> None:
        if not isinstance(sdj, dict) or set(sdj) != {"schema", "data"}:
            messages.append(_not_iglu(sdj, "INVALID_DATA_PAYLOAD"))
            return
        try:
            resolved = self.resolver.lookup(sdj["schema"])
        except SchemaKeyError:
            messages.append(_not_iglu(sdj["schema"], "INVALID_IGLUURI"))
            return
        if resolved.validate is None:
            messages.append({"schemaKey": sdj["schema"],
                             "error": {"error": "ResolutionError", "lookupHistory": resolved.history}})
            return
        try:
            resolved.validate(sdj["data"])
        except fastjsonschema.JsonSchemaValueException as exc:
            messages.append({"schemaKey": sdj["schema"], "error": {"error": "ValidationError", "dataReports": [
                {"message": exc.message, "path": _json_path(exc.path),
                 "keyword": exc.rule, "targets": []}]}})

    def _enrich(self, event: dict) -> None:
        if event["useragent"]:
            event.update(self.ua(event["useragent"]))
        else:
            event.update(br_name=None, br_family=None, br_version=None, os_name=None, os_family=None,
                         dvce_type="Unknown", dvce_ismobile=False)
        if event["platform"] == "mob" and event["dvce_type"] == "Unknown":
            # A mobile app's HTTP client names itself ("snowplow/andr-6.0.0 android/14"), not a browser.
            event.update(dvce_type="Mobile", dvce_ismobile=True)
        elif event["dvce_type"] == "Computer" and \
                ipad_as_mac(event["os_family"], event["dvce_screenwidth"], event["dvce_screenheight"]):
            event.update(dvce_type="Tablet", dvce_ismobile=True)
        event.update(split_url(event["page_url"], "page_url"))
        event.update(split_url(event["page_referrer"], "refr_url"))
        event.update(campaign(event["page_urlquery"]))
        event.update(cross_domain(event["page_urlquery"]))
        event.update(self.referers.classify(event["page_referrer"], event["page_urlhost"]))
        ip = event["user_ipaddress"]
        if ip:
            event["user_ipaddress"] = anonymise_ip(ip, self.settings.ip_anon_octets, self.settings.ip_anon_segments)

    def _pseudonymise(self, event: dict) -> None:
        hmac = self.hmac
        for name in PSEUDONYMISED_FIELDS:
            if event[name]:
                event[name] = hmac(event[name])
        # The nil id of SP-Anonymous requests identifies nobody; keep it so it stays recognisable.
        if event["network_userid"] and event["network_userid"] != NIL_USER:
            event["network_userid"] = hmac(event["network_userid"])
        for name in EMAIL_SCANNED_FIELDS:
            if event[name]:
                event[name] = emails.replace(event[name], hmac)
        for name in CROSS_DOMAIN_FIELDS:
            if event[name] and "_sp=" in event[name]:
                event[name] = pseudonymise_cross_domain(event[name], hmac)

    def _protect_entities(self, event: dict) -> None:
        """Pseudonymise the pii_fields and coarsen geolocation in the self-describing event and contexts;
        only entities whose schema has a rule are touched."""
        if not self.entity_rules:
            return
        for sdj in (event["unstruct_event"], *event["contexts"]):
            if not sdj:
                continue
            key = sdj["schema"].removeprefix("iglu:").split("/")
            for path, transform in self.entity_rules.get((key[0], key[1]), ()):
                _replace_at(sdj["data"], path, transform)


def _session_from_context(event: dict) -> None:
    """The mobile trackers send their session only in the client_session context (no sid, vid or
    duid): its sessionId, sessionIndex and userId (an id per app install, as duid is per browser)
    fill the atomic fields a tracker left empty. Keyed by the collector's cookie instead, an app
    session was cut wherever a request came without it, and into one-event sessions under SP-Anonymous."""
    if event["domain_sessionid"] is not None:
        return
    for sdj in event["contexts"]:
        if sdj["schema"].startswith(CLIENT_SESSION):
            data = sdj["data"]
            event["domain_sessionid"] = data.get("sessionId")
            if event["domain_sessionidx"] is None:
                event["domain_sessionidx"] = data.get("sessionIndex")
            if event["domain_userid"] is None:
                event["domain_userid"] = data.get("userId")
            return


def _not_iglu(value: object, error: str) -> dict:
    """Snowplow's message for JSON that is no self-describing JSON (INVALID_DATA_PAYLOAD) or whose
    schema is no Iglu URI (INVALID_IGLUURI). Longer than 300 characters, only the start of its text
    (the whole of it is in the row's payload already)."""
    try:
        text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:           # nested past orjson's write limit
        text = "…" * 301
    return {"json": value if len(text) <= 300 else badrows.clip(text, 301), "error": error}


def _json_path(path: object) -> str:
    """fastjsonschema's ["data", "items", 0] -> "$.items[0]" (the JSONPath Snowplow's reports use)."""
    if not isinstance(path, list):
        return "$"
    return "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path[1:])


def _replace_at(data: object, path: tuple[str, ...], transform: Callable[[object], object]) -> None:
    """Replace the value at ``path`` by ``transform(value)``; a ``*`` step means every item of a list or object."""
    step, rest = path[0], path[1:]
    if step == "*":
        children = list(range(len(data))) if isinstance(data, list) else list(data) if isinstance(data, dict) else []
    else:
        children = [step] if isinstance(data, dict) and step in data else []
    for child in children:
        if rest:
            _replace_at(data[child], rest, transform)
        else:
            data[child] = transform(data[child])


def _pseudonym(value: object, hmac) -> object:
    """Strings and numbers (an id may be either) become pseudonyms; a list or object at a PII path
    has each of its values pseudonymised; true/false/null say nothing and stay."""
    if isinstance(value, str):
        return hmac(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return hmac(orjson.dumps(value).decode())
    if isinstance(value, list):
        return [_pseudonym(item, hmac) for item in value]
    if isinstance(value, dict):
        return {key: _pseudonym(item, hmac) for key, item in value.items()}
    return value


def _emails_pseudonymised(value: object, hmac) -> object:
    return emails.replace(value, hmac) if isinstance(value, str) else value


def _rounded(value: object, decimals: int) -> object:
    return round(value, decimals) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _withheld(value: object) -> None:
    return None


def _parse_params(params: dict, errors: list) -> tuple[dict, dict]:
    """The event template filled from the tracker's parameters, and its device timestamps."""
    event = TEMPLATE.copy()
    stamps = {"dtm": None, "stm": None, "ttm": None}
    # One pass over what the tracker sent (a dozen or two parameters), not over every known field.
    for name, value in params.items():
        spec = KINDS.get(name)
        if spec is None or not value:
            continue
        kind, target = spec
        if kind is str:
            event[target] = value
        elif kind is FLAG:
            event[target] = _flag(value, name, errors)
        elif kind is DIMS:
            event[target[0]], event[target[1]] = _dimensions(value, name, errors)
        elif target is None:   # a device timestamp
            stamps[name] = _number(value, int, name, errors)
            if stamps[name] is not None and not MIN_TSTAMP < stamps[name] < MAX_TSTAMP:
                errors.append(badrows.message(name, value, TSTAMP_RANGE))
                stamps[name] = None
        else:
            event[target] = _number(value, kind, name, errors)
    return event, stamps


def _flag(value: str, name: str, errors: list[dict]) -> bool | None:
    """``1`` or ``0``, as Snowplow reads ``cookie`` and ``f_*``: ``true`` was stored as False."""
    if value == "1" or value == "0":
        return value == "1"
    errors.append(badrows.message(name, value, "1 or 0"))
    return None


def _number(value: str | None, kind: type, name: str, errors: list[dict]):
    if value == "null":     # an old JavaScript tracker's way to send no value (Snowplow stores null)
        return None
    text = value[1:] if value[:1] == "-" else value
    strict = text.isascii() and (text.isdigit() if kind is int else "_" not in text)
    try:
        if not strict:
            raise ValueError(value)
        number = kind(value)
    except (TypeError, ValueError):
        errors.append(badrows.message(name, value, f"a{'n integer' if kind is int else ' number'}"))
        return None
    if kind is float and not math.isfinite(number):
        errors.append(badrows.message(name, value, "a finite number"))
        return None
    if kind is int and name not in TIMESTAMPS and abs(number) > INT_LIMIT:
        errors.append(badrows.message(name, value, "an integer within 32 bits"))
        return None
    return number


def _dimensions(value: str | None, name: str, errors: list[dict]) -> tuple[int | None, int | None]:
    if not value:
        return None, None
    width, _, height = value.partition("x")
    # Ten digits at most before int(): above 4,300 it raises, and a 32-bit value has ten.
    if all(part.isascii() and part.isdigit() and len(part) <= 10 and int(part) <= INT_LIMIT for part in (width, height)):
        return int(width), int(height)
    errors.append(badrows.message(name, value, "WIDTHxHEIGHT in pixels"))
    return None, None


def _iso(epoch_ms: int | None) -> str | None:
    return None if epoch_ms is None else iso_ms(epoch_ms)


def _is_uuid(text: str) -> bool:
    return _UUID.match(text) is not None


def _writable(row: dict, raw: bytes) -> dict:
    """``row``, or when it cannot be written as JSON (it holds the record, nested over orjson's 254
    written levels; it reads 1,024), one that keeps the raw record as text: a row raising in the
    worker stopped the enricher on that record at every restart."""
    if jsonbytes.writable(row):
        return row
    return badrows.format_violation(raw, f"a {row['schema'].split('/')[1]} row for this record cannot be "
                                         "written as JSON (nested over 254 levels)")
