"""What the pipeline did, counted from its outputs: `python -m demo.summary` or ``summarize(settings)``.

Everything is read from the streams, the lake and the registry themselves, not from the components'
counters, so the summary stays true after a restart and says what actually landed where. Streams
are read without a consumer (no leases, no checkpoints): a plain walk of every shard, optionally
from a point in time (``since``), so `make demo` can count only its own run.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import click
import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from common import aws, logs, registry
from common.cli import CLI_CONTEXT, AwsCommand, ConfigFailed, FiniteRange
from common.config import AwsSettings, ConfigError, load
from common.streams import walk_stream

log = logging.getLogger("summary")


@dataclasses.dataclass(frozen=True)
class SummarySettings(AwsSettings):
    model_name: str = registry.DEFAULT_MODEL
    log_level: str = "WARNING"


# ------------------------------------------------------------------------------------ streams


def events_in_raw(data: bytes) -> int:
    """Tracker events carried by one raw record: one per GET, the payload's items for a POST."""
    try:
        record = json.loads(data)
        if record.get("method") == "POST" and record.get("body"):
            return len(json.loads(record["body"]).get("data") or []) or 1
    except (ValueError, AttributeError):
        pass                           # an unreadable record still was one hit sent
    return 1


def count_raw(client, stream_name: str, since: float | None) -> dict:
    records = events = 0
    for data in walk_stream(client, stream_name, since):
        records += 1
        events += events_in_raw(data)
    return {"records": records, "events": events}


def percentiles(values: list[int], points=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles (plus max), or an empty dict when there are no values."""
    if not values:
        return {}
    ordered = sorted(values)
    found = {f"p{p}": ordered[max(0, -(-p * len(ordered) // 100) - 1)] for p in points}
    return {**found, "max": ordered[-1]}


def _predictions(client, stream_name: str, since: float | None):
    """The predictions on the stream (from ``since``), None for a record that is not one: not JSON,
    not an object, or without string session_id and decision (which are counted, so must hash)."""
    for data in walk_stream(client, stream_name, since):
        try:
            prediction = json.loads(data)
        except (ValueError, RecursionError):              # RecursionError: absurdly nested JSON
            prediction = None
        readable = (isinstance(prediction, dict) and isinstance(prediction.get("session_id"), str)
                    and isinstance(prediction.get("decision"), str))
        yield prediction if readable else None


def count_predictions(client, stream_name: str, since: float | None) -> dict:
    """Predictions, sessions and decisions on the stream; unreadable records are skipped and counted,
    so one stray write cannot stop the summary."""
    latencies, decisions, sessions, skipped = [], Counter(), set(), 0
    for prediction in _predictions(client, stream_name, since):
        if prediction is None:
            skipped += 1
            continue
        sessions.add(prediction["session_id"])
        decisions[prediction["decision"]] += 1
        if isinstance(prediction.get("latency_us"), int):
            latencies.append(prediction["latency_us"])
    return {"records": sum(decisions.values()), "sessions": len(sessions), "buy": decisions["buy"],
            "defer": decisions["defer"], "skipped": skipped, "latency_us": percentiles(latencies)}


def latency_of_events_since(client, stream_name: str, since: float) -> dict:
    """Time-in-scorer percentiles of the predictions for events the collector received after
    ``since`` (epoch seconds): a scorer catching up on older events scores them in the same minutes."""
    cutoff = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return percentiles([p["latency_us"] for p in _predictions(client, stream_name, since)
                        if p and isinstance(p.get("collector_tstamp"), str) and p["collector_tstamp"] >= cutoff
                        and isinstance(p.get("latency_us"), int)])


# ------------------------------------------------------------------------------------ lake


class S3RangeFile(io.RawIOBase):
    """A seekable read-only view of one S3 object through ranged GETs: pyarrow reads only the footer."""

    def __init__(self, s3, bucket: str, key: str, size: int):
        self.s3, self.bucket, self.key, self.size, self.position = s3, bucket, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer)) - 1
        if end < self.position:
            return 0
        body = self.s3.get_object(Bucket=self.bucket, Key=self.key,
                                  Range=f"bytes={self.position}-{end}")["Body"].read()
        buffer[:len(body)] = body
        self.position += len(body)
        return len(body)


def lake_rows(s3, bucket: str, prefix: str = "enriched/") -> dict:
    """Rows and files of the Parquet lake, from each file's footer (no data pages are read)."""
    rows = files = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith(".parquet"):
                continue
            handle = io.BufferedReader(S3RangeFile(s3, bucket, item["Key"], item["Size"]), buffer_size=64 * 1024)
            rows += pq.ParquetFile(handle).metadata.num_rows
            files += 1
    return {"rows": rows, "files": files}


# ------------------------------------------------------------------------------------ model, offers


def model_info(s3, bucket: str, name: str) -> dict:
    """The CURRENT model's version and the figures of its model.json (empty when none is published)."""
    version = registry.current_version(s3, bucket, name)
    if not version:
        return {"name": name, "version": None}
    try:
        meta = json.loads(s3.get_object(Bucket=bucket, Key=f"{registry.PREFIX}/{name}/{version}/model.json")
                          ["Body"].read())
    except ClientError:
        return {"name": name, "version": version, "error": "model.json missing"}
    metrics = {key: value for key, value in (meta.get("metrics") or {}).items() if isinstance(value, (int, float))}
    return {"name": name, "version": version, "roc_auc": metrics.get("roc_auc"), "pr_auc": metrics.get("pr_auc"),
            "threshold": meta.get("threshold"), "algorithm": meta.get("algorithm"),
            "created_at": meta.get("created_at"), "metrics": metrics}


def count_offers(dynamodb, table: str, kind: str = "offer") -> int:
    """Rows of one kind in the offers table: ``offer``, or ``holdout`` (the control group's sessions)."""
    total, start = 0, None
    while True:
        kwargs = {"TableName": table, "Select": "COUNT", "FilterExpression": "#k = :kind",
                  "ExpressionAttributeNames": {"#k": "kind"}, "ExpressionAttributeValues": {":kind": {"S": kind}}}
        if start:
            kwargs["ExclusiveStartKey"] = start
        response = dynamodb.scan(**kwargs)
        total += response["Count"]
        start = response.get("LastEvaluatedKey")
        if not start:
            return total


# ------------------------------------------------------------------------------------ summary


def summarize(settings: AwsSettings, since: float | None = None, model_name: str | None = None,
              progress: Callable[[str], None] = lambda step: None) -> dict:
    """Counts of every stage; streams from ``since`` (epoch seconds) when given, the lake in full.

    ``progress`` is told each step as it starts, so a caller can show that a long count is moving.
    """
    kinesis = aws.client("kinesis", settings.region)
    s3 = aws.client("s3", settings.region)
    name = model_name or getattr(settings, "model_name", registry.DEFAULT_MODEL)
    result: dict = {"since": since}
    steps = [
        ("sent", "counting the raw stream", lambda: count_raw(kinesis, settings.raw_stream, since)),
        ("enriched", "counting the enriched stream",
         lambda: sum(1 for _ in walk_stream(kinesis, settings.enriched_stream, since))),
        ("bad", "counting the bad stream", lambda: sum(1 for _ in walk_stream(kinesis, settings.bad_stream, since))),
        ("lake", "reading Parquet footers in the lake", lambda: lake_rows(s3, settings.bucket)),
        ("scored", "reading the predictions stream",
         lambda: count_predictions(kinesis, settings.predictions_stream, since)),
        ("offers", "counting offers", lambda: count_offers(aws.client("dynamodb", settings.region),
                                                           settings.offers_table)),
        ("held_out", "counting the control group", lambda: count_offers(aws.client("dynamodb", settings.region),
                                                                        settings.offers_table, "holdout")),
        ("model", "reading the model registry", lambda: model_info(s3, settings.bucket, name)),
    ]
    for key, label, count in steps:
        progress(label)
        result[key] = count()
    return result


def _share(part: int, whole: int) -> str:
    return f" ({100 * part / whole:.1f}%)" if whole else ""


def render(summary: dict) -> str:
    """The summary as a few aligned lines for a terminal."""
    sent, scored, model = summary["sent"], summary["scored"], summary["model"]
    checked = summary["enriched"] + summary["bad"]
    latency = scored["latency_us"]
    auc = f"{model['roc_auc']:.4f}" if isinstance(model.get("roc_auc"), (int, float)) else "n/a"
    lines = [
        f"events sent      {sent['events']:>10,}  in {sent['records']:,} collector records",
        f"enriched         {summary['enriched']:>10,}",
        f"bad              {summary['bad']:>10,}{_share(summary['bad'], checked)}",
        f"in the lake      {summary['lake']['rows']:>10,}  in {summary['lake']['files']:,} Parquet files",
        (f"scored           {scored['records']:>10,}  predictions for {scored['sessions']:,} sessions "
         f"({scored['buy']:,} buy / {scored['defer']:,} defer)"
         + (f", {scored['skipped']:,} unreadable records skipped" if scored.get("skipped") else "")),
        f"offers made      {summary['offers']:>10,}" + (f"  and {summary['held_out']:,} sessions held out as the "
                                                    "control group" if summary.get("held_out") else ""),
        f"model            {model['name']} {model.get('version') or '(none published)'}, ROC AUC {auc}",
    ]
    lines.append(latency_line("time in scorer", latency, "from the poll to its micro-batch scored"))
    return "\n".join(lines)


def latency_line(label: str, latency: dict, note: str) -> str:
    """``label`` and the percentiles of ``latency_us``, aligned with the summary's other lines."""
    if not latency:
        return f"{label:<17}n/a (no predictions)"
    return f"{label:<17}" + ", ".join(f"{k} {_duration(v)}" for k, v in latency.items()) + f"  ({note})"


def _duration(us: int) -> str:
    return f"{us:,} µs" if us < 1000 else f"{us / 1000:,.1f} ms"


@click.command(cls=AwsCommand, context_settings=CLI_CONTEXT)
@click.option("--since-minutes", type=FiniteRange(min=0, min_open=True), default=None,
              help="count stream records of the last N minutes only (default: everything retained)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def main(since_minutes: float | None, as_json: bool) -> None:
    """Print what the pipeline sent, enriched, rejected, landed, scored and offered.

    Settings come from CLICKSTREAM_* variables and the [summary] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/liveview.md).
    """
    try:
        settings = load(SummarySettings, section="summary")
    except ConfigError as exc:
        raise ConfigFailed(exc) from None
    logs.setup(settings.log_level, json_lines=False)
    since = time.time() - since_minutes * 60 if since_minutes else None
    summary = summarize(settings, since, progress=lambda step: click.echo(f"... {step}", err=True))
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


if __name__ == "__main__":
    main()
