"""A stream consumer that shares shards through leases and checkpoints only on the caller's word.

Usage::

    consumer = Consumer(stream, leases)
    while running:
        for batch in consumer.poll():
            write_outputs(batch.records)       # make the outputs durable first...
            consumer.checkpoint(batch)         # ...then move the checkpoint
    consumer.close()

Reading runs ahead of the checkpoint: a caller that buffers (the lake loader) checkpoints the last
batch it flushed, and after a crash the next owner re-reads from there. Shards are balanced by
counting live workers (heartbeat rows) and taking free, expired or surplus leases up to an even
share; a closed parent shard must be checkpointed to its end before its children are read.

Leases are renewed in ``poll()``. A caller that retries a write without polling calls
``consumer.renew_due()`` on each turn, and stops writing a batch whose shard is no longer among the
shards it returns (another worker took it and reads the batch again).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from common import aws
from common.aws import throttled
from common.leases import WORKER_PREFIX, DynamoLeaseTable, Lease, LeaseLost, LeaseTable, RenewalWatch
from common.logs import Tally
from common.retry import backoff_s
from common.streams import SHARD_END, KinesisStream, Record, Shard, ShardReader, StreamBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

# A worker row unchanged for this many lease periods belongs to a worker that died without leave()
# (SIGKILL, OOM, a replaced task): balance() deletes it, or every worker would read it for ever.
DEAD_WORKER_LEASES = 10
READ_BACKOFF_CAP_S = 5.0     # the longest a failing shard waits before it is read again
# A shard read again after failing this long gets an INFO line: an outage's end, not a throttle's.
RECOVERY_LINE_AFTER_S = 10.0
STALL_GRACE_S = 5.0          # a shard unread this long past its interval counts as behind (max_lag_ms)
# At most this many rows of aged-out shards are deleted per balance: a group that resharded for months
# before this cleanup existed empties its backlog over minutes rather than in one balance that
# outlasts the leases.
AGED_OUT_DELETES_PER_BALANCE = 20
DEFAULT_LEASE_MS = 10_000
# The consumer's AWS calls wait a sixth of the lease for a connection and for an answer (2 to 10 s):
# botocore's 10 s, the default lease itself, let one hung GetRecords or renewal outlast the lease,
# and a peer took every shard of a worker that had only waited.
CALL_TIMEOUT_LEASE_SHARE = 6


@dataclass
class Batch:
    shard_id: str
    records: list[Record]
    millis_behind: int
    shard_end: bool
    # The sequence number to checkpoint: the batch's last record, or the previous position when empty.
    position: str | None

    @property
    def checkpoint_value(self) -> str | None:
        return SHARD_END if self.shard_end else self.position


@dataclass
class _Owned:
    reader: ShardReader
    position: str | None
    lease: Lease
    checkpointed: str | None = None  # where a rewind reads again from: the start, then each checkpoint
    read_at: float = 0.0            # monotonic time of the last GetRecords on this shard
    read_failures: int = 0          # failed reads in a row: the shard is read again after a backoff
    retry_at: float = 0.0           # monotonic time before which a failing shard is not read again
    # Monotonic time of the first of the reads failing in a row (None when the last one worked): the
    # shard falls behind meanwhile, and the lag reported must say so instead of its last value.
    failing_since: float | None = None
    # Monotonic time since which records handed out wait for a checkpoint (None: none wait).
    unchecked_since: float | None = None


class ReadFailed(Exception):
    """Every owned shard's read failed this round (throttling, a timeout); nothing was handed out and
    each reader stays at its last record, so the caller backs off and polls again, state intact."""


def _aged_out(shards: list[Shard], leases: dict[str, Lease]) -> list[str]:
    """The shards the listing no longer holds whose rows hold nothing to resume from: checkpointed at
    their end, or never checkpointed (a row a peer's ``ensure()`` recreated from a listing made just
    before the shard aged out, which would otherwise stay, and be taken, for good)."""
    listed = {shard.shard_id for shard in shards}
    return [sid for sid, lease in leases.items() if lease.checkpoint in (None, SHARD_END) and sid not in listed]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Consumer:
    def __init__(self, stream: StreamBackend, leases: LeaseTable, *,
                 worker_id: str | None = None, lease_ms: int = DEFAULT_LEASE_MS, batch_limit: int = 1000,
                 shard_refresh_s: float = 10.0, read_interval_s: float = 0.0,
                 start_after: Callable[[Lease], str | None] | None = None,
                 on_lost: Callable[[str], None] | None = None):
        self.stream = stream
        self.leases = leases
        self.worker_id = worker_id or default_worker_id()
        self.lease_ms = lease_ms
        self.batch_limit = batch_limit
        self.shard_refresh_s = shard_refresh_s
        # Kinesis allows 5 GetRecords per second per shard, shared by every app reading the stream.
        self.read_interval_s = read_interval_s
        self.start_after = start_after or (lambda lease: lease.checkpoint)
        self.on_lost = on_lost
        self.owned: dict[str, _Owned] = {}
        self.lag_ms: dict[str, int] = {}
        self._shards: list[Shard] = []
        self._shards_at = 0.0
        self._balanced_at = 0.0
        self._balance_failures = 0
        self._balance_failing_since: float | None = None
        self._renewed_at = 0.0
        self._watch = RenewalWatch(lease_ms)
        self._rows_seen: set[str] = set()      # lease rows of the last query
        self._read_failures = Tally(every_s=30.0)
        self._renew_failures = Tally(every_s=30.0)
        self._calls: ThreadPoolExecutor | None = None      # while_renewing's thread, made at its first call

    # ------------------------------------------------------------------ leases and balancing

    def _refresh_shards(self, force: bool = False) -> list[Shard]:
        if force or time.monotonic() - self._shards_at > self.shard_refresh_s:
            self._shards = self.stream.list_shards()
            # A conditional put for a row the last lease query saw only fails (each worker, each
            # shard, every refresh: writes on the table's one key that grow as workers x shards).
            for shard in (shard for shard in self._shards if shard.shard_id not in self._rows_seen):
                self.leases.ensure(shard.shard_id)
            # Only once every row exists: a listed shard without a row is then one a peer deleted as aged out.
            self._shards_at = time.monotonic()
        return self._shards

    def _eligible(self, shards: list[Shard], leases: dict[str, Lease]) -> list[str]:
        """Unfinished shards whose parents are finished (or gone from the stream).

        A listed shard without a row is one a peer deleted as aged out since we listed it: neither it
        nor (until we list again) its children are taken."""
        finished = {sid for sid, lease in leases.items() if lease.checkpoint == SHARD_END}
        known = {shard.shard_id for shard in shards}
        return [shard.shard_id for shard in shards
                if shard.shard_id in leases and shard.shard_id not in finished
                and all(parent in finished or parent not in known for parent in shard.parents)]

    def shard(self, shard_id: str) -> Shard:
        """The shard as last listed (its parents, its hash key range)."""
        return next((shard for shard in self._shards if shard.shard_id == shard_id), Shard(shard_id))

    def parents(self, shard_id: str) -> tuple[str, ...]:
        """The shard's parents still in the stream (a reshard's closed shards), as last listed."""
        known = {shard.shard_id for shard in self._shards}
        return tuple(parent for parent in self.shard(shard_id).parents if parent in known)

    @property
    def renew_interval_s(self) -> float:
        return self.lease_ms / 3000

    def renew_due(self) -> set[str]:
        """Renew our leases and worker row if a third of ``lease_ms`` has passed since the last renewal;
        returns the shards still ours.

        Cheap enough to call on every turn of a loop that retries a write without polling (a throttled
        stream, a slow table): between due times it does nothing. A lease found taken by another
        worker is dropped (``on_lost`` runs) as ``poll()`` would drop it; the caller then stops
        writing that shard's batch, whose records the new owner reads again from the checkpoint.
        Never raises: a failed renewal is logged and tried again a second later.
        """
        if time.monotonic() - self._renewed_at >= self.renew_interval_s:
            self._renew()
        return set(self.owned)

    def while_renewing(self, call: Callable[..., T], *args, **kwargs) -> T:
        """``call(*args, **kwargs)``'s result (or exception), our leases renewed when due while it runs.

        For one output write that can outlast the lease by itself (an S3 put or a PutRecords answering
        in seconds, botocore's retries of a timeout), which ``renew_due`` between calls does not cover.
        It runs on a thread of its own; whether the caller's shard is still ours afterwards is for the
        caller to ask ``renew_due``."""
        if self._calls is None:
            self._calls = ThreadPoolExecutor(1, thread_name_prefix="consumer-call")
        running = self._calls.submit(call, *args, **kwargs)
        while not wait([running], timeout=self.renew_interval_s).done:
            self.renew_due()
        return running.result()

    def _renew(self) -> None:
        """Renew every owned lease and the worker row, each on its own: one failed call (throttling, a
        timeout) must not cost the others their renewal, nor a lease already taken keep its shard."""
        failure = None
        for shard_id in list(self.owned):
            try:
                self.leases.renew(shard_id, self.worker_id, self.lease_ms)
            except LeaseLost:
                self._drop(shard_id, "taken by another worker")
            except (BotoCoreError, ClientError) as exc:
                failure = exc
        try:
            self.leases.heartbeat(self.worker_id, self.lease_ms)
        except (BotoCoreError, ClientError) as exc:
            failure = exc
        now = time.monotonic()
        if failure is None:
            self._renewed_at = now
        else:
            if count := self._renew_failures.add():       # every second while it lasts: once per 30 s
                log.warning("renewing leases in table %s failed %d times since the last such line, retrying "
                            "every second: %s", getattr(self.leases, "table", "(in memory)"), count, failure)
            self._renewed_at = now - self.renew_interval_s + min(1.0, self.renew_interval_s)

    def balance(self) -> None:
        """Renew our leases, then take free, expired or surplus leases up to an even share."""
        # Renewals come first and stand alone: a throttled ListShards or lease query must not skip them.
        self._renew()
        shards = self._refresh_shards()
        rows, workers = self.leases.leases()
        leases = {lease.shard_id: lease for lease in rows}
        self._rows_seen = set(leases)
        self._drop_taken(leases)
        self._watch.keep_only(set(leases) | {WORKER_PREFIX + worker for worker in workers})
        held = {sid for sid, lease in leases.items()
                if lease.owner and not self._watch.expired(sid, lease.version)}
        eligible = self._eligible(shards, leases)
        alive = self._live_workers(workers)
        target = math.ceil(len(eligible) / len(alive)) if eligible else 0
        mine = [sid for sid in eligible if sid in self.owned]
        free = [leases[sid] for sid in eligible if sid not in self.owned and sid not in held]
        for lease in free[: max(0, target - len(mine))]:
            self._acquire(lease)
            mine.append(lease.shard_id)
        if len(mine) < target:
            self._steal_one(eligible, leases, held, target)
        if self.worker_id == min(alive):       # one worker cleans up; a peer that thinks so too is harmless
            self._remove_aged_out_shards(shards, leases)
        self._balanced_at = time.monotonic()

    def _drop_taken(self, leases: dict[str, Lease]) -> None:
        """Drop the shards the table says another worker holds. Our renewal failed (a call that hung
        past its timeout) for long enough that a peer took them: read on, we would hand out a batch the
        peer reads too, and find out only at its checkpoint."""
        for shard_id in [sid for sid in self.owned if sid in leases and leases[sid].owner != self.worker_id]:
            self._drop(shard_id, f"the lease table names {leases[shard_id].owner or 'no owner'}")

    def _live_workers(self, workers: dict[str, int]) -> set[str]:
        """Ourselves and the workers whose heartbeat changed within a lease period; removes the rows of
        workers long dead."""
        alive = {self.worker_id}
        for worker, beat in workers.items():
            unchanged_ms = self._watch.unchanged_ms(WORKER_PREFIX + worker, beat)
            if unchanged_ms < self.lease_ms:
                alive.add(worker)
            elif unchanged_ms >= DEAD_WORKER_LEASES * self.lease_ms and worker != self.worker_id:
                self._remove_dead_worker(worker, beat)
        return alive

    def _remove_dead_worker(self, worker: str, beat: int) -> None:
        # Conditional on the heartbeat we saw: a worker that came back (a long pause) keeps its row.
        try:
            removed = self.leases.remove_worker(worker, beat)
        except (BotoCoreError, ClientError) as exc:
            log.warning("removing the row of dead worker %s failed, retrying next balance: %s", worker, exc)
            return
        if removed:                           # not when it beat again, nor when a peer removed it first
            log.info("removed the row of worker %s: no heartbeat for %d lease periods", worker, DEAD_WORKER_LEASES)

    def _remove_aged_out_shards(self, shards: list[Shard], leases: dict[str, Lease]) -> None:
        """Delete the rows of shards read to their end (or never checkpointed) and no longer listed
        (past the stream's retention), as the Kinesis Client Library does: each reshard leaves some,
        and every balance of every worker reads them all. A shard still listed keeps its row, or ``ensure()`` would recreate it without
        checkpoint and the shard be read again. Never raises: what fails is tried next balance."""
        if not _aged_out(shards, leases):
            return
        try:
            # Confirmed by a listing newer than the rows: ours may predate a shard created and finished since.
            aged_out = _aged_out(self._refresh_shards(force=True), leases)
            for shard_id in aged_out[:AGED_OUT_DELETES_PER_BALANCE]:
                if self.leases.remove_aged_out(shard_id):   # conditional on the checkpoint; gone already is fine
                    log.info("removed the lease row of shard %s: aged out of the stream, nothing left to read",
                             shard_id)
        except (BotoCoreError, ClientError) as exc:
            log.warning("removing the lease rows of aged-out shards failed, retrying next balance: %s", exc)

    def _steal_one(self, eligible: list[str], leases: dict[str, Lease], held: set[str], target: int) -> None:
        load: dict[str, list[Lease]] = {}
        for sid in eligible:
            lease = leases[sid]
            if sid in held and lease.owner != self.worker_id:
                load.setdefault(lease.owner, []).append(lease)
        if not load:
            return
        _, owned = max(load.items(), key=lambda item: len(item[1]))
        if len(owned) > target:
            self._acquire(owned[0])

    def _acquire(self, lease: Lease) -> None:
        try:
            taken = self.leases.take(lease, self.worker_id, self.lease_ms)
        except LeaseLost:
            return
        if taken.checkpoint == SHARD_END:
            # A peer read it to its end and released it after our snapshot, leaving the row as we saw
            # it (free): nothing is left to read, and a reader cannot start after SHARD_END.
            self.leases.release(lease.shard_id, self.worker_id)
            return
        start = self.start_after(taken)
        if start is not None and not start.isdigit():
            # Kinesis refuses to read after it, for ever: the lake loader before c911e34 wrote
            # TRIM_HORIZON there for "none yet", a hand may write anything. Reading from the oldest
            # record again repeats some (the outputs are idempotent) and loses none.
            log.warning("shard %s of %s: checkpoint %r in the lease table is no sequence number; reading the "
                        "shard from its oldest record", lease.shard_id, self.stream.name, start)
            start = None
        self.owned[lease.shard_id] = _Owned(self.stream.reader(lease.shard_id, start), start, taken, start)
        log.info("worker %s took shard %s of %s from %r, reading after %s",
                 self.worker_id, lease.shard_id, self.stream.name, lease.owner, start)

    def _drop(self, shard_id: str, why: str) -> None:
        if self.owned.pop(shard_id, None) is not None:
            self.lag_ms.pop(shard_id, None)
            log.info("worker %s lost shard %s of %s: %s", self.worker_id, shard_id, self.stream.name, why)
            if self.on_lost:
                self.on_lost(shard_id)

    # ------------------------------------------------------------------ reading and checkpoints

    def poll(self) -> list[Batch]:
        """One round: rebalance if due, then read one page from every owned shard that was last read
        at least ``read_interval_s`` ago.

        A shard whose read fails is skipped this round, its reader reopened after the last record
        handed out (whatever the failed call did to it), while the pages already read from the
        others are returned: raising would lose them, as their readers have moved on. Only when
        every shard read fails does ``ReadFailed`` reach the caller, to back off.
        """
        self._balance_if_due()
        batches, failures, due = [], [], []
        now = time.monotonic()
        for shard_id, owned in list(self.owned.items()):
            if now - owned.read_at >= self.read_interval_s and now >= owned.retry_at:
                owned.read_at = now
                due.append((shard_id, owned))
        if not due and self.owned and all(owned.read_failures for owned in self.owned.values()):
            # Nothing read because every shard waits out a failure: the caller backs off, as after one.
            raise ReadFailed(f"every owned shard of {self.stream.name} is waiting to be read again after failed reads")
        for shard_id, owned in due:
            try:
                result = owned.reader.read(self.batch_limit)
            except Exception as exc:  # noqa: BLE001 - throttling, timeouts: any failure skips the shard
                self._read_failed(shard_id, owned, exc, now)
                failures.append(exc)
                continue
            if owned.failing_since is not None and now - owned.failing_since >= RECOVERY_LINE_AFTER_S:
                log.info("reading shard %s of %s again, after %d failed reads over %.0f s", shard_id,
                         self.stream.name, owned.read_failures, now - owned.failing_since)
            owned.failing_since, owned.read_failures, owned.retry_at = None, 0, 0.0
            if result.records:
                owned.position = result.records[-1].sequence_number
                if owned.unchecked_since is None:
                    owned.unchecked_since = now
            self.lag_ms[shard_id] = result.millis_behind
            if result.records or result.shard_end:
                batches.append(Batch(shard_id, result.records, result.millis_behind,
                                     result.shard_end, owned.position))
        if failures and len(failures) == len(due):
            raise ReadFailed(f"every shard read failed: {failures[-1]}") from failures[-1]
        return batches

    def idle_wait_s(self, fallback_s: float) -> float:
        """How long a caller whose poll read nothing waits before the next: until the soonest owned shard
        is due for a read, so each shard is read every ``read_interval_s``. A fixed sleep shorter than the
        interval woke to a poll with no shard due and slept again: an interval of 0.25 s behind a sleep of
        0.2 s read each shard every 0.4 s, and a quiet shop's click waited that long at each stage.
        ``fallback_s`` when reads are not paced (no interval) or no shard is owned. Never past the next
        renewal: a failing shard's backoff (up to READ_BACKOFF_CAP_S) would otherwise outlast a short lease."""
        owned = list(self.owned.values())
        if not self.read_interval_s or not owned:
            return fallback_s
        due = min(max(item.read_at + self.read_interval_s, item.retry_at) for item in owned)
        return max(0.0, min(due, self._balanced_at + self.renew_interval_s) - time.monotonic())

    def _balance_if_due(self) -> None:
        if time.monotonic() - self._balanced_at <= self.renew_interval_s:
            return
        try:
            self.balance()
            if self._balance_failing_since is not None:
                log.info("listing the shards of stream %s and the leases works again, after %d failures over %.0f s",
                         self.stream.name, self._balance_failures, time.monotonic() - self._balance_failing_since)
            self._balance_failures, self._balance_failing_since = 0, None
        except (BotoCoreError, ClientError) as exc:
            # The stream or the lease table is throttled, away or not created yet: keep reading what
            # we hold, try again in a second, and say so on the first failure and once a minute after.
            self._balance_failures += 1
            if self._balance_failing_since is None:
                self._balance_failing_since = time.monotonic()
            if self._balance_failures % 60 == 1:
                log.warning("listing the shards of stream %s or the leases in table %s failed (%d times in a "
                            "row), retrying every second: %s", self.stream.name,
                            getattr(self.leases, "table", "(in memory)"), self._balance_failures, exc)
            self._balanced_at = time.monotonic() - self.renew_interval_s + min(1.0, self.renew_interval_s)

    def _read_failed(self, shard_id: str, owned: _Owned, exc: Exception, now: float) -> None:
        """Skip a shard whose read failed for a growing while (up to READ_BACKOFF_CAP_S): read again at
        once, a throttled shard stays throttled, and each failed call holds up the reads of every
        other shard of this worker. Its reader is reopened after the last
        record handed out, unless the shard was throttled (the iterator is still good)."""
        owned.read_failures += 1
        owned.retry_at = now + backoff_s(owned.read_failures - 1, 0.2, READ_BACKOFF_CAP_S)
        if owned.failing_since is None:
            owned.failing_since = now
        if not throttled(exc):
            owned.reader = self.stream.reader(shard_id, owned.position)
        if count := self._read_failures.add():
            log.warning("reading stream %s failed %d times since the last such line (last: shard %s, %s); a "
                        "failing shard is read again after a backoff of up to %g s", self.stream.name, count,
                        shard_id, str(exc)[:300], READ_BACKOFF_CAP_S)     # an error page can be kilobytes

    def checkpoint(self, batch: Batch, meta: dict | None = None) -> None:
        """Record that every output of this batch (and all before it on its shard) is durable."""
        self.checkpoint_at(batch.shard_id, batch.checkpoint_value, meta)

    def checkpoint_at(self, shard_id: str, value: str | None, meta: dict | None = None) -> None:
        if value is None:
            return
        try:
            self.leases.checkpoint(shard_id, self.worker_id, value, meta)
        except LeaseLost:
            self._drop(shard_id, "lease lost before checkpoint")
            raise
        owned = self.owned.get(shard_id)
        if owned is not None:
            owned.checkpointed = value
            # Records read past this checkpoint (a loader flushes behind its reads) wait from now on.
            owned.unchecked_since = None if value in (owned.position, SHARD_END) else time.monotonic()
        if value == SHARD_END:
            # The parent is done; release it and look for its children at once.
            self.leases.release(shard_id, self.worker_id)
            self.owned.pop(shard_id, None)
            self.lag_ms.pop(shard_id, None)
            self._shards_at = 0.0
            self._balanced_at = 0.0

    def record_meta(self, shard_id: str, meta: dict) -> None:
        """Replace the lease's meta without moving its checkpoint (e.g. an intent before a write)."""
        try:
            self.leases.checkpoint(shard_id, self.worker_id, None, meta)
        except LeaseLost:
            self._drop(shard_id, "lease lost before writing meta")
            raise

    def rewind(self, shard_id: str) -> None:
        """Read the shard again after its last checkpoint (or where reading began): a batch handed
        out since could not be handled, and the shard's reader has already moved past it."""
        owned = self.owned.get(shard_id)
        if owned is not None:
            owned.position = owned.checkpointed
            owned.reader = self.stream.reader(shard_id, owned.checkpointed)
            # unchecked_since stays: the records handed back still wait for a checkpoint.

    @property
    def max_lag_ms(self) -> int:
        """The slowest owned shard's MillisBehindLatest; for a shard whose reads fail, its last value
        plus the time they have failed (so a lag alert fires during a stream outage). While balancing
        fails (the stream cannot be listed, the lease table is away) and no shard is held, at least the
        time it has failed: a worker that holds no shard because it cannot take one is not caught up.
        One that goes on reading its shards while ListShards is throttled is.

        A shard not read for longer than ``STALL_GRACE_S`` past its read interval (the worker is stuck
        writing its outputs, retrying through an outage of its output stream or table) is at least that
        long behind: MillisBehindLatest is only known at a read, and the last one said 0.

        Safe to call from a metrics scrape on another thread."""
        now = time.monotonic()
        lags = [self.lag_ms.get(shard_id, 0) + self._behind_ms(owned, now) for shard_id, owned in list(self.owned.items())]
        failing_since = self._balance_failing_since
        if failing_since is not None and not lags:
            lags.append(int((now - failing_since) * 1000))
        return max(lags, default=0)

    def _behind_ms(self, owned: _Owned, now: float) -> int:
        """What a shard's last MillisBehindLatest leaves out: how long its reads have failed, or how long
        it has not been read past its interval and the grace (0 before its first read)."""
        if owned.failing_since is not None:
            return int((now - owned.failing_since) * 1000)
        unread = now - owned.read_at
        return int(unread * 1000) if owned.read_at and unread > self.read_interval_s + STALL_GRACE_S else 0

    @property
    def checkpoint_age_s(self) -> float:
        """How long the oldest records handed out and not yet covered by a checkpoint have waited, over
        the owned shards (0 when none wait). Grows while checkpoints fail or a batch cannot be handled:
        the work a restart would repeat. Safe to call from a metrics scrape on another thread."""
        now = time.monotonic()
        since = [owned.unchecked_since for owned in list(self.owned.values()) if owned.unchecked_since is not None]
        return max((now - at for at in since), default=0.0)

    def close(self) -> None:
        """Hand our shards back at once so peers need not wait for the leases to expire, and remove our
        worker row. Never raises: each call is tried on its own, as one failed release (throttling)
        must not keep the other shards or the worker row; what fails expires on its own."""
        for shard_id in list(self.owned):
            self._try_to(f"release shard {shard_id}", self.leases.release, shard_id, self.worker_id)
        self.owned.clear()
        self._try_to("remove the worker row", self.leases.leave, self.worker_id)
        if self._calls is not None:
            self._calls.shutdown(wait=False)

    def _try_to(self, what: str, call: Callable, *args) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - closing goes on whatever failed; peers wait for expiry instead
            log.warning("worker %s could not %s while closing, it will expire instead: %s", self.worker_id, what, exc)


def call_timeout_s(lease_ms: int) -> float:
    """The connect and read timeout of a consumer's AWS calls: a sixth of the lease, from 2 to 10 s. A
    renewal comes due a third of the lease after the last: a read that hangs then, and a renewal that
    hangs once and is retried, still end before peers take a lease of 10 s (the default) or more; one
    hung call, before they take one of 3 s."""
    return min(10.0, max(2.0, lease_ms / 1000 / CALL_TIMEOUT_LEASE_SHARE))


def consumer_for(settings, stream_name: str, app: str, **kwargs) -> Consumer:
    """A consumer over Kinesis with DynamoDB leases, from the shared AWS settings. Its stream calls are
    made once, without botocore's retry: a failed read is tried again by the consumer's own per-shard
    backoff, and a retry inside botocore would hold up the reads of every other shard meanwhile. Lease
    calls are retried once (a take whose answer was lost, see ``DynamoLeaseTable.take``). Every call
    times out within ``call_timeout_s`` of the lease."""
    timeout = call_timeout_s(kwargs.get("lease_ms", DEFAULT_LEASE_MS))
    stream = KinesisStream(aws.client("kinesis", settings.region, timeout=timeout, retries=0), stream_name)
    leases = DynamoLeaseTable(aws.client("dynamodb", settings.region, timeout=timeout, retries=1),
                              settings.lease_table, f"{app}#{stream_name}")
    return Consumer(stream, leases, **kwargs)
