"""`python -m discount.uplift`: did the offers make sessions buy? The offered sessions against the
control group (`holdout_percent`), from the offers table and the scorer's purchase marks.

The table's rows live ``offer_ttl_hours`` (a day), too short for an experiment that needs weeks of
sessions. ``--record`` writes the counts and session lists of every finished hour to the bucket, once
(``reports/uplift/hour=YYYY-MM-DDTHH.json``, by the hour of the qualifying click); run it more often
than the rows live (the template runs it hourly). ``--recorded`` pools the recorded hours of a period;
``make train`` can leave out the offered sessions they list (``treated_sessions``).

    python -m discount.uplift                                   # the rows in the table now
    python -m discount.uplift --record                          # keep each finished hour's counts
    python -m discount.uplift --recorded --since 2026-11-01     # every recorded hour since then
"""
from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import asdict, dataclass

import click

from common import aws
from common.cli import CLI_CONTEXT, AwsCommand, FiniteRange, iso_time
from common.config import MAX_DURATION_S, load
from common.features import parse_ms
from common.retry import backoff_s
from common.uplift_records import HOUR_MS, PREFIX, SCHEMA, hour_name, hour_of, listable, record_key
from discount.settings import DiscountSettings

Z_95 = 1.959964
BATCH_GET_KEYS = 100          # DynamoDB's limit per BatchGetItem


@dataclass(frozen=True)
class Group:
    sessions: int
    bought: int

    @property
    def rate(self) -> float:
        return self.bought / self.sessions if self.sessions else math.nan

    def __add__(self, other: Group) -> Group:
        return Group(self.sessions + other.sessions, self.bought + other.bought)


@dataclass(frozen=True)
class Uplift:
    offered: Group
    held_out: Group
    open_sessions: int          # qualified too recently to have finished: left out
    low: float                  # 95 % interval of the difference in purchase rate, offered minus held out
    high: float
    shares: tuple[float, ...] = ()      # the holdout_percent values the rows were decided under

    def share_warning(self) -> str | None:
        """A comparison over periods of different shares mixes them in other proportions in each group
        (with a buy rate that moved meanwhile, that alone makes a difference)."""
        if len(self.shares) < 2:
            return None
        named = ", ".join(f"{share:g} %" for share in self.shares)
        return (f"the control group's share changed within the period ({named}): compare periods of one share "
                "(--recorded with --since and --until)")

    @property
    def difference(self) -> float:
        return self.offered.rate - self.held_out.rate

    def verdict(self) -> str:
        if not self.offered.sessions or not self.held_out.sessions:
            return ("no comparison: the control group is empty (set holdout_percent)" if self.offered.sessions
                    else "no comparison: no session was offered a discount")
        if self.low > 0:
            return "offers raised the purchase rate"
        if self.high < 0:
            return "offers lowered the purchase rate"
        return "no effect shown: the interval includes 0 (more sessions narrow it)"


def wilson(bought: int, sessions: int) -> tuple[float, float]:
    """95 % Wilson score interval of a purchase rate: sound for small groups and rates near 0 or 1."""
    if not sessions:
        return math.nan, math.nan
    rate, z2 = bought / sessions, Z_95 ** 2
    centre = (rate + z2 / (2 * sessions)) / (1 + z2 / sessions)
    half = Z_95 * math.sqrt(rate * (1 - rate) / sessions + z2 / (4 * sessions ** 2)) / (1 + z2 / sessions)
    return centre - half, centre + half


def compare(offered: Group, held_out: Group, open_sessions: int = 0, shares: tuple[float, ...] = ()) -> Uplift:
    """The difference of the two rates with Newcombe's interval (from the two Wilson intervals)."""
    (low1, high1), (low2, high2) = wilson(offered.bought, offered.sessions), wilson(held_out.bought, held_out.sessions)
    rate1, rate2 = offered.rate, held_out.rate
    low = rate1 - rate2 - math.sqrt((rate1 - low1) ** 2 + (high2 - rate2) ** 2)
    high = rate1 - rate2 + math.sqrt((high1 - rate1) ** 2 + (rate2 - low2) ** 2)
    return Uplift(offered, held_out, open_sessions, low, high, shares)


def qualified_rows(dynamodb, table: str, now: float) -> list[dict]:
    """The offers table's offer and holdout rows that have not expired."""
    rows = []
    pages = dynamodb.get_paginator("scan").paginate(
        TableName=table, ConsistentRead=True, FilterExpression="#k IN (:offer, :holdout)",
        ProjectionExpression="session_id, #k, clicked_ms, offered_at, expires_at, holdout_percent",
        ExpressionAttributeNames={"#k": "kind"},
        ExpressionAttributeValues={":offer": {"S": "offer"}, ":holdout": {"S": "holdout"}})
    for page in pages:
        rows += [item for item in page["Items"] if not aws.ttl_expired(item, now)]
    return rows


def purchase_marks(dynamodb, table: str, session_ids: list[str]) -> dict[str, int]:
    """``bought_ms`` of each session the scorer marked as bought in the predictions table."""
    marks: dict[str, int] = {}
    for start in range(0, len(session_ids), BATCH_GET_KEYS):
        request = {table: {"Keys": [{"session_id": {"S": sid}} for sid in session_ids[start:start + BATCH_GET_KEYS]],
                           "ProjectionExpression": "session_id, bought_ms", "ConsistentRead": True}}
        for attempt in range(20):
            response = dynamodb.batch_get_item(RequestItems=request)
            for item in response["Responses"].get(table, []):
                if "bought_ms" in item:
                    marks[item["session_id"]["S"]] = int(float(item["bought_ms"]["N"]))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            time.sleep(backoff_s(attempt, 0.05, 2.0))      # throttled: DynamoDB hands the rest back
        else:
            raise click.ClickException(f"{table}: keys still unprocessed after 20 tries (throttled); try again later")
    return marks


def measure(dynamodb, offers_table: str, predictions_table: str, settle_s: float, now: float | None = None) -> Uplift:
    """Each qualified session bought when the scorer marked a purchase at or after the click that
    qualified it; sessions that qualified within ``settle_s`` may still buy and are left out."""
    now = time.time() if now is None else now
    rows = qualified_rows(dynamodb, offers_table, now)
    settled = [row for row in rows if _qualified_ms(row) <= (now - settle_s) * 1000]
    marks = purchase_marks(dynamodb, predictions_table, [row["session_id"]["S"] for row in settled])
    return compare(*groups(settled, marks), len(rows) - len(settled), shares_of(settled))


def groups(rows: list[dict], marks: dict[str, int]) -> tuple[Group, Group]:
    """(offered, held out): sessions, and those that bought at or after their qualifying click."""
    counts = {"offer": [0, 0], "holdout": [0, 0]}
    for row in rows:
        mark = marks.get(row["session_id"]["S"])
        counts[row["kind"]["S"]][0] += 1
        counts[row["kind"]["S"]][1] += mark is not None and mark >= _qualified_ms(row)
    return Group(*counts["offer"]), Group(*counts["holdout"])


def shares_of(rows: list[dict]) -> tuple[float, ...]:
    """The holdout shares the rows were decided under (an engine before offer schema 1-1-1 did not say)."""
    return tuple(sorted({float(row["holdout_percent"]["N"]) for row in rows if "holdout_percent" in row}))


def _qualified_ms(row: dict) -> int:
    """The click that qualified the session; for a row without it (an engine before offer schema
    1-1-0), the time of the offer, a little later."""
    return int(row["clicked_ms"]["N"]) if "clicked_ms" in row else parse_ms(row["offered_at"]["S"])


# ------------------------------------------------------------------------------ recorded hours


def recordable_hours(now: float, settle_s: float, ttl_hours: int) -> list[int]:
    """The hours (start, epoch ms) whose qualified sessions have all settled and whose rows are all
    still in the table: an hour's rows expire ``ttl_hours`` after their offer, at the earliest after
    the hour's start."""
    now_ms = now * 1000
    first = int((now_ms - ttl_hours * HOUR_MS) // HOUR_MS) + 1
    last = int((now_ms - settle_s * 1000) // HOUR_MS) - 1
    return [index * HOUR_MS for index in range(first, last + 1)]


def recorded(s3, bucket: str) -> dict[int, str]:
    """The recorded hours: start (epoch ms) -> object key."""
    hours = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}hour="):
        for obj in page.get("Contents", []):
            if (hour := hour_of(obj["Key"])) is not None:       # else not a record of ours
                hours[hour] = obj["Key"]
    return hours


def record(dynamodb, s3, settings: DiscountSettings, settle_s: float, now: float | None = None) -> list[int]:
    """Write the counts and session lists of each recordable hour not yet recorded; the hours written.
    A record is never rewritten: later, some of its hour's rows may have expired."""
    now = time.time() if now is None else now
    done = recorded(s3, settings.bucket)
    todo = [hour for hour in recordable_hours(now, settle_s, settings.offer_ttl_hours) if hour not in done]
    if not todo:
        return []
    by_hour: dict[int, list[dict]] = {hour: [] for hour in todo}
    for row in qualified_rows(dynamodb, settings.offers_table, now):
        hour = _qualified_ms(row) // HOUR_MS * HOUR_MS
        if hour in by_hour:
            by_hour[hour].append(row)
    marks = purchase_marks(dynamodb, settings.predictions_table,
                           [row["session_id"]["S"] for rows in by_hour.values() for row in rows])
    for hour, rows in by_hour.items():
        offered, held_out = groups(rows, marks)
        body = {"schema": SCHEMA, "hour": hour_name(hour), "offered": asdict(offered),
                "held_out": asdict(held_out), "holdout_percent": list(shares_of(rows)), "recorded_at": _iso(now),
                **session_lists(rows)}
        s3.put_object(Bucket=settings.bucket, Key=record_key(hour), Body=json.dumps(body).encode(),
                      ContentType="application/json")
    return todo


def session_lists(rows: list[dict]) -> dict:
    """The sessions of each group, which ``make train`` leaves out (offered: a discount may have made
    them buy) or weighs (held out, by 100 / their share). A session keyed by a user pseudonym (its
    tracker sent no session id) is counted but not listed: a record holds no pseudonym."""
    listed = [row for row in rows if listable(row["session_id"]["S"])]
    return {"offered_sessions": sorted(row["session_id"]["S"] for row in listed if row["kind"]["S"] == "offer"),
            "held_out_sessions": sorted(
                ({"session_id": row["session_id"]["S"],
                  "holdout_percent": float(row["holdout_percent"]["N"]) if "holdout_percent" in row else None}
                 for row in listed if row["kind"]["S"] == "holdout"), key=lambda entry: entry["session_id"])}


@dataclass(frozen=True)
class Pooled:
    uplift: Uplift
    since_ms: int
    until_ms: int
    hours: int                  # recorded hours pooled
    missing: list[int]          # hours of the period without a record


def pool(s3, bucket: str, since_ms: int | None = None, until_ms: int | None = None, now: float | None = None) -> Pooled:
    """The recorded hours that overlap [since_ms, until_ms), summed; by default from the first
    recorded hour to the end of the last. The period ends at the latest with the last finished hour."""
    hours = recorded(s3, bucket)
    if not hours:
        raise click.ClickException(f"no hour is recorded in s3://{bucket}/{PREFIX}: run --record first (hourly)")
    since_ms = min(hours) if since_ms is None else since_ms // HOUR_MS * HOUR_MS
    this_hour = int((time.time() if now is None else now) * 1000) // HOUR_MS * HOUR_MS
    until_ms = max(hours) + HOUR_MS if until_ms is None else max(since_ms, min(until_ms, this_hour))
    offered, held_out, shares = Group(0, 0), Group(0, 0), set()
    pooled = sorted(hour for hour in hours if since_ms <= hour < until_ms)
    for hour in pooled:
        (hour_offered, hour_held_out), hour_shares = _read_record(s3, bucket, hours[hour])
        offered, held_out = offered + hour_offered, held_out + hour_held_out
        shares.update(hour_shares)
    missing = [hour for hour in range(since_ms, until_ms, HOUR_MS) if hour not in hours]
    uplift = compare(offered, held_out, shares=tuple(sorted(shares)))
    return Pooled(uplift, since_ms, until_ms, len(pooled), missing)


def _read_record(s3, bucket: str, key: str) -> tuple[tuple[Group, Group], list[float]]:
    """((offered, held out), the shares) of one hour's record; a ClickException naming it when it is not one."""
    try:
        body = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        counts = tuple(Group(int(body[name]["sessions"]), int(body[name]["bought"])) for name in ("offered", "held_out"))
        return counts, [float(share) for share in body.get("holdout_percent", [])]
    except (ValueError, TypeError, KeyError) as exc:
        raise click.ClickException(f"s3://{bucket}/{key} is not an uplift record ({exc!r}): "
                                   "move it away, or delete it and record the hour again if its rows are still there") from None


def _iso(at_s: float) -> str:
    return dt.datetime.fromtimestamp(at_s, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def as_dict(uplift: Uplift) -> dict:
    """The figures as plain JSON values (no NaN: a group without sessions has no rate, null)."""
    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 6)

    by_name = {name: {**asdict(group), "rate": number(group.rate)}
               for name, group in (("offered", uplift.offered), ("held_out", uplift.held_out))}
    return {**by_name, "open_sessions": uplift.open_sessions, "difference": number(uplift.difference),
            "low": number(uplift.low), "high": number(uplift.high), "verdict": uplift.verdict(),
            "holdout_percent": list(uplift.shares), "warning": uplift.share_warning()}


def table_heading(uplift: Uplift, offers_table: str) -> str:
    return (f"sessions that qualified for an offer ({offers_table}, the last offer_ttl_hours; "
            f"{uplift.open_sessions:,} too recent to have finished, left out)")


def pooled_heading(pooled: Pooled) -> str:
    missing = ""
    if pooled.missing:
        named = ", ".join(hour_name(hour) for hour in pooled.missing[:3])
        missing = f"; {len(pooled.missing):,} not recorded: {named}{', ...' if len(pooled.missing) > 3 else ''}"
    return (f"sessions that qualified from {hour_name(pooled.since_ms)}:00Z to {hour_name(pooled.until_ms)}:00Z "
            f"({pooled.hours:,} recorded hour{'' if pooled.hours == 1 else 's'}{missing})")


def render(uplift: Uplift, heading: str) -> str:
    def line(name: str, group: Group) -> str:
        rate = f"{100 * group.rate:5.1f} %" if group.sessions else "    –  "
        return f"{name:<10}{group.sessions:>9,}{group.bought:>8,}   {rate}"

    lines = [heading, f"{'group':<10}{'sessions':>9}{'bought':>8}   rate",
             line("offered", uplift.offered), line("held out", uplift.held_out)]
    if uplift.offered.sessions and uplift.held_out.sessions:
        lines.append(f"difference (offered - held out): {100 * uplift.difference:+.1f} points, "
                     f"95 % interval {100 * uplift.low:+.1f} to {100 * uplift.high:+.1f}")
    lines.append(uplift.verdict())
    if warning := uplift.share_warning():
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


@click.command(cls=AwsCommand, context_settings=CLI_CONTEXT, epilog="\b\nExamples:\n" + "\n".join(
    line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith("python -m")))
@click.option("--settle-minutes", type=FiniteRange(min=0, max=MAX_DURATION_S / 60), default=30.0,
              help="leave out sessions that qualified this recently: they may still buy (the scorer's session timeout)")
@click.option("--record", "to_record", is_flag=True,
              help="write the counts and sessions of each finished hour not yet recorded to the bucket (reports/uplift/)")
@click.option("--recorded", "from_records", is_flag=True,
              help="compare the groups over the recorded hours (all, or --since to --until), not the table's rows")
@click.option("--since", metavar="TIME", callback=iso_time, help="with --recorded: the first hour (ISO time, UTC unless it says)")
@click.option("--until", metavar="TIME", callback=iso_time, help="with --recorded: the end of the period")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def main(settle_minutes: float, to_record: bool, from_records: bool, since: dt.datetime | None,
         until: dt.datetime | None, as_json: bool) -> None:
    """Compare the purchase rate of the sessions offered a discount with that of the control group
    (the engine's holdout_percent): over the offers table's rows (they live offer_ttl_hours), or over
    the hours recorded with --record (as long an experiment as needed).

    A session bought when the scorer marked its purchase (bought_ms in the predictions table, which
    needs the scorer's lookup_table) at or after the click that qualified it. Settings as the
    engine's: CLICKSTREAM_* variables and the [discount] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/discount-engine.md).
    """
    if to_record and from_records:
        raise click.UsageError("--record writes the hours, --recorded reads them: one at a time")
    if (since or until) and not from_records:
        raise click.UsageError("--since and --until choose recorded hours: use them with --recorded")
    if since and until and since >= until:
        raise click.BadParameter(f"--since {since:%Y-%m-%dT%H:%M}Z is not before --until {until:%Y-%m-%dT%H:%M}Z")
    settings = load(DiscountSettings, section="discount")
    if from_records:
        _print_pooled(pool(aws.client("s3", settings.region), settings.bucket, _ms(since), _ms(until)), as_json)
        return
    dynamodb = aws.client("dynamodb", settings.region)
    if to_record:
        written = record(dynamodb, aws.client("s3", settings.region), settings, settle_minutes * 60)
        names = [hour_name(hour) for hour in written]
        click.echo(json.dumps({"recorded": names}) if as_json else
                   f"recorded {len(names)} hours in s3://{settings.bucket}/{PREFIX}" +
                   (f": {names[0]} to {names[-1]}" if names else " (every finished hour already was)"))
        return
    uplift = measure(dynamodb, settings.offers_table, settings.predictions_table, settle_minutes * 60)
    if as_json:
        click.echo(json.dumps(as_dict(uplift)))
    else:
        click.echo(render(uplift, table_heading(uplift, settings.offers_table)))


def _ms(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _print_pooled(pooled: Pooled, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({**as_dict(pooled.uplift), "since": hour_name(pooled.since_ms),
                               "until": hour_name(pooled.until_ms), "hours": pooled.hours,
                               "missing_hours": [hour_name(hour) for hour in pooled.missing]}))
        return
    click.echo(render(pooled.uplift, pooled_heading(pooled)))


if __name__ == "__main__":
    main()
