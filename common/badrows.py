"""Bad rows as the tools that repair them read them: the raw record a bad row can be replayed from."""
from __future__ import annotations

import orjson

RAW_SCHEMA_PREFIX = "iglu:com.clickstream/raw_record/"
BAD_ROW_SCHEMA_PREFIX = "iglu:com.snowplowanalytics.snowplow.badrows/"


def raw_record_of(payload) -> dict | None:
    """The raw record a bad row's payload holds: the payload itself (a record-level failure) or its
    ``record`` (an event-level one: the raw record rewritten to carry only the failed event)."""
    if isinstance(payload, str):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(payload, dict):
        return None
    if str(payload.get("schema", "")).startswith(RAW_SCHEMA_PREFIX):
        return payload
    record = payload.get("record")
    return raw_record_of(record) if record is not None else None


def is_bad_row(value) -> bool:
    return isinstance(value, dict) and str(value.get("schema", "")).startswith(BAD_ROW_SCHEMA_PREFIX)
