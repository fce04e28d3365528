"""The sender against the in-memory stream backend (common.streams.MemoryStream): throttling and
records that can never fit, which the emulator cannot produce on demand."""
from __future__ import annotations

import os
import time

import orjson

from collector.sink import Sink
from collector.spool import RAW, Spool, encode
from common.producer import Producer
from common.streams import MemoryStream


def sink_for(tmp_path, raw: MemoryStream, bad: MemoryStream) -> Sink:
    spool = Spool(tmp_path, max_bytes=1 << 24)
    return Sink(spool, Producer(raw, max_attempts=1, sleep=lambda _: None),
                Producer(bad, max_attempts=1, sleep=lambda _: None))


def test_throttled_entries_are_kept_and_delivered_once(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    for index in range(10):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    raw.fail_next = 3                                   # the first three entries are refused
    assert not sink._drain()                            # refused entries: back off, don't spin on them
    assert sink.healthy and sink.spool.records == 3
    assert sink._drain()
    delivered = [int(r.data) for r in raw.all_records()]
    assert sorted(delivered) == list(range(10))         # each exactly once: no duplicate of the accepted ones
    assert delivered[:7] == list(range(3, 10))          # the refused ones come after, re-appended
    assert sink.spool.records == 0 and sink.spool.depth_bytes == 0


def test_unreachable_stream_keeps_the_cursor(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    for index in range(5):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    raw.fail_next = 5                                   # nothing of the batch gets through
    assert not sink._drain()
    assert not sink.healthy and sink.spool.records == 5
    assert sink._drain() and sink.healthy
    assert [int(r.data) for r in raw.all_records()] == list(range(5))


def test_a_record_too_big_for_kinesis_becomes_a_size_violation(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    sink.spool.append(encode(RAW, "k", b"x" * (1024 * 1024 + 10)), 1)
    sink.spool.append(encode(RAW, "k", b"small"), 1)
    assert sink._drain()
    assert [r.data for r in raw.all_records()] == [b"small"]
    [row] = [orjson.loads(r.data) for r in bad.all_records()]
    assert row["schema"].endswith("/size_violation/jsonschema/1-0-0")
    assert row["data"]["failure"]["actualSizeBytes"] == 1024 * 1024 + 10


def test_a_failing_bad_stream_does_not_hold_up_raw_records_nor_lose_bad_rows(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    sink.spool.append(encode(RAW, "k", b"good"), 1)
    sink.spool.append(encode(1, "k", b"bad-row"), 1)
    bad.fail_next = 10**9                               # e.g. the bad stream does not exist
    assert not sink._drain()                            # one round, then back off: no spinning
    assert [r.data for r in raw.all_records()] == [b"good"]
    entries, _ = sink.spool.read(10, 1 << 20)
    assert [(e.stream, e.data) for e in entries] == [(1, b"bad-row")]
    bad.fail_next = 0
    assert sink._drain()
    assert [r.data for r in bad.all_records()] == [b"bad-row"]


class SlowStream(MemoryStream):
    """Takes ``seconds`` per PutRecords, like a stream far away."""

    def __init__(self, name, seconds):
        super().__init__(name)
        self.seconds = seconds

    def put_records(self, entries):
        time.sleep(self.seconds)
        return super().put_records(entries)


def test_stop_gives_up_at_its_timeout_and_leaves_the_rest_spooled(tmp_path):
    raw, bad = SlowStream("raw", 0.2), MemoryStream("bad")
    spool = Spool(tmp_path, max_bytes=1 << 24)
    sink = Sink(spool, Producer(raw, max_attempts=1), Producer(bad, max_attempts=1), batch_records=1)
    for index in range(40):
        spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    sink.start()
    sink.stop(timeout=0.5)                                # 40 batches of 0.2 s: a stop that waited would send all
    sent = [int(r.data) for r in raw.all_records()]
    assert 0 < len(sent) < 40 and sent == list(range(len(sent)))
    again = Spool(tmp_path, max_bytes=1 << 24)            # the rest waits for the next start, in order
    entries, _ = again.read(100, 1 << 20)
    assert [int(e.data) for e in entries] == list(range(len(sent), 40)) and again.records == 40 - len(sent)


def test_a_slot_freed_while_running_is_adopted_and_delivered(tmp_path):
    """A rolling deploy on a shared volume: the old task's slot still holds hits when the new task
    starts, and frees only when the old task stops. The running sender adopts it then."""
    from collector.sink import open_orphans
    from collector.spool import claim_dir

    root = tmp_path / "spool"
    own, own_fd = claim_dir(root)
    old, old_fd = claim_dir(root)                        # the old task's slot, held
    stale = Spool(old, max_bytes=1 << 24)
    for index in range(5):
        stale.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    stale.close()
    raw, bad = MemoryStream("raw"), MemoryStream("bad")

    def find(taken):
        return open_orphans(root, taken, lambda folder: Spool(folder, max_bytes=1 << 24))

    sink = Sink(Spool(own, max_bytes=1 << 24), Producer(raw, max_attempts=1), Producer(bad, max_attempts=1),
                linger_ms=20, find_orphans=find, adopt_every_s=0.05)
    sink.start()
    try:
        time.sleep(0.3)
        assert not raw.all_records() and not sink.adopted     # still held by the old task
        os.close(old_fd)                                      # the old task stops
        deadline = time.monotonic() + 5
        while len(raw.all_records()) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)                                       # several more rounds: nothing twice
    finally:
        sink.stop(1.0)
        os.close(own_fd)
    assert sorted(int(r.data) for r in raw.all_records()) == list(range(5))
    assert not sink.adopted                                   # delivered, then released


def test_an_orphan_that_cannot_be_opened_is_released_and_the_others_adopted(tmp_path):
    from collector.sink import open_orphans
    from collector.spool import _lock, claim_dir

    root = tmp_path / "spool"
    slots = [claim_dir(root) for _ in range(3)]
    for folder, fd in slots[1:]:
        stale = Spool(folder, max_bytes=1 << 24)
        stale.append(encode(RAW, "k", b"x"), 1)
        stale.close()
        os.close(fd)
    broken = slots[1][0]

    def open_spool(folder):
        if folder == broken:
            raise OSError(28, "No space left on device")
        return Spool(folder, max_bytes=1 << 24)

    [(adopted, fd)] = open_orphans(root, {slots[0][0]}, open_spool)
    assert adopted.dir == slots[2][0] and adopted.records == 1
    again = _lock(broken)                      # released: another round or process can take it
    assert again is not None
    adopted.close()
    for descriptor in (again, fd, slots[0][1]):
        os.close(descriptor)
