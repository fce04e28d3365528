"""The sender against the in-memory stream backend (common.streams.MemoryStream): throttling and
records that can never fit, which the emulator cannot produce on demand."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from urllib.parse import parse_qs

import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from collector import metrics
from collector.app import Collector
from collector.config import CollectorSettings
from collector.sink import Sink
from collector.spool import RAW, READY, Spool, claim_dir, encode
from common.producer import Producer
from common.streams import MemoryStream
from tests.conftest import wait_for
from tests.faults import RefusesCalls, ThrottledFor


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


def test_throttled_entries_are_counted_and_logged_once_per_interval_with_their_reason(tmp_path, caplog):
    raw, bad = MemoryStream("clickstream-raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)

    def refused():
        return REGISTRY.get_sample_value("collector_records_refused_total", {"stream": "raw"}) or 0

    before = refused()
    for index in range(10):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    with caplog.at_level(logging.WARNING, logger="collector.sink"):
        raw.fail_next = 3
        assert not sink._drain()
        raw.fail_next = 2                               # throttled again: counted, but no second line yet
        assert not sink._drain()
        [line] = [r.getMessage() for r in caplog.records if r.name == "collector.sink"]
    assert "clickstream-raw" in line and "refused 3 records" in line and "ProvisionedThroughputExceededException" in line
    assert refused() - before == 5 and sink.healthy    # partial refusals: the stream is up (sink-health 200)

    caplog.clear()
    sink._refusals[RAW]._next_at -= sink._refusals[RAW].every_s     # the interval passes
    with caplog.at_level(logging.WARNING, logger="collector.sink"):
        raw.fail_next = 1
        assert not sink._drain()
        [line] = [r.getMessage() for r in caplog.records if r.name == "collector.sink"]
    assert "refused 3 records" in line                  # 2 after the first line, and this one
    assert sink._drain() and refused() - before == 6
    assert sorted(int(r.data) for r in raw.all_records()) == list(range(10))


def test_the_drained_timestamp_means_less_than_a_batch_waits_and_ages_while_delivery_is_behind(tmp_path, monkeypatch):
    """Every hit is spooled before it is answered, so a busy healthy collector always has a backlog:
    "caught up" is less than one batch waiting. A stream that takes nothing lets the timestamp age,
    also while less than a batch waits (a quiet shop during an outage)."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "DRAINED", Gauge("collector_spool_drained_timestamp_seconds", "", registry=registry))

    def drained():
        return registry.get_sample_value("collector_spool_drained_timestamp_seconds")

    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(raw, max_attempts=1), Producer(bad, max_attempts=1),
                batch_records=10)
    now = time.time()

    def spool_hits(count):
        for index in range(count):
            sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)

    spool_hits(25)
    assert sink._drain(full_only=True)                  # woken by a full batch: two sent, 5 wait for the timer
    assert sink.spool.records == 5 and drained() >= now

    metrics.DRAINED.set(0)
    raw.fail_next = 10**9                               # the stream takes nothing
    assert not sink._drain()                            # less than a batch waits, but it cannot be sent
    spool_hits(20)
    assert not sink._drain()
    assert drained() == 0

    raw.fail_next = 0                                   # back: two full batches, 5 left for the timer
    assert sink._drain(full_only=True) and sink.spool.records == 5 and drained() >= now
    metrics.DRAINED.set(0)
    assert sink._drain() and sink.spool.records == 0 and drained() >= now
    metrics.DRAINED.set(0)
    assert sink._drain() and drained() >= now           # woken with nothing to send: caught up too


def test_refused_records_a_full_disk_cannot_take_back_are_resent_alone_and_the_batch_is_not(tmp_path, monkeypatch,
                                                                                             caplog):
    """With the spool disk full, re-appending the refused records failed, the batch was not committed
    and was read again whole: another copy of every record the stream had taken went out each round
    (59 copies of each hit in 30 s), for as long as the disk stayed full."""
    raw, bad = RefusesCalls("raw", calls=3, entries=3), MemoryStream("bad")
    spool = Spool(tmp_path, max_bytes=1 << 24)
    sink = Sink(spool, Producer(raw, max_attempts=1, sleep=lambda _: None),
                Producer(bad, max_attempts=1, sleep=lambda _: None), min_backoff_s=0.01)
    for index in range(10):
        spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    append = spool.append

    def full_disk(data, count, force=False):
        if force:
            raise OSError(28, "No space left on device")
        return append(data, count, force)

    monkeypatch.setattr(spool, "append", full_disk)
    with caplog.at_level(logging.ERROR, logger="collector.sink"):
        assert sink._drain()
    assert sorted(int(r.data) for r in raw.all_records()) == list(range(10))        # each once
    assert spool.records == 0 and raw.calls_left == 0                                 # refused twice more, then taken
    assert sink.healthy                                         # throttled: reachable, not down
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot keep 3 refused records on disk (1 times): [Errno 28] No space left on device" in line


def test_unreachable_stream_keeps_the_cursor(tmp_path):
    raw, bad = RefusedFor("raw", 3600), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    for index in range(5):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    assert not sink._drain()                            # nothing of the batch gets through
    assert not sink.healthy and sink.spool.records == 5
    assert REGISTRY.get_sample_value("collector_sink_up") == 0
    raw.until = 0
    assert sink._drain() and sink.healthy
    assert [int(r.data) for r in raw.all_records()] == list(range(5))


def test_a_spool_disk_that_cannot_take_the_cursor_is_not_reported_as_the_stream_down(tmp_path, monkeypatch, caplog):
    """A read-only spool disk read as "stream unreachable" (sink health 0) at every batch."""
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)

    def read_only(*args):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(sink.spool, "_write_cursor", read_only)
    with caplog.at_level(logging.WARNING, logger="collector.sink"):
        for batch in range(3):
            for index in range(5):
                sink.spool.append(encode(RAW, "k", f"{batch}-{index}".encode()), 1)
            assert sink._drain() and sink.healthy
    assert len(raw.all_records()) == 15                 # each delivered once: the cursor moved in memory
    sink.spool.max_age_s = 0
    sink._rotate_old_segment()                          # delivered hits still leave the disk (raw IPs)
    [segment] = tmp_path.glob("*.seg")                  # the new one, empty: the delivered one is gone
    assert int(segment.stem) == sink.spool.end
    said = (f"spool {tmp_path}: cannot record delivered hits on disk (1 times): [Errno 30] Read-only file system; "
            "delivery goes on, and a restart may send them again")
    assert [r.getMessage() for r in caplog.records] == [said]


def test_a_stream_throttling_a_whole_batch_is_reachable_and_its_refusals_are_counted(tmp_path, caplog):
    """Every entry refused with a throttling code: the stream answered, so /sink-health stays 200 and
    collector_sink_up 1; the refusals show in the counter and a WARNING. The cursor stays: the same
    batch is sent again, in order."""
    raw, bad = MemoryStream("clickstream-raw"), MemoryStream("bad")
    sink = sink_for(tmp_path, raw, bad)
    before = REGISTRY.get_sample_value("collector_records_refused_total", {"stream": "raw"}) or 0
    for index in range(5):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    raw.fail_next = 5
    with caplog.at_level(logging.WARNING, logger="collector.sink"):
        assert not sink._drain()                        # back off before trying again
        lines = [r.getMessage() for r in caplog.records if r.name == "collector.sink"]
    assert sink.healthy and REGISTRY.get_sample_value("collector_sink_up") == 1 and sink.spool.records == 5
    assert REGISTRY.get_sample_value("collector_records_refused_total", {"stream": "raw"}) - before == 5
    [line] = lines
    assert "clickstream-raw refused 5 records" in line and "ProvisionedThroughputExceededException" in line
    assert sink._drain() and sink.spool.records == 0
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
    """Takes ``seconds`` per PutRecords, like a stream far away; keeps each call's size."""

    def __init__(self, name, seconds):
        super().__init__(name)
        self.seconds = seconds
        self.calls: list[int] = []

    def put_records(self, entries):
        self.calls.append(len(entries))
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



def spooled_bytes(folder) -> bytes:
    """The spool's segment files, read while the sender may delete them."""
    data = []
    for path in folder.glob("*.seg"):
        try:
            data.append(path.read_bytes())
        except FileNotFoundError:       # delivered and deleted between the listing and the read
            pass
    return b"".join(data)


def test_the_sender_deletes_delivered_hits_once_their_segment_is_old(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    spool = Spool(tmp_path, max_bytes=1 << 24, max_age_s=0.2)
    sink = Sink(spool, Producer(raw, max_attempts=1), Producer(bad, max_attempts=1), linger_ms=20)
    for index in range(5):
        spool.append(encode(RAW, f"k{index}", f"hit-{index}".encode()), 1)
    sink.start()
    try:
        deadline = time.monotonic() + 5
        while b"hit-" in spooled_bytes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(raw.all_records()) == 5
        assert b"hit-" not in spooled_bytes(tmp_path)   # while it runs
    finally:
        sink.stop(1.0)


def test_the_sender_writes_the_next_segment_ahead_and_again_after_each_rotation(tmp_path):
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=4096)
    sink = Sink(spool, Producer(raw, max_attempts=1), Producer(bad, max_attempts=1), linger_ms=20)
    sink.start()
    try:
        wait_for(lambda: (tmp_path / READY).exists(), timeout=5, interval=0.02, what="the next segment")
        prepared = (tmp_path / READY).stat().st_ino
        for index in range(200):                        # several segments' worth
            spool.append(encode(RAW, f"k{index}", f"hit-{index}".encode()), 1)
        wait_for(lambda: len(raw.all_records()) == 200 and (tmp_path / READY).exists()
                 and (tmp_path / READY).stat().st_ino != prepared, timeout=5, interval=0.02,
                 what="another one after the rotation took the first")
    finally:
        sink.stop(1.0)


def test_a_disk_too_full_for_the_next_segment_is_tried_again_a_minute_later_not_every_round(tmp_path, monkeypatch,
                                                                                                 caplog):
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=4096)
    sink = Sink(spool, Producer(MemoryStream("raw"), max_attempts=1), Producer(MemoryStream("bad"), max_attempts=1))
    writes = []

    def disk_full(fd, data, offset):
        writes.append(offset)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", disk_full)
    with caplog.at_level(logging.ERROR, logger="collector.sink"):
        for _ in range(5):
            sink._prepare_next_segment()
    assert len(writes) == 1 and not list(tmp_path.glob("next.ready*"))
    assert "cannot write the next segment ahead" in caplog.text
    sink._prepare_after -= 60
    sink._prepare_next_segment()
    assert len(writes) == 2


def test_a_hit_spooled_while_stop_runs_is_never_deleted_with_the_delivered_ones(tmp_path, monkeypatch):
    """The server still answers hits while lifespan shutdown stops the sink: one spooled after the
    sink found the spool empty must not go with the delivered segments."""
    raw, bad = MemoryStream("raw"), MemoryStream("bad")
    spool = Spool(tmp_path, max_bytes=1 << 24)
    sink = Sink(spool, Producer(raw, max_attempts=1), Producer(bad, max_attempts=1), linger_ms=10)
    spool.append(encode(RAW, "k0", b"delivered"), 1)
    sink.start()
    wait_for(lambda: len(raw.all_records()) == 1, 5, what="the first hit delivered")
    real_close = spool.close

    def a_hit_arrives_then_close():
        spool.append(encode(RAW, "k1", b"answered during stop"), 1)        # acknowledged with 200
        real_close()

    monkeypatch.setattr(spool, "close", a_hit_arrives_then_close)
    sink.stop(1.0)
    delivered = [r.data for r in raw.all_records()]
    entries, _ = Spool(tmp_path, max_bytes=1 << 24).read(10, 1 << 20)
    assert b"answered during stop" in delivered + [e.data for e in entries]

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
    assert not list(old.glob("*.seg"))                        # and its delivered hits deleted by the next round
    assert not list(own.glob("*.seg"))                        # ours too, all delivered at stop


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


# ------------------------------------------------------------------ backoff while hits keep arriving


class RefusedFor(ThrottledFor):
    """Raises on every PutRecords, as an unreachable stream does, for ``seconds``; then accepts."""

    def put_records(self, entries):
        self.during()
        if time.monotonic() < self.until:
            raise ConnectionRefusedError("connection refused")
        return MemoryStream.put_records(self, entries)


def app_with(tmp_path, raw: MemoryStream, spool_max_bytes: int = 1 << 26, fsync: str = "interval",
             **sink_options) -> Collector:
    """The real ASGI app with the real Sink, on in-memory streams (one producer attempt per send)."""
    settings = CollectorSettings(spool_dir=tmp_path / "spool", linger_ms=50, batch_records=10,
                                 shutdown_timeout_s=0.5, spool_max_bytes=spool_max_bytes, fsync=fsync)

    def factory(settings):
        folder, fd = claim_dir(settings.spool_dir)
        spool = Spool(folder, max_bytes=settings.spool_max_bytes, fsync=settings.fsync)
        return Sink(spool, Producer(raw, max_attempts=1), Producer(MemoryStream("bad"), max_attempts=1),
                    linger_ms=settings.linger_ms, batch_records=settings.batch_records, **sink_options), fd

    return Collector(settings, sink_factory=factory)


async def asgi_messages(app: Collector, path: str, query: bytes = b"") -> list[dict]:
    """GET ``path`` through the ASGI app, as granian calls it; the messages the app sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(b"host", b"collector.test")], "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 8080)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def pixel_hit(app: Collector, index: int) -> int:
    """GET /i?n=<index>; the answer's status."""
    return (await asgi_messages(app, "/i", f"e=pv&n={index}".encode()))[0]["status"]


def send_hits_for(app: Collector, seconds: float, per_second: int = 100) -> list[int]:
    async def run():
        statuses, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            statuses.append(await pixel_hit(app, len(statuses)))
            await asyncio.sleep(1 / per_second)
        return statuses

    return asyncio.run(run())


@pytest.mark.parametrize("outage", [ThrottledFor, RefusedFor], ids=["throttled", "unreachable"])
def test_hits_arriving_during_an_outage_do_not_cut_the_backoff_short(tmp_path, caplog, outage):
    """Once the backlog passes batch_records every hit wakes the sender; while it backs off after a
    failed send that must not make it retry: ~2.5 s of outage at a 1 s cap allows about 5 attempts
    (at 0, 0.2, 0.6, 1.4 and 2.4 s), however many hits arrive. Before the fix: one per few hits (dozens)."""
    attempts = []
    raw = outage("raw", 3600, during=lambda: attempts.append(time.monotonic()))
    app = app_with(tmp_path, raw, max_backoff_s=1.0)
    app.start()
    try:
        with caplog.at_level(logging.INFO):
            statuses = send_hits_for(app, seconds=2.5)                 # ~250 hits, 100/s
            failed = len(attempts)
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert statuses == [200] * len(statuses) and len(statuses) > 50
        assert 1 <= failed <= 6, f"{failed} PutRecords attempts in a 2.5 s outage"
        assert not raw.all_records() and app.spool.records == len(statuses)   # all kept, nothing sent
        assert len(warnings) <= failed + 1          # one line per attempt at most (and "unreachable"), never per hit
        raw.until = 0                                                       # the stream is back: all of it, once, in order
        deadline = time.monotonic() + 30
        while app.spool.records and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = [int(parse_qs(orjson.loads(r.data)["querystring"])["n"][0]) for r in raw.all_records()]
        assert sent == list(range(len(statuses)))
        assert app.sink.healthy and app.spool.depth_bytes == 0
    finally:
        app.stop()
        os.close(app._lock_fd)


def test_stop_ends_a_backoff_at_once_and_keeps_the_spool(tmp_path):
    attempts = []
    raw = RefusedFor("raw", 3600, during=lambda: attempts.append(time.monotonic()))
    app = app_with(tmp_path, raw, min_backoff_s=60, max_backoff_s=60)
    app.start()
    statuses = send_hits_for(app, seconds=0.5)
    deadline = time.monotonic() + 10
    while not attempts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert attempts                                                  # failed once: now in a 60 s backoff
    started = time.monotonic()
    app.stop()                                                       # shutdown_timeout_s=0.5
    assert time.monotonic() - started < 10                           # not the 60 s backoff
    assert len(attempts) <= 3 and not raw.all_records()
    os.close(app._lock_fd)
    again = Spool(next((tmp_path / "spool").iterdir()), max_bytes=1 << 26)
    assert statuses == [200] * len(statuses) and again.records == len(statuses)
    again.close()


class TakesTenPerCall(MemoryStream):
    """A stream at its write limit: each PutRecords call takes ten entries and throttles the rest."""

    def put_records(self, entries):
        self.fail_next = max(0, len(entries) - 10)
        results = super().put_records(entries)
        self.fail_next = 0
        return results


def test_a_throttled_stream_that_takes_part_of_each_call_is_retried_at_the_shortest_backoff(tmp_path):
    """Each round delivers something, so the wait must not grow as for an unreachable stream
    (0.2, 0.4, 0.8, 1.6, 3.2 s ...: five rounds in 5 s, at 0, 0.2, 0.6, 1.4 and 3 s, the next at
    6.2 s: 50 entries); at 0.2 s about 25 rounds. (100 asks for ten: a round may take 0.5 s on a
    loaded machine. In 2.5 s against 70, nine rounds were seen with three CPU hogs on two cores.)"""
    raw = TakesTenPerCall("raw")
    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(raw, max_attempts=1), Producer(MemoryStream("bad")),
                batch_records=50, max_backoff_s=5.0)
    for index in range(300):
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
    sink.start()
    try:
        time.sleep(5)
        delivered = len(raw.all_records())
    finally:
        sink.stop(timeout=0)
    assert delivered >= 100, f"{delivered} of 300 delivered in 5 s"


def test_under_sustained_load_batches_leave_full_not_as_each_send_ends(tmp_path):
    """Woken because a batch is full, the sender sent the rest as well: under load, each following
    batch was what arrived during the previous send (about a tenth of one here), and every batch
    costs a cursor write. Only the linger timer sends a partial batch."""
    raw = SlowStream("raw", 0.005)                      # hits keep arriving during each send
    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(raw, max_attempts=1), Producer(MemoryStream("bad")),
                batch_records=50, linger_ms=2000)
    sink.start()
    try:
        for index in range(1000):                       # ~2,000 hits/s for half a second
            sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
            sink.notify()
            if index % 10 == 9:
                time.sleep(0.005)
        wait_for(lambda: len(raw.all_records()) == 1000, timeout=10)
    finally:
        sink.stop(timeout=5)
    assert sorted(int(r.data) for r in raw.all_records()) == list(range(1000))
    assert raw.calls[:-1] == [50] * (len(raw.calls) - 1), raw.calls     # the last one: at the linger timer


def test_the_first_hit_after_a_quiet_round_leaves_at_once_and_hits_that_follow_it_wait_to_batch(tmp_path):
    """A quiet shop's hit waited for the linger timer (100 ms on average at the default 200 ms, of a
    time to act of about half a second) for hits that were not coming. The linger is 5 s here."""
    raw = SlowStream("raw", 0)                      # counts each call's records
    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(raw, max_attempts=1), Producer(MemoryStream("bad")),
                linger_ms=5000)

    def hit(index: int) -> None:
        sink.spool.append(encode(RAW, f"k{index}", str(index).encode()), 1)
        sink.notify()

    sink.start()
    try:
        wait_for(lambda: sink._idle, timeout=15, what="a round that found nothing to send")
        hit(0)
        wait_for(lambda: len(raw.all_records()) == 1, timeout=3, what="the lone hit sent before the linger ends")
        for index in range(1, 4):                   # the round that sent it was not quiet: these batch
            hit(index)
        time.sleep(1)
        assert len(raw.all_records()) == 1
        wait_for(lambda: len(raw.all_records()) == 4, timeout=15, what="the three at the linger timer")
    finally:
        sink.stop(timeout=5)
    assert raw.calls == [1, 3]


def test_the_streams_state_is_logged_as_news_at_start_and_as_a_warning_when_lost(tmp_path, caplog):
    # Every start said "stream reachable again", and losing the stream was an INFO line.
    probes = []
    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(MemoryStream("raw")), Producer(MemoryStream("bad")),
                probe=lambda: probes.append(1))
    with caplog.at_level(logging.INFO, logger="collector.sink"):
        sink.start()
        wait_for(lambda: probes, timeout=10, what="the sender's first probe")
        sink.stop(timeout=0)
        sink._set_health(False)
        sink._set_health(True)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("stream raw")]
    assert probes and lines == [("INFO", "stream raw reachable"),
                                ("WARNING", "stream raw unreachable; hits stay in the spool"),
                                ("INFO", "stream raw reachable again")]


def test_start_does_not_wait_for_a_hung_stream_to_answer_the_probe(tmp_path):
    """start() probed the stream itself: with the stream hung, a worker answered no hit for
    sink_timeout_s (5 s) at every start. The sender's thread probes first thing instead."""
    from botocore.exceptions import ConnectTimeoutError

    probing, release = threading.Event(), threading.Event()

    def hung_probe():
        probing.set()
        release.wait(30)
        raise ConnectTimeoutError(endpoint_url="http://kinesis.test")

    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(MemoryStream("raw"), max_attempts=1),
                Producer(MemoryStream("bad")), probe=hung_probe, linger_ms=10)
    starting = threading.Thread(target=sink.start)
    starting.start()
    try:
        starting.join(10)
        assert not starting.is_alive(), "start() waited for the probe"
        wait_for(probing.is_set, timeout=10, what="the sender's probe")
        assert sink.problem() is None              # not known to be down: nothing says so yet
        release.set()
        wait_for(lambda: sink.problem() == "stream unreachable", timeout=10, what="the probe's answer")
        assert REGISTRY.get_sample_value("collector_sink_up") == 0
    finally:
        release.set()
        starting.join(40)
        sink.stop(timeout=5)


@pytest.mark.parametrize("refused", [True, False], ids=["access denied", "connection refused"])
def test_a_stream_refusing_writes_says_why_and_an_outage_stays_unreachable(tmp_path, caplog, refused):
    """AccessDenied, a disabled KMS key or a deleted stream read as "stream unreachable", as if the
    network were down; an outage must still say so."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    class Failing(MemoryStream):
        def put_records(self, entries):
            if refused:
                raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}}, "PutRecords")
            raise EndpointConnectionError(endpoint_url="http://kinesis.test")

    sink = Sink(Spool(tmp_path, max_bytes=1 << 24), Producer(Failing("raw"), max_attempts=1),
                Producer(MemoryStream("bad")), linger_ms=10)
    sink.spool.append(encode(RAW, "k", b"hit"), 1)
    with caplog.at_level(logging.WARNING, logger="collector.sink"):
        sink.start()
        try:
            wait_for(lambda: sink.problem() is not None, timeout=10)
        finally:
            sink.stop(timeout=0)
    if refused:
        assert sink.problem().startswith("stream not writable: ClientError: An error occurred (AccessDeniedException)")
        assert "stream raw not writable (ClientError: An error occurred (AccessDeniedException)" in caplog.text
    else:
        assert sink.problem() == "stream unreachable" and "stream raw unreachable; hits stay" in caplog.text
    assert sink.spool.records == 1                                        # kept for when it is allowed again


def test_with_fsync_always_concurrent_hits_share_fsync_rounds_not_one_thread_hop_each(tmp_path, monkeypatch):
    # Each hit handed its own sync_to to a thread (most returned at once, the fsync already done by
    # another): the hops and the GIL they took back cost more than the fsyncs.
    app = app_with(tmp_path, MemoryStream("raw"), fsync="always")
    app.start()
    try:
        calls = []
        real = app.spool.sync_to
        monkeypatch.setattr(app.spool, "sync_to", lambda offset: calls.append(offset) or real(offset))

        async def burst():
            return await asyncio.gather(*(pixel_hit(app, n) for n in range(50)))
        assert asyncio.run(burst()) == [200] * 50
        assert app.spool.synced >= app.spool.end and 1 <= len(calls) <= 5, calls
    finally:
        app.stop()
        os.close(app._lock_fd)


def test_adopting_a_dead_workers_slot_drops_its_gauges(tmp_path, monkeypatch):
    """With workers respawned, a live worker may adopt a killed one's slot before its successor
    claims it: only the claim dropped the dead worker's gauges, which then counted for good."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          encoding="utf-8", check=True).stdout.strip()
    slot = tmp_path / "worker-1"
    left = Spool(slot, max_bytes=1 << 20)
    left.append(encode(RAW, "k", b"hit"), 1)
    (slot / "pid").write_text(dead)
    forgotten = []
    monkeypatch.setattr(metrics, "forget_worker", forgotten.append)
    sink = Sink(Spool(tmp_path / "worker-0", max_bytes=1 << 20), Producer(MemoryStream("raw")),
                Producer(MemoryStream("bad")), find_orphans=lambda taken: [(left, os.open(slot, os.O_RDONLY))])
    sink._adopt()
    assert forgotten == [int(dead)]


def test_a_scrape_never_sets_a_stale_up_over_the_senders_down(tmp_path, monkeypatch):
    """The scrape reads the sink's state, then sets the gauge: the sender finding the stream down in
    between must win, not be overwritten with the 1 the scrape read before."""
    sink = sink_for(tmp_path, MemoryStream("raw"), MemoryStream("bad"))
    sender = threading.Thread(target=sink._set_health, args=(False,))

    def up_while_the_sender_finds_it_down() -> str | None:
        sender.start()
        sender.join(0.5)                # the sender's turn comes while the scrape holds what it read
        return None                     # no problem: the stream is up, as the scrape read it

    monkeypatch.setattr(sink, "problem", up_while_the_sender_finds_it_down)
    metrics.refresh(sink)
    sender.join()
    assert REGISTRY.get_sample_value("collector_sink_up") == 0
