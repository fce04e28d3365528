"""The tracker protocol: a raw record (docs/contracts.md) -> one parameter dict per tracker event.

GET hits carry one event in the query string (``/i``, ``/ice.png``, ``/com.snowplowanalytics.snowplow/tp1``
and ``tp2``); POSTs to ``tp2`` carry ``payload_data`` with a list of events; ``/r/tp2`` is a click-tracking
redirect and ``/com.snowplowanalytics.iglu/v1`` a webhook sending self-describing events. Record-level problems raise
``RecordError`` holding the finished bad row; per-event problems are left to the pipeline, so one bad
event never takes its neighbours down.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_plus

import orjson

from enrich import badrows
from enrich.enrichments import short_cache
from enrich.registry import Resolver, SchemaKey, SchemaKeyError

GET_PATHS = frozenset({"/i", "/ice.png", "/com.snowplowanalytics.snowplow/tp1", "/com.snowplowanalytics.snowplow/tp2"})
POST_PATHS = frozenset({"/com.snowplowanalytics.snowplow/tp2"})
REDIRECT_PATH = "/r/tp2"
IGLU_WEBHOOK_PATH = "/com.snowplowanalytics.iglu/v1"
# A webhook's query parameters kept as event fields (not event data), as in Snowplow's adapters.
WEBHOOK_FIELDS = ("nuid", "aid", "cv", "eid", "ttm", "url")
URI_REDIRECT = "iglu:com.snowplowanalytics.snowplow/uri_redirect/jsonschema/1-0-0"
UNSTRUCT_EVENT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
PAYLOAD_DATA = ("com.snowplowanalytics.snowplow", "payload_data")
PAYLOAD_DATA_LATEST = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
RAW_SCHEMA_PREFIX = "iglu:com.clickstream/raw_record/jsonschema/1-"
REQUIRED = ("e", "p", "tv")


class RecordError(Exception):
    """The whole record is unusable; ``row`` is its bad row."""

    def __init__(self, row: dict):
        super().__init__(row["schema"])
        self.row = row


@dataclass
class Hit:
    """One parsed raw record: its fields, and for POSTs the events still to be checked one by one."""

    record: dict
    events: list[dict]
    # For POST bodies, the payload_data key the body declared (each event is validated against it).
    payload_key: str | None = None
    # For a webhook's JSON list, its items: a failed one is replayed alone, not with the whole list.
    items: list | None = None
    # For POSTs, the query string's parameters: laid over each body event once that event passed
    # payload_data (which allows no other keys), winning a clash, as in Snowplow's adapter.
    query: dict[str, str] | None = None

    def params(self, index: int) -> object:
        """Event ``index``'s tracker parameters, the query string's included."""
        event = self.events[index]
        return {**event, **self.query} if self.query and isinstance(event, dict) else event


def parse_record(raw: bytes) -> dict:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(badrows.format_violation(raw, f"not JSON: {exc}")) from None
    if not isinstance(record, dict):
        raise RecordError(badrows.format_violation(raw, "a raw record must be a JSON object"))
    schema = record.get("schema")
    if not isinstance(schema, str) or not schema.startswith(RAW_SCHEMA_PREFIX):
        raise RecordError(badrows.format_violation(raw, f"unknown raw record schema {str(schema)[:200]!r}"))
    stamp = record.get("collector_tstamp")
    if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp <= 0:
        raise RecordError(badrows.format_violation(raw, "collector_tstamp must be a positive integer (epoch ms)"))
    for name in ("path", "method"):
        if not isinstance(record.get(name), str):
            raise RecordError(badrows.format_violation(raw, f"{name} must be a string"))
    for name in ("ip", "useragent", "referer", "querystring", "body", "body_base64", "network_userid",
                 "content_type", "collector", "hostname"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise RecordError(badrows.format_violation(raw, f"{name} must be a string or null"))
    return record


def split(record: dict) -> Hit:
    """The events of a record; raises RecordError for an unsupported path or an unreadable body."""
    method, path = record["method"].upper(), record["path"]
    if method == "POST" and path in POST_PATHS:
        return _post(record)
    if method == "GET" and path in GET_PATHS:
        params = parse_query(record.get("querystring") or "")
        if not params:
            raise RecordError(badrows.protocol_violation(
                record, [badrows.message("querystring", record.get("querystring"), "tracker parameters")]))
        return Hit(record, [params])
    if method == "GET" and path == REDIRECT_PATH:
        return Hit(record, [_redirect(record, parse_query(record.get("querystring") or ""))])
    if method in ("GET", "POST") and path == IGLU_WEBHOOK_PATH:
        return _iglu_webhook(record)
    raise RecordError(badrows.adapter_failure(
        record, [badrows.message("path", f"{method} {path}", "a Snowplow tracker endpoint: GET /i, "
                                 "/ice.png, /com.snowplowanalytics.snowplow/tp1|tp2, POST .../tp2, GET /r/tp2 "
                                 "or GET|POST /com.snowplowanalytics.iglu/v1")]))


def _redirect(record: dict, params: dict[str, str]) -> dict[str, str]:
    """A click-tracking redirect, as Snowplow's redirect adapter reads it: the target ``u`` becomes a
    ``uri_redirect`` entity, the event itself when the link carries no ``e``, else one more context;
    ``tv`` is always ``r-tp2`` and ``p`` defaults to ``web``."""
    target = params.pop("u", None)
    if not target:
        raise RecordError(badrows.adapter_failure(
            record, [badrows.message("querystring", record.get("querystring"), "a u parameter: the redirect target")]))
    redirect = {"schema": URI_REDIRECT, "data": {"uri": target}}
    if "e" in params:
        params.update(_with_context(params, redirect))
    else:
        params["e"] = "ue"
        params["ue_pr"] = orjson.dumps({"schema": UNSTRUCT_EVENT, "data": redirect}).decode()
    return {**params, "tv": "r-tp2", "p": params.get("p", "web")}


def _with_context(params: dict[str, str], entity: dict) -> dict[str, str]:
    """``co`` or ``cx`` with ``entity`` added first; unchanged when they do not parse (the event then
    fails on them as it would without the redirect)."""
    existing, error = decode_json(params, "co", "cx")
    if error or (existing is not None and not (isinstance(existing, dict) and isinstance(existing.get("data"), list))):
        return {}
    envelope = existing or {"schema": CONTEXTS, "data": []}
    merged = orjson.dumps({**envelope, "data": [entity, *envelope["data"]]})
    if params.get("cx"):
        return {"cx": base64.urlsafe_b64encode(merged).decode().rstrip("=")}
    return {"co": merged.decode()}


def _iglu_webhook(record: dict) -> Hit:
    """Self-describing events from an Iglu webhook, as Snowplow's Iglu adapter reads them: ``schema``
    names the schema and the other query parameters (GET), a form body, or a JSON body (one object, or
    a list for several events) are the data; without ``schema`` the body is a self-describing JSON."""
    query = parse_query(record.get("querystring") or "")
    schema, body = query.pop("schema", None), _body(record)
    platform, items = "app", None
    if schema is None:
        payload = _json(record, body)
        if not isinstance(payload, dict) or not isinstance(payload.get("schema"), str) or "data" not in payload:
            raise RecordError(badrows.adapter_failure(
                record, [badrows.message("body", body, "a self-describing JSON {schema, data}, or a schema parameter")]))
        entries = [(payload["schema"], payload["data"])]
    elif not body:
        entries = [(schema, {k: v for k, v in query.items() if k not in ("nuid", "aid", "cv", "p")})]
    elif "x-www-form-urlencoded" in (record.get("content_type") or ""):
        entries, platform = [(schema, parse_query(body))], "srv"
    else:
        data = _json(record, body)
        items = data if isinstance(data, list) else None
        entries = [(schema, item) for item in (data if isinstance(data, list) else [data])]
        if not entries:
            raise RecordError(badrows.adapter_failure(record, [badrows.message("body", body, "at least one event")]))
    fields = {name: query[name] for name in WEBHOOK_FIELDS if name in query}
    fields.update(e="ue", tv="com.snowplowanalytics.iglu-v1", p=query.get("p", platform))
    return Hit(record, [_webhook_event(fields, key, data) for key, data in entries], items=items)


def _webhook_event(fields: dict, schema: str, data: object) -> dict:
    try:
        return {**fields, "ue_pr": orjson.dumps({"schema": UNSTRUCT_EVENT, "data": {"schema": schema, "data": data}}).decode()}
    except orjson.JSONEncodeError:      # nested deeper than orjson writes: this item fails, not its list
        return dict(fields)


def _json(record: dict, body: str | None) -> object:
    try:
        return orjson.loads(body or "")
    except orjson.JSONDecodeError as exc:
        raise RecordError(badrows.adapter_failure(record, [badrows.message("body", body, f"JSON: {exc}")])) from None


# Cached: a session's events repeat their page URL, referrer and title (page pings above all).
_unquote = short_cache(8192)(unquote_plus)


def parse_query(query: str) -> dict[str, str]:
    """A query string -> {name: value}; the first of repeated names wins. Unquotes only the pieces that
    need it: ~5x faster than urllib's parse_qsl, and this runs for every GET hit."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = _unquote(name)
        if "%" in value or "+" in value:
            value = _unquote(value)
        params.setdefault(name, value)
    return params


def _post(record: dict) -> Hit:
    """The body's events, as sent, and the query string's parameters (tracker protocol v2 lets a POST
    carry parameters there too: a proxy's or a tracker's own)."""
    query, body = parse_query(record.get("querystring") or ""), _body(record)
    if not body and query:
        return Hit(record, [query])
    if not body:
        raise RecordError(badrows.protocol_violation(record, [badrows.message("body", None, "a payload_data body")]))
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RecordError(badrows.protocol_violation(record, [badrows.message("body", body, f"JSON: {exc}")])) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise RecordError(badrows.protocol_violation(
            record, [badrows.message("body", body, "a self-describing JSON {schema, data: [events]}")]))
    try:
        key = SchemaKey.parse(payload.get("schema"))
    except SchemaKeyError as exc:
        raise RecordError(badrows.protocol_violation(record, [badrows.message("body.schema", payload.get("schema"), str(exc))])) from None
    if (key.vendor, key.name) != PAYLOAD_DATA or (key.model, key.revision) != (1, 0):
        raise RecordError(badrows.protocol_violation(
            record, [badrows.message("body.schema", str(key), "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-*")]))
    if not payload["data"]:
        raise RecordError(badrows.protocol_violation(record, [badrows.message("body.data", [], "at least one event")]))
    return Hit(record, payload["data"], str(key), query=query or None)


def _body(record: dict) -> str | None:
    """The body as text: as recorded, or decoded from ``body_base64`` (bodies that are not UTF-8)."""
    if record.get("body") is None and record.get("body_base64") is not None:
        return _decode_body(record)
    return record.get("body")


def _decode_body(record: dict) -> str:
    try:
        return base64.b64decode(record["body_base64"], validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise RecordError(badrows.protocol_violation(
            record, [badrows.message("body_base64", record["body_base64"], "a UTF-8 body (base64)")])) from None


def events_record(hit: Hit, indices: list[int]) -> dict:
    """The replayable raw record for some of a hit's events: a record of several events rewritten to
    carry only these (one record holds one event otherwise)."""
    body = events_body(hit, indices)
    return hit.record if body is None else {**hit.record, "body": body, "body_base64": None}


def events_body(hit: Hit, indices: list[int]) -> str | None:
    """The body of ``events_record``, None for a record of one event (kept as it came). Raises
    orjson.JSONEncodeError for an event nested deeper than orjson writes."""
    if hit.payload_key is not None:
        return orjson.dumps({"schema": hit.payload_key, "data": [hit.events[i] for i in indices]}).decode()
    if hit.items is not None:
        return orjson.dumps([hit.items[i] for i in indices]).decode()
    return None


def check_event(hit: Hit, index: int, params: object, resolver: Resolver) -> list[dict]:
    """Protocol messages for one event, ``params`` being ``hit.params(index)`` (empty when it may
    proceed)."""
    sent = hit.events[index]
    if not isinstance(sent, dict):
        return [badrows.message("body.data", sent, "an object of string parameters")]
    if hit.payload_key is not None:
        # Validate one event at a time against payload_data (whose minItems is 1), so a bad event
        # fails alone instead of failing the whole body as a single document would.
        try:
            errors = resolver.validate(hit.payload_key, [sent])
        except LookupError:
            # An older 1-0-x the registries lack: additions only add optional fields, so the newest
            # 1-0-x we ship accepts everything an older one did.
            try:
                errors = resolver.validate(PAYLOAD_DATA_LATEST, [sent])
            except LookupError as exc:
                return [badrows.message("body.schema", hit.payload_key, f"a resolvable payload_data schema: {exc}")]
        if errors:
            return [badrows.message("body.data", None, f"{hit.payload_key}: {error}") for error in errors]
    return [badrows.message(name, None, "a required parameter") for name in REQUIRED if not params.get(name)]


def decode_json(params: dict, plain: str, encoded: str) -> tuple[object, dict | None]:
    """The JSON in ``plain`` (e.g. ``co``) or base64url ``encoded`` (``cx``), padded or not.

    Returns (value or None, None) or (None, error message)."""
    if params.get(encoded):
        text = params[encoded]
        try:
            padded = text.strip().replace("+", "-").replace("/", "_")
            padded += "=" * (-len(padded) % 4)
            data = base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None, badrows.message(encoded, text, "base64url-encoded UTF-8 JSON")
        field = encoded
    elif params.get(plain):
        data, field = params[plain], plain
    else:
        return None, None
    try:
        return orjson.loads(data), None
    except orjson.JSONDecodeError as exc:
        return None, badrows.message(field, data, f"JSON: {exc}")
