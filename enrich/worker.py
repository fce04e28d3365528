"""The stream worker: a thin loop around ``Enricher.process``.

For every batch read from the raw stream: enrich each record, write good events to the enriched
stream and bad rows to the bad stream, and only when both writes succeeded move the checkpoint.
A failed write is retried (only the failed entries) until it succeeds or the worker is told to
stop; stopping without a checkpoint is safe because the next owner of the shard re-reads the batch
(at-least-once; the enriched event ids stay the same, so downstream dedupe by event_id works).
The lease on the batch's shard is renewed between the calls of a long delivery, and during each;
should another worker take the shard anyway, the delivery stops there: the new owner re-reads the batch.
"""
from __future__ import annotations

import logging
import random
import threading
import time

from botocore.exceptions import BotoCoreError, ClientError

from common import jsonbytes, logs
from common.consumer import Batch, Consumer, ReadFailed
from common.leases import LeaseLost
from common.producer import Producer, Resend
from common.producer import batches as put_record_calls
from common.retry import backoff_s
from common.streams import MAX_RECORD_BYTES
from enrich import badrows, metrics
from enrich.pipeline import Enricher

log = logging.getLogger("enrich")


class Worker:
    def __init__(self, enricher: Enricher, consumer: Consumer, good: Producer, bad: Producer,
                 stop: threading.Event | None = None, retry_cap_s: float = 5.0):
        self.enricher = enricher
        self.consumer = consumer
        self.good = good
        self.bad = bad
        self.stop = stop or threading.Event()
        self.retry_cap_s = retry_cap_s
        self.counts = {"records": 0, "good": 0, "bad": 0, "batches": 0}
        self._duplicates = 0
        # An outage or a throttled output is retried every few seconds: logged once per 30 s.
        self._read_failures = logs.Tally(every_s=30.0)
        self._write_retries = logs.Tally(every_s=30.0)
        self._checkpoint_failures = logs.Tally(every_s=30.0)

    def outputs(self, batch: Batch) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
        good, bad = [], []
        for record in batch.records:
            events, rows = self.enricher.process_serialized(record.data)
            for key, data in events:
                if len(data) + len(key.encode()) > MAX_RECORD_BYTES:
                    # Only when max_event_bytes is set above the Kinesis limit: never retry the impossible.
                    bad.append(_bad_entry(badrows.size_violation(data, MAX_RECORD_BYTES, "an event within the Kinesis record limit")))
                else:
                    good.append((key, data))
            bad.extend(_bad_entry(row) for row in rows)
        return good, bad

    def handle(self, batch: Batch) -> bool:
        """Enrich and deliver one batch; True when every output is durable, False when told to stop
        first. Raises LeaseLost when another worker took the shard during the delivery."""
        deduper = self.enricher.deduper
        remembered = deduper.remembered
        good, bad = self.outputs(batch)
        delivered = False
        try:
            delivered = (self._deliver(self.good, good, batch.shard_id, self.enricher.restamp)
                         and self._deliver(self.bad, bad, batch.shard_id))
        finally:
            if not delivered:
                # Whoever reads this batch again (we, if the shard comes back) must not drop its events as repeats.
                deduper.forget_last(deduper.remembered - remembered)
        if not delivered:
            return False
        self.counts["records"] += len(batch.records)
        self.counts["good"] += len(good)
        self.counts["bad"] += len(bad)
        self.counts["batches"] += 1
        metrics.RECORDS.inc(len(batch.records))
        metrics.GOOD.inc(len(good))
        for _, data in bad:
            metrics.BAD.labels(_row_type(data)).inc()
        return True

    def _deliver(self, producer: Producer, entries: list[tuple[str, bytes]], shard_id: str,
                 resend: Resend | None = None) -> bool:
        """Send ``entries`` until all are delivered; what failed is sent again through ``resend``."""
        attempt = 0
        while entries:
            failed = []
            for chunk in put_record_calls(entries):
                # Throttled retries can outlast the lease: renew it when due, and stop writing for a
                # shard another worker took (it re-reads the batch from the checkpoint). One send can
                # too (throttled retries inside it, a slow stream's call at a raised read timeout: up to 40 s).
                if shard_id not in self.consumer.renew_due():
                    raise LeaseLost(shard_id)
                failed += self.consumer.while_renewing(producer.send, chunk, resend=resend)
            if not failed:
                return True
            attempt += 1
            metrics.RETRIES.inc()
            if retries := self._write_retries.add():
                log.warning("retried undelivered entries %d times since the last such line; now %d of %d entries "
                            "not delivered to %s (%s)", retries, len(failed), len(entries), producer.stream.name,
                            failed[0].reason)
            # Never past a lease renewal: a wait longer than the lease would hand the shard to a peer.
            cap = min(backoff_s(attempt, 0.1, self.retry_cap_s), self.consumer.renew_interval_s)
            if self.stop.wait(random.uniform(0, cap)):
                return False
            entries = [(item.partition_key, item.data) for item in failed]
            if resend:
                entries = resend(entries)
        return True

    def run(self, idle_sleep: float = 0.2, report_every_s: float = 30.0) -> None:
        # Read at scrape time: a gauge set after each poll would freeze while the stream cannot be read.
        metrics.LAG.set_function(lambda: self.consumer.max_lag_ms)
        metrics.CHECKPOINT_AGE.set_function(lambda: self.consumer.checkpoint_age_s)
        metrics.SHARDS_OWNED.set_function(lambda: len(self.consumer.owned))
        # Every labelled series exists from the start, at 0: rate() and increase() see no series
        # (so no alert) until a first bad row or failed fetch, and miss that first one.
        for kind in badrows.VERSIONS:
            metrics.BAD.labels(kind)
        for registry in self.enricher.resolver.registries:
            metrics.REGISTRY_ERRORS.labels(registry.name)
        reported = time.monotonic()
        failures = 0
        while not self.stop.is_set():
            try:
                batches = self.consumer.poll()
            except (BotoCoreError, ClientError, ReadFailed) as exc:
                # The stream or the lease table is unreachable for now: wait and try again, never exit.
                failures += 1
                if count := self._read_failures.add():
                    log.warning("reading %s failed %d times since the last such line (%s); retrying",
                                self.consumer.stream.name, count, exc)
                self.stop.wait(backoff_s(failures, 0.2, self.retry_cap_s))
                continue
            failures = 0
            for batch in batches:
                try:
                    if not self.handle(batch):
                        break   # stopping mid-delivery: leave the checkpoint where it was
                except LeaseLost:
                    log.warning("lease on %s lost while delivering its batch; its new owner re-reads it",
                                batch.shard_id)
                    continue
                try:
                    self.consumer.checkpoint(batch)
                except LeaseLost:
                    log.info("lease on %s lost before checkpoint; its new owner re-reads", batch.shard_id)
                except (BotoCoreError, ClientError) as exc:
                    # Outputs are durable; a later batch's checkpoint covers this one.
                    if failed := self._checkpoint_failures.add():
                        log.warning("%d checkpoints failed since the last such line, the last of %s (%s); the next "
                                    "one covers them", failed, batch.shard_id, exc)
            metrics.DUPLICATES.inc(self.enricher.deduper.dropped - self._duplicates)
            self._duplicates = self.enricher.deduper.dropped
            if time.monotonic() - reported > report_every_s:
                reported = time.monotonic()
                log.info("enriched %s; lag %d ms; duplicates dropped %d", self.counts,
                         self.consumer.max_lag_ms, self.enricher.deduper.dropped)
            if not any(batch.records for batch in batches):
                self.stop.wait(self.consumer.idle_wait_s(idle_sleep))     # until a shard is due: see idle_wait_s
        log.info("stopping: %s", self.counts)


def _row_type(data: bytes) -> str:
    # "iglu:com.snowplowanalytics.snowplow.badrows/<type>/jsonschema/..." sits at the start of the row.
    head = data[:120].decode("utf-8", "replace")
    return head.split("badrows/", 1)[-1].split("/", 1)[0] if "badrows/" in head else "unknown"


def _bad_entry(row: dict) -> tuple[str, bytes]:
    """A bad row and a random partition key (contract); a row too big for Kinesis is cut to a size_violation."""
    data = jsonbytes.dumps(row)
    if len(data) > MAX_RECORD_BYTES - 64:
        data = jsonbytes.dumps(badrows.size_violation(data, MAX_RECORD_BYTES - 64, "a bad row within the Kinesis record limit"))
    return random.getrandbits(128).to_bytes(16, "big").hex(), data
