"""Raw records (docs/contracts.md) and size_violation bad rows, built from one request."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import orjson

from collector import COLLECTOR_NAME, __version__
from collector.config import TP2

RAW_SCHEMA = "iglu:com.clickstream/raw_record/jsonschema/1-0-0"
SIZE_VIOLATION = "iglu:com.snowplowanalytics.snowplow.badrows/size_violation/jsonschema/1-0-0"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"


@dataclass(slots=True)
class Hit:
    """What the collector keeps of one request; the raw record is built from it."""

    tstamp: int
    ip: str | None
    useragent: str | None
    referer: str | None
    path: str
    querystring: str | None
    method: str
    content_type: str | None
    body: bytes | None
    headers: list[str]
    network_userid: str | None
    hostname: str


def body_fields(body: bytes | None) -> tuple[str | None, str | None]:
    """(body, body_base64): text when the bytes are valid UTF-8, else base64 of exactly those bytes."""
    if body is None:
        return None, None
    try:
        return body.decode(), None
    except UnicodeDecodeError:
        return None, base64.b64encode(body).decode()


def record(hit: Hit, body: bytes | None) -> dict:
    text, encoded = body_fields(body)
    return {
        "schema": RAW_SCHEMA,
        "collector_tstamp": hit.tstamp,
        "ip": hit.ip,
        "useragent": hit.useragent,
        "referer": hit.referer,
        "path": hit.path,
        "querystring": hit.querystring,
        "method": hit.method,
        "content_type": hit.content_type,
        "body": text,
        "body_base64": encoded,
        "headers": hit.headers,
        "network_userid": hit.network_userid,
        "collector": COLLECTOR_NAME,
        "hostname": hit.hostname,
    }


def size_violation(payload: str, actual: int, maximum: int, keep: int) -> dict:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    return {
        "schema": SIZE_VIOLATION,
        "data": {
            "processor": {"artifact": "clickstream-collector", "version": __version__},
            "failure": {"timestamp": stamp, "maximumAllowedSizeBytes": maximum, "actualSizeBytes": actual,
                        "expectation": f"a record of at most {maximum} bytes"},
            "payload": payload[:keep],
        },
    }


def build(hit: Hit, max_bytes: int, keep: int) -> tuple[list[bytes], list[dict]]:
    """Serialized raw records for ``hit`` (each within ``max_bytes``) and size_violation bad rows."""
    data = orjson.dumps(record(hit, hit.body))
    if len(data) <= max_bytes:
        return [data], []
    # Only a tracker's payload_data body is a list of events; a webhook's body is one document.
    payload = _payload(hit.body) if hit.path == TP2 else None
    if payload is not None and payload["data"]:
        schema = payload.get("schema", PAYLOAD_DATA)
        overhead = len(orjson.dumps(record(hit, _events_body(schema, [])))) + 16
        # Every part repeats the request's own fields (its headers above all). When they take over half
        # a record, a split would copy them into a record or bad row per few events: 700,000 tiny events
        # under a 250 kB user agent made 35 GB of bad rows. Such a request is one bad row, as a whole.
        if overhead <= max_bytes // 2:
            try:
                return split(hit, payload["data"], max_bytes, keep, schema, overhead)
            except orjson.JSONEncodeError:
                # orjson reads 1,024 levels of nesting but writes only 254: an event nested deeper cannot
                # be written back, so the body cannot be split and is kept whole, as an unsplittable one.
                pass
    return [], [size_violation(data.decode(), len(data), max_bytes, keep)]


def _payload(body: bytes | None) -> dict | None:
    """A payload_data body with a list of events, or None (then it cannot be split: a body with other
    keys than schema and data would lose them in the split)."""
    try:
        payload = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list) and set(payload) <= {"schema", "data"}:
        return payload
    return None


def _events_body(schema: object, events: list) -> bytes:
    return orjson.dumps({"schema": schema, "data": events})


def split(hit: Hit, events: list, max_bytes: int, keep: int, schema: object,
          overhead: int) -> tuple[list[bytes], list[dict]]:
    """Greedy split of a POST's events into records under ``max_bytes`` (each costs ``overhead`` bytes
    without its events); a lone oversized event is a bad row."""
    records, bad, group, size = [], [], [], overhead
    for event in events:
        # The body is a JSON string inside the record, so quotes and backslashes are escaped twice.
        cost = len(orjson.dumps(orjson.dumps(event).decode())) - 1
        if overhead + cost > max_bytes:
            single = orjson.dumps(record(hit, _events_body(schema, [event])))
            bad.append(size_violation(single.decode(), len(single), max_bytes, keep))
            continue
        if group and size + cost > max_bytes:
            records.append(orjson.dumps(record(hit, _events_body(schema, group))))
            group, size = [], overhead
        group.append(event)
        size += cost
    if group:
        records.append(orjson.dumps(record(hit, _events_body(schema, group))))
    return records, bad
