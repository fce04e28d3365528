"""Never lose a hit: every hit answered 200 is found in the raw stream, whatever happened meanwhile."""
from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest

from collector.spool import decode_frames, read_cursor
from tests import faults
from tests.collector.conftest import FaultProxy, collector_env, get, read_stream, with_marker
from tests.conftest import wait_for

# The crash tests' CLICKSTREAM_BATCH_RECORDS: the sender saves its cursor after each batch, so a crash
# can only re-send the one batch in flight per spool (sent, cursor not saved yet): at-least-once.
BATCH = 10


def send_hits(url: str, marker: str, count: int, threads: int = 8, start: int = 0) -> list[int]:
    """GET /i hits numbered start..start+count-1 (in order when threads=1); returns their statuses."""
    def one(index: int) -> int:
        return get(f"{url}/i?e=pv&tv=test&aid={marker}&n={index}")[0]

    if threads == 1:
        return [one(i) for i in range(start, start + count)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(start, start + count)))


def numbers(records: list[dict], marker: str) -> list[int]:
    ordered = sorted(with_marker(records, marker), key=lambda r: r["_seq"])
    return [int(parse_qs(r["querystring"])["n"][0]) for r in ordered]


def deliver_then_spool(streams, proxy, url: str, marker: str, delivered: int, spooled: int, threads: int = 8) -> None:
    """Hits 0..delivered-1 reach the stream; then, with the stream down, the next ``spooled`` stay in the spool."""
    assert send_hits(url, marker, delivered, threads) == [200] * delivered
    read_stream(streams.raw_stream, until=lambda r: set(range(delivered)) <= set(numbers(r, marker)))
    proxy.set_up(False)
    assert send_hits(url, marker, spooled, threads, start=delivered) == [200] * spooled


def assert_at_least_once(streams, marker: str, total: int, spools: int = 1) -> None:
    """Every hit 0..total-1 reaches the stream; only a batch in flight at the crash may come twice."""
    records = read_stream(streams.raw_stream, until=lambda r: set(range(total)) <= set(numbers(r, marker)),
                          timeout=60)
    counts = Counter(numbers(records, marker))
    assert sorted(counts) == list(range(total))
    assert sum(counts.values()) - total <= spools * BATCH, {n: c for n, c in counts.items() if c > 1}


def metric(url: str, name: str) -> float:
    text = get(url + "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


@pytest.fixture
def proxy(aws_endpoint):
    proxy = FaultProxy(int(aws_endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


def test_every_hit_reaches_the_stream(streams, make_collector, tmp_path):
    collector = make_collector(collector_env(streams, tmp_path / "spool"))
    marker = uuid.uuid4().hex
    assert send_hits(collector.url, marker, 300) == [200] * 300
    records = read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 300)
    assert sorted(numbers(records, marker)) == list(range(300))
    assert metric(collector.url, "collector_records_produced_total") >= 300


def test_stream_down_then_back_delivers_everything_in_order(streams, proxy, make_collector, tmp_path):
    collector = make_collector(collector_env(streams, tmp_path / "spool", proxy.endpoint))
    marker = uuid.uuid4().hex
    assert send_hits(collector.url, marker, 20, threads=1) == [200] * 20
    read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 20)

    proxy.set_up(False)
    statuses = [get(f"{collector.url}/i?e=pv&aid={marker}&n={i}")[0] for i in range(20, 220)]
    assert statuses == [200] * 200
    deadline = time.monotonic() + 20
    while get(collector.url + "/sink-health")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(collector.url + "/sink-health")[0] == 503
    assert metric(collector.url, "collector_spool_depth_records") > 0

    proxy.set_up(True)
    records = read_stream(streams.raw_stream, until=lambda r: set(range(220)) <= set(numbers(r, marker)),
                          timeout=60)
    got = numbers(records, marker)
    assert set(got) == set(range(220))
    # Drained in order: the first copy of every hit appears in the order the hits were sent.
    first_seen = list(dict.fromkeys(got))
    assert first_seen == list(range(220))
    deadline = time.monotonic() + 20
    while get(collector.url + "/sink-health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(collector.url + "/sink-health")[0] == 200


@pytest.fixture
def slow_proxy(aws_endpoint):
    """The emulator behind tests.faults.FaultProxy, whose ``delays`` make chosen calls slow."""
    with faults.FaultProxy(aws_endpoint) as slow:
        yield slow


def test_a_stream_answering_slower_than_sink_timeout_s_gets_each_hit_a_bounded_number_of_times(
        streams, slow_proxy, make_collector, tmp_path):
    # Each PutRecords lands 1.1 s after it was made, past the 1 s read timeout: the sender cannot tell
    # whether a batch landed. Sent again at that timeout, each batch landed once per attempt, without end.
    # (Just past the timeout, so the doubled wait has 0.9 s to spare on a loaded machine.)
    slow_proxy.delays[faults.PUT_RECORDS] = 1.1
    collector = make_collector(collector_env(streams, tmp_path / "spool", slow_proxy.endpoint, sink_timeout_s=1,
                                             sink_timeout_max_s=8))
    marker, total, first = uuid.uuid4().hex, 150, 10
    assert send_hits(collector.url, marker, first, threads=1) == [200] * first
    time.sleep(1.5)                # the batch that has them timed out, and goes again as it was
    assert send_hits(collector.url, marker, total - first, threads=4, start=first) == [200] * (total - first)
    health = []

    def drained() -> bool:
        health.append(get(collector.url + "/sink-health")[0])
        return metric(collector.url, "collector_spool_depth_records") == 0

    wait_for(drained, timeout=30, interval=0.3, what="the spool to drain")
    time.sleep(2)                  # a copy sent by a call given up on lands 1.1 s after it was made
    counts = Counter(numbers(read_stream(streams.raw_stream, timeout=0), marker))
    assert sorted(counts) == list(range(total))
    # Timed out at 1 s, a batch is answered at 2 s: two copies at most. The batches after it go at 2 s
    # and land once, the hits spooled meanwhile too (they did not join the batch sent again).
    assert max(counts.values()) <= 2, Counter(counts.values())
    assert {n for n, copies in counts.items() if copies > 1} <= set(range(first)), counts
    assert set(health) == {200}, "a stream that answers is slow, not down"
    assert metric(collector.url, "collector_sink_timeouts_total") >= 1
    assert metric(collector.url, "collector_sink_timeout_seconds") == 2

    # Answering at once again, the read timeout steps back down to sink_timeout_s.
    slow_proxy.delays.clear()
    wait_for(lambda: send_hits(collector.url, marker, 1, threads=1, start=total) and
             metric(collector.url, "collector_sink_timeout_seconds") == 1, timeout=20, what="the timeout back at 1 s")


def test_a_stream_slower_than_sink_timeout_max_s_is_reported_down(streams, slow_proxy, make_collector, tmp_path):
    slow_proxy.delays[faults.PUT_RECORDS] = 2
    collector = make_collector(collector_env(streams, tmp_path / "spool", slow_proxy.endpoint, sink_timeout_s=0.3,
                                             sink_timeout_max_s=0.6))
    assert send_hits(collector.url, uuid.uuid4().hex, 5, threads=1) == [200] * 5
    wait_for(lambda: get(collector.url + "/sink-health")[0] == 503, timeout=15, what="/sink-health 503")
    assert get(collector.url + "/sink-health")[2] == b"stream unreachable"
    assert metric(collector.url, "collector_sink_timeout_seconds") == 0.6


# kill -9 leaves the page cache intact, so the fsync policies cannot differ in outcome here (only a
# power cut would tell them apart): the parameters only run each policy's code path through a crash.
@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_kill_9_while_spooled_then_restart_delivers_everything(streams, proxy, make_collector, tmp_path, fsync):
    spool = tmp_path / "spool"
    first = make_collector(collector_env(streams, spool, proxy.endpoint, fsync=fsync, batch_records=BATCH))
    marker = uuid.uuid4().hex
    deliver_then_spool(streams, proxy, first.url, marker, delivered=100, spooled=50)
    first.kill()
    assert set(numbers(read_stream(streams.raw_stream, timeout=0), marker)) == set(range(100))

    second = make_collector(collector_env(streams, spool, batch_records=BATCH))
    assert_at_least_once(streams, marker, 150)
    second.terminate()


def test_spool_full_answers_503_with_retry_after_and_loses_nothing_accepted(streams, proxy, make_collector, tmp_path):
    proxy.set_up(False)
    collector = make_collector(collector_env(streams, tmp_path / "spool", proxy.endpoint,
                                             spool_max_bytes=40_000, retry_after_s=7))
    marker = uuid.uuid4().hex
    accepted, refused = [], []
    for index in range(400):
        status, headers, _ = get(f"{collector.url}/i?e=pv&aid={marker}&n={index}")
        if status == 200:
            accepted.append(index)
        else:
            assert status == 503
            assert headers["Retry-After"] == "7"
            refused.append(index)
    assert accepted and refused
    assert metric(collector.url, "collector_spool_full_total") == len(refused)

    proxy.set_up(True)
    records = read_stream(streams.raw_stream, until=lambda r: set(accepted) <= set(numbers(r, marker)), timeout=60)
    assert set(numbers(records, marker)) == set(accepted)
    # Room again once the spool drained.
    assert get(f"{collector.url}/i?e=pv&aid={marker}&n=9999")[0] == 200


def test_sigterm_flushes_everything(streams, make_collector, tmp_path):
    # A linger far longer than the test: only the shutdown flush can deliver these hits.
    collector = make_collector(collector_env(streams, tmp_path / "spool", linger_ms=600_000))
    marker = uuid.uuid4().hex
    assert send_hits(collector.url, marker, 100) == [200] * 100
    assert not with_marker(read_stream(streams.raw_stream, timeout=0), marker)
    assert collector.terminate() == 0
    records = read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 100, timeout=10)
    assert sorted(numbers(records, marker)) == list(range(100))
    slot = tmp_path / "spool" / "worker-0"
    assert not list(slot.glob("*.seg")) and not (slot / "cursor").exists()    # all delivered: no raw hit left on disk


def test_several_workers_share_the_load_and_report_summed_metrics(streams, make_collector, tmp_path):
    collector = make_collector(collector_env(streams, tmp_path / "spool", workers=2))
    # /health answered by one worker: on a busy machine the other may still be starting, and the
    # first would take every connection.
    wait_for(lambda: len(list((tmp_path / "spool").glob("worker-*/pid"))) == 2, 30, what="both workers started")
    marker = uuid.uuid4().hex
    assert send_hits(collector.url, marker, 200, threads=16) == [200] * 200
    records = read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 200)
    assert sorted(numbers(records, marker)) == list(range(200))
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["worker-0", "worker-1"]
    # Each worker wrote (and delivered) its own share of the hits to its own spool.
    spooled = [sum(len(decode_frames(p.read_bytes())[0]) for p in (tmp_path / "spool" / f"worker-{i}").glob("*.seg"))
               for i in (0, 1)]
    assert all(spooled) and sum(spooled) == 200, spooled
    # /metrics from either worker reports the sum over both.
    assert metric(collector.url, "collector_records_spooled_total") == 200
    wait_for(lambda: metric(collector.url, "collector_records_produced_total") == 200, 10, what="produced == 200")
    assert metric(collector.url, "collector_sink_up") == 1
    # Each worker's own process metrics, which the multiprocess registry lacks, labelled by its pid.
    workers = sorted(p.read_text(encoding="utf-8") for p in (tmp_path / "spool").glob("worker-*/pid"))
    text = get(collector.url + "/metrics")[2].decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds"):
        values = {line.split('pid="')[1].split('"')[0]: float(line.split()[-1])
                  for line in text.splitlines() if line.startswith(name + "{")}
        assert sorted(values) == workers and all(value > 0 for value in values.values()), (name, values)


def test_a_killed_worker_is_replaced_while_the_others_serve(streams, make_collector, tmp_path):
    """granian stopped every worker and exited once one died (an OOM kill, a crash): the whole
    collector was down until its supervisor restarted it."""
    import os
    import signal

    collector = make_collector(collector_env(streams, tmp_path / "spool", workers=2))

    def pids() -> list[str]:
        return sorted(p.read_text(encoding="utf-8") for p in (tmp_path / "spool").glob("worker-*/pid"))

    wait_for(lambda: len(pids()) == 2, 30, what="both workers started")
    before = pids()
    os.kill(int(before[0]), signal.SIGKILL)        # its accepted connections are reset: clients retry those
    wait_for(lambda: len(set(pids()) - set(before)) == 1, 30, what="a new worker in the killed one's slot")
    assert collector.process.poll() is None and before[1] in pids()          # the other one never stopped
    marker = uuid.uuid4().hex
    assert send_hits(collector.url, marker, 100, threads=4) == [200] * 100
    records = read_stream(streams.raw_stream, until=lambda r: len(with_marker(r, marker)) >= 100)
    assert sorted(numbers(records, marker)) == list(range(100))
    text = get(collector.url + "/metrics")[2].decode()
    assert f'pid="{before[0]}"' not in text                                  # the dead worker's series are gone


def test_sigterm_with_the_stream_down_keeps_the_spool_for_the_next_start(streams, proxy, make_collector, tmp_path):
    spool = tmp_path / "spool"
    first = make_collector(collector_env(streams, spool, proxy.endpoint, shutdown_timeout_s=1, batch_records=BATCH))
    marker = uuid.uuid4().hex
    deliver_then_spool(streams, proxy, first.url, marker, delivered=40, spooled=30)
    assert first.terminate() == 0
    assert set(numbers(read_stream(streams.raw_stream, timeout=0), marker)) == set(range(40))
    second = make_collector(collector_env(streams, spool, batch_records=BATCH))
    assert_at_least_once(streams, marker, 70)
    second.terminate()


def test_fewer_workers_after_a_crash_still_deliver_every_slot(streams, proxy, make_collector, tmp_path):
    spool = tmp_path / "spool"
    first = make_collector(collector_env(streams, spool, proxy.endpoint, workers=2, batch_records=BATCH))
    marker = uuid.uuid4().hex
    deliver_then_spool(streams, proxy, first.url, marker, delivered=100, spooled=200, threads=16)
    first.kill()
    # Both workers took hits (connections are spread over them), so both slots hold a backlog.
    assert all(backlog(spool / f"worker-{i}") for i in (0, 1))

    make_collector(collector_env(streams, spool, workers=1, batch_records=BATCH))
    assert_at_least_once(streams, marker, 300, spools=2)


def backlog(folder) -> int:
    """Frames after the saved cursor in a killed worker's spool (one segment: the default 64 MiB holds them)."""
    [segment] = folder.glob("*.seg")
    cursor = read_cursor(folder) or 0
    return len(decode_frames(segment.read_bytes()[cursor - int(segment.stem):])[0])
