"""Producer, consumer and provisioning over HTTP against the emulator (moto server)."""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from common import aws
from common.consumer import ReadFailed, consumer_for
from common.leases import DynamoLeaseTable, Lease, LeaseLost
from common.producer import Producer, ReadTimeouts, output_producer
from common.streams import KinesisStream, ReadPace, walk_stream
from infra.provision import provision
from tests.conftest import ROOT, settings_env, wait_for
from tests.faults import GET_RECORDS, PUT_RECORDS, FaultProxy


def entries(n, tag="r"):
    return [(f"key-{i % 37}", f"{tag}-{i}".encode()) for i in range(n)]


def stream_contents(settings, name=None):
    consumer = consumer_for(settings, name or settings.raw_stream, app=f"reader-{time.monotonic_ns()}")
    seen = []
    for _ in range(5):
        for batch in consumer.poll():
            seen += [r.data.decode() for r in batch.records]
    consumer.close()
    return seen


def test_provisioning_twice_changes_nothing(aws_settings):
    again = provision(aws_settings)
    assert all("exists" in line for line in again), again
    kinesis = aws.client("kinesis")
    summary = kinesis.describe_stream_summary(StreamName=aws_settings.enriched_stream)["StreamDescriptionSummary"]
    assert summary["OpenShardCount"] == 2
    rules = aws.client("s3").get_bucket_lifecycle_configuration(Bucket=aws_settings.bucket)["Rules"]
    assert {r["ID"] for r in rules} >= {"expire-raw", "expire-bad", "expire-enriched"}
    [enriched] = [r for r in rules if r["ID"] == "expire-enriched"]          # as CloudFormation's 400 days
    assert enriched["Expiration"]["Days"] == 400 and enriched["Filter"]["Prefix"] == "enriched/"
    # Versioned: a deleted file can be restored for 7 days; clear personal data (raw/, bad/) for one.
    assert aws.client("s3").get_bucket_versioning(Bucket=aws_settings.bucket)["Status"] == "Enabled"
    kept = {rule["Filter"]["Prefix"]: rule["NoncurrentVersionExpiration"]["NoncurrentDays"] for rule in rules
            if "NoncurrentVersionExpiration" in rule}
    assert kept == {"": 7, "raw/": 1, "bad/": 1}
    ttl = aws.client("dynamodb").describe_time_to_live(TableName=aws_settings.predictions_table)
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"


def test_provisioned_streams_and_bucket_are_encrypted_and_keep_records_as_the_template_does(aws_settings):
    """The README's route to a real account, infra.provision, made unencrypted 24-hour streams and a
    bucket without the TLS-only policy that docs/data-protection.md promises (the template had them)."""
    kinesis, s3 = aws.client("kinesis"), aws.client("s3")
    kept = {}
    for name in (aws_settings.raw_stream, aws_settings.bad_stream, aws_settings.predictions_stream):
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        assert (summary["EncryptionType"], summary["KeyId"]) == ("KMS", "alias/aws/kinesis")
        kept[name] = summary["RetentionPeriodHours"]
    assert list(kept.values()) == [168, 168, 24]
    rule = s3.get_bucket_encryption(Bucket=aws_settings.bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    # A longer retention is raised to; a shorter one is only reported (records would go for good), and
    # a key or a bucket encryption of the operator's own is kept.
    s3.put_bucket_encryption(Bucket=aws_settings.bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]})
    longer = provision(dataclasses.replace(aws_settings, stream_retention_hours=200))
    assert "records kept 200 h" in longer[0] and "encrypted (aws:kms)" in longer[4]
    shorter = provision(aws_settings)
    assert shorter[0].endswith("records kept 200 h (configured 168 h; shorten it deliberately: older records go)")
    assert kinesis.describe_stream_summary(StreamName=aws_settings.raw_stream)[
        "StreamDescriptionSummary"]["RetentionPeriodHours"] == 200


def test_the_tls_only_statement_joins_a_buckets_own_policy_once(aws_settings, monkeypatch):
    from infra.provision import ensure_tls_only

    s3, name = aws.client("s3"), f"{aws_settings.bucket}-tls"
    s3.create_bucket(Bucket=name)
    own = {"Sid": "ShopAuditRead", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
           "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*"}
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [own]}))
    assert "left out" in ensure_tls_only(s3, name)          # on the emulator: its plain HTTP would be refused
    monkeypatch.setattr(aws, "uses_local_endpoint", lambda: False)      # as against AWS
    assert ensure_tls_only(s3, name) == "TLS only (policy statement added)"
    assert ensure_tls_only(s3, name) == "TLS only"                       # once
    statements = json.loads(s3.get_bucket_policy(Bucket=name)["Policy"])["Statement"]
    assert [s["Sid"] for s in statements] == ["ShopAuditRead", "DenyInsecureTransport"]
    with pytest.raises(ClientError, match="Forbidden|AccessDenied"):   # moto enforces it: plain HTTP is refused
        s3.put_object(Bucket=name, Key="x", Body=b"plain http")


def test_provisioning_says_so_when_a_table_expires_rows_by_another_attribute(aws_settings):
    from infra.provision import ensure_table

    dynamodb, name = aws.client("dynamodb"), f"ttl-{time.monotonic_ns()}"
    ensure_table(dynamodb, name, [("session_id", "HASH")], "valid_until")
    line = ensure_table(dynamodb, name, [("session_id", "HASH")], "expires_at")
    assert "TTL is on 'valid_until', not 'expires_at'" in line and "will not expire" in line


def test_producer_retries_only_the_failed_entries(aws_settings):
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.fail_calls = [[0, 3, 4, 99], [1]]        # first call loses 4 entries, the retry loses 1
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        producer = Producer(KinesisStream(client, aws_settings.raw_stream), base_delay=0.01)
        assert producer.send(entries(120)) == []
        assert proxy.failed_entries == 5
        assert producer.retried == 4 + 1
    stored = Counter(stream_contents(aws_settings))
    assert len(stored) == 120 and set(stored.values()) == {1}    # each entry exactly once


def test_producer_returns_everything_when_the_stream_is_unreachable_with_one_warning(aws_settings, caplog):
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.down = True
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        producer = Producer(KinesisStream(client, aws_settings.raw_stream), max_attempts=3, base_delay=0.01)
        with caplog.at_level(logging.WARNING, logger="common.producer"):
            undelivered = producer.send(entries(30))
    assert sorted(u.data for u in undelivered) == sorted(d for _, d in entries(30))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "common.producer"]
    assert "attempt 3 of 3" in warning      # one line per send through an outage, not one per attempt
    with caplog.at_level(logging.WARNING, logger="common.producer"):
        caplog.clear()
        with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
            proxy.down = True
            producer.stream = KinesisStream(aws.session().client("kinesis", endpoint_url=proxy.endpoint),
                                            aws_settings.raw_stream)
            for _ in range(5):                      # the caller retries its sends: still not a line each
                producer.send(entries(3))
    assert not [r for r in caplog.records if r.name == "common.producer"]


def test_a_producer_that_does_not_retry_timeouts_ends_the_send_at_the_first_unanswered_call(aws_settings):
    # The call lands after 1 s, past the 0.3 s read timeout: another attempt would land another copy.
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.delays[PUT_RECORDS] = 1.0
        config = Config(read_timeout=0.3, retries={"max_attempts": 0})
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint, config=config)
        producer = Producer(KinesisStream(client, aws_settings.raw_stream), max_attempts=3, retry_timeouts=False)
        undelivered = producer.send(entries(10))
        assert len(undelivered) == 10 and all(u.timed_out for u in undelivered)
        time.sleep(1.5)                                 # the call is counted once the proxy forwards it
        assert proxy.put_calls == 1
    assert Counter(stream_contents(aws_settings)) == Counter(data.decode() for _, data in entries(10))


def test_the_read_timeout_doubles_up_to_its_cap_and_steps_down_only_after_quick_answers():
    used = []
    timeouts = ReadTimeouts(5, 30, used.append)
    assert timeouts.steps == [5, 10, 20, 30]
    assert [timeouts.timed_out() for _ in range(4)] == [True, True, True, False]     # the last wait was the longest
    assert used == [10, 20, 30]
    timeouts.answered(12)          # slower than half of 20: 20 would time out again at the next call
    assert timeouts.current == 30
    for elapsed in (9, 4, 2):
        timeouts.answered(elapsed)
    assert timeouts.current == 5 and not timeouts.raised and used == [10, 20, 30, 20, 10, 5]


def test_an_output_producer_sends_a_timed_out_batch_again_at_twice_the_read_timeout_once(aws_settings, monkeypatch):
    # Each call lands 1.1 s after it was made: at the 1 s read timeout the send ends (no botocore or
    # producer retry, each would land another copy), and the next one waits up to 2 s and is answered
    # (with 0.9 s to spare: a loaded machine adds to every call through the proxy).
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        producer = output_producer(aws_settings.region, aws_settings.raw_stream, timeout=1.0)
        proxy.delays[PUT_RECORDS] = 1.1
        undelivered = producer.send(entries(10))
        assert len(undelivered) == 10 and all(u.timed_out for u in undelivered)
        assert producer.timeouts.current == 2.0
        assert producer.send([(u.partition_key, u.data) for u in undelivered]) == []
        proxy.delays.clear()
        assert producer.send(entries(1, tag="quick")) == []        # answered within 0.5 s: back to 1 s
        assert producer.timeouts.current == 1.0 and proxy.calls[PUT_RECORDS] == 3
    monkeypatch.undo()
    assert Counter(stream_contents(aws_settings)) == Counter({**{f"r-{i}": 2 for i in range(10)}, "quick-0": 1})


def test_an_output_producer_returns_everything_when_the_stream_is_unreachable(aws_settings, monkeypatch):
    # A refused connection is an outage, not a timeout: the read timeout stays, the caller retries.
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        producer = output_producer(aws_settings.region, aws_settings.raw_stream, timeout=0.5)
        producer.base_delay = 0.01
        proxy.down = True
        undelivered = producer.send(entries(5))
    assert len(undelivered) == 5 and not any(u.timed_out for u in undelivered)
    assert producer.timeouts.current == 0.5


def test_producer_hashes_keys_kinesis_would_refuse_instead_of_failing_the_call(aws_settings):
    long_key = "s" * 300                                          # over Kinesis' 256 characters
    producer = Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream), max_attempts=2, base_delay=0.01)
    assert producer.send([(long_key, b"long-1"), ("ok", b"short"), (long_key, b"long-2"), ("", b"empty")]) == []
    assert sorted(stream_contents(aws_settings)) == ["empty", "long-1", "long-2", "short"]


def test_a_throttled_read_is_sent_once_and_left_to_the_consumers_own_backoff(aws_settings, monkeypatch):
    """botocore's retry of a throttled GetRecords (up to a second's backoff) held up the reads of the
    worker's other shards; the consumer already reads a failing shard again after its own backoff."""
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.enriched_stream)).send(entries(40))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        consumer = consumer_for(aws_settings, aws_settings.enriched_stream, app="throttled", lease_ms=5_000)
        proxy.throttle = {GET_RECORDS}
        with pytest.raises(ReadFailed):
            consumer.poll()                                    # takes both shards' leases, reads each once
        assert len(consumer.owned) == 2 and proxy.calls[GET_RECORDS] == 2                   # one call per shard, no retry inside botocore
        proxy.throttle = set()
        for owned in consumer.owned.values():
            owned.retry_at = 0.0                               # the backoff is over
        read = sum(len(batch.records) for batch in consumer.poll())
        consumer.close()
    assert read == 40                                          # the iterators were kept: nothing skipped


def test_an_expired_iterator_is_replaced_and_read_at_once_not_taken_for_a_caught_up_shard(aws_settings):
    """Iterators expire after 5 minutes on AWS (never on moto): the empty page returned instead read
    as lag 0 for a shard minutes behind."""
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send(entries(30))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        shard = KinesisStream(client, aws_settings.raw_stream).list_shards()[0].shard_id
        reader = KinesisStream(client, aws_settings.raw_stream).reader(shard, None)
        first = reader.read(10)
        proxy.refuse_next[GET_RECORDS] = ["ExpiredIteratorException"]
        second = reader.read(100)
    assert [r.data for r in first.records + second.records] == [d for _, d in entries(30)]
    assert proxy.calls[GET_RECORDS] == 3


def _patch_walk_sleep(monkeypatch, walk_sleep) -> None:
    """Hand the walk's sleeps to ``walk_sleep``. time.sleep is every thread's: py4j's worker (of the
    Spark session an earlier test started) sleeps a second in a loop, and, patched too, it spun and
    filled a list of waits with 153,910 calls."""
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if sys._getframe(1).f_globals["__name__"] == "common.streams":
            walk_sleep(seconds)
        else:
            real_sleep(seconds)
    monkeypatch.setattr("common.streams.time.sleep", sleep)


def test_a_paced_walk_reads_pages_of_its_size_and_waits_for_its_share_of_the_shards_calls_and_bytes(
        aws_endpoint, monkeypatch):
    """The skew check reads the predictions stream the discount engine reads: at its own pace."""
    kinesis, name = aws.client("kinesis"), f"walk-{time.monotonic_ns()}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)
    Producer(KinesisStream(kinesis, name)).send([(f"k{i:03d}", b"x" * 996) for i in range(25)])   # 1,000 bytes each
    waits: list[float] = []
    _patch_walk_sleep(monkeypatch, waits.append)
    pace = ReadPace(records_per_call=10, min_interval_s=15, bytes_per_s=500)
    assert list(walk_stream(kinesis, name, pace=pace)) == [b"x" * 996] * 25
    # Pages of 10, 10 and 5, then the empty page at the tip, which ends the walk: 10,000 bytes at
    # 500 a second wait 20 s (less the call's own time), 5,000 bytes the 15 s between calls.
    assert len(waits) == 3 and all(19 < wait <= 20 for wait in waits[:2]) and 14 < waits[2] <= 15, waits
    waits.clear()
    assert len(list(walk_stream(kinesis, name))) == 25 and waits == []                  # unpaced


def _two_shard_stream(records: int) -> tuple[object, str, list[tuple[str, bytes]]]:
    kinesis, name = aws.client("kinesis"), f"walk-{time.monotonic_ns()}"
    kinesis.create_stream(StreamName=name, ShardCount=2)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)
    entries = [(f"k{i:03d}", b"%03d" % i) for i in range(records)]
    Producer(KinesisStream(kinesis, name)).send(entries)
    return kinesis, name, entries


def test_a_walk_reads_the_shards_side_by_side_each_at_its_own_pace(aws_endpoint, monkeypatch):
    """A shard's read limits are its own: a paced walk over a stream of two shards takes the time of
    one. Each shard's first wait lasts until the other shard's reader waits too, which a walk reading
    the shards one after the other never gets to."""
    kinesis, name, entries = _two_shard_stream(40)
    shards = {shard.shard_id: [] for shard in KinesisStream(kinesis, name).list_shards()}
    for shard_id in shards:
        reader = KinesisStream(kinesis, name).reader(shard_id, None)
        shards[shard_id] = [record.data for record in reader.read(100).records]
    assert all(len(held) >= 10 for held in shards.values())     # pages of 5: each shard waits

    waiting, both = set(), threading.Event()

    def sleep(seconds: float) -> None:
        waiting.add(threading.current_thread().ident)
        if len(waiting) == 2:
            both.set()
        assert both.wait(10), "one shard's reader waited alone"
    _patch_walk_sleep(monkeypatch, sleep)      # another thread's sleep would count as the second shard's
    walked = list(walk_stream(kinesis, name, pace=ReadPace(records_per_call=5, min_interval_s=1)))
    assert sorted(walked) == sorted(data for _, data in entries)
    for held in shards.values():                                  # each shard's records in its order
        assert [data for data in walked if data in held] == held


def test_a_walk_raises_a_shards_read_error_and_stops_its_readers_when_closed(aws_endpoint):
    kinesis, name, _ = _two_shard_stream(20)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        proxy.refuse_next[GET_RECORDS] = ["AccessDeniedException"]
        with pytest.raises(ClientError, match="AccessDeniedException"):
            list(walk_stream(client, name))
    walk = walk_stream(kinesis, name, pace=ReadPace(records_per_call=1, min_interval_s=0.05))
    assert len([next(walk) for _ in range(3)]) == 3
    walk.close()
    wait_for(lambda: not any(thread.name == "stream-walk" for thread in threading.enumerate()), timeout=10,
             what="the walk's readers to stop")


def test_a_checkpoint_kinesis_says_is_of_another_stream_is_read_from_the_oldest_record_not_waited_on(
        aws_settings, caplog):
    """A stream deleted and made again under its name: Kinesis refuses the old checkpoint
    (InvalidArgumentException, "did not come from this stream"), and every read failed, for good."""
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send(entries(30))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        client = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        stream = KinesisStream(client, aws_settings.raw_stream)
        shard = stream.list_shards()[0].shard_id
        old_checkpoint = stream.reader(shard, None).read(10).records[-1].sequence_number
        proxy.refuse_next["Kinesis_20131202.GetShardIterator"] = ["InvalidArgumentException"]
        read = stream.reader(shard, old_checkpoint).read(100)
    assert [r.data for r in read.records] == [d for _, d in entries(30)]
    assert "is not of this stream (was it deleted and made again?)" in caplog.text


def test_an_idle_consumer_waits_until_its_shard_is_due_and_that_poll_reads_the_new_record(aws_settings):
    """A caller's fixed idle sleep shorter than the read interval polled with no shard due and slept
    again: 0.2 s behind an interval of 0.25 s read each shard every 0.4 s, at every stage."""
    consumer = consumer_for(aws_settings, aws_settings.raw_stream, app="idle", read_interval_s=2.0, lease_ms=30_000)
    assert consumer.idle_wait_s(0.2) == 0.2                 # no shard yet: the caller's own sleep
    try:
        assert consumer.poll() == []                        # takes the shard, reads it: empty
        wait = consumer.idle_wait_s(0.2)
        assert 1.0 < wait <= 2.0                            # its next read, not 0.2 s
        Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send([("k", b"hit")])
        time.sleep(wait)
        [batch] = consumer.poll()                           # the next poll reads it
        assert [record.data for record in batch.records] == [b"hit"]
    finally:
        consumer.close()
    unpaced = consumer_for(aws_settings, aws_settings.raw_stream, app="unpaced")
    try:
        unpaced.poll()
        assert unpaced.owned and unpaced.idle_wait_s(0.2) == 0.2     # no interval: the caller paces
    finally:
        unpaced.close()


def test_an_idle_consumer_wakes_for_its_next_renewal_before_its_next_read(aws_settings):
    # A failing shard backs off for up to 5 s: slept through, a lease of a few seconds would expire.
    consumer = consumer_for(aws_settings, aws_settings.raw_stream, app="renewing", read_interval_s=2.0, lease_ms=3_000)
    try:
        consumer.poll()
        assert consumer.owned and 0 < consumer.idle_wait_s(0.2) <= consumer.renew_interval_s == 1.0
    finally:
        consumer.close()


def test_consumer_restart_loses_nothing_and_repeats_only_the_unconfirmed_batch(aws_settings):
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send(entries(200))
    first = consumer_for(aws_settings, aws_settings.raw_stream, app="restart", lease_ms=1000, batch_limit=50)
    outputs = []
    confirmed = first.poll()[0]
    outputs += [r.data for r in confirmed.records]
    first.checkpoint(confirmed)
    unconfirmed = [r.data for b in first.poll() for r in b.records]   # written out, then a crash
    outputs += unconfirmed
    # The next worker takes the dead one's lease once it has seen it unrenewed for its own lease_ms.
    second = consumer_for(aws_settings, aws_settings.raw_stream, app="restart", lease_ms=300, batch_limit=50)
    for _ in range(40):
        time.sleep(0.02)
        for batch in second.poll():
            outputs += [r.data for r in batch.records]
            second.checkpoint(batch)
    second.close()
    counts = Counter(outputs)
    assert set(counts) == {d for _, d in entries(200)}                 # nothing lost
    duplicated = {data for data, n in counts.items() if n > 1}
    assert len(unconfirmed) == 50 and duplicated == set(unconfirmed)   # only the unconfirmed batch repeats


def test_a_checkpoint_that_is_no_sequence_number_is_read_from_the_oldest_record_not_retried_for_ever(
        aws_settings, caplog):
    """The lake loader before c911e34 left TRIM_HORIZON as a checkpoint: after an upgrade every read
    failed (AFTER_SEQUENCE_NUMBER "TRIM_HORIZON"), for ever, with nothing saying why."""
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send(entries(30))
    first = consumer_for(aws_settings, aws_settings.raw_stream, app="legacy", lease_ms=1000, batch_limit=50)
    first.poll()
    [shard_id] = first.owned
    first.leases.checkpoint(shard_id, first.worker_id, "TRIM_HORIZON", {"intent_last": "80"})
    first.close()
    second = consumer_for(aws_settings, aws_settings.raw_stream, app="legacy", lease_ms=1000, batch_limit=50)
    read = [r.data for _ in range(20) for batch in second.poll() for r in batch.records]
    second.close()
    assert read == [data for _, data in entries(30)]
    assert "checkpoint 'TRIM_HORIZON' in the lease table is no sequence number" in caplog.text


def _status(path: Path) -> list[str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _wait(predicate, timeout=40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_two_processes_balance_four_shards_and_take_over_after_kill_9(aws_endpoint, tmp_path):
    """At-least-once repeats only what the killed worker wrote but had not checkpointed: at most one
    batch (up to its batch_limit of 1000) on each of its 2 shards. Killed once every shard's checkpoint
    is at the shard's last record, it has no such batch, so each event must be handled exactly once."""
    from infra.provision import ProvisionSettings
    from tests.conftest import unique_settings

    settings = unique_settings(ProvisionSettings, raw_shards=4)
    provision(settings)
    env = {**os.environ, **settings_env(settings), "LEASE_MS": "3000", "PYTHONPATH": str(ROOT)}
    worker = [sys.executable, str(ROOT / "tests/foundation/consumer_worker.py")]
    outs = [tmp_path / "a.out", tmp_path / "b.out"]
    states = [tmp_path / "a.json", tmp_path / "b.json"]
    leases = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"test#{settings.raw_stream}")
    procs = [subprocess.Popen(worker + [str(o), str(s)], env=env, start_new_session=True)
             for o, s in zip(outs, states)]
    try:
        assert _wait(lambda: sorted(len(_status(s)) for s in states) == [2, 2]), [_status(s) for s in states]
        assert set(_status(states[0])).isdisjoint(_status(states[1]))
        producer = Producer(KinesisStream(aws.client("kinesis"), settings.raw_stream))
        assert producer.send(entries(400, "first")) == []
        assert _wait(lambda: sum(len(o.read_text(encoding="utf-8").splitlines()) for o in outs if o.exists()) >= 400)
        stream = KinesisStream(aws.client("kinesis"), settings.raw_stream)
        ends = {s.shard_id: stream.reader(s.shard_id, None).read(1000).records[-1].sequence_number
                for s in stream.list_shards()}                  # each shard's last "first" record
        assert _wait(lambda: {lease.shard_id: lease.checkpoint for lease in leases.leases()[0]} == ends)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        assert producer.send(entries(400, "second")) == []
        assert _wait(lambda: len(_status(states[1])) == 4)        # takeover within the lease time
        expected = Counter(d.decode() for _, d in entries(400, "first") + entries(400, "second"))
        assert _wait(lambda: set(Counter(l for o in outs for l in o.read_text(encoding="utf-8").splitlines())) == set(expected))
        seen = Counter(line for o in outs for line in o.read_text(encoding="utf-8").splitlines())
        assert not expected - seen                                 # nothing lost
        duplicates = seen - expected
        assert not duplicates, f"{sum(duplicates.values())} events handled twice, e.g. {list(duplicates)[:5]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    assert not any(lease.owner for lease in leases.leases()[0])   # clean stop released every lease


def test_lease_meta_can_be_written_without_moving_the_checkpoint_and_only_by_the_owner(aws_settings):
    from common.leases import LeaseLost, MemoryLeaseTable

    for table in (DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"meta#{time.monotonic_ns()}"),
                  MemoryLeaseTable()):
        table.ensure("shard-1")
        lease = table.take(table.leases()[0][0], "me", 10_000)
        table.checkpoint(lease.shard_id, "me", None, {"intent": "42"})          # before any checkpoint
        assert _lease(table).checkpoint is None and _lease(table).meta == {"intent": "42"}
        table.checkpoint(lease.shard_id, "me", "41", {})
        table.checkpoint(lease.shard_id, "me", None, {"intent": "57"})
        assert (_lease(table).checkpoint, _lease(table).meta) == ("41", {"intent": "57"})
        with pytest.raises(LeaseLost):
            table.checkpoint(lease.shard_id, "someone-else", None, {"intent": "99"})
        assert _lease(table).meta == {"intent": "57"}


def test_a_take_returns_the_checkpoint_the_table_holds_not_the_snapshot_taken_from(aws_settings):
    from common.leases import MemoryLeaseTable

    for table in (DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"take#{time.monotonic_ns()}"),
                  MemoryLeaseTable()):
        table.ensure("shard-1")
        stale = _lease(table)                          # what a slow worker read
        other = table.take(stale, "other", 10_000)     # meanwhile another one takes it, moves on, lets go
        table.checkpoint(other.shard_id, "other", "10", None)
        table.release(other.shard_id, "other")
        taken = table.take(stale, "me", 10_000)        # the row looks as it did, so the take succeeds
        assert (taken.owner, taken.checkpoint) == ("me", "10")


def _lease(table):
    return table.leases()[0][0]


def _rows(settings, group):
    return aws.client("dynamodb").query(
        TableName=settings.lease_table, KeyConditionExpression="#g = :g", ExpressionAttributeNames={"#g": "group"},
        ExpressionAttributeValues={":g": {"S": group}}, ConsistentRead=True)["Items"]


def test_heartbeat_rows_carry_a_ttl_in_epoch_seconds_and_shard_rows_none(aws_settings):
    ttl = aws.client("dynamodb").describe_time_to_live(TableName=aws_settings.lease_table)["TimeToLiveDescription"]
    assert (ttl["AttributeName"], ttl["TimeToLiveStatus"]) == ("expires_at", "ENABLED")
    consumer = consumer_for(aws_settings, aws_settings.raw_stream, app="ttl")
    consumer.balance()
    rows = {row["item"]["S"]: row for row in _rows(aws_settings, f"ttl#{aws_settings.raw_stream}")}
    beat = rows.pop(f"worker#{consumer.worker_id}")
    assert time.time() < int(beat["expires_at"]["N"]) < time.time() + 2 * 86_400     # seconds, not ms
    assert rows and not any("expires_at" in row for row in rows.values())            # checkpoints never expire
    consumer.close()


def test_a_killed_workers_row_is_removed_by_a_peer_and_a_beating_workers_row_never(aws_settings):
    from common.leases import MemoryLeaseTable

    app, lease_ms = "dead", 100
    killed = consumer_for(aws_settings, aws_settings.raw_stream, app=app, lease_ms=lease_ms)
    killed.balance()                                       # then SIGKILL: no close(), no leave()
    peer = consumer_for(aws_settings, aws_settings.raw_stream, app=app, lease_ms=lease_ms)
    until = time.monotonic() + 15 * lease_ms / 1000        # past DEAD_WORKER_LEASES (10) lease periods
    while time.monotonic() < until:
        peer.poll()
        time.sleep(0.02)
    assert {row["item"]["S"] for row in _rows(aws_settings, f"{app}#{aws_settings.raw_stream}")
            if row["item"]["S"].startswith("worker#")} == {f"worker#{peer.worker_id}"}
    peer.close()
    for table in (DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"beat#{time.monotonic_ns()}"),
                  MemoryLeaseTable()):
        table.heartbeat("w", 100)
        seen = table.leases()[1]["w"]
        time.sleep(0.002)
        table.heartbeat("w", 100)                          # it beat again since it was seen
        assert table.remove_worker("w", seen) is False
        assert "w" in table.leases()[1]
        assert table.remove_worker("w", table.leases()[1]["w"]) is True
        assert "w" not in table.leases()[1]


def test_an_aged_out_shards_row_is_deleted_only_with_nothing_to_resume_from_and_a_second_delete_is_harmless(
        aws_settings):
    from common.leases import LeaseLost, MemoryLeaseTable
    from common.streams import SHARD_END

    for table in (DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"end#{time.monotonic_ns()}"),
                  MemoryLeaseTable()):
        table.ensure("unread")
        assert table.remove_aged_out("unread") is True         # never checkpointed: nothing to resume from
        table.ensure("shard-1")
        lease = table.take(_lease(table), "me", 10_000)
        table.checkpoint("shard-1", "me", "41", None)
        assert table.remove_aged_out("shard-1") is False       # a checkpoint, but not the end
        assert _lease(table).checkpoint == "41"
        table.checkpoint("shard-1", "me", SHARD_END, None)
        assert table.remove_aged_out("shard-1") is True
        assert table.leases()[0] == []
        assert table.remove_aged_out("shard-1") is False       # a peer deleted it first: no error
        with pytest.raises(LeaseLost):                         # a worker still holding it learns it is gone
            table.renew(lease.shard_id, "me", 10_000)
        table.release(lease.shard_id, "me")                    # and its release does not recreate it
        assert table.leases()[0] == []


def test_a_take_whose_answer_was_lost_and_retried_by_botocore_is_ours_not_lost(aws_settings):
    """The retry of a conditional take that went through failed its own condition: LeaseLost, and the
    shard stayed ours in the table, unread and unrenewed, until it expired."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        client = aws.session().client("dynamodb", endpoint_url=proxy.endpoint,
                                      config=Config(read_timeout=1, retries={"max_attempts": 2, "mode": "standard"}))
        table = DynamoLeaseTable(client, aws_settings.lease_table, f"retry#{time.monotonic_ns()}")
        table.ensure("shard-1")
        proxy.hang_next = ("DynamoDB_20120810.UpdateItem", "after")     # done, then never answered
        taken = table.take(_lease(table), "me", 10_000)
        assert proxy.hanging.is_set() and proxy.calls["DynamoDB_20120810.UpdateItem"] == 2
        assert taken.owner == "me" and _lease(table).owner == "me"
        with pytest.raises(LeaseLost):                 # a take from a stale snapshot still fails
            table.take(Lease("shard-1"), "other", 10_000)


def test_a_read_that_hangs_ends_in_time_for_the_renewal_and_a_peer_never_takes_the_shard(aws_settings, monkeypatch):
    """The consumer's calls waited botocore's 10 s for an answer, longer than this 6 s lease (and as
    long as the default one): one GetRecords that hung cost the worker its shard, which the peer read
    again from the checkpoint (the scorer's peer rebuilding every session of it)."""
    Producer(KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)).send(entries(10))
    peer = consumer_for(aws_settings, aws_settings.raw_stream, app="hung", worker_id="peer", lease_ms=6000)
    read, done = [], threading.Event()
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        worker = consumer_for(aws_settings, aws_settings.raw_stream, app="hung", worker_id="worker", lease_ms=6000)
        worker.balance()                                       # takes the only shard
        proxy.hang_next = (GET_RECORDS, "before")              # never answered

        def work():
            while not done.is_set():
                try:
                    read.extend(r.data for batch in worker.poll() for r in batch.records)
                except ReadFailed:
                    pass
                time.sleep(0.05)

        runner = threading.Thread(target=work, daemon=True)
        runner.start()
        wait_for(proxy.hanging.is_set, what="the hung read")
        until = time.monotonic() + 9.0            # a 10 s hang: the peer takes the lease within 8 s of its start
        peer_read = []
        while time.monotonic() < until:
            peer_read += [r.data for batch in peer.poll() for r in batch.records]
            time.sleep(0.2)
        done.set()
        runner.join(30)
    assert not peer.owned and peer_read == []
    assert sorted(read) == sorted(data for _, data in entries(10)) and len(worker.owned) == 1
    worker.close()
    peer.close()


def test_a_stream_that_does_not_exist_is_waited_for_with_one_warning_a_minute_not_one_a_second(aws_settings, caplog):
    consumer = consumer_for(aws_settings, "clickstream-typo", app="typo", lease_ms=300)   # retried every 0.1 s
    with caplog.at_level(logging.WARNING, logger="common.consumer"):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert consumer.poll() == []
            time.sleep(0.02)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("listing the shards of stream clickstream-typo or the leases in table")
    assert "ResourceNotFoundException" in warning and consumer._balance_failures >= 5
    # Owning no shard, it read as caught up (lag 0) while nothing was read: lag alerts stayed quiet.
    assert not consumer.owned and consumer.max_lag_ms >= 1_000
