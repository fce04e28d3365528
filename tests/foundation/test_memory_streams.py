"""Producer and consumer logic over the in-memory stream and lease table (no network)."""
import logging
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from common import consumer as consumer_module
from common import leases as leases_module
from common.consumer import Consumer, ReadFailed
from common.leases import LeaseLost, MemoryLeaseTable
from common.producer import Producer, batches
from common.streams import MAX_BATCH_BYTES, MAX_RECORD_BYTES, SHARD_END, MemoryStream


def entries(n, size=10):
    return [(f"key-{i}", f"{i:08d}".encode().ljust(size, b".")) for i in range(n)]


def drain(consumer, rounds=20, checkpoint=True, pause_s=0.0):
    seen = []
    for _ in range(rounds):
        time.sleep(pause_s)
        try:
            batches = consumer.poll()
        except ReadFailed:                  # as the components do: back off (pause_s) and poll again
            continue
        for batch in batches:
            seen += [r.data for r in batch.records]
            if checkpoint:
                consumer.checkpoint(batch)
    return seen


def test_batches_respect_count_and_byte_limits():
    calls = list(batches(entries(1200)))
    assert [len(c) for c in calls] == [500, 500, 200]
    big = entries(12, size=600 * 1024)
    calls = list(batches(big))
    assert all(sum(len(k) + len(d) for k, d in c) <= MAX_BATCH_BYTES for c in calls)
    assert sum(len(c) for c in calls) == 12


def test_producer_retries_only_failed_entries_and_delivers_each_once():
    stream = MemoryStream(shard_count=2)
    stream.fail_next = 7
    producer = Producer(stream, sleep=lambda s: None)
    assert producer.send(entries(100)) == []
    stored = Counter(r.data for r in stream.all_records())
    assert len(stored) == 100 and set(stored.values()) == {1}
    assert producer.retried == 7


def test_producer_hands_back_what_it_could_not_deliver():
    stream = MemoryStream()
    stream.fail_next = 10**6
    producer = Producer(stream, max_attempts=3, sleep=lambda s: None)
    undelivered = producer.send(entries(5) + [("big", b"x" * MAX_RECORD_BYTES)])
    assert len(undelivered) == 6
    assert {u.reason.split(":")[0] for u in undelivered} == {"ProvisionedThroughputExceededException",
                                                           "record larger than 1 MiB"}


def test_consumer_resumes_after_restart_without_loss_or_duplicates():
    stream, leases = MemoryStream(shard_count=3), MemoryLeaseTable()
    Producer(stream).send(entries(300))
    # lease_ms=1: the first worker's leases and heartbeat expire as soon as it "crashes".
    first = Consumer(stream, leases, worker_id="a", batch_limit=40, lease_ms=1)
    got = []
    for batch in first.poll():          # one page per shard, then "crash" without closing
        got += [r.data for r in batch.records]
        first.checkpoint(batch)
    Producer(stream).send([(f"more-{i}", f"more-{i}".encode()) for i in range(50)])
    # A worker that has just started trusts no expiry stamp written by another host: it takes the
    # dead worker's leases once it has seen them unrenewed for its own lease period (100 ms).
    second = Consumer(stream, leases, worker_id="b", lease_ms=100)
    got += drain(second, rounds=40, pause_s=0.01)
    assert Counter(got) == Counter(r.data for r in stream.all_records())


def test_lease_rows_are_made_only_for_shards_the_last_lease_query_did_not_see(monkeypatch):
    # Every worker tried a conditional put for every shard at every shard refresh, each one failing
    # once the row existed: writes on the lease table's one key growing as workers x shards.
    stream, leases = MemoryStream(shard_count=3), MemoryLeaseTable()
    ensured = []
    ensure = leases.ensure
    monkeypatch.setattr(leases, "ensure", lambda shard_id: (ensured.append(shard_id), ensure(shard_id)))
    consumer = Consumer(stream, leases, worker_id="a", lease_ms=60_000, shard_refresh_s=0)   # lists at every balance
    for _ in range(3):
        consumer.balance()
    assert sorted(ensured) == sorted(shard.shard_id for shard in stream.list_shards())       # once each
    leases._leases.pop(ensured[0])                        # a row deleted by hand: made again
    consumer.balance()
    consumer.balance()
    assert ensured.count(ensured[0]) == 2 and len(ensured) == 4


class FlakyReader:
    """A shard reader whose next ``failures`` reads raise, like a throttled GetRecords."""

    def __init__(self, reader, failures: list[int]):
        self.reader, self.failures = reader, failures

    def read(self, limit):
        if self.failures[0]:
            self.failures[0] -= 1
            raise TimeoutError("read timed out")
        return self.reader.read(limit)


def test_a_failed_read_on_one_shard_loses_nothing_read_from_the_others():
    stream, leases = MemoryStream(shard_count=3), MemoryLeaseTable()
    Producer(stream).send(entries(120))
    failures = [0]
    plain = stream.reader
    stream.reader = lambda shard_id, after: FlakyReader(plain(shard_id, after), failures) \
        if shard_id.endswith("2") else plain(shard_id, after)
    consumer = Consumer(stream, leases, worker_id="a", batch_limit=10)
    failures[0] = 3
    got = drain(consumer, rounds=30, pause_s=0.1)         # the failing shard is read again after 0.2, 0.4, 0.8 s
    assert failures[0] == 0
    assert Counter(got) == Counter(r.data for r in stream.all_records())


def flaky_stream(shard_count: int, count: int, failures: list[int]) -> MemoryStream:
    """A stream of ``count`` entries whose reads raise while ``failures[0]`` counts down."""
    stream = MemoryStream(shard_count=shard_count)
    Producer(stream).send(entries(count))
    plain = stream.reader
    stream.reader = lambda shard_id, after: FlakyReader(plain(shard_id, after), failures)
    return stream


def test_poll_raises_when_every_shard_fails_so_the_caller_backs_off():
    failures = [2]
    stream, leases = flaky_stream(2, 10, failures), MemoryLeaseTable()
    consumer = Consumer(stream, leases, worker_id="a")
    with pytest.raises(ReadFailed, match="read timed out"):
        consumer.poll()
    assert Counter(drain(consumer, pause_s=0.05)) == Counter(r.data for r in stream.all_records())


def test_a_failed_read_behind_the_checkpoint_hands_out_nothing_twice():
    """The lake loader and the scorer checkpoint behind their reads: a shard read again after a failed
    read must go on from the last record handed out, not from the checkpoint (duplicate rows)."""
    failures = [0]
    stream, leases = flaky_stream(1, 30, failures), MemoryLeaseTable()
    consumer = Consumer(stream, leases, worker_id="a", batch_limit=10)
    got = [r.data for batch in consumer.poll() for r in batch.records]      # handed out, not checkpointed
    failures[0] = 1
    got += drain(consumer, rounds=10, checkpoint=False, pause_s=0.1)
    assert failures[0] == 0
    assert Counter(got) == Counter(r.data for r in stream.all_records())


class ThrottledShardReader:
    """Reads of one shard answered as Kinesis does when the applications on it read too often."""

    def __init__(self, reader, calls: list[float]):
        self.reader, self.calls, self.throttled = reader, calls, True

    def read(self, limit):
        self.calls.append(time.monotonic())
        if self.throttled:
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException",
                                         "Message": "Rate exceeded for shard"}}, "GetRecords")
        return self.reader.read(limit)


def test_a_throttled_shard_is_read_again_after_a_growing_backoff_with_its_iterator_kept(caplog):
    """Read again at every poll, a throttled shard stayed throttled (its 5 reads a second are shared
    by every application reading it), each call held up the other shards' reads for botocore's
    retries, a WARNING was logged per call and a new iterator opened each time."""
    stream = MemoryStream(shard_count=2)
    Producer(stream).send(entries(40))
    calls, readers, plain = [], [], stream.reader

    def reader(shard_id, after):
        readers.append(shard_id)
        made = plain(shard_id, after)
        return ThrottledShardReader(made, calls) if shard_id == SHARD0 else made
    stream.reader = reader
    consumer = Consumer(stream, MemoryLeaseTable(), worker_id="a")
    seen = []
    with caplog.at_level(logging.WARNING, logger="common.consumer"):
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            seen += [r.data for batch in consumer.poll() for r in batch.records]
            time.sleep(0.01)
    assert 2 <= len(calls) <= 4                                     # at 0, 0.2, 0.6 s: not ~90 times
    assert readers.count(SHARD0) == 1                               # the iterator is still good
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    assert len(seen) == len([r for r in stream.all_records() if r.shard_id == SHARD1])   # the other shard read on


def test_the_lag_of_a_shard_whose_reads_fail_grows_with_the_time_they_have_failed(monkeypatch, caplog):
    # It kept its last value (0 when caught up), so a lag alert never fired during a stream outage.
    # And the outage's end is said: an INFO line, where there were only the WARNINGs of its start.
    clock = [100.0]
    monkeypatch.setattr(consumer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    failures = [0]
    stream, leases = flaky_stream(1, 10, failures), MemoryLeaseTable()
    consumer = Consumer(stream, leases, worker_id="a")
    consumer.poll()
    caught_up = consumer.max_lag_ms
    failures[0] = 100
    for _ in range(3):
        clock[0] += 10
        with pytest.raises(ReadFailed):
            consumer.poll()
    assert consumer.max_lag_ms == caught_up + 20_000       # failing since the first failed read
    failures[0] = 0
    clock[0] += 10                                         # past the failing shard's backoff
    with caplog.at_level(logging.INFO, logger="common.consumer"):
        consumer.poll()
    assert consumer.max_lag_ms < 1_000
    assert f"reading shard {SHARD0} of {stream.name} again, after 3 failed reads over 30 s" in caplog.messages


def test_the_lag_of_a_shard_its_worker_has_not_read_for_a_while_grows_with_that_time(monkeypatch):
    """A worker stuck writing its outputs (retrying through its output stream's outage) reads nothing:
    the lag kept the last read's 0, and the enricher's, scorer's and discount engine's lag alerts
    never fired however long it lasted."""
    clock = [100.0]
    monkeypatch.setattr(consumer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    consumer = Consumer(flaky_stream(1, 10, [0]), MemoryLeaseTable(), worker_id="a")
    consumer.poll()
    assert consumer.max_lag_ms < 1_000
    clock[0] += 4                                          # a slow batch: within the grace
    assert consumer.max_lag_ms < 1_000
    clock[0] += 86                                         # stuck, nothing read for 90 s
    assert consumer.max_lag_ms >= 90_000
    consumer.poll()                                        # reading again: the stream's own figure
    assert consumer.max_lag_ms < 1_000


def test_the_checkpoint_age_is_how_long_records_read_have_waited_for_a_checkpoint(monkeypatch):
    # Nothing showed checkpoints that stopped moving (a lease table away, a batch failing): only the
    # work a restart would repeat, found after the restart.
    clock = [100.0]
    monkeypatch.setattr(consumer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    stream, leases = MemoryStream(shard_count=1), MemoryLeaseTable()
    Producer(stream).send(entries(30))
    consumer = Consumer(stream, leases, worker_id="a", batch_limit=10)
    assert consumer.checkpoint_age_s == 0
    [first] = consumer.poll()
    clock[0] += 5
    [second] = consumer.poll()
    clock[0] += 5
    assert consumer.checkpoint_age_s == 10                  # since the first records were handed out
    consumer.checkpoint(first)                              # behind the reads (a loader flushing late)
    clock[0] += 2
    assert consumer.checkpoint_age_s == 2
    consumer.checkpoint(second)
    assert consumer.checkpoint_age_s == 0
    consumer.poll()
    clock[0] += 3
    assert consumer.checkpoint_age_s == 3
    consumer.rewind(first.shard_id)              # a batch that failed, to be read again: it still waits
    clock[0] += 4
    consumer.poll()
    assert consumer.checkpoint_age_s == 7


def test_reads_of_a_shard_are_paced_to_share_kinesis_read_limit(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(consumer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    stream, leases = MemoryStream(shard_count=2), MemoryLeaseTable()
    reads = Counter()
    plain = stream.reader

    def counted(shard_id, after):
        reader = plain(shard_id, after)

        class Counted:
            def read(self, limit):
                reads[shard_id] += 1
                return reader.read(limit)
        return Counted()
    stream.reader = counted
    consumer = Consumer(stream, leases, worker_id="a", read_interval_s=0.25)
    for _ in range(10):                                     # a poll every 62.5 ms (exact in binary)
        consumer.poll()
        clock[0] += 0.0625
    assert sorted(reads.values()) == [3, 3]                 # at 0, 0.25 and 0.5 s


def test_unconfirmed_batch_is_redelivered():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Producer(stream).send(entries(10))
    first = Consumer(stream, leases, worker_id="a")
    assert len(drain(first, rounds=1, checkpoint=False)) == 10
    first.close()
    assert len(drain(Consumer(stream, leases, worker_id="b"), rounds=2)) == 10


def test_a_rewound_shard_is_read_again_after_its_last_checkpoint():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Producer(stream).send(entries(9))
    consumer = Consumer(stream, leases, worker_id="a", batch_limit=3)
    [handled] = consumer.poll()
    consumer.checkpoint(handled)
    [failed] = consumer.poll()                  # say handling this one fails: its reader is past it
    consumer.rewind(failed.shard_id)
    [again] = consumer.poll()
    assert [r.data for r in again.records] == [r.data for r in failed.records]
    assert again.checkpoint_value == failed.checkpoint_value


def test_two_workers_split_four_shards_evenly_and_a_leaver_hands_over():
    stream, leases = MemoryStream(shard_count=4), MemoryLeaseTable()
    a = Consumer(stream, leases, worker_id="a")
    b = Consumer(stream, leases, worker_id="b")
    a.balance()
    assert len(a.owned) == 4                # alone, it takes everything
    for _ in range(3):
        b.balance()
        a.balance()
    assert (len(a.owned), len(b.owned)) == (2, 2)
    assert set(a.owned).isdisjoint(b.owned)
    a.close()
    b.balance()
    assert len(b.owned) == 4


def test_parent_is_finished_before_children_are_read():
    """batch_limit=3: the parent's 20 records take 7 polls, so a child read while the parent is
    unfinished would show up before the parent's last record."""
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Producer(stream).send(entries(20))
    stream.split("shardId-000000000000")
    Producer(stream).send([(f"late-{i}", b"late") for i in range(20)])
    consumer = Consumer(stream, leases, worker_id="a", shard_refresh_s=0, batch_limit=3)
    order = []
    for _ in range(30):
        for batch in consumer.poll():
            order += [(batch.shard_id, r.data) for r in batch.records]
            consumer.checkpoint(batch)
    parent = [i for i, (shard, _) in enumerate(order) if shard == "shardId-000000000000"]
    children = [i for i, (shard, _) in enumerate(order) if shard != "shardId-000000000000"]
    assert len(parent) == 20 and len(children) == 20
    assert max(parent) < min(children)
    rows = {lease.shard_id: lease for lease in leases.leases()[0]}
    assert rows["shardId-000000000000"].checkpoint == SHARD_END


# ---------------------------------------------------------------- leases held through long writes

SHARD0, SHARD1 = "shardId-000000000000", "shardId-000000000001"


class CountingLeases(MemoryLeaseTable):
    """Counts renewals; ``failing`` makes the heartbeat fail as a throttled DynamoDB would."""

    def __init__(self):
        super().__init__()
        self.renewals = 0
        self.failing = False

    def renew(self, shard_id, owner, duration_ms):
        self.renewals += 1
        super().renew(shard_id, owner, duration_ms)

    def heartbeat(self, worker_id, duration_ms):
        if self.failing and worker_id == "a":
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}},
                              "PutItem")
        super().heartbeat(worker_id, duration_ms)


class ThrottledListShards(MemoryStream):
    failing = False

    def list_shards(self):
        if self.failing:
            raise ClientError({"Error": {"Code": "LimitExceededException", "Message": "Rate exceeded"}}, "ListShards")
        return super().list_shards()


def test_renew_due_keeps_a_lease_through_handling_longer_than_the_lease():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Producer(stream).send(entries(10))
    a = Consumer(stream, leases, worker_id="a", lease_ms=300)
    b = Consumer(stream, leases, worker_id="b", lease_ms=300)
    [batch] = a.poll()
    until = time.monotonic() + 1.0                  # over three leases inside "handle()", never polling
    while time.monotonic() < until:
        assert a.renew_due() == {SHARD0}
        assert b.poll() == []                      # the peer finds the lease held throughout
        time.sleep(0.02)
    a.checkpoint(batch)                            # still ours: no LeaseLost
    assert not b.owned


def test_renew_due_is_cheap_in_a_tight_loop():
    stream, leases = MemoryStream(), CountingLeases()
    a = Consumer(stream, leases, worker_id="a", lease_ms=300)
    a.poll()
    leases.renewals = 0
    calls, until = 0, time.monotonic() + 0.35
    while time.monotonic() < until:
        a.renew_due()
        calls += 1
    assert calls > 1000 and 1 <= leases.renewals <= 4    # one renewal per lease_ms / 3 at most


def test_renew_due_drops_a_lease_another_worker_took_so_the_caller_stops_writing_it():
    stream, leases = MemoryStream(shard_count=2), MemoryLeaseTable()
    Producer(stream).send(entries(20))
    lost = []
    a = Consumer(stream, leases, worker_id="a", lease_ms=300, on_lost=lost.append)
    batches_a = {batch.shard_id: batch for batch in a.poll()}
    row = next(lease for lease in leases.leases()[0] if lease.shard_id == SHARD1)
    leases.take(row, "b", 10_000)                  # e.g. taken over while a's write was stuck
    time.sleep(0.11)                               # the next renewal is due
    assert a.renew_due() == {SHARD0} and lost == [SHARD1]
    a.checkpoint(batches_a[SHARD0])
    with pytest.raises(LeaseLost):
        a.checkpoint(batches_a[SHARD1])


@pytest.mark.parametrize("failing", ["list_shards", "heartbeat"])
def test_a_failed_list_shards_or_heartbeat_does_not_skip_the_renewals(failing, caplog):
    stream, leases = ThrottledListShards(), CountingLeases()
    Producer(stream).send(entries(10))
    a = Consumer(stream, leases, worker_id="a", lease_ms=300, shard_refresh_s=0)
    b = Consumer(stream, leases, worker_id="b", lease_ms=300)
    a.poll()
    stream.failing, leases.failing = failing == "list_shards", failing == "heartbeat"
    until = time.monotonic() + 1.0
    with caplog.at_level(logging.WARNING, logger="common.consumer"):
        while time.monotonic() < until:
            a.poll()                               # balancing fails every round
            time.sleep(0.02)
    # Retried every 0.1 s here: one line says so, with the count, not one line per attempt.
    assert len([r for r in caplog.records if "renewing leases" in r.getMessage()]) <= 1
    assert a.max_lag_ms < 500                      # its shards are read: no lag alarm for a throttled ListShards
    stream.failing = leases.failing = False
    b.poll()
    assert set(a.owned) == {SHARD0} and not b.owned
    if failing == "heartbeat":
        return
    time.sleep(0.11)                               # a's next balance is due, and works again: it says so
    with caplog.at_level(logging.INFO, logger="common.consumer"):
        a.poll()
    assert any(m.startswith(f"listing the shards of stream {stream.name} and the leases works again, after ")
               for m in caplog.messages)


# ---------------------------------------------------------------- clocks, closing, dead workers' rows

def test_a_worker_whose_clock_runs_ahead_takes_its_share_and_no_more(monkeypatch):
    """Expiry stamps come from the writer's wall clock: a worker 15 s ahead used to see every peer's
    lease and heartbeat as expired and take every shard each round (each take replays from the
    checkpoint). Expiry is judged on each worker's own clock, so the shards settle two and two."""
    stream, leases = MemoryStream(shard_count=4), MemoryLeaseTable()
    skew_ms, real_now_ms = [0], leases_module.now_ms

    def clock():
        return real_now_ms() + skew_ms[0]

    monkeypatch.setattr(leases_module, "now_ms", clock)
    monkeypatch.setattr(consumer_module, "now_ms", clock, raising=False)        # where the consumer read it
    a = Consumer(stream, leases, worker_id="a", lease_ms=300)
    b = Consumer(stream, leases, worker_id="b", lease_ms=300)
    rounds = []                                     # the owners after each balance
    for _ in range(12):
        for worker, skew in ((a, 0), (b, 15_000)):
            skew_ms[0] = skew
            worker.balance()
            rounds.append({lease.shard_id: lease.owner for lease in leases.leases()[0]})
        time.sleep(0.11)                            # a renewal is due each round
    assert all(owners == rounds[-1] for owners in rounds[6:]), rounds       # settled, then no lease moves
    assert sorted(rounds[-1].values()) == ["a", "a", "b", "b"]


def test_a_worker_that_just_started_waits_a_lease_period_before_taking_a_held_lease():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Consumer(stream, leases, worker_id="crashed", lease_ms=1).balance()     # never renews again
    time.sleep(0.01)                                                     # its stamps are in the past
    fresh = Consumer(stream, leases, worker_id="b", lease_ms=200)
    fresh.balance()
    assert not fresh.owned                    # another host's stamp says nothing about this host's clock
    time.sleep(0.21)
    fresh.balance()
    assert set(fresh.owned) == {SHARD0}


class ThrottledRelease(MemoryLeaseTable):
    """Throttles the release of one shard, as DynamoDB may during a shutdown."""

    def release(self, shard_id, owner):
        if shard_id == SHARD0:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "UpdateItem")
        super().release(shard_id, owner)


class HungRenewals(MemoryLeaseTable):
    """Renewals that time out (a hung UpdateItem) while ``hung`` is set; queries answer."""

    hung = False

    def renew(self, shard_id, owner, duration_ms):
        if self.hung:
            raise ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com/")
        super().renew(shard_id, owner, duration_ms)


def test_a_worker_whose_renewals_time_out_stops_reading_a_shard_the_table_says_a_peer_took():
    """Its renewals failed with a timeout, not LeaseLost, so it read on: every batch of the shard went
    to both workers, for as long as its renewals and checkpoints timed out."""
    stream, leases = MemoryStream(), HungRenewals()
    lost = []
    a = Consumer(stream, leases, worker_id="a", lease_ms=300, on_lost=lost.append)
    a.poll()
    leases.hung = True
    [row] = leases.leases()[0]
    leases.take(row, "b", 10_000)                  # the peer, once the lease expired unrenewed
    Producer(stream).send(entries(10))
    time.sleep(0.11)                               # the next renewal is due
    assert a.poll() == [] and lost == [SHARD0] and not a.owned


def test_close_releases_the_other_shards_and_removes_the_worker_row_when_one_release_fails(caplog):
    stream, leases = MemoryStream(shard_count=3), ThrottledRelease()
    a = Consumer(stream, leases, worker_id="a")
    a.balance()
    assert len(a.owned) == 3
    a.close()                                                            # does not raise
    owners = {lease.shard_id: lease.owner for lease in leases.leases()[0]}
    assert owners[SHARD0] == "a" and [owners[s] for s in owners if s != SHARD0] == ["", ""]
    assert "a" not in leases.leases()[1] and not a.owned
    assert any("ThrottlingException" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_the_row_of_a_worker_that_died_without_leaving_is_removed_and_a_live_ones_is_kept():
    stream, leases = MemoryStream(shard_count=2), MemoryLeaseTable()
    lease_ms = 30
    dead = Consumer(stream, leases, worker_id="dead", lease_ms=lease_ms)
    dead.balance()                                   # killed: no close(), its row stays
    live = Consumer(stream, leases, worker_id="live", lease_ms=lease_ms)
    slow = Consumer(stream, leases, worker_id="slow", lease_ms=lease_ms)
    until = time.monotonic() + 15 * lease_ms / 1000     # past DEAD_WORKER_LEASES (10) lease periods
    while time.monotonic() < until:
        live.balance()
        slow.renew_due()                             # alive, though it never balances
        time.sleep(0.005)
    assert set(leases.leases()[1]) == {"live", "slow"}


# ---------------------------------------------------------------- rows of shards aged out after a reshard

SHARD2, SHARD3, SHARD4 = "shardId-000000000002", "shardId-000000000003", "shardId-000000000004"


def checkpoints(leases) -> dict:
    return {lease.shard_id: lease.checkpoint for lease in leases.leases()[0]}


class RecordedRemovals(MemoryLeaseTable):
    """Records the deletions of finished shards' rows; ``throttled`` makes them fail as DynamoDB may."""

    def __init__(self):
        super().__init__()
        self.removals, self.throttled = [], False

    def remove_aged_out(self, shard_id):
        if self.throttled:
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}},
                              "DeleteItem")
        self.removals.append(shard_id)
        return super().remove_aged_out(shard_id)


def test_a_finished_shards_row_is_kept_while_listed_and_deleted_once_it_ages_out_of_the_stream():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    Producer(stream).send(entries(20))
    stream.split(SHARD0)
    Producer(stream).send([(f"late-{i}", b"late") for i in range(20)])
    consumer = Consumer(stream, leases, worker_id="a", shard_refresh_s=0)
    assert len(drain(consumer)) == 40
    consumer.balance()
    assert checkpoints(leases)[SHARD0] == SHARD_END      # still listed: ensure() would recreate it unread
    stream.age_out(SHARD0)                               # the stream's retention has passed
    consumer.balance()
    assert checkpoints(leases).keys() == {SHARD1, SHARD2} and set(consumer.owned) == {SHARD1, SHARD2}
    assert SHARD0 not in consumer._watch._seen
    Producer(stream).send([(f"after-{i}", b"after") for i in range(20)])
    assert drain(consumer) == [b"after"] * 20             # the children go on, the parent is not read again
    stream.split(SHARD1)                                  # a second reshard: new shard ids, never reused
    assert [shard.shard_id for shard in stream.list_shards()][-2:] == [SHARD3, SHARD4]


def test_only_the_first_live_worker_deletes_and_a_throttled_delete_is_retried_next_balance(caplog):
    stream, leases = MemoryStream(), RecordedRemovals()
    stream.split(SHARD0)
    a = Consumer(stream, leases, worker_id="a", shard_refresh_s=0)
    b = Consumer(stream, leases, worker_id="b", shard_refresh_s=0)
    drain(a)
    stream.age_out(SHARD0)
    b.balance()
    assert leases.removals == [] and SHARD0 in checkpoints(leases)       # "a" sees to it
    leases.throttled = True
    a.balance()                                                          # does not raise
    assert SHARD0 in checkpoints(leases) and len(a.owned) >= 1
    assert any("aged-out" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    leases.throttled = False
    a.balance()
    assert leases.removals == [SHARD0] and SHARD0 not in checkpoints(leases)


def test_the_first_live_worker_confirms_with_a_new_listing_before_it_deletes():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    first = Consumer(stream, leases, worker_id="a", shard_refresh_s=3600)
    first.balance()
    first.close()                                   # its listing stays [SHARD0], from before any reshard
    stream.split(SHARD0)
    stream.split(SHARD1)                            # a child split in turn: SHARD1 is closed, still listed
    reader = Consumer(stream, leases, worker_id="b", shard_refresh_s=0)
    drain(reader)
    assert {sid for sid, checkpoint in checkpoints(leases).items() if checkpoint == SHARD_END} == {SHARD0, SHARD1}
    stream.age_out(SHARD0)
    first.balance()                                 # SHARD1 is missing from its old listing, but still listed
    assert SHARD0 not in checkpoints(leases) and checkpoints(leases)[SHARD1] == SHARD_END


def test_a_peer_whose_listing_still_holds_a_deleted_row_takes_nothing_of_it_and_does_not_fail():
    stream, leases = MemoryStream(), MemoryLeaseTable()
    stream.split(SHARD0)
    first = Consumer(stream, leases, worker_id="a", shard_refresh_s=0)
    drain(first)
    peer = Consumer(stream, leases, worker_id="b", shard_refresh_s=3600)
    peer.balance()                                  # lists SHARD0, for an hour
    stream.age_out(SHARD0)
    first.balance()
    assert SHARD0 not in checkpoints(leases)
    peer.balance()                                  # SHARD0 listed, its row gone: used to be a KeyError
    assert SHARD0 not in peer.owned and SHARD0 not in checkpoints(leases)


class ListedBefore:
    """The stream, but listed as it was earlier: a ListShards answer made just before a shard aged out."""

    def __init__(self, stream, listing):
        self.stream, self.listing = stream, listing

    def list_shards(self):
        return self.listing

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_a_row_recreated_from_a_listing_made_before_its_shard_aged_out_goes_again():
    """A peer's listing still held the shard, and its ensure() came after the delete: the row was back,
    never checkpointed, for a shard gone from the stream, and stayed (taken, read in vain) for good."""
    stream, leases = MemoryStream(), MemoryLeaseTable()
    stream.split(SHARD0)
    first = Consumer(stream, leases, worker_id="a", shard_refresh_s=0)
    drain(first)
    listed_before = stream.list_shards()
    stream.age_out(SHARD0)
    first.balance()
    assert SHARD0 not in checkpoints(leases)
    late = Consumer(ListedBefore(stream, listed_before), leases, worker_id="b", shard_refresh_s=0)
    late.balance()
    assert checkpoints(leases)[SHARD0] is None and SHARD0 in late.owned     # the race: back, and taken
    first.balance()
    assert SHARD0 not in checkpoints(leases)
    late.stream = stream                                                     # it lists afresh from now on
    late.balance()
    assert SHARD0 not in late.owned and SHARD0 not in checkpoints(leases)


def test_a_shard_finished_and_released_after_our_snapshot_is_given_back_not_read():
    """A peer reads a free shard to its end and releases it between our lease query and our take: the
    row is free again as we saw it, so the take succeeds, on a shard with nothing left to read."""
    stream, leases = MemoryStream(), MemoryLeaseTable()
    stream.split(SHARD0)
    stale = Consumer(stream, leases, worker_id="late")
    stale._refresh_shards(force=True)
    [seen] = [lease for lease in leases.leases()[0] if lease.shard_id == SHARD0]      # free, as listed
    drain(Consumer(stream, leases, worker_id="peer", shard_refresh_s=0))               # reads it to its end
    assert checkpoints(leases)[SHARD0] == SHARD_END
    stale._acquire(seen)                            # used to open a reader after SHARD_END: a ValueError
    assert SHARD0 not in stale.owned
    [after] = [lease for lease in leases.leases()[0] if lease.shard_id == SHARD0]
    assert after.owner == "" and after.checkpoint == SHARD_END
