"""A flush that takes longer than the lease (in memory, no network): the loader keeps the lease
while it writes, and stops writing a range whose shard another worker took."""
from __future__ import annotations

import datetime as dt
import logging
import time

import orjson

from batch import lake
from batch.loader import INTENT, Limits, StreamLoader, write_enriched
from common.consumer import Consumer
from common.leases import MemoryLeaseTable
from common.streams import MemoryStream
from tests.batch.conftest import BASE, make_event

LEASE_MS = 300          # stands for the default 10 s; the slow puts stand for a slow or throttled S3
HOURS = 6               # one object per hour of events: six puts in one flush


class SlowSink(lake.MemorySink):
    """Each put takes ``seconds``; ``during`` runs before it (what other workers do meanwhile)."""

    def __init__(self, seconds: float, during=lambda: None):
        super().__init__()
        self.seconds = seconds
        self.during = during

    def put(self, key, data, content_type, *, if_absent=False):
        self.during()
        time.sleep(self.seconds)
        super().put(key, data, content_type, if_absent=if_absent)


def loaded_stream() -> MemoryStream:
    stream = MemoryStream("enriched")
    events = [make_event(i, at=BASE + dt.timedelta(hours=i)) for i in range(HOURS)]
    stream.put_records([(event["domain_sessionid"], orjson.dumps(event)) for event in events])
    return stream


def loader(stream, leases, sink) -> StreamLoader:
    return StreamLoader(lambda **hooks: Consumer(stream, leases, worker_id="a", lease_ms=LEASE_MS, **hooks),
                        write_enriched, sink, Limits(records=HOURS))


def test_a_flush_longer_than_the_lease_keeps_the_lease():
    stream, leases = loaded_stream(), MemoryLeaseTable()
    peer = Consumer(stream, leases, worker_id="b", lease_ms=LEASE_MS)
    peer_read = []
    sink = SlowSink(0.15, during=lambda: peer_read.extend(r for b in peer.poll() for r in b.records))
    part = loader(stream, leases, sink)
    assert part.step() == HOURS                            # reads and flushes: 0.9 s of puts, three leases
    [lease] = leases.leases()[0]
    assert lease.owner == "a" and lease.checkpoint == stream.all_records()[-1].sequence_number
    assert peer_read == [] and not peer.owned
    assert part.stats["events"] == HOURS and len(sink.objects) == HOURS


def test_a_flush_stops_writing_once_another_worker_took_the_shard():
    stream, leases = loaded_stream(), MemoryLeaseTable()

    def take_over():
        [row] = leases.leases()[0]
        if row.owner == "a":
            leases.take(row, "b", 60_000)                  # taken over while "a" was writing

    sink = SlowSink(0.15, during=take_over)
    part = loader(stream, leases, sink)
    part.step()
    [lease] = leases.leases()[0]
    assert lease.owner == "b" and lease.checkpoint is None
    assert 0 < len(sink.objects) < HOURS                   # it stopped; the new owner rewrites the range
    assert not part.buffers and part.stats["events"] == 0


class FailsOnce(lake.MemorySink):
    """S3 refuses the first put, then comes back."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def put(self, key, data, content_type, *, if_absent=False):
        if not self.failed:
            self.failed = True
            raise OSError("S3 unreachable")
        super().put(key, data, content_type, if_absent=if_absent)


def test_a_failed_write_of_a_crashed_owners_intended_range_is_retried_and_the_shard_goes_on():
    """A new owner writes the range its crashed predecessor meant to (``intent_last``) first; when
    that write failed, the range went back behind the rest of the buffer, and the shard stopped."""
    stream, leases = MemoryStream("enriched"), MemoryLeaseTable()
    events = [make_event(i, at=BASE) for i in range(10)]
    stream.put_records([("k", orjson.dumps(event)) for event in events])
    records = stream.all_records()
    shard = records[0].shard_id
    leases.ensure(shard)
    leases.take(leases.leases()[0][0], "crashed", LEASE_MS)
    leases.checkpoint(shard, "crashed", None, {INTENT: records[4].sequence_number})
    leases.release(shard, "crashed")
    sink = FailsOnce()
    part = StreamLoader(lambda **hooks: Consumer(stream, leases, worker_id="a", lease_ms=LEASE_MS, **hooks),
                        write_enriched, sink, Limits(records=1000, seconds=0.01), retry_s=0.0)
    for _ in range(20):
        part.step()
    part.close()
    assert sink.failed and part.stats["events"] == 10
    written = [i for data in sink.objects.values() for i in lake.parquet_table(data).column("event_id").to_pylist()]
    assert sorted(written) == sorted(event["event_id"] for event in events)


class AlwaysFails(lake.MemorySink):
    bucket = "the-lake"

    def put(self, key, data, content_type, *, if_absent=False):
        raise OSError("S3 unreachable")


def test_a_failing_flush_is_one_error_line_per_30_s_naming_the_stream_and_bucket(caplog):
    """One line per retry (every lake_retry_s) that named only the shard, whose id both streams have."""
    stream, leases = loaded_stream(), MemoryLeaseTable()
    part = StreamLoader(lambda **hooks: Consumer(stream, leases, worker_id="a", lease_ms=LEASE_MS, **hooks),
                        write_enriched, AlwaysFails(), Limits(records=1, seconds=0.01), retry_s=0.0)
    with caplog.at_level(logging.ERROR, logger="batch.loader"):
        for _ in range(10):
            part.step()
    [line] = [r.getMessage() for r in caplog.records if r.name == "batch.loader"]
    assert "of stream enriched to bucket the-lake failed 1 times since the last such line" in line
    assert part.stats["write_errors"] >= 5 and part.stats["events"] == 0
