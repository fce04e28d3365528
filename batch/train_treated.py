"""Sessions a discount may have changed, left out of training (with ``treated_sessions = "leave_out"``).

The discount engine offers a discount to sessions the model rates likely to defer. A session that
then bought may have bought because of the discount, so its label tells of the discount, not of the
session. Trained on such sessions, the next model learns that they buy, rates them higher, and the
engine offers fewer discounts to the very sessions they work on.

The uplift records (``python -m discount.uplift --record``, hourly) list each hour's offered and
held-out sessions. Training leaves out the offered ones and weighs each held-out one by
100 / holdout_percent: the control group is a random share of the sessions that qualified, so
weighted it stands for all of them, untreated.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from batch.train_config import TrainSettings
from batch.train_lake import Window, midnight_ms
from common import aws
from common.logs import first_few
from common.uplift_records import HOUR_MS, PREFIX, hour_name, hour_of, record_key

log = logging.getLogger(__name__)
HOLDOUT_WEIGHT = "holdout_weight"
SETTLED_MS = 2 * HOUR_MS       # an hour is recorded after the recorder's settle time and its next hourly run


@dataclass(frozen=True)
class Treated:
    weights: dict[str, float]       # session id -> 0.0 when offered (left out), 100 / share when held out
    recorded_hours: int = 0         # hours whose records list their sessions
    missing: list[int] = field(default_factory=list)    # hours since the first such record without one

    def applied(self, examples: DataFrame) -> tuple[DataFrame, dict]:
        """``examples`` without the offered sessions, held-out rows weighed (HOLDOUT_WEIGHT), and what
        was done: sessions left out and weighed."""
        summary = {"recorded_hours": self.recorded_hours, "missing_hours": len(self.missing),
                   "offered_left_out": 0, "held_out_weighed": 0}
        if not self.weights:
            return examples, summary
        spark = examples.sparkSession
        decided = F.broadcast(spark.createDataFrame(list(self.weights.items()), "session_id string, _weight double"))
        found = (examples.select("session_id").distinct().join(decided, "session_id")
                 .groupBy((F.col("_weight") == 0).alias("offered")).count().collect())
        for row in found:
            summary["offered_left_out" if row["offered"] else "held_out_weighed"] = row["count"]
        weight = F.coalesce(F.col("_weight"), F.lit(1.0))            # 1 for a session no record lists
        kept = examples.join(decided, "session_id", "left").filter(weight > 0)
        return kept.select(*examples.columns, weight.alias(HOLDOUT_WEIGHT)), summary


def read_treated(spark, settings: TrainSettings, window: Window, now: float | None = None) -> Treated:
    """The decisions of the hours whose sessions may be the window's: from the day before its first
    (a clock a little behind) to the day after its last (a session running past midnight). From
    ``s3://<bucket>/reports/uplift/`` when training syncs the lake, else from the folder beside
    ``lake_path`` (``<lake_path>/../reports/uplift/``, through Spark: any filesystem it reads)."""
    first = midnight_ms(window.start - dt.timedelta(days=1))
    end = midnight_ms(window.end + dt.timedelta(days=2))
    if settings.lake_path:
        where = f"{settings.lake_path.rstrip('/').rsplit('/', 1)[0]}/{PREFIX}"
        bodies = _from_folder(spark, where, first, end)
    else:
        where = f"s3://{settings.bucket}/{PREFIX}"
        bodies = _from_bucket(aws.client("s3", settings.region), settings.bucket, first, end)
    return treated_from(bodies, first, end, where, time.time() if now is None else now)


def treated_from(bodies: dict[int, bytes], first: int, end: int, where: str, now: float) -> Treated:
    """The weights of the recorded sessions. An hour after the first record without one, or whose
    record lists no sessions (an older recorder) or cannot be read, counts as missing: its treated
    sessions, if any, train as untreated, and a warning says which hours."""
    weights: dict[str, float] = {}
    listed: set[int] = set()
    for hour, body in sorted(bodies.items()):
        try:
            hour_weights = _decisions(json.loads(body))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s%s is not an uplift record (%r): its hour's sessions train as untreated",
                        where, record_key(hour).removeprefix(PREFIX), exc)
            continue
        if hour_weights is not None:
            weights |= hour_weights
            listed.add(hour)
    if not listed:
        log.info("no uplift record with session lists in %s for %s..%s: every session trains as untreated "
                 "(the discount engine's `python -m discount.uplift --record` writes them)",
                 where, hour_name(first), hour_name(end - HOUR_MS))
        return Treated(weights)
    # Before the first record the engine may not have run yet; after it, a gap is a recorder that missed hours.
    settled = min(end, int(now * 1000) - SETTLED_MS) // HOUR_MS * HOUR_MS
    unlisted = [hour for hour in range(min(listed), settled, HOUR_MS) if hour not in listed]
    treated = Treated(weights, len(listed), unlisted)
    if min(listed) > first:
        log.info("the uplift records of %s begin at %s: sessions before it train as untreated", where,
                 hour_name(min(listed)))
    if unlisted:
        log.warning("%d hour(s) without an uplift record listing their sessions in %s: %s. Sessions offered a "
                    "discount then train as untreated; is `python -m discount.uplift --record` running hourly?",
                    len(unlisted), where, first_few(hour_name(hour) for hour in unlisted))
    return treated


def _decisions(record: dict) -> dict[str, float] | None:
    """Session id -> weight of one record; None for a record from before the lists (uplift_hour 1-0-0)."""
    offered, held_out = record.get("offered_sessions"), record.get("held_out_sessions")
    if offered is None and held_out is None:
        return None
    if not isinstance(offered, list) or not isinstance(held_out, list):
        raise TypeError("offered_sessions and held_out_sessions must be lists")
    weights = {str(entry["session_id"]): _weight(entry.get("holdout_percent")) for entry in held_out}
    return weights | dict.fromkeys(map(str, offered), 0.0)


def _weight(share) -> float:
    """A held-out session stands for 100 / share qualified sessions; 1 when its share is not known (a
    row of an engine before offer schema 1-1-1)."""
    return 100.0 / float(share) if share else 1.0


def _from_bucket(s3, bucket: str, first: int, end: int) -> dict[int, bytes]:
    """The records of the hours [first, end): listed from the first one's key on, in key (time) order."""
    bodies = {}
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{PREFIX}hour=", StartAfter=record_key(first).removesuffix(".json"))
    for page in pages:
        for obj in page.get("Contents", []):
            hour = hour_of(obj["Key"])
            if hour is None or hour < first:
                continue
            if hour >= end:
                return bodies
            if (body := aws.get_object_bytes(s3, bucket, obj["Key"])) is not None:
                bodies[hour] = body
    return bodies


def _from_folder(spark, folder: str, first: int, end: int) -> dict[int, bytes]:
    """The records of the hours [first, end) in ``folder``, read by Spark (a local folder, s3a://, ...)."""
    days = sorted({hour_name(hour)[:10] for hour in range(first, end, HOUR_MS)})
    pattern = f"{folder}hour={{{','.join(days)}}}T*.json"
    try:
        files = spark.sparkContext.wholeTextFiles(pattern).collect()
    except Py4JJavaError as exc:
        if "matches 0 files" in str(exc) or "does not exist" in str(exc):
            return {}
        raise
    bodies = {hour_of(path): text.encode() for path, text in files}
    return {hour: body for hour, body in bodies.items() if hour is not None and first <= hour < end}
