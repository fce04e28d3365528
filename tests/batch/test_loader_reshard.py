"""Resharding on kinesis-mock (AWS-faithful): a closed parent is flushed to its end before its children."""
from __future__ import annotations

import functools

import orjson
import pytest

from batch import lake
from batch.loader import Limits, StreamLoader, write_enriched
from common import aws
from common.consumer import Consumer
from common.leases import DynamoLeaseTable
from common.producer import Producer
from common.streams import SHARD_END, KinesisStream
from tests.batch.conftest import lake_event_ids, make_event
from tests.conftest import wait_for

pytestmark = pytest.mark.kinesis_mock


def _kinesis(endpoint: str):
    return aws.session().client("kinesis", endpoint_url=endpoint)


def _wait_active(kinesis, name: str) -> None:
    wait_for(lambda: kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"]
               == "ACTIVE", timeout=30)


def test_split_parent_is_finished_and_children_are_loaded_exactly_once(aws_settings, kinesis_mock):
    """Pages of 10 leave 60-70 parent records unread at the split: a child read alongside the parent
    (flushed after at most 3 pages of its 30+ records) would be written before the parent's last object."""
    kinesis = _kinesis(kinesis_mock)
    name = f"enriched-reshard-{aws_settings.bucket[-8:]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    _wait_active(kinesis, name)
    stream = KinesisStream(kinesis, name)
    producer = Producer(stream)
    before = [make_event(i, session=f"s{i % 9}") for i in range(100)]
    assert producer.send([(e["domain_sessionid"], orjson.dumps(e)) for e in before]) == []

    leases = DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"lake-loader#{name}")
    make = functools.partial(Consumer, stream, leases, lease_ms=3000, shard_refresh_s=0,
                             batch_limit=10)
    written = []                                        # the shard of each write, in the order written

    def write(sink, shard_id, records, stream_name, first=None):
        written.append(shard_id)
        return write_enriched(sink, shard_id, records, stream_name, first)

    loader = StreamLoader(make, write, lake.S3Sink(aws.client("s3"), aws_settings.bucket),
                          Limits(seconds=0.5, records=25))
    wait_for(lambda: loader.step() >= 0 and loader.stats["events"] >= 30, timeout=30, interval=0.05)

    kinesis.update_shard_count(StreamName=name, TargetShardCount=2, ScalingType="UNIFORM_SCALING")
    _wait_active(kinesis, name)
    after = [make_event(200 + i, session=f"s{i % 9}") for i in range(60)]
    assert producer.send([(e["domain_sessionid"], orjson.dumps(e)) for e in after]) == []
    loader.consumer.balance()       # sees the children while the parent is unfinished: must not take them yet
    wait_for(lambda: loader.step() >= 0 and loader.stats["events"] >= 160, timeout=60, interval=0.05)
    loader.close()

    assert sorted(lake_event_ids(aws_settings.bucket)) == sorted(e["event_id"] for e in before + after)
    rows = {lease.shard_id: lease for lease in leases.leases()[0]}
    shards = stream.list_shards()
    parent = next(s for s in shards if s.closed)
    assert rows[parent.shard_id].checkpoint == SHARD_END
    children = [s for s in shards if parent.shard_id in s.parents]
    assert len(children) == 2
    # Every parent object was written before the first child object (and the parent wrote more than once).
    first_child = written.index(next(shard for shard in written if shard != parent.shard_id))
    assert set(written[:first_child]) == {parent.shard_id} and written.count(parent.shard_id) > 1
    assert set(written[first_child:]) == {child.shard_id for child in children}
    # Every child wrote objects of its own (the sessions hash to both halves).
    keys = [o["Key"] for o in lake.list_objects(aws.client("s3"), aws_settings.bucket, "enriched/")]
    assert {child.shard_id for child in children} <= {key.rsplit("/", 1)[1].rsplit("-", 2)[0] for key in keys}
