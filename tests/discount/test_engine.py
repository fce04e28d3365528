"""The discount engine against the emulator: offers, one per session, budget, replay, kill -9, the service."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager

import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common import aws
from common.config import ConfigError, load
from common.consumer import Consumer, consumer_for
from common.leases import DynamoLeaseTable
from common.producer import Producer
from common.streams import KinesisStream
from discount.engine import APP, Engine, skip_reason
from discount.metrics import Metrics
from discount.offers import OfferTable, Outcome, Prediction, held_out, hour_of
from discount.settings import DiscountSettings
from infra.provision import ProvisionSettings, provision
from localstack.emulator import free_port
from scorer.sink import PredictionWriter
from tests.conftest import ROOT, settings_env, unique_settings, wait_for
from tests.faults import FaultProxy

T0 = 1_796_000_000.0          # a fixed clock, so every offer of a test falls in one budget hour


def iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prediction(session: str, p_buy: float, events: int = 5, clicked: float = T0 - 5,
               collected: float | None = None) -> dict:
    return {"session_id": session, "event_id": str(uuid.uuid4()), "collector_tstamp": iso(collected or clicked),
            "derived_tstamp": iso(clicked), "scored_at": iso((collected or clicked) + 0.01),
            "model_name": "buy-defer", "model_version": "v7", "feature_version": "1", "p_buy": p_buy,
            "decision": "buy" if p_buy >= 0.5 else "defer", "threshold": 0.5, "latency_us": 40,
            "events_in_session": events}


def publish(settings, records: list) -> None:
    stream = KinesisStream(aws.client("kinesis", settings.region), settings.predictions_stream)
    entries = [(r["session_id"] if isinstance(r, dict) else "x",
                json.dumps(r).encode() if isinstance(r, dict) else r) for r in records]
    assert Producer(stream).send(entries) == []


def discount_settings(aws_settings, **overrides) -> DiscountSettings:
    names = {f.name: getattr(aws_settings, f.name) for f in dataclasses.fields(aws_settings)
             if f.name in {g.name for g in dataclasses.fields(DiscountSettings)}}
    return DiscountSettings(**{**names, "offer_threshold": 0.3, "offer_ceiling": 0.95, "min_events": 3,
                               **overrides})


def engine(settings: DiscountSettings, clock=lambda: T0, app: str = APP) -> Engine:
    offers = OfferTable(aws.client("dynamodb"), settings.offers_table, budget_per_hour=settings.budget_per_hour,
                        discount_percent=settings.discount_percent, ttl_hours=settings.offer_ttl_hours,
                        bought_table=settings.predictions_table if settings.check_purchases else None,
                        holdout_percent=settings.holdout_percent)
    return Engine(settings, consumer_for(settings, settings.predictions_stream, app), offers, Metrics(), clock=clock)


def drain(engine_: Engine, expected: int, timeout: float = 30) -> None:
    handled, deadline = 0, time.monotonic() + timeout
    while handled < expected:
        assert time.monotonic() < deadline, f"handled {handled} of {expected} records"
        handled += engine_.step()
    assert handled == expected


def offers(settings) -> dict[str, dict]:
    items = aws.client("dynamodb").scan(TableName=settings.offers_table, ConsistentRead=True)["Items"]
    return {item["session_id"]["S"]: item for item in items if item["kind"]["S"] == "offer"}


def decided(settings) -> dict[str, str]:
    """session id → kind of every offer row and control group's holdout row."""
    items = aws.client("dynamodb").scan(TableName=settings.offers_table, ConsistentRead=True)["Items"]
    return {item["session_id"]["S"]: item["kind"]["S"] for item in items if item["kind"]["S"] != "budget"}


def count(engine_: Engine, outcome: str) -> float:
    return engine_.metrics.registry.get_sample_value("discount_predictions_total", {"outcome": outcome}) or 0.0


def test_no_offer_on_a_prediction_read_after_its_session_bought(aws_settings):
    """An engine lagging or restarting reads predictions made before a purchase the scorer has since
    folded: the scorer's mark on the session's row in the predictions table stops the offer."""
    settings = discount_settings(aws_settings)
    clicked_ms = int((T0 - 5) * 1000)
    writer = PredictionWriter(None, aws.client("dynamodb"), settings.predictions_table, 3600)
    rows = {"bought": clicked_ms, "bought-before": clicked_ms - 3_600_000, "browsing": clicked_ms}
    assert writer.write({"shardId-0": [({"session_id": session, "events_in_session": 5}, event_ms)
                                       for session, event_ms in rows.items()]},
                        bought={"shardId-0": [("bought", clicked_ms + 2_000),                 # after the click read late
                                              ("bought-before", clicked_ms - 3_000_000)]})  # an earlier session's
    writer.close()
    publish(settings, [prediction(session, 0.5) for session in (*rows, "not-in-the-table")])
    eng = engine(settings)
    drain(eng, 4)
    assert set(offers(settings)) == {"bought-before", "browsing", "not-in-the-table"}
    assert count(eng, "bought") == 1 and eng.offers.spent(T0) == 3          # no budget spent on it
    # Off (a scorer without its table), the same prediction gets its offer.
    unchecked = discount_settings(aws_settings, check_purchases=False, predictions_stream=settings.predictions_stream)
    publish(settings, [prediction("bought", 0.5)])
    drain(engine(unchecked, app="unchecked"), 5)
    assert "bought" in offers(settings)


@pytest.mark.parametrize("table", ["missing", "keyed by another attribute"])
def test_a_predictions_table_that_cannot_be_checked_holds_the_offers_back_not_skips_them(aws_settings, table, caplog):
    """A wrong predictions_table fails every offer's transaction: retried and logged as the table's
    fault, never counted invalid and checkpointed past."""
    settings = discount_settings(aws_settings)
    name = f"{settings.predictions_table}-{uuid.uuid4().hex[:6]}"
    if table != "missing":
        aws.client("dynamodb").create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                                             KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                                             AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
    publish(settings, [prediction("s", 0.5)])
    tries = []
    eng = engine(dataclasses.replace(settings, predictions_table=name))
    eng.stop = lambda: len(tries) >= 2
    eng.metrics.write_errors.inc = lambda *args: tries.append(args)
    deadline = time.monotonic() + 30
    with caplog.at_level(logging.WARNING, logger="discount"):
        while len(tries) < 2:          # a failed batch is read again from its checkpoint
            assert time.monotonic() < deadline, "the offer was never tried"
            eng.step()
    assert count(eng, "invalid") == 0 and offers(settings) == {} and eng.offers.spent(T0) == 0
    assert f"offer writes to table {settings.offers_table} (checking purchases in {name}) failed" in caplog.text
    eng.close()


def test_qualifying_sessions_get_exactly_one_offer(aws_settings, caplog):
    settings = discount_settings(aws_settings)
    publish(settings, [
        prediction("a", 0.55), prediction("a", 0.60), prediction("a", 0.70),      # one offer, then known
        prediction("a", 0.10),                          # the rules label it, whatever this process remembers
        prediction("b", 0.10),                                                     # no interest
        prediction("c", 0.50, events=1), prediction("c", 0.52, events=4),          # too early, then offered
        prediction("d", 0.99),                                                     # buys anyway
        b"not a prediction",
    ])
    eng = engine(settings)
    with caplog.at_level(logging.WARNING, logger="discount"):
        drain(eng, 9)
    made = offers(settings)
    assert set(made) == {"a", "c"}
    [skipped] = [r.getMessage() for r in caplog.records if "not predictions" in r.getMessage()]
    assert skipped.startswith("skipped 1 records that are not predictions since the last such line; the last: "
                              "shard shardId-000000000000 sequence ")      # where to find the record
    assert made["a"]["p_buy"]["N"] == "0.55" and made["c"]["p_buy"]["N"] == "0.52"
    assert int(made["a"]["expires_at"]["N"]) == int(T0) + 24 * 3600
    assert made["a"]["code"]["S"].startswith("SAVE10-") and made["a"]["model_version"]["S"] == "v7"
    assert made["a"]["schema"]["S"] == "iglu:com.clickstream/offer/jsonschema/1-1-1"
    assert made["a"]["clicked_ms"]["N"] == str(int((T0 - 5) * 1000))     # the uplift report's purchases are after it
    # What batch.skew --rows offers checks the prediction by: its event's collection and place in the session.
    assert (made["a"]["collected_ms"]["N"], made["a"]["events_in_session"]["N"]) == (str(int((T0 - 5) * 1000)), "5")
    assert made["a"]["holdout_percent"]["N"] == "0"            # the share in force: uplift warns of a change
    assert eng.offers.get("c", now=T0)["offer_id"] == made["c"]["offer_id"]["S"] and eng.offers.get("b", now=T0) is None
    assert {o: count(eng, o) for o in ("offered", "already_offered", "below_threshold", "too_early",
                                       "above_ceiling", "invalid")} == {
        "offered": 2, "already_offered": 2, "below_threshold": 2, "too_early": 1, "above_ceiling": 1, "invalid": 1}
    # The checkpoint moved to the last record, after the writes.
    rows, _ = eng.consumer.leases.leases()
    last = max(int(seq) for seq in [r.checkpoint for r in rows if r.checkpoint])
    assert last == int(eng.consumer.owned[rows[0].shard_id].position)
    eng.close()


def test_predictions_that_would_stall_the_engine_are_invalid_and_the_next_offer_is_made(aws_settings):
    settings = discount_settings(aws_settings)
    overflow = json.dumps(prediction("o", 0.5)).replace('"events_in_session": 5', '"events_in_session": 1e400')
    nested = b'{"session_id": "n", "p_buy": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"   # RecursionError in json
    publish(settings, [prediction(f"budget#{hour_of(T0)}", 0.6), overflow.encode(), nested, prediction("fine", 0.6)])
    eng = engine(settings)
    drain(eng, 4)
    assert count(eng, "invalid") == 3 and set(offers(settings)) == {"fine"}
    assert eng.offers.spent(T0) == 1
    eng.close()


def test_predictions_whose_fields_are_not_of_the_contracts_types_are_invalid(aws_settings):
    settings = discount_settings(aws_settings)
    wrong = [{**prediction("x", 0.6), **fields} for fields in (
        {"session_id": None}, {"session_id": 12}, {"session_id": {"a": 1}}, {"decision": None},
        {"model_version": None}, {"model_name": 7}, {"event_id": None}, {"p_buy": "0.6"}, {"p_buy": True})]
    publish(settings, [json.dumps(record).encode() for record in wrong] + [prediction("fine", 0.6)])
    eng = engine(settings)
    drain(eng, len(wrong) + 1)
    assert count(eng, "invalid") == len(wrong) and set(offers(settings)) == {"fine"}
    eng.close()


def test_predictions_whose_strings_utf8_cannot_encode_are_invalid_and_the_checkpoint_moves_past_them(aws_settings):
    """JSON's "\\ud800" is valid and loads as a lone surrogate: the hash of the session id, the offer's
    token and the write would raise on it, and the shard re-read the batch for ever."""
    settings = discount_settings(aws_settings)
    surrogates = [json.dumps({**prediction("x", 0.6), name: "abc"}).replace('"abc"', '"abc\\ud800"').encode()
                  for name in ("session_id", "event_id", "model_version")]
    with pytest.raises(ValueError, match="event_id holds a lone surrogate"):
        Prediction.from_record(json.loads(surrogates[1]))
    publish(settings, [*surrogates, prediction("fine", 0.6)])
    eng = engine(settings)
    drain(eng, len(surrogates) + 1)
    assert count(eng, "invalid") == len(surrogates) and set(offers(settings)) == {"fine"}
    rows, _ = eng.consumer.leases.leases()
    [checkpoint] = [r.checkpoint for r in rows if r.checkpoint]
    assert checkpoint == eng.consumer.owned[rows[0].shard_id].position       # the last record, the offered one
    eng.close()


@pytest.mark.parametrize("failing", ["checkpoint", "offer write"])
def test_a_failed_batch_loses_no_batch_read_from_any_shard(aws_endpoint, failing):
    """A step reads a page from every shard at once: when one batch's checkpoint or (while stopping, when
    writes are not retried) offer write fails, the others must still be handled, and no later
    checkpoint may move past a batch whose offers were not written."""
    aws_settings = unique_settings(ProvisionSettings, raw_shards=1, enriched_shards=1, bad_shards=1,
                                   predictions_shards=2)
    provision(aws_settings)
    settings = discount_settings(aws_settings)
    sessions = {f"s{i}" for i in range(40)}
    publish(settings, [prediction(s, 0.5) for s in sorted(sessions)])
    stopping = False
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        # DynamoDB through the proxy, for the lease table or the offers table, with no botocore retry.
        broken = aws.session().client("dynamodb", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
        direct = aws.client("dynamodb")
        leases = DynamoLeaseTable(broken if failing == "checkpoint" else direct, settings.lease_table,
                                  f"{APP}#{settings.predictions_stream}")
        consumer = Consumer(KinesisStream(aws.client("kinesis"), settings.predictions_stream), leases,
                            read_interval_s=settings.read_interval_s)
        table = OfferTable(broken if failing == "offer write" else direct, settings.offers_table,
                           budget_per_hour=100, discount_percent=10, ttl_hours=24)
        eng = Engine(settings, consumer, table, Metrics(), clock=lambda: T0, stop=lambda: stopping)
        consumer.balance()
        assert len(consumer.owned) == 2
        proxy.down, stopping = True, failing == "offer write"
        try:
            eng.step()                # reads both shards' pages; the failing calls fail for each batch
        except (BotoCoreError, ClientError):
            pass                      # what run() does with a failed step: log, wait, step again
        proxy.down, stopping = False, False
        late = {f"late{i}" for i in range(10)}        # later batches, whose checkpoints follow
        publish(settings, [prediction(s, 0.5) for s in sorted(late)])
        deadline = time.monotonic() + 30
        while not late <= set(offers(settings)):
            assert time.monotonic() < deadline, "the late predictions were never handled"
            if not eng.step():
                time.sleep(0.1)
    assert set(offers(settings)) == sessions | late
    assert count(eng, "offered") == 50 and eng.offers.spent(T0) == 50
    eng.close()


def _throttled_offers_engine(settings, proxy, lease_ms: int) -> Engine:
    """An engine whose offer writes go through ``proxy`` (down = DynamoDB refusing them) and whose
    leases last ``lease_ms``."""
    broken = aws.session().client("dynamodb", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
    table = OfferTable(broken, settings.offers_table, budget_per_hour=100, discount_percent=10, ttl_hours=24)
    consumer = consumer_for(settings, settings.predictions_stream, APP, worker_id="engine", lease_ms=lease_ms)
    return Engine(settings, consumer, table, Metrics(), clock=lambda: T0)


def _down_for(proxy, seconds: float) -> threading.Timer:
    proxy.down = True
    timer = threading.Timer(seconds, lambda: setattr(proxy, "down", False))
    timer.start()
    return timer


def test_a_write_refused_as_invalid_skips_its_record_only_while_the_table_takes_others(aws_settings, caplog):
    """Every ValidationException was taken for the record's fault: while a table refused every write
    (another key schema: a wrong offers_table, a table made again) each qualifying prediction was
    counted invalid and checkpointed past, its offer never made."""
    settings = discount_settings(aws_settings)
    publish(settings, [prediction("x" * 3000, 0.5), prediction("fine", 0.5)])     # a key over 2048 bytes
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        eng = _throttled_offers_engine(settings, proxy, lease_ms=10_000)
        eng.consumer.balance()
        with caplog.at_level(logging.ERROR, logger="discount"):
            drain(eng, 2)
        assert (count(eng, "invalid"), count(eng, "offered")) == (1, 1)
        assert "DynamoDB refused 1 offers as invalid since the last such line" in caplog.text
        publish(settings, [prediction("refused-for-a-while", 0.5)])
        refusals = ["ValidationException"] * 3                              # the table's, not the record's
        proxy.refuse_next = {"DynamoDB_20120810.TransactWriteItems": list(refusals),
                             "DynamoDB_20120810.GetItem": list(refusals)}
        drain(eng, 1)
    assert (count(eng, "invalid"), count(eng, "offered")) == (1, 2)
    assert set(offers(settings)) == {"fine", "refused-for-a-while"}
    assert eng.metrics.registry.get_sample_value("discount_write_errors_total") == 3
    eng.close()


def test_the_budget_gauge_and_outcome_series_are_true_before_any_prediction_is_read(aws_settings, monkeypatch):
    """The gauge was set only after a step that read: with the stream unreadable from the start it
    said 0 left (as if spent) for the whole outage; and the outcomes' series appeared with their first
    increment, which rate() misses."""
    from common.consumer import ReadFailed

    settings = discount_settings(aws_settings, budget_per_hour=7)
    eng = engine(settings)
    rounds = []

    def unreadable():
        rounds.append(1)
        raise ReadFailed("the predictions stream cannot be read")

    monkeypatch.setattr(eng.consumer, "poll", unreadable)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    eng.stop = lambda: len(rounds) >= 2
    eng.run()
    assert eng.metrics.registry.get_sample_value("discount_budget_remaining") == 7
    assert eng.metrics.registry.get_sample_value("discount_predictions_total", {"outcome": "stale"}) == 0.0
    eng.close()


@contextmanager
def peer_polling(peer):
    """A peer consumer polling every 0.2 s on a thread while the block runs; yields what it read."""
    read, done = [], threading.Event()

    def polls():
        while not done.is_set():
            read.extend(r for b in peer.poll() for r in b.records)
            time.sleep(0.2)

    runner = threading.Thread(target=polls, daemon=True)
    runner.start()
    try:
        yield read
    finally:
        done.set()
        runner.join(30)


def test_offer_writes_retried_longer_than_the_lease_keep_the_lease(aws_settings):
    settings = discount_settings(aws_settings)
    publish(settings, [prediction("slow", 0.5)])
    peer = consumer_for(settings, settings.predictions_stream, APP, worker_id="peer", lease_ms=1000)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        eng = _throttled_offers_engine(settings, proxy, lease_ms=1000)
        eng.consumer.balance()
        # Refused for longer than the 1 s lease, and than the backoff's sleeps would grow without a cap.
        timer = _down_for(proxy, 3.0)
        try:
            with peer_polling(peer) as peer_read:
                assert eng.step() == 1
        finally:
            timer.join()
    assert "slow" in offers(settings) and not peer.owned and peer_read == []
    [lease] = eng.consumer.leases.leases()[0]
    assert lease.owner == "engine" and lease.checkpoint is not None
    eng.close()
    peer.close()


def test_offer_writes_that_each_answer_slowly_keep_the_lease(aws_settings):
    """Only a failed write renewed the lease: writes that each took a third of a second, and all
    succeeded, outlasted it over a batch, and a peer took the shard and handled the batch again."""
    settings = discount_settings(aws_settings)
    publish(settings, [prediction(f"slow-{i}", 0.5) for i in range(10)])
    peer = consumer_for(settings, settings.predictions_stream, APP, worker_id="peer", lease_ms=1000)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        eng = _throttled_offers_engine(settings, proxy, lease_ms=1000)
        eng.consumer.balance()
        proxy.delay_s = 0.3                         # each offer answered, three seconds in all
        with peer_polling(peer) as peer_read:
            assert eng.step() == 10
    assert len(offers(settings)) == 10 and not peer.owned and peer_read == []
    [lease] = eng.consumer.leases.leases()[0]
    assert lease.owner == "engine" and lease.checkpoint is not None
    eng.close()
    peer.close()


def test_a_budget_read_slower_than_the_lease_keeps_the_lease(aws_settings):
    """The budget gauge's read runs on the engine's loop, every 5 s: answered after longer than the
    lease (a hung one lasts botocore's three 10 s attempts), it let a peer take the shard."""
    settings = discount_settings(aws_settings)
    peer = consumer_for(settings, settings.predictions_stream, APP, worker_id="peer", lease_ms=1000)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        eng = _throttled_offers_engine(settings, proxy, lease_ms=1000)
        eng.consumer.balance()
        proxy.delay_s = 2.0
        with peer_polling(peer):
            eng._update_budget_gauge()
    assert not peer.owned and eng.consumer.owned
    eng.close()
    peer.close()


def test_offer_writes_stop_once_another_worker_took_the_shard(aws_settings):
    settings = discount_settings(aws_settings)
    publish(settings, [prediction("taken", 0.5)])
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        eng = _throttled_offers_engine(settings, proxy, lease_ms=3000)
        eng.consumer.balance()
        leases = eng.consumer.leases
        [row] = leases.leases()[0]
        leases.take(row, "peer", 60_000)                # taken over while the offer writes fail
        timer = _down_for(proxy, 4.0)
        try:
            assert eng.step() == 0                      # gave the batch up...
            assert proxy.down                           # ...while the writes still failed
        finally:
            timer.join()
    time.sleep(0.5)
    assert "taken" not in offers(settings) and not eng.consumer.owned
    [lease] = leases.leases()[0]
    assert lease.owner == "peer" and lease.checkpoint is None


def test_budget_caps_offers_per_hour(aws_settings):
    settings = discount_settings(aws_settings, budget_per_hour=3)
    now = [T0]
    publish(settings, [prediction(f"s{i}", 0.5) for i in range(8)])
    eng = engine(settings, clock=lambda: now[0])
    drain(eng, 8)
    assert len(offers(settings)) == 3
    assert count(eng, "offered") == 3 and count(eng, "budget_exhausted") == 5
    assert eng.offers.spent(T0) == 3
    # A new hour brings a new budget, and the sessions refused before can be served now.
    now[0] = T0 + 3600
    publish(settings, [prediction("s7", 0.5, clicked=now[0]), prediction("late", 0.5, clicked=now[0])])
    drain(eng, 2)
    assert {"s7", "late"} <= set(offers(settings)) and len(offers(settings)) == 5
    eng.close()


def test_a_prediction_for_a_click_older_than_the_max_age_gets_no_offer_nor_budget(aws_settings):
    """After an outage, or at a first start reading the stream from its start, predictions for visitors
    long gone spent the hour's budget."""
    settings = discount_settings(aws_settings, budget_per_hour=5, max_prediction_age_s=1800)
    publish(settings, [prediction(f"gone{i}", 0.5, clicked=T0 - 20 * 3600) for i in range(6)]
            # Collected just now, happened hours or days ago (an offline queue, a backfill): gone too.
            + [prediction(f"queued{i}", 0.5, clicked=T0 - hours * 3600, collected=T0 - 60)
               for i, hours in enumerate((5, 6 * 24))]
            + [prediction("here", 0.5, clicked=T0 - 1700)]
            # A device clock's fault (dtm sent in seconds: 1970): the scorer took the collector's time.
            + [prediction("reset-clock", 0.5, clicked=1_700_000.0, collected=T0 - 60)])
    eng = engine(settings)
    drain(eng, 10)
    assert set(offers(settings)) == {"here", "reset-clock"} and eng.offers.spent(T0) == 2
    assert count(eng, "stale") == 8 and count(eng, "offered") == 2
    eng.close()


def test_an_idle_engine_waits_until_its_shard_is_due_not_its_shorter_idle_sleep(aws_settings):
    """0.2 s behind the 0.25 s interval woke to a poll with no shard due, and slept again: the
    predictions shard was read every 0.4 s, and a quiet shop's prediction waited up to that long here."""
    settings = discount_settings(aws_settings)
    sleeps: list[float] = []
    consumer = consumer_for(settings, settings.predictions_stream, APP, read_interval_s=2.0, lease_ms=30_000)
    offers_ = OfferTable(aws.client("dynamodb"), settings.offers_table, budget_per_hour=5, discount_percent=10,
                         ttl_hours=24)
    eng = Engine(settings, consumer, offers_, Metrics(), stop=lambda: bool(sleeps), sleep=sleeps.append)
    try:
        eng.run(idle_sleep=0.05)
    finally:
        eng.close()
    assert len(sleeps) == 1 and 1.0 < sleeps[0] <= 2.0     # one empty poll, then until the shard's next read


def test_every_prediction_reads_its_age_since_collection_whatever_its_outcome(aws_settings):
    """The pipeline's time to act: the engine's clock minus the click's collector_tstamp. A click
    from an offline queue (collected now, happened days ago) is young: the pipeline was quick."""
    settings = discount_settings(aws_settings)
    publish(settings, [prediction("fresh", 0.5, clicked=T0 - 0.3),
                       prediction("queued", 0.5, clicked=T0 - 3 * 86400, collected=T0 - 0.3),   # stale
                       prediction("no-interest", 0.1, clicked=T0 - 2),
                       prediction("behind", 0.5, clicked=T0 - 45),
                       prediction("gone", 0.5, clicked=T0 - 3600),                              # stale
                       b"not a prediction"])
    eng = engine(settings)
    drain(eng, 6)
    sample = eng.metrics.registry.get_sample_value
    buckets = {le: sample("discount_prediction_age_seconds_bucket", {"le": le}) for le in ("0.25", "0.5", "2.5", "60.0", "+Inf")}
    assert buckets == {"0.25": 0, "0.5": 2, "2.5": 3, "60.0": 4, "+Inf": 5}
    assert sample("discount_prediction_age_seconds_sum") == pytest.approx(0.3 + 0.3 + 2 + 45 + 3600)
    assert count(eng, "stale") == 2 and count(eng, "invalid") == 1
    eng.close()


def test_restart_resumes_and_replay_makes_no_second_offer(aws_settings):
    settings = discount_settings(aws_settings, budget_per_hour=50)
    records = [prediction(f"r{i % 5}", 0.4 + i / 100) for i in range(15)]
    publish(settings, records)
    first = engine(settings)
    drain(first, 15)
    first.close()
    before = offers(settings)
    assert len(before) == 5

    restarted = engine(settings)              # same app: continues after the checkpoint
    assert sum(restarted.step() for _ in range(3)) == 0
    restarted.close()

    replay = engine(settings, clock=lambda: T0 + 60, app="discount-replay")   # reads everything again
    drain(replay, 15)
    assert count(replay, "offered") == 0 and count(replay, "already_offered") == 15
    assert offers(settings) == before
    assert replay.offers.spent(T0) == 5
    replay.close()


def test_an_offer_past_its_expiry_is_absent_though_dynamodb_still_holds_it(aws_settings):
    # DynamoDB deletes rows past their TTL only within about two days, and serves them until then.
    settings = discount_settings(aws_settings)
    table = engine(settings).offers
    assert table.offer(Prediction.from_record(prediction("old", 0.5)), now=T0) is Outcome.OFFERED
    expires = T0 + 24 * 3600
    assert table.get("old", now=expires - 1)["expires_at"] == int(expires)
    assert table.get("old", now=expires) is None and "old" in offers(settings)      # still in the table
    # Once expired it counts as no offer, as after DynamoDB's deletion: the session may get a new one.
    assert table.offer(Prediction.from_record(prediction("old", 0.6)), now=expires - 1) is Outcome.ALREADY_OFFERED
    assert table.offer(Prediction.from_record(prediction("old", 0.6)), now=expires) is Outcome.OFFERED
    assert table.get("old", now=expires)["p_buy"] == 0.6
    assert table.get("old") is None                  # by the wall clock (the default), T0 + 48 h is past


def test_the_engines_memory_of_offers_ends_when_the_tables_does(aws_settings):
    """The engine remembers an offer it made for as long as its row lives: a later prediction then
    finds the row expired, as the table does, and may get a new offer."""
    settings = discount_settings(aws_settings)
    now = [T0]
    eng = engine(settings, clock=lambda: now[0])
    assert eng.decide(json.dumps(prediction("kept", 0.5)).encode()) == "offered"
    now[0] = T0 + 24 * 3600 - 1
    assert eng.decide(json.dumps(prediction("kept", 0.55, clicked=now[0])).encode()) == "already_offered"
    now[0] = T0 + 24 * 3600
    assert eng.decide(json.dumps(prediction("kept", 0.6, clicked=now[0])).encode()) == "offered"   # the row expired
    assert offers(settings)["kept"]["p_buy"] == {"N": "0.6"}


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match="CLICKSTREAM_OFFER_THRESHOLD"):
        load(DiscountSettings, env={"CLICKSTREAM_OFFER_THRESHOLD": "high"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_OFFER_THRESHOLD"):
        load(DiscountSettings, env={"CLICKSTREAM_OFFER_THRESHOLD": "0.8", "CLICKSTREAM_OFFER_CEILING": "0.5"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_BUDGET_PER_HOUR"):
        load(DiscountSettings, env={"CLICKSTREAM_BUDGET_PER_HOUR": "0"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_DISCOUNT_PERCENT: expected at most 100"):
        load(DiscountSettings, env={"CLICKSTREAM_DISCOUNT_PERCENT": "150"})
    for bad in ("-1", "101"):
        with pytest.raises(ConfigError, match="CLICKSTREAM_HOLDOUT_PERCENT: expected a percentage within 0..100"):
            load(DiscountSettings, env={"CLICKSTREAM_HOLDOUT_PERCENT": bad})


def test_offer_ttl_shorter_than_the_predictions_retention_is_refused():
    # The offer row is what refuses a second offer: it must outlive the predictions a replay re-reads.
    with pytest.raises(ConfigError, match="CLICKSTREAM_OFFER_TTL_HOURS"):
        load(DiscountSettings, env={"CLICKSTREAM_OFFER_TTL_HOURS": "1"})
    assert load(DiscountSettings, env={"CLICKSTREAM_OFFER_TTL_HOURS": "24"}).offer_ttl_hours == 24


def consumer_example() -> str:
    """The code of "Writing your own consumer" in docs/discount-engine.md."""
    section = (ROOT / "docs" / "discount-engine.md").read_text(encoding="utf-8").split("## Writing your own consumer", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_consumer_example_runs_within_the_read_limit(aws_settings):
    settings = discount_settings(aws_settings)
    publish(settings, [prediction("a", 0.5), prediction("b", 0.5)])
    acted, deadline = [], time.monotonic() + 30

    class Stopping:                   # the example's `stopping`: true once both records were acted on
        def __bool__(self):
            return len(acted) >= 2 or time.monotonic() > deadline

    namespace = {"settings": settings, "stopping": Stopping(), "act_on": acted.append}
    exec(consumer_example(), namespace)   # noqa: S102 - the doc's own code, run as a reader would
    assert [record["session_id"] for record in acted] == ["a", "b"]
    assert namespace["consumer"].read_interval_s >= 0.2     # Kinesis allows 5 GetRecords/s per shard


def test_service_writes_offers_serves_metrics_and_stops_on_sigterm(aws_settings, tmp_path):
    port = free_port()
    env = {**os.environ, **settings_env(aws_settings), "CLICKSTREAM_METRICS_PORT": str(port),
           "CLICKSTREAM_MIN_EVENTS": "1"}
    with open(tmp_path / "discount.log", "wb") as log:     # the child keeps its own copy of the handle
        process = subprocess.Popen([sys.executable, "-m", "discount"], env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        now = time.time()                   # the service's own clock
        publish(aws_settings, [prediction("live-1", 0.45, clicked=now), prediction("live-1", 0.5, clicked=now),
                               prediction("live-2", 0.05, clicked=now)])
        deadline = time.monotonic() + 40
        while "live-1" not in offers(aws_settings):
            assert process.poll() is None, (tmp_path / "discount.log").read_text(encoding="utf-8")
            assert time.monotonic() < deadline, (tmp_path / "discount.log").read_text(encoding="utf-8")
            time.sleep(0.3)
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            if 'discount_predictions_total{outcome="below_threshold"} 1.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "discount_offers_total 1.0" in text
        assert 'discount_predictions_total{outcome="below_threshold"} 1.0' in text
        assert "discount_consumer_lag_ms" in text
        assert "process_start_time_seconds" in text          # a crash loop shows as its changes()
        assert set(offers(aws_settings)) == {"live-1"}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert code == 0, (tmp_path / "discount.log").read_text(encoding="utf-8")
    lines = [json.loads(line) for line in (tmp_path / "discount.log").read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    assert any(line.get("session_id") == "live-1" and line["msg"].startswith("offer made") for line in lines)



def test_kill_9_mid_write_twice_gives_each_qualifying_session_one_offer_and_one_budget_unit(aws_settings, tmp_path):
    # 200 sessions, three predictions each; only the third can qualify (min_events is 3), and a quarter
    # of the sessions stay below the threshold. Through a proxy that hangs one offer write, the service
    # is killed with an offer written but not acknowledged, then with one not written yet: no session
    # may lose its offer, get two, or be counted twice against the budget. A quarter of the sessions
    # are the control group: each that qualifies gets its holdout row instead, and spends no budget.
    now = time.time()                       # the service's own clock: the clicks must be fresh for it
    sessions = [f"crash-{i}" for i in range(200)]
    publish(aws_settings, [prediction(s, 0.1 if i % 4 == 0 else 0.6, events=1 + r, clicked=now)
                           for r in range(3) for i, s in enumerate(sessions)])
    qualifying = {s for i, s in enumerate(sessions) if i % 4}
    control = {s for s in qualifying if held_out(s, 25)}

    def start(proxy: FaultProxy, name: str) -> subprocess.Popen:
        env = {**os.environ, **settings_env(aws_settings), "AWS_ENDPOINT_URL": proxy.endpoint,
               "CLICKSTREAM_METRICS_PORT": "0", "CLICKSTREAM_BUDGET_PER_HOUR": "10000",
               "CLICKSTREAM_BATCH_LIMIT": "20", "CLICKSTREAM_READ_INTERVAL_S": "0.05", "CLICKSTREAM_LEASE_MS": "2000",
               "CLICKSTREAM_HOLDOUT_PERCENT": "25"}
        with open(tmp_path / name, "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "discount"], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)

    def kill_at_a_hung_offer_write(proxy: FaultProxy, name: str, when: str, after_offers: int) -> None:
        proxy.hanging.clear()
        process = start(proxy, name)
        try:
            wait_for(lambda: len(offers(aws_settings)) >= after_offers, timeout=60, interval=0.05)
            proxy.hang_next = ("DynamoDB_20120810.TransactWriteItems", when)
            wait_for(proxy.hanging.is_set, timeout=30, what=f"an offer write ({name})")
        finally:
            process.kill()
            process.wait(10)

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        kill_at_a_hung_offer_write(proxy, "first.log", "after", after_offers=20)
        kill_at_a_hung_offer_write(proxy, "second.log", "before", after_offers=60)
        assert len(offers(aws_settings)) < len(qualifying)
        last = start(proxy, "last.log")
        try:
            wait_for(lambda: set(decided(aws_settings)) == qualifying, timeout=60, what="every qualifying offer")
            last.send_signal(signal.SIGTERM)
            assert last.wait(20) == 0, (tmp_path / "last.log").read_text(encoding="utf-8")
        finally:
            last.kill()
    table = OfferTable(aws.client("dynamodb"), aws_settings.offers_table, budget_per_hour=10_000,
                       discount_percent=10, ttl_hours=24)
    hours = {hour_of(now), hour_of(time.time())}                      # the run may cross an hour
    assert sum(table.spent(dt.datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC).timestamp())
               for hour in hours) == len(qualifying - control)
    assert 20 < len(control) < 60 and {s for s, kind in decided(aws_settings).items() if kind == "holdout"} == control


def test_the_threshold_and_the_ceiling_themselves_get_offers():
    """docs/discount-engine.md: offer_threshold is the lowest p_buy that gets an offer, offer_ceiling the highest."""
    settings = DiscountSettings(offer_threshold=0.3, offer_ceiling=0.95, min_events=3)

    def reason(p_buy: float, events: int = 3):
        return skip_reason(settings, Prediction.from_record(prediction("edge", p_buy, events=events)))
    assert [reason(0.3), reason(0.95), reason(0.3, events=2)] == [None, None, "too_early"]
    assert [reason(0.299999), reason(0.950001)] == ["below_threshold", "above_ceiling"]
