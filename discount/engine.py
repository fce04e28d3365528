"""Read predictions, decide offers, write them, then checkpoint: the whole engine loop.

At-least-once: a batch's checkpoint moves only after every offer in it is written, and the writes
are idempotent (one offer per session, enforced by the table), so a crash or a replay re-reads
predictions without making a second offer (while the offer row lives: see docs/discount-engine.md).
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from botocore.exceptions import BotoCoreError, ClientError

from common import aws, logs
from common.consumer import Batch, Consumer, ReadFailed, consumer_for
from common.leases import LeaseLost
from common.retry import backoff_s
from discount.metrics import Metrics
from discount.offers import OfferTable, Outcome, Prediction, hour_of
from discount.settings import DiscountSettings

log = logging.getLogger("discount")
APP = "discount"
REMEMBERED_SESSIONS = 100_000
# How long an "already offered" learnt from the table is trusted: that offer's row expires at a time
# the answer does not say, after which the session may have a new one (as the table would allow).
RECHECK_OFFERED_S = 3600


def skip_reason(settings: DiscountSettings, prediction: Prediction) -> str | None:
    """Why a prediction gets no offer, or None when it qualifies."""
    if prediction.events_in_session < settings.min_events:
        return "too_early"
    if prediction.p_buy < settings.offer_threshold:
        return "below_threshold"
    if prediction.p_buy > settings.offer_ceiling:
        return "above_ceiling"
    return None



class RefusedWrite(Exception):
    """DynamoDB refused this offer's write as invalid (ValidationException) and takes others: retrying
    cannot help."""

class Engine:
    def __init__(self, settings: DiscountSettings, consumer: Consumer, offers: OfferTable, metrics: Metrics,
                 *, clock: Callable[[], float] = time.time, stop: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.consumer = consumer
        self.offers = offers
        self.metrics = metrics
        # Read at scrape time: a gauge set after each poll would freeze while the stream cannot be read.
        metrics.lag_ms.set_function(lambda: self.consumer.max_lag_ms)
        metrics.checkpoint_age.set_function(lambda: self.consumer.checkpoint_age_s)
        metrics.shards.set_function(lambda: len(self.consumer.owned))
        self.clock = clock
        self.stop = stop
        self.sleep = sleep
        self.write_failures = logs.Tally(every_s=30.0)
        self.read_failures = logs.Tally(every_s=30.0)       # a stream outage: once per 30 s, not every second
        self.invalid_records = logs.Tally(every_s=30.0)
        self.refused_writes = logs.Tally(every_s=30.0)
        # Sessions known to have an offer, until when: saves a write for each of their later predictions.
        self.offered: OrderedDict[str, float] = OrderedDict()
        self.exhausted_hour: str | None = None
        self._budget_read_at = 0.0
        self._shard: str | None = None          # the shard of the batch being handled

    @classmethod
    def from_settings(cls, settings: DiscountSettings, metrics: Metrics, **kwargs) -> Engine:
        consumer = consumer_for(settings, settings.predictions_stream, APP, batch_limit=settings.batch_limit,
                                read_interval_s=settings.read_interval_s, lease_ms=settings.lease_ms)
        offers = OfferTable(aws.client("dynamodb", settings.region), settings.offers_table,
                            budget_per_hour=settings.budget_per_hour, discount_percent=settings.discount_percent,
                            ttl_hours=settings.offer_ttl_hours,
                            bought_table=settings.predictions_table if settings.check_purchases else None,
                            holdout_percent=settings.holdout_percent)
        return cls(settings, consumer, offers, metrics, **kwargs)

    # ------------------------------------------------------------------ decisions

    def decide(self, data: bytes, sequence: str | None = None) -> str:
        """Handle one prediction record; returns the outcome label (also counted in the metrics)."""
        try:
            prediction = Prediction.from_record(json.loads(data))
        except (ValueError, RecursionError) as exc:   # JSONDecodeError is a ValueError; deep nesting recurses
            if skipped := self.invalid_records.add():
                log.warning("skipped %d records that are not predictions since the last such line; the last: shard "
                            "%s sequence %s: %s", skipped, self._shard, sequence, exc, extra={"shard_id": self._shard})
            return "invalid"
        now = self.clock()
        if prediction.collected_ms is not None:
            self.metrics.prediction_age.observe(now - prediction.collected_ms / 1000)
        reason = skip_reason(self.settings, prediction)
        if reason:
            return reason
        if prediction.clicked_ms is not None and now - prediction.clicked_ms / 1000 > self.settings.max_prediction_age_s:
            return "stale"
        if now < self.offered.get(prediction.session_id, 0.0):     # saves a DynamoDB call; the table decides
            return Outcome.ALREADY_OFFERED.value
        if self.exhausted_hour == hour_of(now):
            return Outcome.BUDGET_EXHAUSTED.value
        try:
            outcome = self._retrying(lambda: self.offers.offer(prediction, now))
        except RefusedWrite as exc:
            if refused := self.refused_writes.add():
                log.error("DynamoDB refused %d offers as invalid since the last such line, skipped; the last: %s",
                          refused, exc.__cause__, extra={"session_id": prediction.session_id,
                                                         "event_id": prediction.event_id})
            return "invalid"
        if outcome is Outcome.BUDGET_EXHAUSTED:
            self.exhausted_hour = hour_of(now)
        elif outcome in (Outcome.OFFERED, Outcome.HELD_OUT):
            self._remember(prediction.session_id, now + self.offers.ttl_s)      # as long as its row lives
        elif outcome is Outcome.ALREADY_OFFERED:
            self._remember(prediction.session_id, now + RECHECK_OFFERED_S)
        if outcome in (Outcome.OFFERED, Outcome.HELD_OUT):
            log.info("offer made, p_buy %.3f" if outcome is Outcome.OFFERED else
                     "no offer, control group, p_buy %.3f", prediction.p_buy,
                     extra={"session_id": prediction.session_id, "event_id": prediction.event_id,
                            "model_version": prediction.model_version})
        return outcome.value

    def _remember(self, session_id: str, until: float) -> None:
        self.offered[session_id] = until
        self.offered.move_to_end(session_id)
        if len(self.offered) > REMEMBERED_SESSIONS:
            self.offered.popitem(last=False)

    def _retrying(self, write: Callable[[], Outcome]) -> Outcome:
        """Retry a write through throttling and outages: skipping it would lose an offer decision."""
        for attempt in range(1_000_000):
            try:
                return self.consumer.while_renewing(write)      # one write can outlast the lease (a hang)
            except (BotoCoreError, ClientError) as exc:
                if _invalid(exc) and self._table_usable():
                    raise RefusedWrite from exc     # this record's write stays refused: no retry
                if self.stop():
                    raise
                self.metrics.write_errors.inc()
                if count := self.write_failures.add():
                    checked = f" (checking purchases in {self.offers.bought_table})" if self.offers.bought_table else ""
                    log.warning("offer writes to table %s%s failed %d times since the last such line, retrying: %s",
                                self.offers.table, checked, count, exc)
                # Retrying can outlast the lease: renew it (so never sleep past a renewal), and give the
                # batch up once another worker has taken its shard (it reads the batch again; offers are idempotent).
                time.sleep(min(backoff_s(attempt, 0.1, 5.0), self.consumer.renew_interval_s))
                if self._shard is not None and self._shard not in self.consumer.renew_due():
                    raise LeaseLost(self._shard) from exc
        raise AssertionError("unreachable")

    def _table_usable(self) -> bool:
        """Whether the tables read their keys: a refusal of every write (another key schema: a wrong
        offers_table, a table made again) is the table's, not the record's, and skipping the records
        for it dropped every offer, checkpointed, while it lasted."""
        return self.offers.usable(self.clock())

    # ------------------------------------------------------------------ the loop

    def handle(self, batch: Batch) -> None:
        """Decide on every record of the batch; LeaseLost when another worker took its shard meanwhile."""
        self._shard = batch.shard_id
        for record in batch.records:
            # Offer writes that each succeed slowly (a DynamoDB answering in seconds) outlast the lease
            # together: renew it between records too, not only between retries.
            if batch.shard_id not in self.consumer.renew_due():
                raise LeaseLost(batch.shard_id)
            started = time.perf_counter()
            outcome = self.decide(record.data, record.sequence_number)
            self.metrics.predictions.labels(outcome).inc()
            if outcome == Outcome.OFFERED.value:
                self.metrics.offers.inc()
                self.metrics.decision_seconds.observe(time.perf_counter() - started)

    def step(self) -> int:
        """One round: read a page from every owned shard, decide, write, then checkpoint.

        Each batch is handled and checkpointed on its own: the readers of every shard have already
        moved past their batch, so a failure with one batch must not skip the others.
        """
        handled = 0
        for batch in self.consumer.poll():
            try:
                self.handle(batch)
            except LeaseLost:
                log.warning("shard %s was taken while its offers were being written; its new owner re-reads it",
                            batch.shard_id)
                continue
            except Exception:
                log.exception("handling a batch of shard %s failed; re-reading it from its checkpoint",
                              batch.shard_id)
                self.consumer.rewind(batch.shard_id)
                continue
            try:
                self.consumer.checkpoint(batch)
            except LeaseLost:
                pass                           # another worker owns the shard now and re-reads from there
            except (BotoCoreError, ClientError) as exc:
                # The offers are written: the shard's next checkpoint covers this batch too.
                log.warning("checkpoint of shard %s failed, the next one covers it: %s", batch.shard_id, exc)
            handled += len(batch.records)
        return handled

    def _update_budget_gauge(self) -> None:
        # The counter lives in DynamoDB (shared by all processes); a read every few seconds is plenty.
        if time.monotonic() - self._budget_read_at < 5.0:
            return
        self._budget_read_at = time.monotonic()
        try:
            spent = self.consumer.while_renewing(self.offers.spent, self.clock())     # on the loop: may hang
        except (BotoCoreError, ClientError):
            return
        self.metrics.budget_left.set(max(0, self.settings.budget_per_hour - spent))

    def run(self, idle_sleep: float = 0.2) -> None:
        while not self.stop():
            # Before reading: a stream that cannot be read left the gauge at 0 (budget spent) for good.
            self._update_budget_gauge()
            try:
                if not self.step():
                    self.sleep(self.consumer.idle_wait_s(idle_sleep))     # until a shard is due: see idle_wait_s
            except (BotoCoreError, ClientError, ReadFailed) as exc:
                # Reading failed: nothing was handed out and every reader stays at its last record.
                if failures := self.read_failures.add():
                    log.warning("stream or lease calls failed %d times since the last such line, retrying every "
                                "second: %s", failures, exc)
                time.sleep(1.0)

    def close(self) -> None:
        self.consumer.close()


def _invalid(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and exc.response["Error"]["Code"] == "ValidationException"
