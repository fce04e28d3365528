"""Snowplow's self-describing bad rows, as docs/contracts.md fixes them.

Every row keeps the input it failed on, in a form that can be replayed: a whole raw record for
record-level failures, and for one event of a POST the raw record rewritten to carry only that event
(``payload.record``) plus the event's raw parameters (``payload.parameters``).
"""
from __future__ import annotations

import orjson

from enrich import __version__
from enrich.enrichments import iso_ms, utc_now_ms

BADROWS = "iglu:com.snowplowanalytics.snowplow.badrows"
PROCESSOR = {"artifact": "clickstream-enrich", "version": __version__}
VERSIONS = {
    "collector_payload_format_violation": "1-0-0",
    "adapter_failures": "1-0-0",
    "tracker_protocol_violations": "1-0-0",
    "schema_violations": "2-0-0",
    "enrichment_failures": "2-0-0",
    "size_violation": "1-0-0",
}


def _row(kind: str, failure: dict, payload: object) -> dict:
    return {"schema": f"{BADROWS}/{kind}/jsonschema/{VERSIONS[kind]}",
            "data": {"processor": PROCESSOR, "failure": {"timestamp": iso_ms(utc_now_ms()), **failure},
                     "payload": payload}}


def message(field: str, value: object, expectation: str) -> dict:
    """One ``{field, value, expectation}`` item, Snowplow's shape for protocol and input-data errors:
    the value as text (or null), the field and expectation within the badrows schemas' lengths."""
    if value is not None and not isinstance(value, str):
        try:
            value = orjson.dumps(value, default=str).decode()
        except orjson.JSONEncodeError:          # orjson writes 254 levels of nesting, reads 1,024
            value = "(nested over 254 levels: not shown)"
    return {"field": field[:64], "value": None if value is None else clip(value, 1025),
            "expectation": clip(expectation, 256)}


def clip(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: its start and "…" when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_violation(raw: bytes, error: str) -> dict:
    text = raw.decode("utf-8", "replace")
    return _row("collector_payload_format_violation",
                {"loader": "clickstream-raw-record", "message": {"error": error}}, text)


def adapter_failure(record: dict, messages: list[dict]) -> dict:
    return _row("adapter_failures", {"vendor": _vendor(record), "version": _version(record),
                                     "messages": messages}, record)


def protocol_violation(record: dict, messages: list[dict], parameters: dict | None = None) -> dict:
    payload = record if parameters is None else {"record": record, "parameters": parameters}
    return _row("tracker_protocol_violations", {"vendor": _vendor(record), "version": _version(record),
                                                "messages": messages}, payload)


def schema_violation(record: dict, parameters: dict, messages: list[dict]) -> dict:
    return _row("schema_violations", {"messages": messages}, {"record": record, "parameters": parameters})


def enrichment_failure(record: dict, parameters: dict, messages: list[dict]) -> dict:
    return _row("enrichment_failures", {"messages": messages}, {"record": record, "parameters": parameters})


def size_violation(serialized: bytes, maximum: int, what: str) -> dict:
    return _row("size_violation", {"maximumAllowedSizeBytes": maximum, "actualSizeBytes": len(serialized),
                                   "expectation": what},
                serialized[: max(1000, maximum // 10)].decode("utf-8", "ignore"))


def _vendor(record: dict) -> str:
    path = record.get("path") or ""
    return path.strip("/").split("/")[0][:64] if path.count("/") > 1 else "com.snowplowanalytics.snowplow"


def _version(record: dict) -> str:
    path = record.get("path") or ""
    return path.rstrip("/").rsplit("/", 1)[-1][:16] if path.count("/") > 1 else "tp1"    # the schema's lengths
