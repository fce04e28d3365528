"""Where the uplift records live: ``s3://<bucket>/reports/uplift/hour=YYYY-MM-DDTHH.json``, one per
finished hour, written once by ``python -m discount.uplift --record`` (docs/contracts.md). The
discount engine's reports pool their counts; ``make train`` reads their session lists to leave out
the sessions a discount may have changed."""
from __future__ import annotations

import datetime as dt
import re

PREFIX = "reports/uplift/"
SCHEMA = "iglu:com.clickstream/uplift_hour/jsonschema/1-1-0"
HOUR_MS = 3_600_000
NAME_FORMAT = "%Y-%m-%dT%H"
# The enricher's pseudonyms (keyed HMAC-SHA256, hex). The scorer keys a session whose tracker sent no
# session id by its user's pseudonym (common.features.session_key): a record counts such a session
# but does not list it, as records are kept for good and an erasure does not rewrite them.
PSEUDONYM = re.compile(r"[0-9a-f]{64}")


def hour_name(hour_ms: int) -> str:
    return f"{dt.datetime.fromtimestamp(hour_ms / 1000, dt.UTC):{NAME_FORMAT}}"


def record_key(hour_ms: int) -> str:
    return f"{PREFIX}hour={hour_name(hour_ms)}.json"


def hour_of(key: str) -> int | None:
    """The start (epoch ms) of the hour a record's key or path names; None for any other name."""
    name = key.rsplit("/", 1)[-1]
    if not (name.startswith("hour=") and name.endswith(".json")):
        return None
    try:
        start = dt.datetime.strptime(name[len("hour="):-len(".json")], NAME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return int(start.timestamp() * 1000)


def listable(session_id: str) -> bool:
    """Whether a record may list this session id: not when it is a user's pseudonym."""
    return PSEUDONYM.fullmatch(session_id) is None
