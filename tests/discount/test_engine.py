"""The discount engine against the emulator: offers, one per session, budget, replay, the service."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from common import aws
from common.config import ConfigError, load
from common.consumer import consumer_for
from common.producer import Producer
from common.streams import KinesisStream
from discount.engine import APP, Engine
from discount.metrics import Metrics
from discount.offers import OfferTable, hour_of
from discount.settings import DiscountSettings
from localstack.emulator import free_port
from tests.conftest import ROOT, settings_env

T0 = 1_796_000_000.0          # a fixed clock, so every offer of a test falls in one budget hour


def prediction(session: str, p_buy: float, events: int = 5) -> dict:
    return {"session_id": session, "event_id": str(uuid.uuid4()), "collector_tstamp": "2026-11-29T10:00:00.000Z",
            "derived_tstamp": "2026-11-29T10:00:00.000Z", "scored_at": "2026-11-29T10:00:00.010Z",
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
                        discount_percent=settings.discount_percent, ttl_hours=settings.offer_ttl_hours)
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


def count(engine_: Engine, outcome: str) -> float:
    return engine_.metrics.registry.get_sample_value("discount_predictions_total", {"outcome": outcome}) or 0.0


def test_qualifying_sessions_get_exactly_one_offer(aws_settings):
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
    drain(eng, 9)
    made = offers(settings)
    assert set(made) == {"a", "c"}
    assert made["a"]["p_buy"]["N"] == "0.55" and made["c"]["p_buy"]["N"] == "0.52"
    assert int(made["a"]["expires_at"]["N"]) == int(T0) + 24 * 3600
    assert made["a"]["code"]["S"].startswith("SAVE10-") and made["a"]["model_version"]["S"] == "v7"
    assert eng.offers.get("c")["offer_id"] == made["c"]["offer_id"]["S"] and eng.offers.get("b") is None
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
    publish(settings, [prediction(f"budget#{hour_of(T0)}", 0.6), overflow.encode(), prediction("fine", 0.6)])
    eng = engine(settings)
    drain(eng, 3)
    assert count(eng, "invalid") == 2 and set(offers(settings)) == {"fine"}
    assert eng.offers.spent(T0) == 1
    eng.close()


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
    publish(settings, [prediction("s7", 0.5), prediction("late", 0.5)])
    drain(eng, 2)
    assert {"s7", "late"} <= set(offers(settings)) and len(offers(settings)) == 5
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


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match="CLICKSTREAM_OFFER_THRESHOLD"):
        load(DiscountSettings, env={"CLICKSTREAM_OFFER_THRESHOLD": "high"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_OFFER_THRESHOLD"):
        load(DiscountSettings, env={"CLICKSTREAM_OFFER_THRESHOLD": "0.8", "CLICKSTREAM_OFFER_CEILING": "0.5"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_BUDGET_PER_HOUR"):
        load(DiscountSettings, env={"CLICKSTREAM_BUDGET_PER_HOUR": "0"})
    with pytest.raises(ConfigError, match="CLICKSTREAM_DISCOUNT_PERCENT: expected at most 100"):
        load(DiscountSettings, env={"CLICKSTREAM_DISCOUNT_PERCENT": "150"})


def test_service_writes_offers_serves_metrics_and_stops_on_sigterm(aws_settings, tmp_path):
    port = free_port()
    env = {**os.environ, **settings_env(aws_settings), "CLICKSTREAM_METRICS_PORT": str(port),
           "CLICKSTREAM_MIN_EVENTS": "1"}
    with open(tmp_path / "discount.log", "wb") as log:     # the child keeps its own copy of the handle
        process = subprocess.Popen([sys.executable, "-m", "discount"], env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        publish(aws_settings, [prediction("live-1", 0.45), prediction("live-1", 0.5), prediction("live-2", 0.05)])
        deadline = time.monotonic() + 40
        while "live-1" not in offers(aws_settings):
            assert process.poll() is None, (tmp_path / "discount.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "discount.log").read_text()
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
        assert set(offers(aws_settings)) == {"live-1"}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert code == 0, (tmp_path / "discount.log").read_text()
    lines = [json.loads(line) for line in (tmp_path / "discount.log").read_text().splitlines() if line.startswith("{")]
    assert any(line.get("session_id") == "live-1" and line["msg"].startswith("offer made") for line in lines)
