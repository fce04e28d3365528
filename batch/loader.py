"""The lake loader: enriched events and bad rows from their streams to S3, exactly once by construction.

Each owned shard has a buffer. When it is due (records, bytes or age), its contiguous range
[first_seq, last_seq] is written as one object per hour partition, named from the shard and the
range, and only then is the shard checkpointed at last_seq. A crash between the write and the
checkpoint means the range is read again; to make the re-read produce *the same* names, the loader
records the range as an intent on the shard's lease (``intent_first``, ``intent_last`` in the lease
metadata) before it writes, and the next owner cuts its first flush exactly there and names it from
``intent_first``. So a replay overwrites objects instead of adding a second copy of any event.

Run it with ``python -m batch.loader`` (config from ``CLICKSTREAM_*`` variables, section ``[lake]``).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import orjson
import pyarrow as pa
from botocore.exceptions import BotoCoreError, ClientError

from batch import lake
from common import aws, jsonbytes, logs
from common.cli import run_command
from common.config import AwsSettings, ConfigError, require_batch_limit, require_positive, require_renewed_in_time
from common.consumer import Consumer, ReadFailed, consumer_for
from common.leases import Lease, LeaseLost
from common.retry import backoff_s
from common.service import listening, settings_or_exit, stop_on_signals
from common.streams import SHARD_END, Record, sequence_key

log = logging.getLogger("batch.loader")

INTENT = "intent_last"
INTENT_FIRST = "intent_first"
MAX_RETRY_WAIT_S = 5.0          # between retries through a stream or lease table outage
PARQUET_TYPE = "application/vnd.apache.parquet"
JSONL_GZ_TYPE = "application/x-ndjson"


# The other components' lease groups (their `app` in common.consumer.consumer_for).
OTHER_READERS = ("enrich", "scorer", "discount", "liveview")


@dataclass(frozen=True)
class LoaderSettings(AwsSettings):
    lake_flush_seconds: float = 300.0
    lake_flush_bytes: int = 64 * 1024 * 1024
    lake_flush_records: int = 200_000
    lake_lease_ms: int = 10_000
    lake_batch_limit: int = 1000
    lake_idle_sleep_s: float = 0.5
    lake_read_interval_s: float = 0.5           # per shard; with the scorer's 0.4 s: 4.5 of Kinesis' 5 reads/s
    lake_retry_s: float = 5.0
    lake_app: str = "lake-loader"
    lake_metrics_port: int = 0                  # Prometheus /metrics; 0 = off
    lake_metrics_host: str = "127.0.0.1"        # 0.0.0.0 in a container, so the scraper can reach it
    log_level: str = "INFO"

    def validate(self) -> None:
        require_positive(self, "lake_flush_seconds", "lake_flush_bytes", "lake_flush_records", "lake_lease_ms",
                         "lake_idle_sleep_s", "lake_retry_s", "lake_read_interval_s")
        require_renewed_in_time(self, "lake_lease_ms", "lake_idle_sleep_s", "lake_read_interval_s")
        require_batch_limit(self, "lake_batch_limit")
        if not self.lake_app.strip() or self.lake_app in OTHER_READERS:
            # The lease group: another reader's name would share its leases and checkpoints, and each
            # would skip what the other read.
            raise ConfigError(f"CLICKSTREAM_LAKE_APP: expected a name of its own, not empty nor one of "
                              f"{', '.join(OTHER_READERS)}; got {self.lake_app!r}")


@dataclass(frozen=True)
class Limits:
    seconds: float = 300.0
    bytes: int = 64 * 1024 * 1024
    records: int = 200_000


class Sink(Protocol):
    def put(self, key: str, data: bytes, content_type: str, *, if_absent: bool = False) -> None: ...


class Intent(NamedTuple):
    """The range a flush was about to write: the next owner writes the same one, under the same names."""
    first: str | None          # None when recorded by a loader from before intent_first
    last: str


@dataclass
class ShardBuffer:
    records: list[Record] = field(default_factory=list)
    size: int = 0
    started: float | None = None   # monotonic time of the oldest buffered record

    def add(self, records: list[Record], now: float) -> None:
        if records and not self.records:
            self.started = now
        self.records.extend(records)
        self.size += sum(len(record.data) for record in records)

    def take(self, upto: str | None = None) -> list[Record]:
        """Remove and return the records up to sequence number ``upto`` (all when None)."""
        cut = len(self.records)
        if upto is not None:
            limit = sequence_key(upto)
            cut = next((i for i, r in enumerate(self.records) if sequence_key(r.sequence_number) > limit), cut)
        taken, self.records = self.records[:cut], self.records[cut:]
        self.size -= sum(len(record.data) for record in taken)
        return taken

    def restore(self, records: list[Record], started: float | None) -> None:
        """Put back records whose write failed, in front, so the range is retried unchanged."""
        self.records = records + self.records
        self.size += sum(len(record.data) for record in records)
        self.started = started


def write_enriched(sink: Sink, shard_id: str, records: list[Record], stream: str, first: str | None = None) -> dict:
    """One Parquet object per hour of collector_tstamp, plus the rejected records as loader bad rows.
    With ``first`` (a range whose start the stream no longer holds), the objects are named from it and
    only those missing are written: the ones there hold the records that are gone too."""
    keep = first is not None
    first, last = first or records[0].sequence_number, records[-1].sequence_number
    name = lake.object_name(shard_id, first, last)
    converted = _convert([record.data for record in records])
    meta = {"stream": stream, "shard_id": shard_id, "first_seq": first, "last_seq": last,
            "loader_version": lake.LOADER_VERSION}
    hours = converted.hours()
    for hour, table in hours.items():
        sink.put(lake.enriched_key(hour, name), lake.parquet_bytes(table, meta), PARQUET_TYPE, if_absent=keep)
    bad = _by_arrival_hour([(records[i], row) for i, row in converted.bad])
    for hour, rows in bad.items():
        sink.put(lake.bad_key(hour, name, from_loader=True), lake.jsonl_gz(rows), JSONL_GZ_TYPE, if_absent=keep)
    return {"events": converted.table.num_rows, "bad": len(converted.bad), "files": len(hours) + len(bad)}


def _convert(payloads: list[bytes]) -> lake.Converted:
    """``lake.convert``, and should it ever raise, each record on its own: an unforeseen value costs
    its record a bad row, never the shard a crash loop (the range would be re-read and fail again)."""
    try:
        return lake.convert(payloads)
    except Exception:
        log.exception("converting %d records failed; converting them one by one", len(payloads))
    tables, bad = [], []
    for i, data in enumerate(payloads):
        try:
            one = lake.convert([data])
        except Exception as exc:  # noqa: BLE001 - whatever it is, the record is kept as a bad row
            bad.append((i, lake.loader_bad_row(data, [lake.unhandled(f"{type(exc).__name__}: {exc}")])))
            continue
        tables.append(one.table)
        bad += [(i, row) for _, row in one.bad]
    return lake.Converted(pa.concat_tables(tables) if tables else lake.SCHEMA.empty_table(), bad)


def write_bad(sink: Sink, shard_id: str, records: list[Record], stream: str, first: str | None = None) -> dict:
    """Bad rows as gzip JSON lines per hour of arrival; a record that is not JSON is wrapped, not lost.
    ``first``: as for ``write_enriched``."""
    keep = first is not None
    name = lake.object_name(shard_id, first or records[0].sequence_number, records[-1].sequence_number)
    rows = []
    for record in records:
        try:
            row, reason = orjson.loads(record.data), "not a JSON object"
        except orjson.JSONDecodeError as exc:
            row, reason = None, f"not JSON: {exc}"
        if isinstance(row, dict) and not jsonbytes.writable(row):   # it raised writing the file, at every restart
            row, reason = None, "nested over 254 levels: orjson reads 1,024 but writes 254"
        if not isinstance(row, dict):                   # not JSON, or JSON but null, a list, a number
            row = lake.loader_bad_row(record.data, [lake.unhandled(reason)])
        rows.append((record, row))
    by_hour = _by_arrival_hour(rows)
    for hour, hour_rows in by_hour.items():
        sink.put(lake.bad_key(hour, name), lake.jsonl_gz(hour_rows), JSONL_GZ_TYPE, if_absent=keep)
    return {"events": 0, "bad": len(rows), "files": len(by_hour)}


def _by_arrival_hour(rows: list[tuple[Record, dict]]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for record, row in rows:
        grouped.setdefault(record.arrival_ms // lake.HOUR_MS, []).append(row)
    return grouped


class LeasedSink:
    """The sink as one shard's flush sees it. Writing a range can take longer than the lease (many
    hours of objects, a slow or throttled S3), so before each object the consumer renews its leases
    when due; once another worker has taken the shard, the flush stops (LeaseLost) instead of writing
    on: the new owner rewrites the range under the same names (the intent on the lease).

    One put alone can outlast the lease too (S3 answering in seconds, botocore's retries of a timeout),
    so the leases are renewed while it runs. Renewed only between objects, a peer took the shard
    during each slow put and the checkpoint after it failed: with every put that slow, the loaders
    took the shard from each other and none ever checkpointed."""

    def __init__(self, sink: Sink, consumer: Consumer, shard_id: str):
        self.sink = sink
        self.consumer = consumer
        self.shard_id = shard_id

    def put(self, key: str, data: bytes, content_type: str, *, if_absent: bool = False) -> None:
        if self.shard_id not in self.consumer.renew_due():
            raise LeaseLost(self.shard_id)
        self.consumer.while_renewing(self.sink.put, key, data, content_type, if_absent=if_absent)


class StreamLoader:
    """Buffers, writes and checkpoints the shards of one stream that this worker owns."""

    def __init__(self, make_consumer: Callable[..., Consumer], write: Callable[..., dict], sink: Sink,
                 limits: Limits = Limits(), *, retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.write = write
        self.sink = sink
        self.limits = limits
        self.retry_s = retry_s
        self.clock = clock
        self.buffers: dict[str, ShardBuffer] = {}
        self.intents: dict[str, Intent] = {}
        self.ended: set[str] = set()
        self.paused_until = 0.0
        self.writes_failing_since: float | None = None    # clock() of the first of a run of failed writes
        self.failed_flushes = logs.Tally(every_s=30.0, clock=clock)
        self._leases_at = 0.0
        self.stats = {"events": 0, "bad": 0, "files": 0, "flushes": 0, "write_errors": 0}
        self.consumer = make_consumer(start_after=self._start_after, on_lost=self._lost)

    # -------------------------------------------------------------- consumer callbacks

    def _start_after(self, lease: Lease) -> str | None:
        # ``lease`` is the row as our take wrote it (checkpoint and intent included): a previous owner
        # may have checkpointed or recorded an intent after our snapshot, never after our take.
        self.buffers[lease.shard_id] = ShardBuffer()
        self.ended.discard(lease.shard_id)
        if lease.meta.get(INTENT):
            # A previous owner may have written this range before it could checkpoint it.
            self.intents[lease.shard_id] = Intent(lease.meta.get(INTENT_FIRST), lease.meta[INTENT])
        else:
            self.intents.pop(lease.shard_id, None)
        return lease.checkpoint

    def _lost(self, shard_id: str) -> None:
        """Another worker reads this shard from its checkpoint now: our buffer would be a duplicate."""
        self.buffers.pop(shard_id, None)
        self.intents.pop(shard_id, None)
        self.ended.discard(shard_id)

    # -------------------------------------------------------------- the loop

    def step(self) -> int:
        """Read one page per owned shard and flush what is due; returns the records read."""
        now = self.clock()
        if now < self.paused_until:
            # S3 writes are failing: stop reading (memory stays bounded) but keep our leases.
            if now - self._leases_at > self.consumer.lease_ms / 3000:
                self.consumer.balance()
                self._leases_at = now
            return 0
        if self.paused_until:
            # After a failed write, retry what is buffered before reading more: polling first grew
            # the buffers by a page per shard every retry, without bound over a long S3 outage.
            self.flush_due()
            if self.clock() < self.paused_until:
                return 0
            self.paused_until = 0.0
            self.writes_failing_since = None
        read = 0
        for batch in self.consumer.poll():
            buffer = self.buffers.setdefault(batch.shard_id, ShardBuffer())
            buffer.add(batch.records, now)
            if batch.records:
                log.debug("read %d records from %s up to %s", len(batch.records), batch.shard_id,
                          batch.records[-1].sequence_number, extra={"shard_id": batch.shard_id})
            read += len(batch.records)
            if batch.shard_end:
                self.ended.add(batch.shard_id)
        self.flush_due()
        return read

    @property
    def lag_ms(self) -> int:
        """The consumer's lag, and at least how long writes have failed: reading stops meanwhile, so
        the shards' MillisBehindLatest would keep the last value read (0 when it was caught up)."""
        since = self.writes_failing_since
        return max(self.consumer.max_lag_ms, 0 if since is None else int((self.clock() - since) * 1000))

    def _due(self, shard_id: str, now: float) -> bool:
        buffer = self.buffers[shard_id]
        if shard_id in self.intents:
            return bool(buffer.records)
        if not buffer.records:
            return shard_id in self.ended
        return (shard_id in self.ended or len(buffer.records) >= self.limits.records
                or buffer.size >= self.limits.bytes or now - buffer.started >= self.limits.seconds)

    def flush_due(self, force: bool = False) -> None:
        now = self.clock()
        for shard_id in list(self.buffers):
            due = shard_id in self.buffers and (force or self._due(shard_id, now))
            if due and not self.flush(shard_id):
                return

    def flush(self, shard_id: str) -> bool:
        """Write the shard's due range, then checkpoint it; False when AWS failed (the range is kept)."""
        buffer = self.buffers[shard_id]
        intent = self.intents.get(shard_id)
        if intent is not None and (not buffer.records
                                   or sequence_key(buffer.records[-1].sequence_number) < sequence_key(intent.last)):
            return True  # the recorded range is not fully read again yet
        started, records = buffer.started, buffer.take(intent and intent.last)
        if intent is not None and not records:
            # Every record of the recorded range expired before this re-read: waiting for them kept the
            # shard's buffer unwritten for good.
            log.warning("%s: the stream no longer holds any record of the range up to %s a previous owner was "
                        "writing; going on after it", shard_id, intent.last, extra={"shard_id": shard_id})
            del self.intents[shard_id]
            return True
        try:
            if records:
                if intent is None:
                    intent = self._record_intent(shard_id, records[0].sequence_number, records[-1].sequence_number)
                self._write_and_checkpoint(shard_id, records, intent)
                records = []
                buffer.started = self.clock() if buffer.records else None
            if shard_id in self.ended and not buffer.records:
                self.consumer.checkpoint_at(shard_id, SHARD_END)
                self._lost(shard_id)
        except LeaseLost:
            log.warning("lease on %s lost during a flush; the new owner rewrites the range", shard_id,
                        extra={"shard_id": shard_id})
        except (BotoCoreError, ClientError, OSError) as exc:
            # Nothing past the last checkpoint is lost: the range goes back in front of the buffer and
            # is retried unchanged (same intent, same names) after a pause.
            buffer.restore(records, started)
            self.stats["write_errors"] += 1
            self.paused_until = self.clock() + self.retry_s
            if self.writes_failing_since is None:
                self.writes_failing_since = self.clock()
            if failed := self.failed_flushes.add():
                log.error("flushing %s of stream %s to bucket %s failed %d times since the last such line, retrying "
                          "every %.0f s: %s", shard_id, self.consumer.stream.name, getattr(self.sink, "bucket", "-"),
                          failed, self.retry_s, exc, extra={"shard_id": shard_id})
            return False
        return True

    def _record_intent(self, shard_id: str, first: str, last: str) -> Intent:
        self.consumer.record_meta(shard_id, {INTENT_FIRST: first, INTENT: last})
        self.intents[shard_id] = Intent(first, last)
        return self.intents[shard_id]

    def _write_and_checkpoint(self, shard_id: str, records: list[Record], intent: Intent) -> None:
        began = time.perf_counter()
        first, last = records[0].sequence_number, records[-1].sequence_number
        log.debug("writing %s [%s, %s]", shard_id, first, last, extra={"shard_id": shard_id})
        # Read from the shard's oldest record (no checkpoint yet), the range a crashed owner was writing
        # may have lost its first records to retention since: named as it was, the objects it wrote
        # kept (they hold those records too), so none of its events is written twice.
        started_late = intent.first is not None and sequence_key(first) > sequence_key(intent.first)
        if started_late:
            log.warning("%s: the stream no longer holds the start of the range [%s, %s] a previous owner was "
                        "writing; keeping the objects it wrote, writing those missing", shard_id, intent.first, last,
                        extra={"shard_id": shard_id})
        counts = self.write(LeasedSink(self.sink, self.consumer, shard_id), shard_id, records, self.consumer.stream.name,
                            first=intent.first if started_late else None)
        self.consumer.checkpoint_at(shard_id, last, {})
        self.intents.pop(shard_id, None)
        for key, value in counts.items():
            self.stats[key] += value
        self.stats["flushes"] += 1
        log.info("flushed %s [%s, %s]: %d events, %d bad rows, %d files in %.0f ms", shard_id, first, last,
                 counts["events"], counts["bad"], counts["files"], (time.perf_counter() - began) * 1000,
                 extra={"shard_id": shard_id})

    def close(self) -> None:
        """Flush what can be flushed, checkpoint it, and hand the leases back."""
        self.paused_until = 0.0
        self.flush_due(force=True)
        self.consumer.close()


class Loader:
    """Runs the enriched and the bad stream loaders side by side in one thread."""

    def __init__(self, loaders: list[StreamLoader], idle_sleep: float = 0.5):
        self.loaders = loaders
        self.idle_sleep = idle_sleep
        self.failures = logs.Tally(every_s=30.0)     # retried every few seconds while an outage lasts

    def run(self, stop: Callable[[], bool]) -> None:
        failures = 0
        try:
            while not stop():
                try:
                    read = sum(loader.step() for loader in self.loaders)
                    failures = 0
                except (BotoCoreError, ClientError, OSError, ReadFailed) as exc:
                    # Kinesis or DynamoDB hiccup: nothing was checkpointed past what is durable, so wait and
                    # go on, backing off: an outage would otherwise be retried (and logged) twice a second.
                    failures += 1
                    if count := self.failures.add():
                        log.warning("stream or lease calls failed %d times since the last such line, retrying: %s",
                                    count, exc)
                    renewals = [loader.consumer.renew_interval_s for loader in self.loaders]
                    time.sleep(backoff_s(failures, self.idle_sleep, min(MAX_RETRY_WAIT_S, *renewals)))
                    continue
                if not read:
                    time.sleep(self.idle_sleep)
        finally:
            for loader in self.loaders:
                try:
                    loader.close()
                except Exception:  # the other stream must still be flushed and released
                    log.exception("closing the %s loader failed; its leases expire on their own",
                                  loader.consumer.stream.name)


class LoaderCollector:
    """Prometheus metrics read from the loaders at scrape time, so the hot path counts nothing twice."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {name: CounterMetricFamily(f"lake_loader_{name}", help_text, labels=["stream"])
                    for name, help_text in (("events", "enriched events written to Parquet"),
                                            ("bad", "bad rows written (bad stream and loader rejects)"),
                                            ("files", "objects written"), ("flushes", "ranges flushed"),
                                            ("write_errors", "failed flushes (retried)"))}
        lag = GaugeMetricFamily("lake_loader_millis_behind", "max MillisBehindLatest of owned shards", labels=["stream"])
        buffered = GaugeMetricFamily("lake_loader_buffered_records", "records read, not yet written", labels=["stream"])
        shards = GaugeMetricFamily("lake_loader_owned_shards", "shards leased by this worker", labels=["stream"])
        age = GaugeMetricFamily("lake_loader_checkpoint_age_seconds", "how long the oldest records read have "
                                "waited for a checkpoint (up to lake_flush_seconds by design)", labels=["stream"])
        for part in self.loader.loaders:
            stream = part.consumer.stream.name
            for name, family in counters.items():
                family.add_metric([stream], part.stats[name])
            lag.add_metric([stream], part.lag_ms)
            buffered.add_metric([stream], sum(len(b.records) for b in list(part.buffers.values())))
            shards.add_metric([stream], len(part.consumer.owned))
            age.add_metric([stream], part.consumer.checkpoint_age_s)
        yield from counters.values()
        yield from (lag, buffered, shards, age)


def serve_metrics(loader: Loader, port: int, host: str = "127.0.0.1"):
    """Expose /metrics on ``port`` (0 in the config means off); returns the HTTP server."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry()
    registry.register(LoaderCollector(loader))
    ProcessCollector(registry=registry)         # process_start_time_seconds: a crash loop shows as its changes()
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def build(settings: LoaderSettings, sink: Sink | None = None) -> Loader:
    limits = Limits(settings.lake_flush_seconds, settings.lake_flush_bytes, settings.lake_flush_records)
    sink = sink or lake.S3Sink(aws.client("s3", settings.region, timeout=30), settings.bucket)
    loaders = []
    for stream, write in ((settings.enriched_stream, write_enriched), (settings.bad_stream, write_bad)):
        make = functools.partial(consumer_for, settings, stream, settings.lake_app,
                                 lease_ms=settings.lake_lease_ms, batch_limit=settings.lake_batch_limit,
                                 read_interval_s=settings.lake_read_interval_s)
        loaders.append(StreamLoader(make, write, sink, limits, retry_s=settings.lake_retry_s))
    return Loader(loaders, settings.lake_idle_sleep_s)


def main() -> int:
    """Run the lake loader: land the enriched stream in S3 as Parquet and the bad stream as gzip
    JSON lines, partitioned by date and hour, checkpointing only what S3 holds.

    Settings come from CLICKSTREAM_* variables and the [lake] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/lake.md). Stops cleanly on SIGTERM or Ctrl-C.
    """
    settings = settings_or_exit(LoaderSettings, "lake")
    logs.setup(settings.log_level)
    stopping = stop_on_signals()
    loader = build(settings)
    if settings.lake_metrics_port:
        with listening("lake_metrics_host, lake_metrics_port", settings.lake_metrics_host, settings.lake_metrics_port):
            serve_metrics(loader, settings.lake_metrics_port, settings.lake_metrics_host)
    log.info("lake loader started: %s and %s -> s3://%s", settings.enriched_stream, settings.bad_stream,
             settings.bucket)
    loader.run(stopping.is_set)
    log.info("lake loader stopped: %s", [part.stats for part in loader.loaders])
    return 0


def hard_exit(code: int) -> None:
    """Exit without running native destructors, once all output is flushed.

    After Parquet work the interpreter here sometimes aborts while tearing down pyarrow's native
    libraries ("terminate called without an active exception", exit -6; 2 to 12 of 30 runs of
    `lake stats` with pyarrow 26.0.1), which would turn a finished run into a failure. Callers use
    this only when every output is durable and checkpointed, so skipping that teardown loses nothing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_command(main, exit=hard_exit)
