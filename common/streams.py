"""Stream backends: Kinesis (boto3) and an in-memory stream with the same interface.

A backend knows how to put a batch of entries, list shards and read a shard after a sequence
number. Everything above it (the producer's batching and retries, the consumer's leases and
checkpoints) is written once against this small interface, so unit tests and benchmarks can swap
the emulator for memory without changing the code under test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from botocore.exceptions import ClientError

from common.config import GET_RECORDS_MAX

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1024 * 1024          # data + partition key, per Kinesis record
MAX_BATCH_BYTES = 5 * 1024 * 1024       # per PutRecords call
MAX_BATCH_RECORDS = 500                 # per PutRecords call
SHARD_END = "SHARD_END"


@dataclass(frozen=True)
class Record:
    data: bytes
    partition_key: str
    sequence_number: str
    shard_id: str
    arrival_ms: int


@dataclass(frozen=True)
class Shard:
    shard_id: str
    parent_shard_id: str | None = None
    adjacent_parent_shard_id: str | None = None
    closed: bool = False
    # The MD5 hash keys of the partition keys it takes (Kinesis' HashKeyRange), both ends included.
    start_hash: int = 0
    end_hash: int = 2**128 - 1

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(p for p in (self.parent_shard_id, self.adjacent_parent_shard_id) if p)

    def takes(self, partition_key: str) -> bool:
        """Whether a record with this partition key goes to this shard."""
        return self.start_hash <= hash_key(partition_key) <= self.end_hash


@dataclass(frozen=True)
class PutResult:
    """Outcome of one entry of a PutRecords call: a sequence number, or an error code."""

    sequence_number: str | None = None
    shard_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass
class ReadResult:
    records: list[Record]
    millis_behind: int
    shard_end: bool


class ShardReader(Protocol):
    def read(self, limit: int) -> ReadResult: ...


class StreamBackend(Protocol):
    name: str

    def put_records(self, entries: list[tuple[str, bytes]]) -> list[PutResult]: ...
    def list_shards(self) -> list[Shard]: ...
    def reader(self, shard_id: str, after_sequence: str | None) -> ShardReader: ...


def sequence_key(sequence_number: str) -> int:
    """Sequence numbers compare as integers (the emulator's are small, Kinesis' are 56 digits)."""
    return int(sequence_number)


# --------------------------------------------------------------------------------------- Kinesis


class KinesisStream:
    """A Kinesis data stream reached through boto3 (emulator, LocalStack or AWS alike)."""

    def __init__(self, client, name: str):
        self.client = client
        self.name = name

    def put_records(self, entries: list[tuple[str, bytes]]) -> list[PutResult]:
        response = self.client.put_records(
            StreamName=self.name,
            Records=[{"PartitionKey": key, "Data": data} for key, data in entries],
        )
        return [
            PutResult(item.get("SequenceNumber"), item.get("ShardId"),
                      item.get("ErrorCode"), item.get("ErrorMessage"))
            for item in response["Records"]
        ]

    def list_shards(self) -> list[Shard]:
        shards, token = [], None
        while True:
            kwargs = {"NextToken": token} if token else {"StreamName": self.name}
            response = self.client.list_shards(**kwargs)
            for item in response["Shards"]:
                hashes = item.get("HashKeyRange", {})
                shards.append(Shard(
                    item["ShardId"], item.get("ParentShardId"), item.get("AdjacentParentShardId"),
                    "EndingSequenceNumber" in item.get("SequenceNumberRange", {}),
                    int(hashes.get("StartingHashKey", 0)), int(hashes.get("EndingHashKey", 2**128 - 1)),
                ))
            token = response.get("NextToken")
            if not token:
                return shards

    def reader(self, shard_id: str, after_sequence: str | None) -> KinesisShardReader:
        return KinesisShardReader(self, shard_id, after_sequence)


class KinesisShardReader:
    """Reads one shard, renewing the iterator from the last sequence number when it expires."""

    def __init__(self, stream: KinesisStream, shard_id: str, after_sequence: str | None):
        self.stream = stream
        self.shard_id = shard_id
        self.last_sequence = after_sequence
        self.iterator: str | None = None
        self.ended = False

    def _new_iterator(self) -> str | None:
        kwargs = {"StreamName": self.stream.name, "ShardId": self.shard_id}
        if not self.last_sequence:
            return self.stream.client.get_shard_iterator(**kwargs, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        try:
            return self.stream.client.get_shard_iterator(**kwargs, ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                                         StartingSequenceNumber=self.last_sequence)["ShardIterator"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidArgumentException":
                raise
        # Kinesis refuses a sequence number another stream gave: this one was deleted and made again under
        # its name, and the checkpoint is the old one's. Waiting would read nothing, for good; the oldest
        # record on is read again instead (the outputs are idempotent).
        log.error("stream %s shard %s: checkpoint %s is not of this stream (was it deleted and made again?); "
                  "reading the shard from its oldest record", self.stream.name, self.shard_id, self.last_sequence)
        self.last_sequence = None
        return self._new_iterator()

    def read(self, limit: int) -> ReadResult:
        if self.ended:
            return ReadResult([], 0, True)
        if self.iterator is None:
            self.iterator = self._new_iterator()
        try:
            response = self.stream.client.get_records(ShardIterator=self.iterator, Limit=limit)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ExpiredIteratorException":
                raise
            # An iterator lives 5 minutes, and a pause that long (writes retried through an outage) is
            # when the lag matters: read again at once, not an empty page that reads as caught up.
            self.iterator = self._new_iterator()
            response = self.stream.client.get_records(ShardIterator=self.iterator, Limit=limit)
        records = [
            Record(item["Data"], item["PartitionKey"], item["SequenceNumber"], self.shard_id,
                   int(item["ApproximateArrivalTimestamp"].timestamp() * 1000))
            for item in response["Records"]
        ]
        if records:
            self.last_sequence = records[-1].sequence_number
        self.iterator = response.get("NextShardIterator")
        # Kinesis may return an empty page with a valid iterator before the end of a closed shard;
        # only a missing iterator means the shard has been read to its end.
        self.ended = self.iterator is None
        return ReadResult(records, int(response.get("MillisBehindLatest", 0)), self.ended)


class TimedShardReader(KinesisShardReader):
    """A shard reader that starts at a point in time (AT_TIMESTAMP) instead of the trim horizon."""

    def __init__(self, stream: KinesisStream, shard_id: str, since: float | None):
        super().__init__(stream, shard_id, None)
        self.since = since

    def _new_iterator(self) -> str | None:
        if self.last_sequence or self.since is None:
            return super()._new_iterator()
        # Once a record was read, the parent renews from its sequence number; until then, from the time.
        return self.stream.client.get_shard_iterator(
            StreamName=self.stream.name, ShardId=self.shard_id, ShardIteratorType="AT_TIMESTAMP",
            Timestamp=datetime.fromtimestamp(self.since, UTC))["ShardIterator"]


@dataclass(frozen=True)
class ReadPace:
    """A plain reader's share of a shard's read limits, which every consumer of the stream shares: 5
    GetRecords calls and 2 MB a second. The defaults leave the discount engine its 4 calls a second
    (``read_interval_s`` 0.25) and half the bytes; a page of 2,000 predictions is about 1 MB."""
    records_per_call: int = 2_000
    min_interval_s: float = 1.0
    bytes_per_s: float = 1_000_000

    def wait_s(self, page_bytes: int, elapsed_s: float) -> float:
        """How long to wait before the next call, ``elapsed_s`` after this page's call began."""
        return max(self.min_interval_s, page_bytes / self.bytes_per_s) - elapsed_s


def walk_stream(client, stream_name: str, since: float | None = None, pace: ReadPace | None = None) -> Iterator[bytes]:
    """The data of every record of a stream (from ``since``, epoch seconds) until caught up: a plain
    read, with no lease and no checkpoint, for commands that count or check what a stream holds.
    Each shard has read limits of its own, so the shards are read side by side, a thread each, and
    their records come interleaved (each shard's in order; a parent's and its child's alike).
    Unpaced, a shard is read as fast as it answers; ``pace`` leaves the stream's consumers their
    share of each shard."""
    stream = KinesisStream(client, stream_name)
    shards = [_shard_pages(stream, shard.shard_id, since, pace) for shard in stream.list_shards()]
    for page in _side_by_side(shards):
        yield from page


def _shard_pages(stream: KinesisStream, shard_id: str, since: float | None, pace: ReadPace | None) -> Iterator[list[bytes]]:
    reader = TimedShardReader(stream, shard_id, since)
    while True:
        began = time.monotonic()
        result = reader.read(pace.records_per_call if pace else GET_RECORDS_MAX)
        yield [record.data for record in result.records]
        # An empty page with nothing behind means we reached the tip of an open shard.
        if result.shard_end or (not result.records and result.millis_behind == 0):
            return
        if pace:
            page_bytes = sum(len(record.data) + len(record.partition_key) for record in result.records)
            time.sleep(max(0.0, pace.wait_s(page_bytes, time.monotonic() - began)))


_DONE = object()


def _side_by_side(producers: list[Iterator]) -> Iterator:
    """What each iterator yields, each run on a thread of its own, as it comes. An item per iterator
    waits at most (a slow caller holds the readers back: a page of a shard is up to 10 MB), an
    iterator's exception is raised here, and the threads stop at their next item once this generator
    is closed."""
    items: queue.Queue = queue.Queue(maxsize=max(1, len(producers)))
    closed = threading.Event()

    def offer(item) -> bool:
        while not closed.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def run(producer: Iterator) -> None:
        try:
            for item in producer:
                if not offer(item):
                    return
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread, which would wait for ever
            offer(exc)
            return
        offer(_DONE)

    for producer in producers:
        threading.Thread(target=run, args=(producer,), daemon=True, name="stream-walk").start()
    try:
        running = len(producers)
        while running:
            item = items.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        closed.set()


# --------------------------------------------------------------------------------------- memory


def hash_key(partition_key: str) -> int:
    """Kinesis maps a partition key to the 128-bit MD5 of its UTF-8 bytes."""
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")


@dataclass
class _MemoryShard:
    shard: Shard
    records: list[Record] = field(default_factory=list)


class MemoryStream:
    """An in-process stream with Kinesis' routing and ordering, for unit tests and benchmarks.

    ``fail_next`` makes the next N put entries fail with a throttling error, so producer retries can
    be exercised without a network. ``split()`` and ``age_out()`` play a reshard and its aftermath.
    """

    def __init__(self, name: str = "memory", shard_count: int = 1):
        self.name = name
        self._lock = threading.Lock()
        self._sequence = 0
        self.fail_next = 0
        span = 2**128 // shard_count
        self._shards = [
            _MemoryShard(Shard(f"shardId-{i:012d}", start_hash=i * span,
                               end_hash=2**128 - 1 if i == shard_count - 1 else (i + 1) * span - 1))
            for i in range(shard_count)
        ]
        self._shards_created = shard_count      # shard ids are never reused, even after an age_out()

    def put_records(self, entries: list[tuple[str, bytes]]) -> list[PutResult]:
        results = []
        now = int(time.time() * 1000)
        with self._lock:
            for key, data in entries:
                if self.fail_next > 0:
                    self.fail_next -= 1
                    results.append(PutResult(error_code="ProvisionedThroughputExceededException",
                                             error_message="injected"))
                    continue
                target = self._route(hash_key(key))
                self._sequence += 1
                sequence = str(self._sequence)
                target.records.append(Record(bytes(data), key, sequence, target.shard.shard_id, now))
                results.append(PutResult(sequence, target.shard.shard_id))
        return results

    def _route(self, hashed: int) -> _MemoryShard:
        for item in self._shards:
            if not item.shard.closed and item.shard.start_hash <= hashed <= item.shard.end_hash:
                return item
        raise RuntimeError("no open shard covers the hash key")

    def list_shards(self) -> list[Shard]:
        with self._lock:
            return [item.shard for item in self._shards]

    def split(self, shard_id: str) -> None:
        """Close a shard and open two children covering its hash range, as UpdateShardCount does."""
        with self._lock:
            parent = next(item for item in self._shards if item.shard.shard_id == shard_id)
            parent.shard = dataclasses.replace(parent.shard, closed=True)
            start, end = parent.shard.start_hash, parent.shard.end_hash
            middle, base = (start + end) // 2, self._shards_created
            self._shards_created += 2
            for index, (low, high) in enumerate(((start, middle), (middle + 1, end))):
                self._shards.append(_MemoryShard(Shard(f"shardId-{base + index:012d}", shard_id, start_hash=low,
                                                       end_hash=high)))

    def age_out(self, shard_id: str) -> None:
        """Forget a closed shard, as Kinesis does once the stream's retention has passed since it closed:
        ListShards no longer lists it and it can no longer be read."""
        with self._lock:
            [aged] = [item for item in self._shards if item.shard.shard_id == shard_id and item.shard.closed]
            self._shards.remove(aged)

    def expire(self, count: int) -> None:
        """Drop each shard's ``count`` oldest records, as retention does (for readers made after it)."""
        with self._lock:
            for item in self._shards:
                del item.records[:count]

    def reader(self, shard_id: str, after_sequence: str | None) -> MemoryShardReader | _GoneShardReader:
        shard = next((item for item in self._shards if item.shard.shard_id == shard_id), None)
        if shard is None:
            return _GoneShardReader(shard_id)
        return MemoryShardReader(self, shard, after_sequence)

    def all_records(self) -> list[Record]:
        with self._lock:
            return [record for item in self._shards for record in item.records]


class _GoneShardReader:
    """A reader of a shard no longer in the stream (aged out): it fails at its first read, as a
    Kinesis reader does (it opens lazily), not when it is made."""

    def __init__(self, shard_id: str):
        self.shard_id = shard_id

    def read(self, limit: int) -> ReadResult:
        raise ClientError({"Error": {"Code": "ResourceNotFoundException",
                                     "Message": f"Shard {self.shard_id} does not exist"}}, "GetShardIterator")


class MemoryShardReader:
    def __init__(self, stream: MemoryStream, shard: _MemoryShard, after_sequence: str | None):
        self.stream = stream
        self.shard = shard
        self.position = 0
        if after_sequence is not None:
            after = sequence_key(after_sequence)
            self.position = sum(1 for r in shard.records if sequence_key(r.sequence_number) <= after)

    def read(self, limit: int) -> ReadResult:
        with self.stream._lock:
            records = self.shard.records[self.position:self.position + limit]
            self.position += len(records)
            remaining = len(self.shard.records) - self.position
            ended = self.shard.shard.closed and remaining == 0
        behind = 0 if not remaining else max(0, int(time.time() * 1000) - self.shard.records[self.position].arrival_ms)
        return ReadResult(list(records), behind, ended)
