"""The partition key of a raw record (docs/contracts.md), shared by the collector and ``replay-bad``.

A raw stream keyed by the tracker's session id keeps a session's hits on one shard, in the order
collected, whatever the collector's cookie did: a crawler, a browser that blocks it, or a visit's
first hits sent before its answer came back get a new collector id on every request. Keyed by that id, those
hits spread over the shards and reached the enricher, and so the scorer, in any order.
"""
from __future__ import annotations

import base64
import re
import uuid

NIL_UUID = "00000000-0000-0000-0000-000000000000"

# What an id may be to key a record: a tracker's are UUIDs. Anything else (longer than the enricher
# takes, or with characters a client chose: a control character, a newline) keys the hit as if it had
# none, so no request can make a key that Kinesis or a header might refuse. The collector holds its
# cookie ids to the same rule.
SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
# Per id, in order: its name, the query's first and later parameter, the body's key and its pattern. In a
# payload_data body an event's own fields are top-level keys of its object; the same names inside a
# context or self-describing event are in an escaped JSON string (\"sid\":), so never match.
_IDS = [(name, f"{name}=", f"&{name}=", b'"%s"' % name.encode(),
         re.compile(rb'"%s"\s*:\s*"([A-Za-z0-9._-]{1,128})"' % name.encode()))
        for name in ("sid", "duid")]
KEYED_BY = ("sid", "duid", "network_userid", "random")


def partition_key(querystring: str | None, body: bytes | None, network_userid: str | None) -> str:
    """The tracker's session id (``sid``), else its cookie id (``duid``), from the query string or
    else the body (the first event of a batch), else the collector's user id unless it is the nil
    one of SP-Anonymous hits (shared by everyone: one hot shard), else random."""
    return keyed(querystring, body, network_userid)[0]


def keyed(querystring: str | None, body: bytes | None, network_userid: str | None) -> tuple[str, str]:
    """``partition_key`` and what it was taken from: ``sid``, ``duid``, ``network_userid`` or
    ``random`` (one of KEYED_BY)."""
    for name, first, later, needle, pattern in _IDS:
        found = _query_value(querystring, first, later) if querystring else None
        if found:
            return found, name
        if body and needle in body:
            found = pattern.search(body)
            if found:
                return found.group(1).decode(), name
    if network_userid and network_userid != NIL_UUID:
        return network_userid, "network_userid"
    return str(uuid.uuid4()), "random"


def _query_value(query: str, first: str, later: str) -> str | None:
    """The value of the first parameter ``first`` (``name=``) or ``later`` (``&name=``), undecoded: a
    tracker's ids are UUIDs, and a key needs only to be the same each time. str.find: a regex took
    2 µs a hit."""
    if query.startswith(first):
        begin = len(first)
    else:
        at = query.find(later)
        if at < 0:
            return None
        begin = at + len(later)
    end = query.find("&", begin)
    value = query[begin:end] if end >= 0 else query[begin:]
    return value if SAFE_ID.match(value) else None


def record_key(raw: dict) -> str:
    """The partition key of a raw record as written: the same as the collector gave its hit."""
    body = raw.get("body")
    if isinstance(body, str):
        data = body.encode()
    else:
        try:
            data = base64.b64decode(raw.get("body_base64") or b"", validate=True)
        except (ValueError, TypeError):
            data = None
    query, nuid = raw.get("querystring"), raw.get("network_userid")
    return partition_key(query if isinstance(query, str) else None, data, nuid if isinstance(nuid, str) else None)
