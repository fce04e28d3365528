"""Producer and consumer records/s: the emulator (moto server over HTTP) vs the in-memory stream."""
from __future__ import annotations

import os
import time

from bench.report import Report, rate
from common.consumer import Consumer
from common.leases import DynamoLeaseTable, MemoryLeaseTable
from common.producer import Producer
from common.streams import KinesisStream, MemoryStream
from localstack import emulator


def _entries(n: int, size: int) -> list[tuple[str, bytes]]:
    return [(f"session-{i % 997}", os.urandom(size // 2).hex().encode()) for i in range(n)]


def _produce(stream, entries) -> float:
    producer = Producer(stream)
    started = time.perf_counter()
    undelivered = producer.send(entries)
    elapsed = time.perf_counter() - started
    assert not undelivered, f"{len(undelivered)} undelivered"
    return elapsed


def _consume(stream, leases, expected: int) -> float:
    consumer = Consumer(stream, leases, worker_id="bench", batch_limit=10_000)
    started, seen = time.perf_counter(), 0
    while seen < expected:
        for batch in consumer.poll():
            seen += len(batch.records)
            consumer.checkpoint(batch)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def _emulator_backend(endpoint: str, shards: int):
    from common import aws

    os.environ["AWS_ENDPOINT_URL"] = endpoint
    kinesis, dynamodb = aws.client("kinesis"), aws.client("dynamodb")
    name = f"bench-{time.monotonic_ns()}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)
    dynamodb.create_table(TableName="bench-leases", BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k in ("group", "item")],
                          KeySchema=[{"AttributeName": "group", "KeyType": "HASH"},
                                     {"AttributeName": "item", "KeyType": "RANGE"}])
    return KinesisStream(kinesis, name), DynamoLeaseTable(dynamodb, "bench-leases", f"bench#{name}")


def run(report: Report, quick: bool) -> None:
    count, size, shards = (5_000, 200, 2) if quick else (20_000, 500, 2)
    entries = _entries(count, size)
    section = report.section(f"Stream IO: {count:,} records of {size} B, {shards} shards",
                             ["backend", "produce rec/s", "consume rec/s"])
    memory = MemoryStream(shard_count=shards)
    produce_s = _produce(memory, entries)
    consume_s = _consume(memory, MemoryLeaseTable(), count)
    report.row(section, "in-memory stream", rate(count, produce_s), rate(count, consume_s))
    memory_rates = (rate(count, produce_s), rate(count, consume_s))

    server = emulator.start("moto")
    saved = os.environ.get("AWS_ENDPOINT_URL")
    try:
        stream, leases = _emulator_backend(server.endpoint, shards)
        produce_s = _produce(stream, entries)
        consume_s = _consume(stream, leases, count)
        report.row(section, "moto server (HTTP)", rate(count, produce_s), rate(count, consume_s))
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
    report.note(section, f"in-memory is {memory_rates[0] / rate(count, produce_s):,.0f}x faster to produce and "
                         f"{memory_rates[1] / rate(count, consume_s):,.0f}x faster to consume: benchmarks of "
                         "components use it so the emulator is not the bottleneck")
