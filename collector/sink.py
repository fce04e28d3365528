"""The sender: a thread that drains the spool into the raw and bad streams, in order.

It wakes every ``linger_ms`` (or earlier when the request side says a batch is full), reads up to
one PutRecords batch from the spool cursor, sends it with the shared producer, and only then moves
the cursor. When nothing of a batch got through (stream unreachable) the cursor stays put and the
same batch is retried with backoff, so order is kept. When only some entries were refused
(throttling), those are appended again at the end of the spool and the cursor moves on: the
producer has already reordered them, and re-sending the accepted ones would duplicate them.
New hits do not cut a backoff short (only stop() does): under traffic they would otherwise retry a
failing or throttled stream as fast as they arrive.
A batch whose PutRecords got no answer in time (a slow stream) may have landed: it is sent again,
in order as well, but with a longer read timeout each time (``ReadTimeouts``), so the stream gets a
few copies of it, not one per attempt for as long as the slowness lasts.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

from collector import metrics
from collector.records import size_violation
from collector.spool import BAD, RAW, Entry, Spool, claim_dir, encode, forget_delivered, orphans
from common import aws, logs
from common.producer import TOO_LARGE, Producer, ReadTimeouts, Undelivered
from common.streams import MAX_RECORD_BYTES, KinesisStream, PutResult

log = logging.getLogger(__name__)
PREPARE_RETRY_S = 60.0           # after writing the next segment ahead failed (a full disk)


class Sink:
    def __init__(self, spool: Spool, raw: Producer, bad: Producer, *, linger_ms: int = 200,
                 batch_records: int = 500, batch_bytes: int = 4 * 1024 * 1024,
                 fsync_interval_ms: int | None = None, probe=None, min_backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0,
                 find_orphans: Callable[[set[Path]], list[tuple[Spool, int]]] | None = None,
                 adopt_every_s: float = 30.0, bad_payload_keep_bytes: int = 50_000,
                 timeouts: ReadTimeouts | None = None):
        self.spool = spool
        # Other slots' spools left without a worker (a stopped task's on a shared volume, a slot unused
        # since fewer workers run): drained after ours, then released. Looked for at start and every
        # adopt_every_s, since on a rolling deploy the stopped task's slot frees after ours started.
        self.find_orphans = find_orphans
        self.adopt_every_s = adopt_every_s
        self.adopted: list[tuple[Spool, int]] = []
        self._adopted_at = 0.0
        self.producers = {RAW: raw, BAD: bad}
        self.linger = linger_ms / 1000
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.fsync_interval = fsync_interval_ms / 1000 if fsync_interval_ms else None
        self.probe = probe
        self.min_backoff = min_backoff_s
        self.max_backoff = max_backoff_s
        self.bad_payload_keep_bytes = bad_payload_keep_bytes
        self.timeouts = timeouts or ReadTimeouts(5.0, 30.0)
        # Until the sender's first probe, its first act, says otherwise: a start waiting for the probe
        # answered no hit while a hung stream took sink_timeout_s to time it out.
        self.healthy = True
        self.cause: str | None = None        # AWS's answer while the stream cannot be written
        self._health_known = False          # the first answer is news, not "again"
        self._health_lock = threading.Lock()    # the sender and a scrape both set collector_sink_up
        self.progressed = False          # whether this sending round delivered anything
        self._idle = False               # the last round found nothing to send: the next hit goes at once
        self._send_partial = False       # woken for such a hit: send it, though no batch is full
        self._unanswered: tuple[Spool, int] | None = None     # the batch that got no answer in time: spool, records
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector-sink", daemon=True)
        self._rotate_errors = logs.Tally(every_s=60.0)
        self._prepare_errors = logs.Tally(every_s=60.0)
        self._prepare_after = 0.0        # after a failure: a nearly full disk is not filled again each round
        self._commit_errors = logs.Tally(every_s=60.0)    # a failing disk fails every round alike
        self._keep_errors = logs.Tally(every_s=60.0)
        self._fsync_errors = logs.Tally(every_s=60.0)
        # Throttling refuses entries in every call while it lasts: one WARNING per stream and 30 s,
        # with how many records it stands for.
        self._refusals = {stream: logs.Tally(every_s=30.0) for stream in (RAW, BAD)}
        # fsync=interval on its own thread: the sender can block in a send for many seconds while
        # the stream is down, which is exactly when the spool grows.
        self._syncer = threading.Thread(target=self._sync_loop, name="collector-fsync", daemon=True) \
            if self.fsync_interval else None

    def start(self) -> None:
        self._adopt()
        metrics.SINK_UP.set(int(self.healthy))
        metrics.SINK_TIMEOUT.set(self.timeouts.current)
        metrics.DRAINED.set(time.time())         # a backlog left by a previous run counts as behind from now
        self._thread.start()
        if self._syncer:
            self._syncer.start()

    def notify(self) -> None:
        """Called by the request side after each append: wake early when a batch is full, or at once
        for the first hit after a round that found nothing to send. A quiet shop's hit waited up to
        linger_ms for hits that were not coming (100 ms on average of the time to act); under load
        every round finds hits, so they still leave in batches."""
        if self._batch_full(self.spool):
            if not self.wake.is_set():       # set() takes a lock: under load it would on every hit
                self.wake.set()
        elif self._idle and self.spool.records == 1:
            self._idle = False
            self._send_partial = True
            self.wake.set()

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        if self.probe is not None:
            self._check()           # says at once whether the stream can be written, hits or not
        backoff = 0.0
        while not self._stop.is_set():
            if backoff:
                # After a failed or throttled send: notify() sets `wake` on every hit once the backlog
                # passes a batch, so waiting on it would retry as fast as hits arrive. Only stop() ends it.
                self._stop.wait(backoff)
                full_only = False
            else:
                full_only = self.wake.wait(self.linger) and not self._send_partial
            self._send_partial = False
            self.wake.clear()
            self.progressed = False
            try:
                if time.monotonic() - self._adopted_at >= self.adopt_every_s:
                    self._adopt()
                delivered = self._drain(full_only=full_only)
            except Exception:  # the sender must outlive any one failure
                log.exception("sender failed; retrying")
                self._set_health(False)
                delivered = False
            self._idle = delivered and not self.progressed and self.spool.records == 0
            self._rotate_old_segment()
            self._prepare_next_segment()
            if delivered:
                backoff = 0.0
            elif self.progressed:      # throttled, yet some got through: pause, but do not let the wait grow
                backoff = self.min_backoff
            else:
                backoff = min(self.max_backoff, max(self.min_backoff, backoff * 2))
            metrics.update_spool(self.spools())

    def _rotate_old_segment(self) -> None:
        try:
            self.spool.rotate_if_old()
        except OSError as exc:          # a full or failing disk: the next append tries again, and says so
            if failures := self._rotate_errors.add():
                log.error("spool %s: cannot start a new segment (%d times): %s", self.spool.dir, failures, exc)

    def _prepare_next_segment(self) -> None:
        if time.monotonic() < self._prepare_after:
            return
        try:
            self.spool.prepare_next(stop=self._stop.is_set)      # a stop must not wait for it
        except OSError as exc:          # a full disk: rotation falls back to fallocate, and fails there too
            self._prepare_after = time.monotonic() + PREPARE_RETRY_S
            if failures := self._prepare_errors.add():
                log.error("spool %s: cannot write the next segment ahead (%d times): %s", self.spool.dir,
                          failures, exc)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            try:
                self.spool.sync_to(self.spool.end)
            except OSError as exc:
                if failures := self._fsync_errors.add():
                    log.error("spool %s: fsync failed (%d times): %s", self.spool.dir, failures, exc)

    def _drain(self, deadline: float | None = None, full_only: bool = False) -> bool:
        """Send until the spools are empty, or until ``deadline`` (None: until stop() is called);
        False when the stream could not be reached. ``full_only`` (woken because a batch is full, not
        by the linger timer): our own spool's last, partial batch waits for more hits or the timer.
        Sent at once, under load each partial batch is what arrived during the previous send, and
        the per-batch costs (cursor write, metrics) were paid every hundred hits or so."""
        for spool in self.spools():
            while True:
                if self._stop.is_set() if deadline is None else time.monotonic() >= deadline:
                    return True
                if full_only and spool is self.spool and not self._batch_full(spool):
                    break
                entries, offset = spool.read(self._batch_limit(spool), self.batch_bytes)
                if not entries:
                    self._note_drained(spool)
                    break
                delivered = self._send(entries, offset, spool)
                # Per batch: under sustained load this loop does not return for a long time.
                metrics.update_spool(self.spools())
                if not delivered:
                    return False
            if spool is not self.spool:
                self._release(spool)
        if not self.healthy and self.probe is not None:
            return self._check()
        return True

    def _batch_limit(self, spool: Spool) -> int:
        """A batch that got no answer in time goes again as it was, not grown by the hits spooled since:
        each of those would land once more per attempt as well."""
        if self._unanswered and self._unanswered[0] is spool:
            return self._unanswered[1]
        return self.batch_records

    def _batch_full(self, spool: Spool) -> bool:
        return spool.records >= self.batch_records or spool.depth_bytes >= self.batch_bytes

    def _note_drained(self, spool: Spool) -> None:
        """Our own hits are caught up when less than a batch waits, not only when none does: every
        hit is spooled first, and woken by a full batch the sender leaves the rest for the linger
        timer. Only after a commit or on finding the spool empty, so a small backlog that cannot be
        sent (stream down) does not count. Adopted spools are extra work, not our delivery's delay."""
        if spool is self.spool and not self._batch_full(spool):
            metrics.DRAINED.set(time.time())

    def _adopt(self) -> None:
        self._adopted_at = time.monotonic()
        if self.find_orphans is None:
            return
        # Ours and those already adopted are passed over by name: on NFS (EFS) flock is a POSIX lock,
        # which the process holding it can take again.
        for spool, fd in self.find_orphans({self.spool.dir, *(spool.dir for spool, _ in self.adopted)}):
            log.info("adopting spool %s (%d undelivered records, no live worker holds it)", spool.dir, spool.records)
            metrics.forget_dead_worker(spool.dir)
            self.adopted.append((spool, fd))

    def spools(self) -> list[Spool]:
        """Ours and the adopted ones (also read by /metrics, on the request side)."""
        return [self.spool] + [spool for spool, _ in self.adopted]

    def problem(self) -> str | None:
        """Why the spool is not being delivered now, or None. A sender thread that died sends nothing
        however reachable the stream is; during stop() it has ended on purpose and stop() drains."""
        if not (self._thread.is_alive() or self._stop.is_set()):
            return "sender thread not running"
        if not self.healthy:
            # AWS's answer tells an outage from a refusal (AccessDenied, KMS, a missing stream).
            return f"stream not writable: {self.cause}" if self.cause else "stream unreachable"
        return None

    def _release(self, spool: Spool) -> None:
        log.info("adopted spool %s delivered; releasing it", spool.dir)
        for index, (item, fd) in enumerate(self.adopted):
            if item is spool:
                spool.close()
                os.close(fd)
                del self.adopted[index]
                return

    def _check(self) -> bool:
        try:
            self.probe()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot reach the stream"
            log.warning("stream not reachable: %s", exc)
            self._set_health(False)
            return False
        self._set_health(True)
        return True

    def _set_health(self, healthy: bool, cause: str | None = None) -> None:
        with self._health_lock:
            if healthy != self.healthy or not self._health_known:
                name = self.producers[RAW].stream.name
                if healthy:
                    log.info("stream %s reachable%s", name, " again" if self._health_known else "")
                elif cause:
                    log.warning("stream %s not writable (%s); hits stay in the spool", name, cause)
                else:
                    log.warning("stream %s unreachable; hits stay in the spool", name)
            self.healthy, self._health_known = healthy, True
            self.cause = None if healthy else cause
            metrics.SINK_UP.set(int(healthy))

    def publish_health(self) -> None:
        """Set collector_sink_up from problem() at a scrape. Under the sender's lock: a scrape that read
        the stream as up just before the sender found it down would set a stale 1 over its 0."""
        with self._health_lock:
            metrics.SINK_UP.set(int(self.problem() is None))

    def _send(self, entries: list[Entry], offset: int, spool: Spool) -> bool:
        """Deliver one batch; False when the caller should back off (nothing or not everything got through)."""
        started = time.perf_counter()
        refused = self._produce(entries)
        elapsed = time.perf_counter() - started
        delivered = len(entries) - len(refused)
        self.progressed = self.progressed or delivered > 0
        metrics.SINK_LATENCY.observe(elapsed)
        resendable = [(s, u) for s, u in refused if u.reason != TOO_LARGE]
        if any(item.timed_out for _, item in resendable):
            longest = not self._timed_out()
            if delivered == 0:
                return self._unanswered_batch(spool, len(entries), longest)
        elif delivered:
            self._answered(elapsed)
        if resendable and delivered == 0:
            # Nothing got through: the cursor stays and the same batch is retried, so order is kept.
            # A stream that throttled all of it answered, though: it is reachable, and at its limit.
            throttled = all(item.throttled for _, item in resendable)
            first = resendable[0][1]
            self._set_health(throttled, first.reason if first.refused else None)
            if throttled:
                self._report_refused(resendable)
            return False
        self._set_health(True)
        self._report_refused(resendable)
        again = self._resendable(refused)
        kept = self._keep(again)
        if not kept and self._resend(again):
            return False                # stopping: the cursor stays, and the batch goes again after a restart
        if self._unanswered and self._unanswered[0] is spool:
            self._unanswered = None
        self._commit(spool, offset, len(entries))
        self._note_drained(spool)
        # Refused entries (throttling, or one stream missing) were re-appended: back off before
        # reading them again instead of spinning on them.
        return not (resendable and kept)

    def _unanswered_batch(self, spool: Spool, records: int, longest: bool) -> bool:
        """No answer in time, and the batch may have landed: the cursor stays, so order is kept, and the
        batch goes again as it was. Slow is not down, though, until the stream does not answer within
        the longest wait either. Always False (back off)."""
        if longest:
            self._set_health(False)
        self._unanswered = (spool, records)
        return False

    def _timed_out(self) -> bool:
        """A batch got no answer within the read timeout: wait longer for the next attempt. False when
        the wait was already the longest (sink_timeout_max_s)."""
        metrics.SINK_TIMEOUTS.inc()
        raised = self.timeouts.timed_out()
        metrics.SINK_TIMEOUT.set(self.timeouts.current)
        return raised

    def _answered(self, elapsed_s: float) -> None:
        self.timeouts.answered(elapsed_s)
        metrics.SINK_TIMEOUT.set(self.timeouts.current)

    def _produce(self, entries: list[tuple[int, str, bytes]]) -> list[tuple[int, Undelivered]]:
        """Send (stream, partition key, data) entries, each stream's in one producer call; what was refused.
        At a raised read timeout, one attempt per call: the sender's loop retries, and a stop waits for
        at most one such attempt."""
        refused: list[tuple[int, Undelivered]] = []
        attempts = 1 if self.timeouts.raised else None
        for stream in (RAW, BAD):
            batch = [(key, data) for entry_stream, key, data in entries if entry_stream == stream]
            if not batch:
                continue
            failed = self.producers[stream].send(batch, attempts)
            metrics.PRODUCED[stream].inc(len(batch) - len(failed))
            refused.extend((stream, item) for item in failed)
        return refused

    def _commit(self, spool: Spool, offset: int, count: int) -> None:
        """Move the spool past a delivered batch. A disk that cannot take the cursor or delete a segment
        (read-only, failing) is the spool's fault, not the stream's: delivery goes on (the cursor
        moved in memory), and what was delivered may be sent again after a restart."""
        try:
            spool.commit(offset, count)
        except OSError as exc:
            if failures := self._commit_errors.add():
                log.error("spool %s: cannot record delivered hits on disk (%d times): %s; delivery goes on, and "
                          "a restart may send them again", spool.dir, failures, exc)

    def _keep(self, again: list[tuple[int, str, bytes]]) -> bool:
        """Re-append what the stream refused; False when the disk cannot take it (full, failing)."""
        if not again:
            return True
        try:
            self.spool.append(b"".join(encode(*entry) for entry in again), len(again), force=True)
        except OSError as exc:
            if failures := self._keep_errors.add():
                log.error("spool %s: cannot keep %d refused records on disk (%d times): %s; sending them again "
                          "before moving on", self.spool.dir, len(again), failures, exc)
            return False
        return True

    def _resendable(self, refused: list[tuple[int, Undelivered]]) -> list[tuple[int, str, bytes]]:
        """(stream, partition key, data) to send again; what can never fit becomes a size_violation bad row."""
        entries = []
        for stream, item in refused:
            if item.reason == TOO_LARGE:
                log.error("record of %d bytes can never fit a Kinesis record; sending a bad row", len(item.data))
                data = size_violation(item.data.decode("utf-8", "replace"), len(item.data), MAX_RECORD_BYTES,
                                      self.bad_payload_keep_bytes)
                entries.append((BAD, str(uuid.uuid4()), orjson.dumps(data)))
            else:
                entries.append((stream, item.partition_key, item.data))
        return entries

    def _resend(self, pending: list[tuple[int, str, bytes]]) -> bool:
        """Send the refused records (which the disk could not take back) until the stream takes them,
        backing off; True when stop() came first. Re-reading the whole batch instead put another copy
        of every record the stream had taken on it each round, for as long as the disk stayed full,
        and the cursor, which alone frees the disk, never moved."""
        backoff = self.min_backoff
        while True:
            refused = self._produce(pending)
            if any(item.timed_out for _, item in refused):
                self._timed_out()
            # Nothing else is sent meanwhile: say so, and call the stream down unless it is throttling.
            self._set_health(all(item.throttled for _, item in refused))
            if not refused:
                return False
            self._report_refused(refused)
            backoff = self.min_backoff if len(refused) < len(pending) else min(self.max_backoff, backoff * 2)
            pending = [(stream, item.partition_key, item.data) for stream, item in refused]
            if self._stop.wait(backoff):
                return True

    def _report_refused(self, refused: list[tuple[int, Undelivered]]) -> None:
        """Count the records the stream refused (to be resent), with one WARNING per stream and 30 s."""
        for stream in (RAW, BAD):
            items = [item for s, item in refused if s == stream]
            if not items:
                continue
            metrics.REFUSED[stream].inc(len(items))
            if count := self._refusals[stream].add(len(items)):
                log.warning("stream %s refused %d records since the last such line (kept to be resent): %s",
                            self.producers[stream].stream.name, count, items[0].reason)

    # ------------------------------------------------------------------ shutdown

    def stop(self, timeout: float) -> None:
        """Stop the loop, try to deliver the backlog within ``timeout``, then close the spool."""
        self._stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        self._thread.join()                   # returns after the batch in flight
        if self._syncer:
            self._syncer.join()
        while self.spool.depth_bytes and time.monotonic() < deadline:
            if not self._drain(deadline):
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self.spool.close()                    # first: a hit still arriving is refused (503), not spooled
        left = self.spool.depth_bytes
        if left:
            log.warning("stopping with %d undelivered bytes in the spool; they are sent on the next start", left)
        else:
            forget_delivered(self.spool.dir)   # all delivered: no raw hit stays on disk after us
        for spool, fd in self.adopted:
            spool.close()
            os.close(fd)


class DiscardStream:
    """sink=memory: every put is accepted and dropped. For benchmarks: what remains is the collector's
    own cost (HTTP, record, spool, sender), with no stream's (not even in-memory routing)."""

    def __init__(self, name: str):
        self.name = name

    def put_records(self, entries: list[tuple[str, bytes]]) -> list[PutResult]:
        return [ACCEPTED] * len(entries)


ACCEPTED = PutResult("0", "discarded")


def kinesis_client(settings, read_timeout: float | None = None):
    """Like common.aws.client, without botocore's parameter validation: it costs ~3 us of the ~17 us of
    CPU per record that PutRecords takes client-side, in the process that also serves the requests,
    and the producer only ever builds valid calls. No botocore retry: the producer and the sender's
    loop retry, and botocore would send a call that timed out (and may have landed) again at once."""
    return aws.client("kinesis", settings.region, timeout=settings.sink_timeout_s, read_timeout=read_timeout,
                      retries=0, max_pool_connections=4, parameter_validation=False)


def open_orphans(root: Path, taken: set[Path], open_spool: Callable[[Path], Spool]) -> list[tuple[Spool, int]]:
    """The orphaned slots under ``root`` (not ``taken``), opened, with their lock fds; one that cannot
    be opened (a full disk, say) is released for a later round or another process."""
    found = []
    for folder, fd in orphans(root, taken):
        try:
            found.append((open_spool(folder), fd))
        except OSError as exc:
            os.close(fd)
            log.error("cannot open spool %s to adopt it, trying again later: %s", folder, exc)
    return found


def open_sink(settings) -> tuple[Sink, int]:
    """The spool for this worker, producers for the raw and bad streams, and the sender thread."""

    def open_spool(folder: Path) -> Spool:
        return Spool(folder, max_bytes=settings.spool_max_bytes, segment_bytes=settings.spool_segment_bytes,
                     fsync=settings.fsync, max_age_s=settings.spool_segment_max_age_s)

    def find_orphans(taken: set[Path]) -> list[tuple[Spool, int]]:
        return open_orphans(Path(settings.spool_dir), taken, open_spool)

    folder, lock_fd = claim_dir(Path(settings.spool_dir))
    spool = open_spool(folder)
    if spool.records:
        log.info("spool %s holds %d undelivered records from a previous run; sending them first", folder, spool.records)
    timeouts = ReadTimeouts(settings.sink_timeout_s, settings.sink_timeout_max_s, name=settings.raw_stream)
    if settings.sink == "memory":
        raw, bad, probe = DiscardStream(settings.raw_stream), DiscardStream(settings.bad_stream), None
    else:
        clients = aws.ByReadTimeout(lambda read_timeout: kinesis_client(settings, read_timeout))
        client = clients(settings.sink_timeout_s)
        raw, bad = KinesisStream(client, settings.raw_stream), KinesisStream(client, settings.bad_stream)
        timeouts.use = clients.switching(raw, bad)

        def probe() -> None:
            client.describe_stream_summary(StreamName=settings.raw_stream)
    sink = Sink(spool, Producer(raw, max_attempts=3, retry_timeouts=False), Producer(bad, max_attempts=3, retry_timeouts=False),
                linger_ms=settings.linger_ms, batch_records=settings.batch_records,
                batch_bytes=settings.batch_bytes,
                fsync_interval_ms=settings.fsync_interval_ms if settings.fsync == "interval" else None,
                probe=probe, find_orphans=find_orphans, bad_payload_keep_bytes=settings.bad_payload_keep_bytes,
                timeouts=timeouts)
    return sink, lock_fd
