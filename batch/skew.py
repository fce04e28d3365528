"""Training/serving skew, measured live: does each session's latest prediction match what training
computes from the lake for the same events? With ``--rows offers``: did the predictions that made offers?

The predictions table holds each session's latest prediction: the event it followed (``event_id``),
how many events the scorer had folded (``events_in_session``), the model version and ``p_buy``. For
a sample of those rows this reads the session's events back from the lake, orders and cuts them as
training does (``train_features.records``, the same inactivity gap), folds them with
``common.features`` up to that event, scores the features with that model version and compares.

The tests pin the fold's parity on fixed sessions; this measures what production adds: sessions the
scorer evicted or could not rebuild after a restart, events that reached it in another order than
their collection times say, or that never reached the lake, and a scorer running other feature code
under the same ``FEATURE_VERSION``.

The latest prediction is the end of a session; an offer is made mid-session, on the first prediction
that qualified, and that is the score the discount was spent on. ``--rows offers`` checks the
prediction of each offer and control-group (holdout) row of the offers table instead (``both``: both
kinds, from one read of the lake). The row names its event, model version and ``p_buy``, and (offer
schema 1-1-1) its ``events_in_session`` and ``collected_ms``; an older row's event count is not
checked, and its click time stands for its collection.

Both kinds see one prediction of a session; the scorer published one after each event. ``--rows
stream`` checks every prediction of a sample of sessions that the predictions stream still holds
(24 h): a session folded in another order than training's for a few events, then alike again, shows
only there. ``all``: the three kinds.

    python -m batch.skew                                  # the last 24 h up to 15 min ago, 1,000 sessions
    python -m batch.skew --since 2026-12-06T00:00 --until 2026-12-06T12:00 --sample 5000
    python -m batch.skew --rows offers                    # the predictions that made offers
    python -m batch.skew --rows stream                    # every prediction of 1,000 sessions
    python -m batch.skew --rows all                       # all three: what the nightly schedule runs

It runs where ``make train`` does (Spark's module orders the events; onnxruntime scores them), with
its settings: the ``[train]`` section (bucket, predictions_table, offers_table, predictions_stream,
session_gap_minutes). Exit 1 when a prediction's score or event count differs, or its event is missing from the lake;
docs/operations.md.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import heapq
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from batch import lake
from batch.train_config import TrainSettings
from common import aws, registry
from common.cli import CLI_CONTEXT, AwsCommand, ConfigFailed, iso_time
from common.config import ConfigError, load
from common.features import EVENT_FIELDS, event_time_ms, in_calendar, parse_ms, session_key, session_prefixes
from common.streams import ReadPace, walk_stream

HOUR_MS = 3_600_000
TOLERANCE = 1e-5            # the export parity gate's; the scorer's p_buy is rounded to 6 decimals
COLUMNS = [*dict.fromkeys((*EVENT_FIELDS, "domain_userid", "user_id", "etl_tstamp"))]
# What common.features.session_key reads, in its order.
KEY_COLUMNS = ("domain_sessionid", "domain_userid", "user_id", "network_userid", "event_id")

MATCH = "match"
SCORE_DIFFERS = "score differs"
COUNT_DIFFERS = "event count differs"
NOT_IN_LAKE = "not in the lake"
CUT = "started before the window"
NO_MODEL = "model not servable"
VERDICTS = (MATCH, SCORE_DIFFERS, COUNT_DIFFERS, NOT_IN_LAKE, CUT, NO_MODEL)
FAILING = (SCORE_DIFFERS, COUNT_DIFFERS, NOT_IN_LAKE)      # the ones that make the command exit 1
# The rows checked: each session's latest prediction (the predictions table), the prediction each
# offer and holdout row of the offers table was decided on, or every prediction of a session that the
# predictions stream still holds.
LATEST, OFFERS, STREAM = "latest", "offers", "stream"
ROW_NAMES = {LATEST: "latest prediction", OFFERS: "offer or holdout row's prediction", STREAM: "prediction"}
ROW_CHOICES = {LATEST: (LATEST,), OFFERS: (OFFERS,), STREAM: (STREAM,), "both": (LATEST, OFFERS),
               "all": (LATEST, OFFERS, STREAM)}
# A prediction reaches its stream after the collector received its event, by the collector's clock:
# the stream is read from this long before --since, in case that clock ran ahead of Kinesis'.
STREAM_CLOCK_SLACK_MS = 300_000


@dataclass(frozen=True)
class Live:
    """A prediction the scorer published: a predictions-table row (a session's latest), the one an
    offers-table row was decided on, or a record of the predictions stream."""
    session_id: str
    event_id: str
    events: int | None                  # None: the row does not say (an offer row before schema 1-1-1)
    p_buy: float
    model_name: str
    model_version: str
    collected_ms: int


@dataclass
class Finding:
    live: Live
    verdict: str
    events: int | None = None           # what the lake's events give
    p_buy: float | None = None
    note: str = ""

    def describe(self) -> str:
        live = self.live
        offline = "" if self.p_buy is None else f"; from the lake: p_buy {self.p_buy:.6f} after {self.events} events"
        after = "" if live.events is None else f" after {live.events} events"
        return (f"session {live.session_id} event {live.event_id}: live p_buy {live.p_buy:.6f}{after} "
                f"(model {live.model_version}){offline}")


@dataclass
class Report:
    rows: str                                            # LATEST, OFFERS or STREAM
    table: str                                           # or stream
    since_ms: int
    until_ms: int
    in_window: int = 0                                   # table rows collected in the window
    findings: list[Finding] = field(default_factory=list)
    retained_from_ms: int | None = None                  # STREAM: what arrived before it is gone

    @property
    def counts(self) -> Counter:
        return Counter(finding.verdict for finding in self.findings)

    @property
    def failed(self) -> bool:
        return any(self.counts[verdict] for verdict in FAILING)

    def max_abs_diff(self) -> float:
        return max((abs(f.p_buy - f.live.p_buy) for f in self.findings if f.p_buy is not None), default=0.0)


def live_predictions(dynamodb, table: str, since_ms: int, until_ms: int) -> Iterator[Live]:
    """Every row of the predictions table whose event was collected in [since_ms, until_ms)."""
    pages = dynamodb.get_paginator("scan").paginate(
        TableName=table, ProjectionExpression="session_id, event_id, events_in_session, p_buy, model_name, "
                                              "model_version, collector_tstamp")
    for page in pages:
        for item in page["Items"]:
            try:
                collected = parse_ms(item["collector_tstamp"]["S"])
                live = Live(item["session_id"]["S"], item["event_id"]["S"], int(item["events_in_session"]["N"]),
                            float(item["p_buy"]["N"]), item["model_name"]["S"], item["model_version"]["S"], collected)
            except (KeyError, ValueError):
                continue        # a row without these (an older scorer's): nothing to compare
            if since_ms <= collected < until_ms:
                yield live


def offer_decisions(dynamodb, table: str, since_ms: int, until_ms: int) -> Iterator[Live]:
    """The prediction of every offer and holdout row of the offers table whose event was collected in
    [since_ms, until_ms), but those past their TTL (no longer served, and soon deleted)."""
    pages = dynamodb.get_paginator("scan").paginate(
        TableName=table, FilterExpression="#k IN (:offer, :holdout)", ExpressionAttributeNames={"#k": "kind"},
        ExpressionAttributeValues={":offer": {"S": "offer"}, ":holdout": {"S": "holdout"}})
    now = time.time()
    for page in pages:
        for item in page["Items"]:
            try:
                collected = int(_number(item, "collected_ms", "clicked_ms"))
                events = _number(item, "events_in_session")
                live = Live(item["session_id"]["S"], item["event_id"]["S"], None if events is None else int(events),
                            float(item["p_buy"]["N"]), item["model_name"]["S"], item["model_version"]["S"], collected)
            except (KeyError, TypeError, ValueError):
                continue        # a row before schema 1-1-0 names no click: nothing to place it by
            if since_ms <= collected < until_ms and not aws.ttl_expired(item, now):
                yield live


def stream_predictions(kinesis, stream: str, since_ms: int, until_ms: int) -> Iterator[Live]:
    """Every prediction on the predictions stream whose event was collected in [since_ms, until_ms),
    as far as the stream's retention (24 h) still holds them; duplicates included (at-least-once). Read
    at a pace that leaves the discount engine, which reads the same shards, its share."""
    for data in walk_stream(kinesis, stream, (since_ms - STREAM_CLOCK_SLACK_MS) / 1000, ReadPace()):
        try:
            record = json.loads(data)
            collected = parse_ms(record["collector_tstamp"])
            live = Live(record["session_id"], record["event_id"], int(record["events_in_session"]),
                        float(record["p_buy"]), record["model_name"], record["model_version"], collected)
        except (KeyError, TypeError, ValueError):
            continue        # not a prediction of this scorer's (no count: an older one's): nothing to compare
        if since_ms <= collected < until_ms:
            yield live


def retained_from(kinesis, stream: str) -> int:
    """The arrival time (epoch ms) before which the stream no longer holds records: now less its retention."""
    summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    return int((time.time() - summary["RetentionPeriodHours"] * 3600) * 1000)


def _number(item: dict, *names: str) -> float | None:
    """The first of these number attributes the row has."""
    return next((float(item[name]["N"]) for name in names if name in item), None)


def sample_sessions(rows: Iterable[Live], size: int, salt: bytes) -> tuple[list[Live], int]:
    """(the distinct rows of a uniform sample of ``size`` sessions at most, how many rows there were).

    A stream holds a session's rows among everyone else's: the sessions kept are those whose salted
    hash ranks lowest, so each is kept whole or not at all, in one pass and with memory for the sample
    only. A table's rows, one per session, are sampled alike."""
    kept: dict[str, dict[Live, None]] = {}
    highest: list[tuple[int, str]] = []           # (-rank, session) of the kept sessions, highest rank first
    seen = 0
    for seen, row in enumerate(rows, 1):
        if row.session_id not in kept:
            rank = int.from_bytes(hashlib.blake2b(row.session_id.encode(), key=salt, digest_size=8).digest(), "big")
            if len(highest) < size:
                heapq.heappush(highest, (-rank, row.session_id))
            elif rank < -highest[0][0]:
                del kept[heapq.heapreplace(highest, (-rank, row.session_id))[1]]
            else:
                continue
            kept[row.session_id] = {}
        kept[row.session_id][row] = None           # a record delivered twice is checked once
    return [row for rows_of_session in kept.values() for row in rows_of_session], seen


def check(s3, dynamodb, bucket: str, tables: dict[str, str], since_ms: int, until_ms: int, *, size: int = 1000,
          lead_in_hours: int = 6, gap_minutes: int = 30, rng: random.Random | None = None,
          progress: bool = False, kinesis=None) -> list[Report]:
    """Compare a sample of the live predictions collected in [since_ms, until_ms) with the lake, a
    report for each kind of row in ``tables`` (LATEST: the predictions table's; OFFERS: those the
    offers table's rows were decided on; STREAM: every prediction of a sample of sessions, from the
    predictions stream that ``tables`` names, read with ``kinesis``), from one read of the lake."""
    reports, samples, rng = [], [], rng or random.Random()
    for rows_kind, table in tables.items():
        report = Report(rows_kind, table, since_ms, until_ms)
        if rows_kind == STREAM:
            report.retained_from_ms = retained_from(kinesis, table)
            source = stream_predictions(kinesis, table, since_ms, until_ms)
        else:
            source = (offer_decisions if rows_kind == OFFERS else live_predictions)(dynamodb, table, since_ms, until_ms)
        rows, report.in_window = sample_sessions(source, size, rng.randbytes(16))
        reports.append(report)
        samples.append(rows)
    keys = {row.session_id for rows in samples for row in rows}
    if not keys:
        return reports
    read_from_ms = (since_ms - lead_in_hours * HOUR_MS) // HOUR_MS * HOUR_MS
    events = lake_events(s3, bucket, keys, read_from_ms, until_ms, progress)
    wanted: dict[str, set[str]] = {}
    for row in (row for rows in samples for row in rows):
        wanted.setdefault(row.session_id, set()).add(row.event_id)
    folds = {key: fold_session(events.get(key, []), event_ids, read_from_ms, gap_minutes * 60_000)
             for key, event_ids in wanted.items()}
    for report, rows in zip(reports, samples):
        report.findings = score(s3, bucket, rows, [folds[row.session_id].get(row.event_id, UNSEEN) for row in rows])
    return reports


# ------------------------------------------------------------------------------------- the lake


def lake_events(s3, bucket: str, keys: set[str], from_ms: int, until_ms: int, progress: bool) -> dict[str, list[dict]]:
    """The lake's events of these sessions (by the scorer's session key) collected from ``from_ms``,
    by session, in the order the scorer folds them, each event once."""
    # Training's own ordering; its module loads Spark, so only when this runs.
    from batch.train_features import records

    first, last = lake.partition(from_ms), lake.partition(until_ms)      # hours of collector_tstamp
    objects = [obj for obj in lake.objects_between(s3, bucket, "enriched", _day(from_ms), _day(until_ms))
               if obj["Key"].endswith(".parquet") and first <= _partition_of(obj["Key"]) <= last]
    wanted = pa.array(sorted(keys), pa.string())
    parts = []
    for obj in tqdm(objects, desc="lake files", unit="file", disable=not progress):
        table = lake.lift_from_extra(lake.read_parquet_object(s3, bucket, obj["Key"], [*COLUMNS, "extra"]), COLUMNS)
        parts.append(_as_millis(table.filter(_may_be_of(table, wanted))))
    if not parts:
        return {}
    found = pa.concat_tables(parts, promote_options="permissive")
    by_key: dict[str, list[int]] = {}
    for index, row in enumerate(found.select([name for name in KEY_COLUMNS if name in found.column_names]).to_pylist()):
        if (key := session_key(row)) in keys:
            by_key.setdefault(key, []).append(index)
    return {key: records(found.take(indices)) for key, indices in by_key.items()}


def _may_be_of(table: pa.Table, wanted: pa.Array) -> pa.ChunkedArray:
    """Rows one of whose ids is a wanted session key: a superset of those whose key
    (common.features.session_key, applied after) is one, kept small before Python reads them."""
    masks = [pc.fill_null(pc.is_in(table[name], value_set=wanted), False)
             for name in KEY_COLUMNS if name in table.column_names]
    return functools.reduce(pc.or_, masks)


def _as_millis(table: pa.Table) -> pa.Table:
    """Timestamps as epoch ms, as training hands the fold its events (parse_ms takes either)."""
    for index, column in enumerate(table.schema):
        if pa.types.is_timestamp(column.type):
            millis = pc.cast(table[column.name], pa.timestamp("ms", column.type.tz), safe=False).cast(pa.int64())
            table = table.set_column(index, column.name, millis)
    return table


def _day(at_ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).date()


def _partition_of(key: str) -> str:
    date, hour = lake.key_partition(key)
    return f"date={date}/hour={hour}"


# ---------------------------------------------------------------------------------------- the fold


Fold = tuple[str, int, list[float] | None]     # (verdict so far, events folded, features)
UNSEEN: Fold = (NOT_IN_LAKE, 0, None)


def fold_session(events: list[dict], event_ids: set[str], read_from_ms: int, gap_ms: int) -> dict[str, Fold]:
    """The fold after each of these events of one session's lake events, by event id, each in its run
    (training's cut: more than ``gap_ms`` after the latest event starts a new one). An event missing
    from the result is not in the lake, or follows a purchase (never scored, so not the scorer's)."""
    folds: dict[str, Fold] = {}
    for run in _runs(events, gap_ms):
        if not event_ids.intersection(event["event_id"] for event in run):
            continue
        if parse_ms(run[0]["collector_tstamp"]) - read_from_ms < gap_ms:
            # Its start may lie before what was read.
            folds.update((event["event_id"], (CUT, 0, None)) for event in run if event["event_id"] in event_ids)
            continue
        for count, (event, row) in enumerate(session_prefixes(run), 1):
            if event["event_id"] in event_ids:
                folds[event["event_id"]] = (MATCH, count, row)
    return folds


def _runs(events: list[dict], gap_ms: int) -> Iterator[list[dict]]:
    run: list[dict] = []
    latest = None
    for event in events:
        at = event_time_ms(event)
        if not in_calendar(at):
            continue                # skipped by the scorer and training alike
        if latest is not None and at - latest > gap_ms:
            yield run
            run = []
        run.append(event)
        latest = at if latest is None else max(latest, at)
    if run:
        yield run


# ------------------------------------------------------------------------------------ the scores


def score(s3, bucket: str, rows: list[Live], folded: list[Fold]) -> list[Finding]:
    """A finding for each row, ``folded`` the lake's fold to its event."""
    findings = []
    by_model: dict[tuple[str, str], list[tuple[Live, int, list[float]]]] = {}
    for live, (verdict, count, features) in zip(rows, folded, strict=True):
        if features is None:
            findings.append(Finding(live, verdict))
        else:
            by_model.setdefault((live.model_name, live.model_version), []).append((live, count, features))
    for (name, version), folded_rows in by_model.items():
        try:
            probabilities = _probabilities(s3, bucket, name, version, [features for _, _, features in folded_rows])
        except (LookupError, ValueError) as exc:
            findings.extend(Finding(live, NO_MODEL, note=str(exc)) for live, _, _ in folded_rows)
            continue
        for (live, count, _), p_buy in zip(folded_rows, probabilities):
            if live.events is not None and count != live.events:
                verdict = COUNT_DIFFERS
            else:
                verdict = MATCH if abs(p_buy - live.p_buy) <= TOLERANCE else SCORE_DIFFERS
            findings.append(Finding(live, verdict, count, p_buy))
    return findings


def _probabilities(s3, bucket: str, name: str, version: str, matrix: list[list[float]]) -> list[float]:
    """P(buy) of each row with that model version, scored as the parity gate scores (float32);
    LookupError or ValueError when the registry no longer holds it, or holds a model of other features."""
    from batch import export

    bundle = registry.load(s3, bucket, name, version)
    if not registry.has_fold_features(bundle.meta):
        raise ValueError(f"model {name} version {version} does not take this code's features")
    return export.onnx_probabilities(bundle.onnx, np.asarray(matrix)).tolist()


# ------------------------------------------------------------------------------------- the command


@click.command(cls=AwsCommand, context_settings=CLI_CONTEXT, epilog="\b\nExamples:\n" + "\n".join(
    line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith("python -m")))
@click.option("--since", metavar="TIME", callback=iso_time,
              help="ISO time of the first collection to check, UTC unless it says (default: 24 h before --until)")
@click.option("--until", metavar="TIME", callback=iso_time,
              help="ISO time (default: 15 min ago: the lake loader writes its files every lake_flush_seconds, 5 min)")
@click.option("--sample", "size", type=click.IntRange(min=1), default=1000,
              help="sessions to check of each kind of row, drawn at random from its table or stream")
@click.option("--rows", "rows_kind", type=click.Choice(list(ROW_CHOICES)), default=LATEST, show_default=True,
              help="which predictions: each session's latest (predictions_table), those the offers and holdout "
                   "rows were decided on (offers_table), every one of a session (predictions_stream), "
                   "both (latest and offers) or all three")
@click.option("--lead-in-hours", type=click.IntRange(min=0), default=6,
              help="lake hours read before --since, for sessions that began earlier")
@click.option("--bucket", help="overrides CLICKSTREAM_BUCKET")
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr")
def main(since: dt.datetime | None, until: dt.datetime | None, size: int, rows_kind: str, lead_in_hours: int,
         bucket: str | None, progress: bool) -> None:
    """Compare the scorer's latest prediction of a sample of sessions (with --rows offers: the
    prediction each offer was made on; with --rows stream: every prediction of the session on the
    predictions stream) with what training computes from the lake for the same events: features,
    event count and score.

    Settings come from CLICKSTREAM_* variables and the [train] section of the TOML file named by
    CLICKSTREAM_CONFIG, as make train reads them.
    """
    try:
        settings = load(TrainSettings, section="train", bucket=bucket)
    except ConfigError as exc:
        raise ConfigFailed(exc) from None
    until = until or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=15)
    since = since or until - dt.timedelta(hours=24)
    if since >= until:
        raise click.BadParameter(f"--since {since:%Y-%m-%dT%H:%M:%SZ} is not before --until {until:%Y-%m-%dT%H:%M:%SZ}")
    tables = {LATEST: settings.predictions_table, OFFERS: settings.offers_table, STREAM: settings.predictions_stream}
    chosen = {kind: tables[kind] for kind in ROW_CHOICES[rows_kind]}
    # Paced, but other readers' bursts may still make Kinesis refuse a call: more retries.
    kinesis = aws.client("kinesis", settings.region, timeout=30, retries=10)
    reports = check(aws.client("s3", settings.region, timeout=30), aws.client("dynamodb", settings.region, timeout=30),
                    settings.bucket, chosen, _ms(since), _ms(until), size=size, lead_in_hours=lead_in_hours,
                    gap_minutes=settings.session_gap_minutes, progress=progress, kinesis=kinesis)
    for report in reports:
        _print(report)
    sys.exit(1 if any(report.failed for report in reports) else 0)


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def _iso(at_ms: int) -> str:
    return f"{dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


def _print(report: Report) -> None:
    window = f"{_iso(report.since_ms)} to {_iso(report.until_ms)}"
    if report.retained_from_ms is not None and report.since_ms < report.retained_from_ms:
        click.echo(f"{report.table} no longer holds what reached it before {_iso(report.retained_from_ms)} (its "
                   "retention): the window's start is checked only as far as it is left")
    if not report.findings:
        where = "on" if report.rows == STREAM else "in"
        click.echo(f"no {ROW_NAMES[report.rows]} {where} {report.table} followed an event collected from {window}: "
                   "nothing to check")
        return
    counts = report.counts
    if report.rows == STREAM:
        sessions = len({finding.live.session_id for finding in report.findings})
        click.echo(f"checked {len(report.findings):,} predictions of {sessions:,} sessions, of the {report.in_window:,} "
                   f"predictions on {report.table} that followed an event collected from {window}:")
    else:
        click.echo(f"checked {len(report.findings):,} of the {report.in_window:,} sessions in {report.table} whose "
                   f"{ROW_NAMES[report.rows]} followed an event collected from {window}:")
    for verdict in VERDICTS:
        click.echo(f"  {verdict:<27} {counts[verdict]:>7,}")
    click.echo(f"largest |p_buy live - p_buy from the lake|: {report.max_abs_diff():.3g} (tolerance {TOLERANCE:g})")
    for finding in [f for f in report.findings if f.verdict in (*FAILING, NO_MODEL)][:10]:
        click.echo(f"{finding.verdict}: {finding.describe()}" + (f" ({finding.note})" if finding.note else ""))


if __name__ == "__main__":
    main()
