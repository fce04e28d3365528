"""The lake loader against the emulator: exactly the events sent, after crashes, lease loss and SIGTERM."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import orjson
import pytest
from botocore.config import Config

from batch import lake
from batch import loader as loader_module
from batch.loader import INTENT, Intent, Limits, LoaderSettings, StreamLoader, build, serve_metrics, write_enriched
from common import aws
from common.config import ConfigError, load
from common.leases import DynamoLeaseTable
from common.streams import KinesisStream
from localstack.emulator import free_port
from tests.batch.conftest import (
    BASE,
    ROOT_DIR,
    lake_bad_rows,
    lake_event_ids,
    lake_keys,
    loader_settings,
    make_bad_row,
    make_event,
    make_raw,
    put,
    put_events,
)
from tests.conftest import settings_env, wait_for
from tests.faults import FaultProxy


def _leases(settings, stream: str) -> dict:
    table = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"lake-loader#{stream}")
    return {lease.shard_id: lease for lease in table.leases()[0]}


def _run_until(loader, condition, timeout: float = 60) -> None:
    def step():
        for part in loader.loaders:
            part.step()
        return condition()
    wait_for(step, timeout, interval=0.05)


def test_loader_lands_every_event_and_bad_row_once(aws_settings):
    # Events in two hours, a record that is not JSON and one with a wrong type on the enriched stream.
    events = [make_event(i, at=BASE + dt.timedelta(seconds=30 * i)) for i in range(120)]
    put_events(aws_settings.enriched_stream, events)
    put(aws_settings.enriched_stream, [("k1", b"{not json"), ("k2", orjson.dumps(make_event(999, domain_sessionidx="x")))])
    raws = [make_raw(i) for i in range(5)]
    put(aws_settings.bad_stream, [(f"b{i}", orjson.dumps(make_bad_row(raw))) for i, raw in enumerate(raws)]
        + [("b9", b"\xff\xfe not utf-8"), ("b10", b"null"), ("b11", b"[1, 2]")])
    loader = build(loader_settings(aws_settings, lake_flush_records=50, lake_flush_seconds=1, lake_lease_ms=3000))
    enriched, bad = loader.loaders
    _run_until(loader, lambda: enriched.stats["events"] + enriched.stats["bad"] == 122 and bad.stats["bad"] == 8)
    for part in loader.loaders:
        part.close()
    port = free_port()
    server = serve_metrics(loader, port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
    finally:
        server.shutdown()
    assert f'lake_loader_events_total{{stream="{aws_settings.enriched_stream}"}} 120.0' in metrics
    assert f'lake_loader_bad_total{{stream="{aws_settings.bad_stream}"}} 8.0' in metrics
    assert f'lake_loader_buffered_records{{stream="{aws_settings.enriched_stream}"}} 0.0' in metrics
    assert "process_start_time_seconds" in metrics           # a crash loop shows as its changes()

    ids = lake_event_ids(aws_settings.bucket)
    assert sorted(ids) == sorted(e["event_id"] for e in events)
    keys = lake_keys(aws_settings.bucket)
    hours = {lake.key_partition(k) for k in keys if k.startswith("enriched/")}
    assert hours == {("2026-11-29", "09"), ("2026-11-29", "10")}
    # Rejected enriched records keep their payload, under names that cannot clash with the bad stream's.
    loader_rows = [row for key, row in lake_bad_rows(aws_settings.bucket) if key.endswith(".loader.jsonl.gz")]
    assert sorted(row["data"]["payload"][:9] for row in loader_rows) == ['{"app_id"', "{not json"]
    assert all(row["schema"] == lake.LOADER_BAD_SCHEMA for row in loader_rows)
    stream_rows = [row for key, row in lake_bad_rows(aws_settings.bucket)
                   if not key.endswith(".loader.jsonl.gz")]
    assert [row["data"]["payload"]["record"] for row in stream_rows[:5]] == raws
    assert stream_rows[5]["data"]["failure"]["payload_encoding"] == "base64"
    # JSON that is not an object (a null, a list) is kept the same way, not a crash on every restart.
    assert [row["data"]["payload"] for row in stream_rows[6:]] == ["null", "[1, 2]"]
    assert {row["data"]["failure"]["errors"][0]["message"] for row in stream_rows[6:]} == {"not a JSON object"}
    # Checkpoints sit at the last record of each shard, with no intent left behind.
    for stream in (aws_settings.enriched_stream, aws_settings.bad_stream):
        for lease in _leases(aws_settings, stream).values():
            assert lease.checkpoint not in (None, "TRIM_HORIZON")
            assert not lease.meta.get(INTENT)
            assert lease.owner == ""  # released on close


class Crash(BaseException):
    """Stands for the process dying: not an error the loader may catch."""


class CrashAfterFirstPut:
    def __init__(self, sink):
        self.sink = sink
        self.keys = []

    def put(self, key, data, content_type, *, if_absent=False):
        self.sink.put(key, data, content_type, if_absent=if_absent)
        self.keys.append(key)
        raise Crash(key)


def test_crash_between_write_and_checkpoint_rewrites_the_same_objects(aws_settings):
    events = [make_event(i, session=f"s{i % 4}") for i in range(200)]
    put_events(aws_settings.enriched_stream, events)
    s3_sink = lake.S3Sink(aws.client("s3"), aws_settings.bucket)
    crashing = CrashAfterFirstPut(s3_sink)
    first = build(loader_settings(aws_settings, lake_flush_records=30, lake_batch_limit=40, lake_lease_ms=1500),
                  sink=crashing)
    with pytest.raises(Crash):
        _run_until(first, lambda: False)
    written = crashing.keys[0]
    assert len(lake_event_ids(aws_settings.bucket)) > 0

    # A new worker with other limits would cut other ranges; the intent on the lease makes it redo the same one.
    second = build(loader_settings(aws_settings, lake_flush_records=10_000, lake_flush_seconds=1,
                                   lake_batch_limit=500, lake_lease_ms=1500))
    _run_until(second, lambda: second.loaders[0].stats["events"] >= 200, timeout=60)
    for part in second.loaders:
        part.close()
    assert written in lake_keys(aws_settings.bucket, "enriched/")
    ids = lake_event_ids(aws_settings.bucket)
    assert Counter(ids) == Counter(e["event_id"] for e in events)


def test_a_first_flush_whose_start_expired_before_the_rewrite_keeps_its_objects_and_adds_none(aws_settings):
    """No checkpoint yet (a first deploy or a rebuild on a stream holding a full retention): the crashed
    owner's range started at the shard's oldest record, which retention dropped before the next owner
    read the shard again. It named its first flush from the new oldest record: a second object with
    90 of the same 100 events, merged by compaction for good."""
    from common.consumer import Consumer
    from common.leases import MemoryLeaseTable
    from common.streams import MemoryStream

    stream, leases = MemoryStream("enriched"), MemoryLeaseTable()
    events = [make_event(i, session=f"s{i % 5}") for i in range(100)]
    stream.put_records([(event["domain_sessionid"], orjson.dumps(event)) for event in events])
    sink = lake.S3Sink(aws.client("s3"), aws_settings.bucket)

    def loader(worker: str, write_sink) -> StreamLoader:
        return StreamLoader(lambda **hooks: Consumer(stream, leases, worker_id=worker, lease_ms=200, **hooks),
                            write_enriched, write_sink, Limits(records=100))

    crashing = CrashAfterFirstPut(sink)
    with pytest.raises(Crash):
        loader("a", crashing).step()
    stream.expire(10)                                      # retention passes meanwhile
    time.sleep(0.3)                                        # and the lease runs out
    second = loader("b", sink)
    wait_for(lambda: second.step() >= 0 and second.stats["flushes"] == 1, timeout=10)
    assert lake_keys(aws_settings.bucket, "enriched/") == [crashing.keys[0]]          # its name, one object
    assert Counter(lake_event_ids(aws_settings.bucket)) == Counter(event["event_id"] for event in events)
    [lease] = leases.leases()[0]
    assert lease.checkpoint == stream.all_records()[-1].sequence_number

    # A range every record of which expired before the re-read: the buffer waited for them for good.
    crashing = CrashAfterFirstPut(sink)
    later = [make_event(200 + i, session=f"s{i % 5}") for i in range(100)]
    stream.put_records([(event["domain_sessionid"], orjson.dumps(event)) for event in later])
    third = loader("c", crashing)                          # "b" stops; "c" takes the shard once its lease ran out
    with pytest.raises(Crash):
        wait_for(lambda: third.step() < 0, timeout=10)
    stream.expire(len(stream.all_records()))               # all of it, "later" too
    newest = [make_event(400 + i, session=f"s{i % 5}") for i in range(100)]
    stream.put_records([(event["domain_sessionid"], orjson.dumps(event)) for event in newest])
    time.sleep(0.3)
    fourth = loader("d", sink)
    wait_for(lambda: fourth.step() >= 0 and fourth.stats["flushes"] == 1, timeout=10)
    assert Counter(lake_event_ids(aws_settings.bucket)) == Counter(e["event_id"] for e in events + later + newest)


class SlowSink:
    """Every put is done after ``seconds`` (S3 answering slowly, not failing); ``during`` runs meanwhile."""

    def __init__(self, seconds: float, during):
        self.seconds, self.during, self.keys = seconds, during, []

    def put(self, key, data, content_type, *, if_absent=False):
        until = time.monotonic() + self.seconds
        while time.monotonic() < until:
            self.during()
            time.sleep(0.05)
        self.keys.append(key)


def test_a_put_slower_than_the_lease_keeps_the_lease_and_its_checkpoint_lands():
    """The lease was renewed only between objects: a put that took longer than the lease let a peer
    take the shard, and the checkpoint after it failed; with every put that slow, two loaders took
    the shard from each other and neither ever checkpointed."""
    from common.consumer import Consumer
    from common.leases import MemoryLeaseTable
    from common.streams import MemoryStream

    stream, leases = MemoryStream("enriched"), MemoryLeaseTable()
    stream.put_records([(f"s{i}", orjson.dumps(make_event(i))) for i in range(20)])
    peer = Consumer(stream, leases, worker_id="peer", lease_ms=300)
    sink = SlowSink(1.0, during=peer.poll)                 # over three leases
    loader = StreamLoader(lambda **hooks: Consumer(stream, leases, worker_id="a", lease_ms=300, **hooks),
                          write_enriched, sink, Limits(records=20))
    assert loader.step() == 20
    assert loader.stats["flushes"] == 1 and len(sink.keys) == 1 and not peer.owned
    [lease] = leases.leases()[0]
    assert (lease.owner, lease.checkpoint) == ("a", stream.all_records()[-1].sequence_number)
    loader.close()


def test_lost_lease_drops_the_buffer(aws_settings):
    events = [make_event(i) for i in range(30)]
    put_events(aws_settings.enriched_stream, events)
    loader = build(loader_settings(aws_settings, lake_flush_records=10_000, lake_lease_ms=1500))
    enriched = loader.loaders[0]
    wait_for(lambda: enriched.step() >= 0 and sum(len(b.records) for b in enriched.buffers.values()) == 30)
    table = DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table,
                             f"lake-loader#{aws_settings.enriched_stream}")
    for lease in table.leases()[0]:
        table.take(lease, "another-worker", 60_000)
    wait_for(lambda: enriched.step() >= 0 and not enriched.buffers, timeout=10)
    enriched.close()
    assert lake_keys(aws_settings.bucket) == []
    assert all(lease.owner == "another-worker" and lease.checkpoint is None
               for lease in _leases(aws_settings, aws_settings.enriched_stream).values())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="CLICKSTREAM_LAKE_FLUSH_RECORDS"):
        load(LoaderSettings, env={"CLICKSTREAM_LAKE_FLUSH_RECORDS": "many"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_LAKE_FLUSH_SECONDS"):
        load(LoaderSettings, env={"CLICKSTREAM_LAKE_FLUSH_SECONDS": "0"})


# ------------------------------------------------------------------------------ the real process


def _start(settings, log_path, **overrides) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings), "CLICKSTREAM_LAKE_LEASE_MS": "2000",
           "CLICKSTREAM_LAKE_IDLE_SLEEP_S": "0.1", "CLICKSTREAM_LOG_LEVEL": "DEBUG",
           **{f"CLICKSTREAM_{k.upper()}": str(v) for k, v in overrides.items()}}
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "batch.loader"], env=env, stdout=log, stderr=log,
                                cwd=ROOT_DIR)


def test_sigterm_flushes_checkpoints_and_releases(aws_settings, tmp_path):
    log_path = tmp_path / "loader.log"
    process = _start(aws_settings, log_path, lake_flush_records=100_000, lake_flush_seconds=3600)
    try:
        events = [make_event(i) for i in range(40)]
        put_events(aws_settings.enriched_stream, events)
        wait_for(lambda: log_path.read_text(encoding="utf-8").count("read ") and sum(
            int(line.split('"msg": "read ')[1].split(" ")[0]) for line in log_path.read_text(encoding="utf-8").splitlines()
            if '"msg": "read ' in line) == 40)
        assert lake_keys(aws_settings.bucket) == []  # nothing due yet: thresholds are an hour away
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert sorted(lake_event_ids(aws_settings.bucket)) == sorted(e["event_id"] for e in events)
    leases = _leases(aws_settings, aws_settings.enriched_stream)
    assert all(lease.owner == "" for lease in leases.values())
    # Every shard is checkpointed at its last record: restarting replays nothing.
    last = _last_sequence_per_shard(aws_settings.enriched_stream)
    assert len(last) == 2 and {shard: leases[shard].checkpoint for shard in last} == last


def _last_sequence_per_shard(stream: str) -> dict[str, str]:
    kinesis = aws.client("kinesis")
    last = {}
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=10_000)["Records"]
        if records:
            last[shard["ShardId"]] = records[-1]["SequenceNumber"]
    return last


def test_kill_9_mid_batch_then_restart_holds_exactly_the_events_sent(aws_settings, tmp_path):
    events = [make_event(i, session=f"session-{i % 13}") for i in range(300)]
    done = threading.Event()

    def send():
        for start in range(0, len(events), 30):
            put_events(aws_settings.enriched_stream, events[start:start + 30])
            time.sleep(0.05)
        done.set()

    limits = {"lake_flush_records": 45, "lake_batch_limit": 25, "lake_flush_seconds": 1}
    first = _start(aws_settings, tmp_path / "first.log", **limits)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        # The second range starts being written (its intent is recorded): kill -9 right there, so the
        # restart finds an intent, maybe some of its objects, no checkpoint, and a lease still held.
        log = tmp_path / "first.log"
        wait_for(lambda: log.read_text(encoding="utf-8").count('"msg": "writing ') >= 2, interval=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
        sender.join()
    assert done.is_set()
    assert len(set(lake_event_ids(aws_settings.bucket))) < len(events)

    second = _start(aws_settings, tmp_path / "second.log", **{**limits, "lake_flush_records": 70})
    try:
        wait_for(lambda: len(set(lake_event_ids(aws_settings.bucket))) == len(events), timeout=90, interval=0.5)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        second.kill()
    ids = lake_event_ids(aws_settings.bucket)
    assert Counter(ids) == Counter(e["event_id"] for e in events)  # no loss, no duplicate


def test_s3_failure_keeps_the_range_and_retries_it_without_checkpointing(aws_settings, s3):
    events = [make_event(i, session="one-session") for i in range(50)]
    put_events(aws_settings.enriched_stream, events)
    missing = f"{aws_settings.bucket}-later"
    loader = build(loader_settings(aws_settings, bucket=missing, lake_flush_records=20, lake_retry_s=0.2,
                                   lake_lease_ms=3000))
    enriched = loader.loaders[0]
    wait_for(lambda: enriched.step() >= 0 and enriched.stats["write_errors"] >= 2, timeout=30, interval=0.05)
    leases = _leases(aws_settings, aws_settings.enriched_stream)
    assert {lease.checkpoint for lease in leases.values()} <= {None, "TRIM_HORIZON"}  # nothing durable yet
    assert any(lease.meta.get(INTENT) for lease in leases.values())

    s3.create_bucket(Bucket=missing)  # S3 is back
    wait_for(lambda: enriched.step() >= 0 and enriched.stats["events"] == 50, timeout=30, interval=0.05)
    enriched.close()
    assert Counter(lake_event_ids(missing)) == Counter(e["event_id"] for e in events)


def test_an_s3_outage_does_not_grow_the_buffers_with_every_retry(aws_settings, s3):
    # It read a page per shard before each retry: the whole stream backlog ended up in memory.
    put_events(aws_settings.enriched_stream, [make_event(i, session=f"s{i % 7}") for i in range(50)])
    missing = f"{aws_settings.bucket}-away"
    loader = build(loader_settings(aws_settings, bucket=missing, lake_flush_records=20, lake_retry_s=0.1,
                                   lake_lease_ms=3000))
    enriched = loader.loaders[0]

    def buffered() -> int:
        return sum(len(buffer.records) for buffer in enriched.buffers.values())
    wait_for(lambda: enriched.step() >= 0 and enriched.stats["write_errors"] >= 1, timeout=30, interval=0.05)
    before = buffered()
    put_events(aws_settings.enriched_stream, [make_event(i, session=f"s{i % 7}") for i in range(50, 250)])
    wait_for(lambda: enriched.step() >= 0 and enriched.stats["write_errors"] >= 6, timeout=30, interval=0.05)
    assert 0 < before <= 50 and buffered() == before
    # Not reading, so the shards' lag stays at its last value: the gauge counts the failing time.
    assert enriched.lag_ms >= 400 and enriched.consumer.max_lag_ms < enriched.lag_ms
    s3.create_bucket(Bucket=missing)  # S3 is back: everything lands, once
    wait_for(lambda: enriched.step() >= 0 and enriched.stats["events"] == 250, timeout=30, interval=0.05)
    assert enriched.writes_failing_since is None
    enriched.close()
    assert len(lake_event_ids(missing)) == 250


def test_a_new_owner_starts_from_the_lease_row_as_it_is_after_the_take(aws_settings):
    # The row a worker read before taking the lease may be stale: the previous owner can checkpoint
    # and record an intent in between (the take compares owner and expiry only). The loader must
    # start from the row as the take wrote it.
    loader = build(loader_settings(aws_settings))
    enriched = loader.loaders[0]
    table, shard = enriched.consumer.leases, "shardId-000000000000"
    table.ensure(shard)
    table.take(next(lease for lease in table.leases()[0] if lease.shard_id == shard), "old-owner", 60_000)
    stale = next(lease for lease in table.leases()[0] if lease.shard_id == shard)
    table.checkpoint(shard, "old-owner", "7", {INTENT: "9"})
    enriched.consumer._acquire(stale)
    assert enriched.consumer.owned[shard].position == "7"
    assert enriched.intents == {shard: Intent(None, "9")}          # recorded without intent_first: an older loader


def test_a_kinesis_outage_is_retried_with_backoff_not_twice_a_second(aws_settings, monkeypatch):
    # It slept its idle 0.5 s between retries: 6 error lines a second for two streams of two shards.
    loader = build(loader_settings(aws_settings, lake_idle_sleep_s=0.2, lake_read_interval_s=0))
    for part in loader.loaders:
        part.step()                         # takes its shards
    waits = []                              # the waits after a failure (an idle round sleeps 0.2 s)
    monkeypatch.setattr(loader_module, "time", SimpleNamespace(
        sleep=lambda s: time.sleep(s) if s == 0.2 else waits.append(s), monotonic=time.monotonic,
        perf_counter=time.perf_counter))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        for part in loader.loaders:         # Kinesis through the proxy; the lease table stays reachable
            kinesis = aws.session().client("kinesis", endpoint_url=proxy.endpoint,
                                           config=Config(retries={"max_attempts": 1}))
            part.consumer.stream = KinesisStream(kinesis, part.consumer.stream.name)
            for shard_id in part.consumer.owned:
                part.consumer.rewind(shard_id)      # readers on the new client
        proxy.down = True
        deadline = time.monotonic() + 20
        loader.run(lambda: len(waits) >= 6 or time.monotonic() > deadline)
    renewal = loader.loaders[0].consumer.renew_interval_s          # never past a lease renewal
    assert waits == [0.4, 0.8, 1.6, 3.2, renewal, renewal]
