"""The worker's delivery retries against the shard lease (in memory, no network): a delivery retried
for longer than the lease keeps the lease, and one whose shard another worker took stops writing.
And what a batch's outputs cost in memory while they wait for the streams."""
from __future__ import annotations

import random
import threading

import orjson
import pytest

from common.consumer import Consumer
from common.leases import LeaseLost, MemoryLeaseTable
from common.producer import Producer
from common.streams import MemoryStream
from enrich.worker import Worker
from tests.conftest import memory_grown_by, wait_for
from tests.enrich.helpers import enricher, get_record
from tests.faults import AnswersSlowly, RefusesCalls, ThrottledFor

LEASE_MS = 300          # stands for the default 10 s; the throttling below stands for minutes of it


def raw_records(raw: MemoryStream, n: int) -> None:
    raw.put_records([(f"k{i}", get_record({"e": "pv", "p": "web", "tv": "t",
                                          "eid": f"00000000-0000-4000-8000-{i:012d}"})) for i in range(n)])


def rows_of(leases) -> dict:
    return {lease.shard_id: lease for lease in leases.leases()[0]}


def worker(raw, leases, good, bad, stop=None) -> Worker:
    consumer = Consumer(raw, leases, worker_id="a", lease_ms=LEASE_MS)
    return Worker(enricher(), consumer, Producer(good, max_attempts=1), Producer(bad, max_attempts=1),
                  stop, retry_cap_s=0.05)


@pytest.mark.parametrize("slow_stream", [ThrottledFor, AnswersSlowly], ids=["retried", "one-slow-send"])
def test_a_delivery_longer_than_the_lease_keeps_the_lease(slow_stream):
    """Throttled retries over three leases, or one PutRecords that long (a hung one lasts minutes
    through the producer's and botocore's retries): the lease was renewed between sends only, and a
    peer took the shard and wrote the batch again."""
    raw, leases = MemoryStream("raw"), MemoryLeaseTable()
    raw_records(raw, 5)
    peer = Consumer(raw, leases, worker_id="b", lease_ms=LEASE_MS)
    peer_read = []
    good = slow_stream("enriched", 1.0, during=lambda: peer_read.extend(r for b in peer.poll() for r in b.records))
    w = worker(raw, leases, good, MemoryStream("bad"))
    [batch] = w.consumer.poll()
    assert w.handle(batch)
    w.consumer.checkpoint(batch)                        # still ours: no LeaseLost
    assert peer_read == [] and not peer.owned
    assert len(good.all_records()) == 5


@pytest.fixture
def seeded_random():
    """The jitter's draws fixed for one test; the tests after it get the generator as it was."""
    state = random.getstate()
    random.seed(7)
    yield
    random.setstate(state)


def test_the_backoff_between_delivery_retries_never_outlasts_the_lease(seeded_random):
    raw, leases = MemoryStream("raw"), MemoryLeaseTable()
    raw_records(raw, 5)
    consumer = Consumer(raw, leases, worker_id="a", lease_ms=LEASE_MS)
    good = ThrottledFor("enriched", 2.0)
    w = Worker(enricher(), consumer, Producer(good, max_attempts=1), Producer(MemoryStream("bad"), max_attempts=1),
               retry_cap_s=5.0)                   # the default: waits of seconds, against a 300 ms lease
    [batch] = w.consumer.poll()
    peer = Consumer(raw, leases, worker_id="b", lease_ms=LEASE_MS)
    peer_read, done = [], threading.Event()

    def peer_polls():                             # a peer looking for expired leases all along
        while not done.wait(0.05):
            peer_read.extend(r for b in peer.poll() for r in b.records)

    watcher = threading.Thread(target=peer_polls, daemon=True)
    watcher.start()
    try:
        assert w.handle(batch)
    finally:
        done.set()
        watcher.join(10)
    assert peer_read == [] and not peer.owned and len(good.all_records()) == 5


def test_a_delivery_stops_once_another_worker_took_the_shard_and_the_other_shards_go_on():
    raw, leases = MemoryStream("raw", shard_count=2), MemoryLeaseTable()
    raw_records(raw, 20)
    first, second = "shardId-000000000000", "shardId-000000000001"
    on_second = sum(1 for r in raw.all_records() if r.shard_id == second)
    assert 0 < on_second < 20

    def take_first_shard():
        row = next(lease for lease in leases.leases()[0] if lease.shard_id == first)
        if row.owner == "a":
            leases.take(row, "b", 60_000)               # a peer took it over while "a" was throttled

    good = ThrottledFor("enriched", 1.0, during=take_first_shard)
    stop = threading.Event()
    w = worker(raw, leases, good, MemoryStream("bad"), stop)
    runner = threading.Thread(target=w.run, kwargs={"idle_sleep": 0.02}, daemon=True)
    runner.start()
    try:
        wait_for(lambda: rows_of(leases).get(second) and rows_of(leases)[second].checkpoint, timeout=30,
                 what="the second shard's checkpoint")
    finally:
        stop.set()
        runner.join(30)
    rows = rows_of(leases)
    assert rows[first].owner == "b" and rows[first].checkpoint is None
    # Only the second shard's events went out: the first shard's batch was not written on after the loss.
    assert len(good.all_records()) == on_second
    assert w.counts["records"] == on_second


def test_a_batch_given_up_on_a_lost_lease_is_no_repeat_when_read_again():
    """Its events went through the deduper but not out: should the shard come back to this worker
    (the peer that took it stopped), reading the batch again must deliver them, not drop them."""
    raw, leases = MemoryStream("raw"), MemoryLeaseTable()
    raw_records(raw, 5)

    def taken_by_a_peer():
        [row] = leases.leases()[0]
        if row.owner == "a":
            leases.take(row, "b", 60_000)

    good = ThrottledFor("enriched", 1.0, during=taken_by_a_peer)
    w = worker(raw, leases, good, MemoryStream("bad"))
    [batch] = w.consumer.poll()
    with pytest.raises(LeaseLost):
        w.handle(batch)
    assert good.all_records() == []
    again, _ = w.outputs(batch)
    assert len(again) == 5 and w.enricher.deduper.dropped == 0


class NoWait(threading.Event):
    def wait(self, timeout=None):              # the backoff's sleeps, skipped: only their count matters
        return self.is_set()


def test_a_delivery_retried_more_than_a_thousand_times_does_not_overflow_its_backoff():
    raw, leases = MemoryStream("raw"), MemoryLeaseTable()
    raw_records(raw, 3)
    good = RefusesCalls("enriched", 1_100)     # 2**1024 overflows a float
    w = worker(raw, leases, good, MemoryStream("bad"), NoWait())
    [batch] = w.consumer.poll()
    assert w.handle(batch)
    assert len(good.all_records()) == 3 and good.calls_left == 0


def test_a_batchs_outputs_take_about_their_length_in_memory_until_written():
    """orjson's bytes hold a buffer of 4 KiB or more whatever their length: a batch's enriched
    events and bad rows took 10-20x their size until the streams had them."""
    raw, good, bad = MemoryStream("raw"), MemoryStream("enriched"), MemoryStream("bad")
    raw_records(raw, 600)
    raw.put_records([(f"b{i}", get_record({"e": "no-such-type", "p": "web", "tv": "t"})) for i in range(300)])
    w = worker(raw, MemoryLeaseTable(), good, bad)
    batches = w.consumer.poll()
    handled, grown = memory_grown_by(lambda: [w.handle(batch) for batch in batches])
    assert all(handled)
    written = good.all_records() + bad.all_records()
    assert len(good.all_records()) == 600 and len(bad.all_records()) == 300
    assert grown < 3 * sum(len(record.data) for record in written), grown


class RefusesTwo(MemoryStream):
    """A stream whose first call refuses two of its entries, as Kinesis refuses some of a batch."""

    def __init__(self, name: str):
        super().__init__(name)
        self.calls = 0

    def put_records(self, entries):
        self.calls += 1
        if self.calls == 1:
            self.fail_next = 2
        return super().put_records(entries)


def test_a_partly_refused_delivery_resends_only_the_refused_events():
    raw, good = MemoryStream("raw"), RefusesTwo("enriched")
    raw_records(raw, 5)
    w = worker(raw, MemoryLeaseTable(), good, MemoryStream("bad"))
    [batch] = w.consumer.poll()
    assert w.handle(batch)
    ids = [orjson.loads(record.data)["event_id"] for record in good.all_records()]
    assert sorted(ids) == [f"00000000-0000-4000-8000-{i:012d}" for i in range(5)]     # each once


def test_an_event_over_the_kinesis_record_limit_is_a_bad_row_even_when_max_event_bytes_allows_it():
    """max_event_bytes may be set above Kinesis' 1 MiB: such an event was retried for ever, the shard stalled."""
    raw = MemoryStream("raw")
    raw.put_records([("k", get_record({"e": "pv", "p": "web", "tv": "t", "page": "x" * 1_100_000,
                                       "eid": "00000000-0000-4000-8000-000000000001"}))])
    consumer = Consumer(raw, MemoryLeaseTable(), worker_id="a", lease_ms=LEASE_MS)
    w = Worker(enricher(max_event_bytes=2_000_000), consumer, Producer(MemoryStream("enriched"), max_attempts=1),
               Producer(MemoryStream("bad"), max_attempts=1), retry_cap_s=0.05)
    [batch] = consumer.poll()
    good, bad = w.outputs(batch)
    assert good == [] and len(bad) == 1 and b"size_violation" in bad[0][1]
