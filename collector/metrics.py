"""Prometheus metrics. With several granian workers, prometheus-client's multiprocess mode is used
(``PROMETHEUS_MULTIPROC_DIR`` set by ``__main__`` before the workers start), so /metrics from any
worker reports the sum over all of them."""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.process_collector import ProcessCollector

from common.rawkey import KEYED_BY

_MULTI = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_GAUGE = {"multiprocess_mode": "livesum"} if _MULTI else {}
_MIN = {"multiprocess_mode": "livemin"} if _MULTI else {}       # the worst worker shows, not a sum
_MAX = {"multiprocess_mode": "livemax"} if _MULTI else {}

REQUESTS = Counter("collector_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
PRODUCED_TOTAL = Counter("collector_records_produced_total", "Records accepted by the stream", ["stream"])
PRODUCED = {0: PRODUCED_TOTAL.labels("raw"), 1: PRODUCED_TOTAL.labels("bad")}
REFUSED_TOTAL = Counter("collector_records_refused_total",
                        "Records the stream refused (throttling), kept in the spool to be resent",
                        ["stream"])
REFUSED = {0: REFUSED_TOTAL.labels("raw"), 1: REFUSED_TOTAL.labels("bad")}
SPOOLED = Counter("collector_records_spooled_total", "Records written to the spool")
REJECTED = Counter("collector_spool_full_total", "Hits answered 503: the backlog reached spool_max_bytes")
WRITE_ERRORS = Counter("collector_spool_write_errors_total",
                       "Hits answered 503: writing them to the spool failed (a full or failing disk)")
SPOOL_DAMAGED = Counter("collector_spool_damaged_total",
                        "Damaged stretches of spool passed over or cut (a failing disk, a power cut): their hits are lost")
# Hits keyed by no id that outlives the request (random) may reach the enricher, and so the scorer, out
# of order: docs/collector.md, "Records, limits and bad input".
HITS_KEYED = Counter("collector_hits_keyed_total",
                     "Hits by what keyed their raw records: the tracker's sid or duid, a returning network_userid, "
                     "or random (no id that outlives the request)", ["by"])
_KEYED = {by: HITS_KEYED.labels(by) for by in KEYED_BY}
SPOOL_RECORDS = Gauge("collector_spool_depth_records", "Undelivered records in the spool", **_GAUGE)
SPOOL_BYTES = Gauge("collector_spool_depth_bytes", "Undelivered bytes in the spool", **_GAUGE)
# Not "depth == 0": every hit is spooled first, so a busy healthy collector always has a backlog.
# Set by the sender only, so a stuck or dead sender lets it age; the stalest worker shows.
DRAINED = Gauge("collector_spool_drained_timestamp_seconds",
                "Last time less than one batch of this worker's own hits waited in its spool (min over workers)",
                **_MIN)
SINK_UP = Gauge("collector_sink_up", "1 while the stream can be reached and the sender runs (min over workers)", **_MIN)
# A PutRecords that got no answer in time may have landed: the sender sends the batch again, waiting
# longer (see common.producer.ReadTimeouts). Copies in the stream, and a slow stream, show here.
SINK_TIMEOUTS = Counter("collector_sink_timeouts_total",
                        "Batches whose PutRecords got no answer within the read timeout (sent again, so they "
                        "may be in the stream more than once)")
SINK_TIMEOUT = Gauge("collector_sink_timeout_seconds",
                     "Read timeout of the sender's next PutRecords: sink_timeout_s, raised while the stream answers "
                     "slowly (max over workers)", **_MAX)
SINK_LATENCY = Histogram("collector_sink_latency_seconds", "Time to deliver one batch to the stream(s)",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

_children: dict[tuple[str, int], object] = {}
# With one process the hot path adds to plain ints, moved into the counters by render() before each
# scrape: Counter.inc checks its argument and takes a lock, and two per hit were ~0.5 us of the ~9 us of
# CPU a hit costs. Both run on the event loop's thread, so nothing is counted twice or lost. With
# several workers each one's counts must be in its file at once (any worker answers a scrape).
_pending: dict[object, int] = {}
_damage_counted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # per spool, in SPOOL_DAMAGED
_damage_lock = threading.Lock()


def count(endpoint: str, status: int) -> None:
    # labels() takes a lock and a dict lookup per call; cache the children for the hot path.
    child = _children.get((endpoint, status))
    if child is None:
        child = _children[(endpoint, status)] = REQUESTS.labels(endpoint, str(status))
    _add(child, 1)


def keyed(by: str) -> None:
    """Count a hit by what keyed it (one of common.rawkey.KEYED_BY; the event loop's thread only)."""
    _add(_KEYED[by], 1)


def spooled(records: int) -> None:
    """Count records written to the spool (request side, the event loop's thread only)."""
    _add(SPOOLED, records)


def _add(counter, amount: int) -> None:
    if _MULTI:
        counter.inc(amount)
    else:
        _pending[counter] = _pending.get(counter, 0) + amount


def flush() -> None:
    """Move the counts ``count`` and ``spooled`` kept aside into their counters."""
    while _pending:
        counter, amount = _pending.popitem()
        counter.inc(amount)


def update_spool(spools: list) -> None:
    with _damage_lock:                      # the sender and a scrape both call this
        for spool in spools:
            seen = spool.corrupt_frames         # once: the sender may pass more damage meanwhile
            damaged = seen - _damage_counted.get(spool, 0)
            if damaged > 0:
                SPOOL_DAMAGED.inc(damaged)
                _damage_counted[spool] = seen
    SPOOL_RECORDS.set(sum(spool.records for spool in spools))
    SPOOL_BYTES.set(sum(spool.depth_bytes for spool in spools))


def refresh(sink) -> None:
    """At scrape time, from the worker's sink itself: the sender also sets these per batch, but a
    stuck or dead sender would leave them at their last value (an empty spool, a stream up). In
    multiprocess mode this refreshes the scraped worker's values; the others' are their senders'."""
    update_spool(sink.spools())
    sink.publish_health()


def forget_worker(pid: int) -> None:
    """Drop a worker's live gauges from the merged view: without it, a worker granian replaced (a
    reload) or one killed kept its last values for good, the stalest drained time among them."""
    if _MULTI:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def forget_dead_worker(slot: Path) -> None:
    """Drop the gauges of the last worker of a spool slot (its pid is kept there) if that process is
    gone, killed without stopping: called by the worker that claims the slot and by one that adopts
    it (after a respawn either may get it first; the dead worker's gauges stayed otherwise)."""
    try:
        previous = int((slot / "pid").read_text())
        os.kill(previous, 0)
    except ProcessLookupError:
        forget_worker(previous)
    except (OSError, ValueError):           # no marker yet, or a pid alive (ours, or reused)
        pass


class WorkerProcesses:
    """The ``process_*`` metrics of every live worker, labelled ``pid``: the multiprocess registry has
    none, so a worker's memory or CPU would not show. Workers are found by the pid each one writes in
    its spool slot (``<spool root>/worker-N/pid``), and count while that process is alive and has our
    parent (granian's main process): a slot left by a killed worker, or its pid now another
    program's, yields nothing."""

    def __init__(self, spool_root: Path):
        self.spool_root = spool_root

    def pids(self) -> list[int]:
        pids = []
        for marker in sorted(self.spool_root.glob("worker-*/pid")):
            try:
                pid = int(marker.read_text())
            except (OSError, ValueError):     # a slot being claimed right now
                continue
            if _parent(pid) == os.getppid():
                pids.append(pid)
        return pids

    def collect(self):
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            # ProcessCollector reads /proc/<pid> and yields nothing once that process has gone.
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from merged.values()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (command) state ppid ...": the command may hold spaces and parentheses.
    return int(stat.rpartition(")")[2].split()[1])


def render(sink=None) -> tuple[bytes, str]:
    flush()
    if sink is not None:
        refresh(sink)
    if _MULTI:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if sink is not None:
            registry.register(WorkerProcesses(sink.spool.dir.parent))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
