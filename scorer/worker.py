"""The streaming worker: enriched events in, one prediction per scored event out.

One poll = one micro-batch: every record of every owned shard is folded into its session, the
touched rows are scored in ONE onnxruntime call, and the predictions chosen by the emit policy
are buffered. The buffer is written (stream + table) and the shards checkpointed when the poll
came back empty or the oldest buffered prediction is ``flush_ms`` old, so no prediction waits
longer than that.

Restart without re-emitting: each checkpoint stores, next to the consumer's "emitted up to"
sequence number, ``state_after`` in the lease meta: the sequence number before the first record
of the oldest live session on the shard. A new owner reads from there and folds the records up to
"emitted up to" quietly (states, dedupe ids and emit counters rebuilt, nothing written).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from common import logs
from common.consumer import Batch, Consumer, ReadFailed
from common.features import FEATURE_VERSION, features, in_calendar, parse_ms, session_key, step
from common.leases import Lease, LeaseLost
from common.retry import backoff_s
from common.service import gc_paused
from common.streams import SHARD_END, Record, Shard, sequence_key
from scorer import metrics
from scorer.config import ScorerSettings
from scorer.drift import ScoreDrift
from scorer.inputs import BadEvent, event_time
from scorer.model import Model, Models
from scorer.sessions import Session, SessionStore
from scorer.sink import PredictionWriter

log = logging.getLogger("scorer.worker")

PREDICTION_SCHEMA = "iglu:com.clickstream/prediction/jsonschema/1-0-0"   # docs/contracts.md: bump with the record
FROM_START = "TRIM_HORIZON"        # lease meta value meaning "replay from the shard's first record"
MAX_BUFFER = 20_000                # predictions; flush early rather than grow without bound
EVENTS_LIVE, EVENTS_REPLAY = metrics.EVENTS.labels("live"), metrics.EVENTS.labels("replay")
REBUILD_ATTEMPTS = 20              # failed reads of a closed parent shard before its sessions are given up
IDLE_SLEEP_S = 0.2                 # after an empty poll while no shard is owned (else until one is due)
SHADOW_SUMMARY_S = 60.0            # how often the challenger's comparison with the champion is logged


@dataclass
class ShadowTally:
    """A challenger's comparison with the champion since its last log line."""
    versions: tuple[str, str]          # (shadow, champion)
    rows: int = 0
    differ: int = 0                    # decisions that differ
    abs_dp: float = 0.0                # sum of |p_shadow - p_champion|


class BadRecord(ValueError):
    """A record on the enriched stream that is not a usable enriched event."""


@dataclass
class Row:
    """One scored event: where its prediction goes, and whether it is a quiet replay."""

    session: Session
    event: dict
    event_ms: int
    quiet: bool
    events: int
    collected_ms: int = 0


def parse_event(record: Record) -> tuple[dict, int, int]:
    """The enriched event of a record, when it happened and when it was collected (ms); BadRecord or
    BadEvent naming the problem."""
    try:
        event = orjson.loads(record.data)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    event_ms = event_time(event)
    try:
        return event, event_ms, parse_ms(event["collector_tstamp"])
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise BadEvent(f"bad collector_tstamp: {exc}") from None


def observe_ages(rows: list[Row], scored_ms: int) -> None:
    """Each live event's age at scoring, from the collector's receipt: the pipeline's time to act up to
    here. Quiet replays are left out: a restart's rebuild is not a click waiting for its prediction."""
    collected_ms = np.fromiter((row.collected_ms for row in rows if not row.quiet), np.float64)
    metrics.EVENT_AGE_SECONDS.observe_all((scored_ms - collected_ms) / 1000)


def _int_or_none(text: object) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def iso_now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def published_time(value: object) -> str | None:
    """An event's timestamp as its prediction carries it: ISO (the contract), or None. The enricher's
    strings go as they are. Another writer's (a number, another shape) reached the predictions table
    as written, and DynamoDB refuses a number past 1e125: that write was retried for ever."""
    if type(value) is str and len(value) == 24:
        return value
    try:
        ms = parse_ms(value)
    except (TypeError, ValueError, ArithmeticError):
        return None
    return _iso(datetime.fromtimestamp(ms / 1000, UTC)) if in_calendar(ms) else None


class Worker:
    def __init__(self, settings: ScorerSettings, models: Models, writer: PredictionWriter,
                 make_consumer: Callable[..., Consumer]):
        self.settings = settings
        self.models = models
        self.writer = writer
        self.shadow_tally = ShadowTally(("", ""))
        self.shadow_logged_at = 0.0
        self.drift = ScoreDrift(settings.drift_window_s)
        # Retried while the lease table is away: once a second, one WARNING per 30 s.
        self.checkpoint_failures = logs.Tally(every_s=30.0)
        self.lease_read_failures = logs.Tally(every_s=30.0)
        self.read_failures = logs.Tally(every_s=30.0)       # a stream outage: once per 30 s, not every second
        self.checkpoint_retry_at = 0.0
        self.store = SessionStore(settings.session_timeout_s * 1000, settings.max_sessions, settings.dedupe_window,
                                  settings.replay_max_s * 1000)
        self.make_consumer = make_consumer
        self.consumer = make_consumer(start_after=self._start_after, on_lost=self._on_lost)
        self.positions: dict[str, str | None] = {}      # last record read per shard
        self.replay_until: dict[str, int] = {}          # shard -> "emitted up to" while replaying
        # Closed parent shard -> the newly owned children it split into (or merged from): the
        # sessions going on on those children are rebuilt from the parent before they are folded.
        self.parents_to_rebuild: dict[str, list[Shard]] = {}
        # shard -> (prediction, session's latest event time) not yet written; the table keeps a row
        # only over one with an earlier (time, events) pair, and the session's time never goes back.
        self.pending: dict[str, list[tuple[dict, int]]] = {}
        self.pending_count = 0
        # shard -> the sessions that bought, to mark in the table with their latest event time when
        # written: their rows carry that time (events after the purchase in the same batch included).
        self.pending_bought: dict[str, list[Session]] = {}
        self.pending_batches: dict[str, Batch] = {}     # newest batch per shard not yet checkpointed
        self.pending_since = 0.0
        self.stopping = False
        self.stop_requested: Callable[[], bool] = lambda: False      # run()'s stop, seen by flush()'s retries
        self.running = False
        self.gap_checked: str | None = None              # the model version whose session gap was compared
        self.folding = threading.Lock()                  # held while a batch changes the sessions (API reads)
        self.sleep: Callable[[float], None] = time.sleep     # after an empty poll

    # ------------------------------------------------------------------ lease hooks

    def _start_after(self, lease: Lease) -> str | None:
        """Where a newly owned shard is read from: the start of its oldest live session."""
        emitted = lease.checkpoint
        if emitted == SHARD_END:
            return emitted
        self.positions[lease.shard_id] = None
        child = self.consumer.shard(lease.shard_id)
        for parent in self.consumer.parents(lease.shard_id):
            if not self.store.holds_all_sessions_of(parent):      # it read the parent itself: nothing to do
                self.parents_to_rebuild.setdefault(parent, []).append(child)
        if emitted is None:
            return None
        state_after = lease.meta.get("state_after", emitted)
        self.replay_until[lease.shard_id] = sequence_key(emitted)
        start = None if state_after == FROM_START else state_after
        self.positions[lease.shard_id] = start
        log.info("shard %s: replaying quietly after %s up to %s", lease.shard_id, state_after, emitted,
                 extra={"shard_id": lease.shard_id})
        return start

    def _on_lost(self, shard_id: str) -> None:
        self.store.drop_shard(shard_id)
        self.pending_count -= len(self.pending.pop(shard_id, []))
        self.pending_bought.pop(shard_id, None)
        self.pending_batches.pop(shard_id, None)
        self.replay_until.pop(shard_id, None)
        self.positions.pop(shard_id, None)

    # ------------------------------------------------------------------ one micro-batch

    def poll_once(self) -> int:
        """Read, fold, score and buffer one round of records; flush when due. Returns records read."""
        model = self.models.champion          # one model for the whole batch, even if a reload lands now
        if model is not None and model.version != self.gap_checked:
            self._check_session_gap(model)
        batches = self.consumer.poll()
        if self.parents_to_rebuild and not self._rebuild_parents(model):
            return 0            # stopped midway: these batches are not checkpointed, their next reader folds them
        polled = time.perf_counter()
        count = sum(len(batch.records) for batch in batches)
        with self.folding, gc_paused():     # gc_paused: the batch's events and rows die at its end
            self._fold_and_score(model, batches, polled)
        for batch in batches:
            self.pending_batches[batch.shard_id] = batch
        if batches and not self.pending_since:
            self.pending_since = time.monotonic()
        if self._flush_due(count):
            # From the buffer's first batch, so that light traffic, flushed by the next (empty) poll, counts too.
            buffered_since = self.pending_since
            if self.flush() and buffered_since:
                metrics.BATCH_SECONDS.observe(time.monotonic() - buffered_since)
        return count

    def _check_session_gap(self, model: Model) -> None:
        """Warn when the model was trained on sessions split by another inactivity gap: the features
        of events after such a pause would differ from the rows it learnt from."""
        self.gap_checked = model.version
        trained = model.meta.get("session_gap_s")
        if isinstance(trained, int) and trained * 1000 != self.store.timeout_ms:
            log.warning("model %s was trained on sessions that end after %d s of inactivity, but session_timeout_s "
                        "is %d: set it (or the trainer's session_gap_minutes) so they agree", model.version, trained,
                        self.settings.session_timeout_s)

    def _rebuild_parents(self, model: Model) -> bool:
        """Quietly fold the closed parents of newly owned shards, from their replay start to their end,
        keeping the sessions that go on on those children.

        Whoever read a parent (a peer, or this worker before a restart) held those sessions; without
        this they would start again from nothing on the child. Sessions this store holds already
        are left alone: their parent events were folded once. False when stopped midway."""
        leases = self._lease_rows()
        if leases is None:
            return False
        existing = set(self.store.sessions)
        while self.parents_to_rebuild:
            parent, children = next(iter(self.parents_to_rebuild.items()))
            meta = leases[parent].meta if parent in leases else {}
            start = meta.get("state_after", SHARD_END)
            needed = start != SHARD_END and self._parent_may_hold_live_sessions(meta, children, leases)
            if needed and not self._replay_closed_shard(parent, start, children, existing, model):
                return False
            del self.parents_to_rebuild[parent]
        return True

    def _lease_rows(self) -> dict[str, Lease] | None:
        """The lease table's rows by shard, read again through throttling or an outage (the batches
        just polled wait for them: a restart would drop every session); None once stopped."""
        attempt = 0
        while True:
            try:
                return {lease.shard_id: lease for lease in self.consumer.leases.leases()[0]}
            except (BotoCoreError, ClientError) as exc:
                attempt += 1
                if self.stopping or self.stop_requested():
                    return None
                if failures := self.lease_read_failures.add():
                    log.warning("reading the lease table for a parent shard's rebuild failed (%d times), "
                                "retrying: %s", failures, exc)
                self.consumer.renew_due()
                time.sleep(backoff_s(attempt, 0.2, self.consumer.renew_interval_s))

    def _parent_may_hold_live_sessions(self, parent_meta: dict, children: list[Shard], leases: dict) -> bool:
        """False when every child was checkpointed past ``replay_max_s`` after the parent's last event:
        sessions begun that long ago are not rebuilt by any restart (so not here either), and the
        parent would otherwise be read again at every restart for as long as the stream keeps it."""
        ended = _int_or_none(parent_meta.get("watermark_ms"))
        reached = [_int_or_none(leases[child.shard_id].meta.get("watermark_ms")) if child.shard_id in leases else None
                   for child in children]
        if ended is None or None in reached:
            return True
        return min(reached) - ended <= self.store.replay_max_ms

    def _replay_closed_shard(self, shard: str, state_after: str, children: list[Shard], existing: set[str],
                             model: Model) -> bool:
        start = None if state_after == FROM_START else state_after
        log.info("closed shard %s: rebuilding the sessions of %s from after %s", shard,
                 ", ".join(child.shard_id for child in children), state_after, extra={"shard_id": shard})
        reader, position, failures, folded = self.consumer.stream.reader(shard, start), start, 0, 0
        while True:
            if self.stopping or self.stop_requested():
                return False
            self.consumer.renew_due()          # a long parent must not cost us the leases we hold
            try:
                page = reader.read(self.consumer.batch_limit)
            except Exception as exc:  # noqa: BLE001 - throttling, a timeout: read again after the last record
                failures += 1
                if failures > REBUILD_ATTEMPTS:
                    log.error("giving up rebuilding the sessions of closed shard %s after %d failed reads (%s): "
                              "sessions that began there start again from their next event", shard, failures, exc)
                    self.store.finish_shard(shard)      # what was rebuilt expires by the shards still read
                    return True
                log.warning("reading closed shard %s failed, retrying: %s", shard, exc)
                time.sleep(backoff_s(failures, 0.2, self.consumer.renew_interval_s))
                reader = self.consumer.stream.reader(shard, position)
                continue
            failures = 0
            rows: list[Row] = []
            matrix: list[list[float]] = []
            replayed = 0
            with self.folding, gc_paused():
                for record in page.records:
                    # Only the sessions that go on on our children: the others are a peer's to rebuild.
                    if any(child.takes(record.partition_key) for child in children):
                        replayed += self._fold_record(record, shard, position, True, rows, matrix, skip=existing)
                    position = record.sequence_number
                EVENTS_REPLAY.inc(replayed)
                if rows:
                    self._score(model, rows, matrix, time.perf_counter())
            folded += len(page.records)
            if page.shard_end:
                self.store.finish_shard(shard)
                log.info("closed shard %s: %d events read, %d live sessions", shard, folded, len(self.store),
                         extra={"shard_id": shard})
                return True
            time.sleep(self.consumer.read_interval_s)

    def _fold_and_score(self, model: Model, batches: list[Batch], polled: float) -> None:
        rows, features_rows = self._fold(batches)
        if rows:
            self._score(model, rows, features_rows, polled)

    def _fold(self, batches: list[Batch]) -> tuple[list[Row], list[list[float]]]:
        rows: list[Row] = []
        matrix: list[list[float]] = []
        for batch in batches:
            shard = batch.shard_id
            until = self.replay_until.get(shard)
            previous = self.positions.get(shard)
            folded = {False: 0, True: 0}        # live, quiet: counted per batch, not per event (~1 µs each)
            for record in batch.records:
                quiet = until is not None and sequence_key(record.sequence_number) <= until
                folded[quiet] += self._fold_record(record, shard, previous, quiet, rows, matrix)
                previous = record.sequence_number
            EVENTS_LIVE.inc(folded[False])
            EVENTS_REPLAY.inc(folded[True])
            self.positions[shard] = previous
            if until is not None and (batch.shard_end or (previous and sequence_key(previous) >= until)):
                del self.replay_until[shard]
                log.info("shard %s: replay done, %d live sessions", shard, len(self.store),
                         extra={"shard_id": shard})
        metrics.SESSIONS_LIVE.set(len(self.store))
        return rows, matrix

    def _fold_record(self, record: Record, shard: str, previous: str | None, quiet: bool,
                     rows: list[Row], matrix: list[list[float]], skip: Container[str] = ()) -> bool:
        """Fold one record into its session, adding its row to score unless it bought; whether it was folded."""
        try:
            event, event_ms, collected_ms = parse_event(record)
            session_id = session_key(event)
            if not isinstance(session_id, str):
                raise BadRecord(f"session id {session_id!r} is not a string")
        except (KeyError, TypeError, ValueError) as exc:          # BadRecord and BadEvent are ValueErrors
            metrics.BAD_RECORDS.inc()
            log.error("shard %s sequence %s: skipped a record that is not an enriched event: %s",
                      shard, record.sequence_number, exc, extra={"shard_id": shard})
            return False
        if session_id in skip:
            return False
        session = self.store.session_for(session_id, shard, event_ms, collected_ms, previous)
        if not session.first_sight(event["event_id"], self.settings.dedupe_window):
            metrics.DUPLICATES.inc()
            return False
        had_bought = session.state.purchased
        try:
            step(session.state, event, event_ms)
        except Exception as exc:  # noqa: BLE001 - whatever fails, a crash would replay this record for ever
            metrics.BAD_RECORDS.inc()
            log.error("shard %s sequence %s: event %s could not be folded: %r", shard, record.sequence_number,
                      event["event_id"], exc, extra={"shard_id": shard, "event_id": event["event_id"]})
            return False
        if not session.state.purchased:       # one that bought needs no buy/defer (nor did training have one)
            rows.append(Row(session, event, event_ms, quiet, session.state.events, collected_ms))
            matrix.append(features(session.state))
        elif not had_bought and not quiet:    # its row tells the discount engine: no offer after a purchase
            self.pending_bought.setdefault(session.shard_id, []).append(session)
        return True

    def _score(self, model: Model, rows: list[Row], matrix: list[list[float]], started: float) -> None:
        inputs = np.asarray(matrix, dtype=np.float32)
        scoring = time.perf_counter()
        p_buy = model.predict(inputs)
        metrics.SCORING_SECONDS.observe(time.perf_counter() - scoring)
        latency_us = int((time.perf_counter() - started) * 1e6)
        self._shadow(inputs, p_buy, model)
        self.drift.observe(model, p_buy, inputs, live=np.fromiter((not row.quiet for row in rows), bool, len(rows)))
        scored_at = iso_now()
        observe_ages(rows, parse_ms(scored_at))
        for row, p in zip(rows, p_buy.tolist()):
            if not math.isfinite(p):      # the table refuses NaN: a write retried for ever would stall the shard
                metrics.BAD_RECORDS.inc()
                log.error("model %s gave p_buy %r for event %s; not published", model.version, p,
                          row.event["event_id"], extra={"event_id": row.event["event_id"]})
                continue
            p = round(p, 6)                 # decided as published: a p_buy below the threshold is never "buy"
            decision = model.decide(p)
            if self._should_emit(row.session, decision) and not row.quiet:
                prediction = self._prediction(row, model, p, decision, latency_us, scored_at)
                self.pending.setdefault(row.session.shard_id, []).append((prediction, row.session.state.last_ms))
                self.pending_count += 1

    def _should_emit(self, session: Session, decision: str) -> bool:
        """Apply the emit policy; updates the session's counters (also on quiet replay)."""
        policy = self.settings.emit
        changed = decision != session.last_decision
        session.last_decision = decision
        if policy == "every":
            return True
        if policy == "change":
            return changed
        session.since_emit += 1
        if changed or session.since_emit >= self.settings.emit_every_n:
            session.since_emit = 0
            return True
        return False

    @staticmethod
    def _prediction(row: Row, model: Model, p: float, decision: str, latency_us: int, scored_at: str) -> dict:
        event = row.event
        return {"schema": PREDICTION_SCHEMA, "session_id": row.session.session_id, "event_id": event["event_id"],
                "collector_tstamp": published_time(event.get("collector_tstamp")),
                "derived_tstamp": published_time(event.get("derived_tstamp")),
                "scored_at": scored_at, "model_name": model.name, "model_version": model.version,
                "feature_version": FEATURE_VERSION, "p_buy": p, "decision": decision,
                "threshold": model.threshold, "latency_us": latency_us, "events_in_session": row.events}

    def _shadow(self, inputs: np.ndarray, p_buy: np.ndarray, champion: Model) -> None:
        shadow = self.models.shadow
        if shadow is None:
            return
        try:
            challenger = shadow.predict(inputs)
        except Exception:
            log.exception("shadow model %s failed", shadow.version)
            return
        disagree = int(np.sum((p_buy >= champion.threshold) != (challenger >= shadow.threshold)))
        metrics.SHADOW_DISAGREEMENTS.inc(disagree)
        metrics.SHADOW_ROWS.inc(len(p_buy))
        self._summarise_shadow(shadow.version, champion.version, len(p_buy), disagree,
                               float(np.sum(np.abs(challenger - p_buy))))

    def _summarise_shadow(self, shadow: str, champion: str, rows: int, disagree: int, abs_dp: float) -> None:
        """One log line per SHADOW_SUMMARY_S for a challenger, not one per batch (2.5 a second per worker)."""
        versions = (shadow, champion)
        if self.shadow_tally.versions != versions:
            self.shadow_tally = ShadowTally(versions)
        tally = self.shadow_tally
        tally.rows += rows
        tally.differ += disagree
        tally.abs_dp += abs_dp
        now = time.monotonic()
        if now - self.shadow_logged_at < SHADOW_SUMMARY_S:
            return
        log.info("shadow %s vs champion %s: %d rows, %d decisions differ, mean |dp| %.4f", shadow, champion,
                 tally.rows, tally.differ, tally.abs_dp / tally.rows, extra={"model_version": shadow})
        self.shadow_tally = ShadowTally(versions)
        self.shadow_logged_at = now

    # ------------------------------------------------------------------ durability

    def _flush_due(self, count: int) -> bool:
        if not self.pending_batches:
            return False
        if not self.pending and not self.pending_bought and time.monotonic() < self.checkpoint_retry_at:
            return False        # only refused checkpoints to retry: once a second, not at every idle poll
        age_ms = (time.monotonic() - self.pending_since) * 1000
        return count == 0 or age_ms >= self.settings.flush_ms or self.pending_count >= MAX_BUFFER

    def flush(self) -> bool:
        """Write buffered predictions, then checkpoint each shard with its replay start."""
        # A write retried through throttling can outlast the leases: the writer renews them as it goes.
        # A shard found taken is dropped (_on_lost) and its predictions are no longer written: its new
        # owner replays the shard from the checkpoint and publishes them.
        if (self.pending or self.pending_bought) and not self.writer.write(
                self.pending, stop=lambda: self.stopping or self.stop_requested(),
                owns=lambda shard: shard in self.consumer.owned, renew=self.consumer.renew_due,
                max_wait_s=self.consumer.renew_interval_s, run=self.consumer.while_renewing,
                bought={shard: [(session.session_id, session.state.last_ms) for session in sessions]
                        for shard, sessions in self.pending_bought.items()}):
            return False
        self.pending.clear()
        self.pending_count = 0
        self.pending_bought.clear()
        self.store.sweep()
        unchecked: dict[str, Batch] = {}
        for shard, batch in list(self.pending_batches.items()):
            if shard in self.replay_until:
                # Still replaying quietly: the checkpoint already says how far predictions went out;
                # moving it back to this batch would have the next owner emit them again.
                continue
            value = batch.checkpoint_value
            meta = {"state_after": self.store.state_after(shard, value) or FROM_START}
            if shard in self.store.watermark_ms:     # how far its events went: see _parent_may_hold_live_sessions
                meta["watermark_ms"] = str(self.store.watermark_ms[shard])
            try:
                self.consumer.checkpoint_at(shard, value, meta)
            except LeaseLost:
                log.warning("shard %s was taken before its checkpoint; the new owner re-reads it", shard)
                continue
            except (BotoCoreError, ClientError) as exc:
                # A throttled or unreachable lease table. The predictions are written (and idempotent):
                # keep the batch for the next flush, unless a newer batch of the shard replaces it. A
                # restart would drop every session and, unable to balance, own no shards, score nothing.
                if failures := self.checkpoint_failures.add():
                    log.warning("checkpoints failed %d times since the last such line (shard %s), retrying: %s",
                                failures, shard, exc, extra={"shard_id": shard})
                self.checkpoint_retry_at = time.monotonic() + 1.0
                unchecked[shard] = batch
                continue
            if value == SHARD_END:
                self.store.finish_shard(shard)
                self.positions.pop(shard, None)     # never read again: a reshard a day would leave one each
        self.pending_batches = unchecked
        self.pending_since = 0.0
        return True

    # ------------------------------------------------------------------ the loop

    def run(self, stop: Callable[[], bool]) -> None:
        waited = False
        self.stop_requested = stop
        self.running = True
        # Read at scrape time (self.consumer is replaced by a restart): a gauge set after each poll
        # would freeze while the stream cannot be read.
        metrics.LAG_MS.set_function(lambda: self.consumer.max_lag_ms)
        metrics.CHECKPOINT_AGE.set_function(lambda: self.consumer.checkpoint_age_s)
        metrics.WORKER_RUNNING.set_function(lambda: int(self.running))
        metrics.SHARDS_OWNED.set_function(lambda: len(self.consumer.owned))     # read at scrape: a stuck worker's too
        try:
            while not stop():
                if self.models.champion is None:
                    if not waited:
                        log.warning("no model loaded yet; the worker waits before reading the stream")
                        waited = True
                    time.sleep(0.5)
                    continue
                try:
                    if self.poll_once() == 0:
                        self.sleep(self.consumer.idle_wait_s(IDLE_SLEEP_S))     # until a shard is due: see idle_wait_s
                except ReadFailed as exc:
                    # Nothing was handed out and the readers stay put: the sessions are still right.
                    if failures := self.read_failures.add():
                        log.warning("reading the enriched stream failed %d times since the last such line, "
                                    "retrying every second: %s", failures, exc)
                    time.sleep(1.0)
                except Exception:
                    log.exception("worker batch failed; dropping in-memory state and re-reading from the checkpoints")
                    self.restart()
                    time.sleep(1.0)
        finally:
            self.running = False
            self.stopping = True
            self.close()

    def restart(self) -> None:
        """Forget everything not checkpointed and take the shards again, as a fresh process would.

        After an error mid-batch (a bug, a failed lease-table call outside a checkpoint) the sessions may
        hold events whose predictions were never written; re-reading from the checkpoints (quietly up
        to "emitted up to") rebuilds them exactly. A failed read comes not here but to ``ReadFailed``,
        a failed checkpoint is retried by the next flush.
        """
        metrics.WORKER_RESTARTS.inc()
        try:
            self.consumer.close()
        except Exception:
            log.warning("could not hand the shards back cleanly", exc_info=True)
        self.store = SessionStore(self.store.timeout_ms, self.store.max_sessions, self.store.dedupe_window,
                                  self.store.replay_max_ms, self.store.clock)
        self.positions.clear()
        self.replay_until.clear()
        self.parents_to_rebuild.clear()
        self.pending.clear()
        self.pending_count = 0
        self.pending_bought.clear()
        self.pending_batches.clear()
        self.pending_since = 0.0
        self.consumer = self.make_consumer(start_after=self._start_after, on_lost=self._on_lost)

    def close(self) -> None:
        """Clean stop: write and checkpoint what is buffered, then hand the shards back."""
        try:
            self.flush()
        except Exception:
            log.exception("final flush failed; the next owner re-reads from the last checkpoint")
        self.consumer.close()
        self.writer.close()
