"""What an operator sees when a part of the collector fails: a failing spool disk, a dead sender thread.
Through the real ASGI app with the real Sink and Spool, on in-memory streams."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
import time

import pytest

from common.streams import MemoryStream
from tests.collector.test_sink import app_with, asgi_messages, pixel_hit
from tests.faults import ThrottledFor


def asgi_get(app, path: str) -> tuple[int, dict, bytes]:
    """GET ``path`` through the ASGI app: status, headers, body."""
    sent = asyncio.run(asgi_messages(app, path))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def metric(app, name: str) -> float:
    text = asgi_get(app, "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def hits(app, count: int, start: int = 0) -> list[int]:
    async def run():
        return [await pixel_hit(app, index) for index in range(start, start + count)]

    return asyncio.run(run())


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_failing_spool_disk_is_its_own_counter_and_one_error_line_per_interval(tmp_path, monkeypatch, caplog):
    app = app_with(tmp_path, MemoryStream("raw"))
    app.start()
    try:
        full_before = metric(app, "collector_spool_full_total")
        errors_before = metric(app, "collector_spool_write_errors_total")

        def disk_full(frames, count, force=False):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(app.spool, "append", disk_full)
        with caplog.at_level(logging.ERROR, logger="collector"):
            status, headers, _ = asgi_get(app, "/i")
            statuses = hits(app, 49)
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert status == 503 and headers[b"retry-after"] == b"30"      # answered as before
        assert statuses == [503] * 49
        assert metric(app, "collector_spool_write_errors_total") - errors_before == 50
        assert metric(app, "collector_spool_full_total") == full_before  # not a backlog at its limit
        [line] = lines                                                  # not one per hit
        assert str(app.spool.dir) in line and "No space left on device" in line and " 1 hits" in line

        caplog.clear()
        app.write_errors._next_at -= app.write_errors.every_s          # the interval passes: one line for the rest
        with caplog.at_level(logging.ERROR, logger="collector"):
            hits(app, 1, start=50)
            [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert " 50 hits" in line                                       # 49 after the first line, and this one
    finally:
        monkeypatch.undo()
        app.stop()
        os.close(app._lock_fd)


def test_a_full_spool_logs_one_error_line_per_interval_with_its_size(tmp_path, caplog):
    app = app_with(tmp_path, ThrottledFor("raw", 3600), spool_max_bytes=4096)     # the backlog only grows
    app.start()
    try:
        full_before = metric(app, "collector_spool_full_total")
        with caplog.at_level(logging.ERROR, logger="collector"):
            statuses = hits(app, 50)
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        refused = statuses.count(503)
        assert 0 < refused < 50 and metric(app, "collector_spool_full_total") - full_before == refused
        [line] = lines                                                  # not one per hit
        assert str(app.spool.dir) in line and f"{app.spool.depth_bytes} undelivered bytes" in line
        assert "spool_max_bytes 4096" in line and " 1 hits" in line

        caplog.clear()
        app.full_refusals._next_at -= app.full_refusals.every_s        # the interval passes: one line for the rest
        with caplog.at_level(logging.ERROR, logger="collector"):
            assert hits(app, 1, start=50) == [503]
            [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert f" {refused} hits" in line                               # those after the first line, and this one
    finally:
        app.stop()
        os.close(app._lock_fd)


WORKER = """
import os, sys
from collector import metrics
from collector.app import Collector
from collector.config import settings
# A linger of 10 minutes: the sender's first round would set the drained time to now (0.2 s after start).
app = Collector(settings(env={"CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": sys.argv[1],
                             "CLICKSTREAM_LINGER_MS": "600000"}))
app.start()
metrics.DRAINED.set(float(sys.argv[2]))
if sys.argv[3] == "scrape":
    print(metrics.render()[0].decode())
if sys.argv[3] == "killed":
    os._exit(0)
if sys.argv[3] == "running":
    print("ready", flush=True)
    sys.stdin.read()
app.stop()
"""


def test_with_several_workers_the_drained_timestamp_is_the_stalest_live_workers(tmp_path):
    """granian workers are processes: prometheus-client's multiprocess mode merges their values. The
    sum or any one worker's would hide a worker whose delivery is behind; a worker gone (stopped, or
    killed and its slot taken again) must not count, or its last value would stay the minimum for good."""
    (tmp_path / "metrics").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}

    def worker(drained: int, how: str) -> str:
        return subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "spool"), str(drained), how], env=env,
                              check=True, capture_output=True, encoding="utf-8").stdout

    worker(1000, "stopped")
    worker(2000, "killed")
    running = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "spool"), "1500", "running"], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, encoding="utf-8")
    try:
        assert running.stdout.readline() == "ready\n"          # it took the killed one's slot
        text = worker(3000, "scrape")
    finally:
        running.communicate("", timeout=30)
    assert "collector_spool_drained_timestamp_seconds 1500.0" in text.splitlines()


def test_worker_process_metrics_skip_slots_whose_process_is_gone_or_not_a_sibling(tmp_path):
    """A killed worker's slot keeps its pid until the slot is taken again; that pid may by then be
    another program's. Neither may show as a worker: only processes with the scraper's parent do."""
    from collector.metrics import WorkerProcesses

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    slots = {"worker-0": os.getpid(), "worker-1": gone.pid, "worker-2": 1, "worker-3": "not a pid"}
    for slot, pid in slots.items():
        (tmp_path / slot).mkdir()
        (tmp_path / slot / "pid").write_text(str(pid))
    workers = WorkerProcesses(tmp_path)
    assert workers.pids() == [os.getpid()]
    memory = next(family for family in workers.collect() if family.name == "process_resident_memory_bytes")
    assert [(sample.labels, sample.value > 0) for sample in memory.samples] == [({"pid": str(os.getpid())}, True)]


# The thread ends with an exception on purpose; pytest would report it as unhandled.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_sender_fails_sink_health_and_the_spool_gauges_stay_true(tmp_path, monkeypatch):
    raw = MemoryStream("raw")
    app = app_with(tmp_path, raw)
    app.start()
    try:
        assert hits(app, 5) == [200] * 5
        wait_until(lambda: len(raw.all_records()) == 5)
        wait_until(lambda: metric(app, "collector_spool_depth_records") == 0)
        assert asgi_get(app, "/sink-health")[0] == 200

        def die(deadline=None, full_only=False):
            raise SystemExit          # not an Exception: the sender's catch-all lets it end the thread
        monkeypatch.setattr(app.sink, "_drain", die)
        app.sink.wake.set()
        app.sink._thread.join(10)
        assert not app.sink._thread.is_alive()

        assert hits(app, 30, start=5) == [200] * 30                 # still spooled: nothing is lost
        status, _, body = asgi_get(app, "/sink-health")
        assert (status, body) == (503, b"sender thread not running")
        assert asgi_get(app, "/health")[0] == 200                    # the process still serves
        assert metric(app, "collector_spool_depth_records") == app.spool.records == 30
        assert metric(app, "collector_spool_depth_bytes") == app.spool.depth_bytes > 0
        assert metric(app, "collector_sink_up") == 0
    finally:
        monkeypatch.undo()
        app.stop()                    # delivers what the dead sender left
        os.close(app._lock_fd)
    assert len(raw.all_records()) == 35


def test_a_sender_ended_by_shutdown_is_not_reported_dead(tmp_path):
    app = app_with(tmp_path, MemoryStream("raw"))
    app.start()
    try:
        sink = app.sink
        sink._stop.set()              # what stop() does first; it then drains the rest itself
        sink.wake.set()
        sink._thread.join(10)
        assert asgi_get(app, "/sink-health")[0] == 200
        assert metric(app, "collector_sink_up") == 1
    finally:
        app.stop()
        os.close(app._lock_fd)


def test_damaged_spool_bytes_are_counted_and_the_hits_after_them_delivered(tmp_path, caplog):
    """Damage in the spool was an ERROR line only: nothing an alert could see (SpoolDamaged)."""
    from collector.spool import RAW, Spool, encode

    left = Spool(tmp_path / "spool" / "worker-0", max_bytes=1 << 20)    # a crashed run's backlog
    ends = [left.append(encode(RAW, f"k{i}", b'{"hit":%d}' % i), 1) for i in range(6)]
    with open(next((tmp_path / "spool" / "worker-0").glob("*.seg")), "r+b") as segment:
        segment.seek(ends[1] + 9)
        segment.write(b"\xff")                                 # the disk damaged the third hit
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("collector_spool_damaged_total")      # the counter is the process's
    raw = MemoryStream("raw")
    app = app_with(tmp_path, raw)
    app.start()
    try:
        wait_until(lambda: len(raw.all_records()) == 5)
        assert sorted(record.data for record in raw.all_records()) == [b'{"hit":%d}' % i for i in (0, 1, 3, 4, 5)]
        wait_until(lambda: metric(app, "collector_spool_damaged_total") == before + 1)
    finally:
        app.stop()
    assert "passed over" in caplog.text


def test_damage_the_sender_passes_during_a_scrape_is_counted_once_not_lost():
    # The count was read twice, before and after the increment: a frame the sender passed between
    # the two was taken as counted and never added.
    from prometheus_client import REGISTRY

    from collector import metrics as collector_metrics

    class Passing:                        # each read sees one more damaged frame, as during a read()
        records = depth_bytes = 0
        seen = 0

        @property
        def corrupt_frames(self):
            self.seen += 1
            return self.seen

    spool = Passing()
    before = REGISTRY.get_sample_value("collector_spool_damaged_total") or 0
    for _ in range(3):
        collector_metrics.update_spool([spool])
    counted = REGISTRY.get_sample_value("collector_spool_damaged_total") - before
    assert counted == spool.seen            # every damaged frame the spool has reported (3 here; 3 of 6 before)

