"""AWS-faithful Kinesis behaviour on kinesis-mock: resharding order and the record size limit."""
import time

import pytest
from botocore.exceptions import ClientError

from common import aws
from common.consumer import Consumer
from common.leases import DynamoLeaseTable
from common.producer import Producer
from common.streams import MAX_RECORD_BYTES, SHARD_END, KinesisStream

pytestmark = pytest.mark.kinesis_mock


def _active(client, name):
    for _ in range(100):
        if client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never became ACTIVE")


@pytest.fixture
def mock_stream(kinesis_mock, aws_settings):
    client = aws.session().client("kinesis", endpoint_url=kinesis_mock)
    name = f"split-{time.monotonic_ns()}"
    client.create_stream(StreamName=name, ShardCount=1)
    _active(client, name)
    return client, name


def test_parent_shard_is_read_to_its_end_before_its_children(mock_stream, aws_settings):
    client, name = mock_stream
    stream = KinesisStream(client, name)
    producer = Producer(stream)
    assert producer.send([(f"k{i}", f"before-{i}".encode()) for i in range(60)]) == []
    parent = stream.list_shards()[0].shard_id
    client.split_shard(StreamName=name, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    _active(client, name)
    assert producer.send([(f"k{i}", f"after-{i}".encode()) for i in range(60)]) == []
    shards = stream.list_shards()
    assert len(shards) == 3 and all(s.parent_shard_id == parent for s in shards if s.shard_id != parent)

    leases = DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, f"split#{name}")
    consumer = Consumer(stream, leases, worker_id="w", batch_limit=25, shard_refresh_s=0)
    order = []
    for _ in range(30):
        for batch in consumer.poll():
            order += [(batch.shard_id, r.data.decode(), r.sequence_number) for r in batch.records]
            consumer.checkpoint(batch)
        if len(order) == 120:
            break
    consumer.close()
    from_parent = [i for i, (shard, _, _) in enumerate(order) if shard == parent]
    from_children = [i for i, (shard, _, _) in enumerate(order) if shard != parent]
    assert len(from_parent) == 60 and len(from_children) == 60
    assert max(from_parent) < min(from_children)
    assert {lease.shard_id: lease.checkpoint for lease in leases.leases()[0]}[parent] == SHARD_END
    parent_sequences = [int(seq) for shard, _, seq in order if shard == parent]
    assert parent_sequences == sorted(parent_sequences) and parent_sequences[0] > 2**64   # real 56-digit numbers


def test_a_record_over_one_mib_is_refused_by_kinesis_and_handed_back_by_the_producer(mock_stream):
    client, name = mock_stream
    with pytest.raises(ClientError):
        client.put_record(StreamName=name, PartitionKey="k", Data=b"x" * (MAX_RECORD_BYTES + 1))
    undelivered = Producer(KinesisStream(client, name)).send([("k", b"x" * MAX_RECORD_BYTES), ("k", b"ok")])
    assert [u.reason for u in undelivered] == ["record larger than 1 MiB"]
