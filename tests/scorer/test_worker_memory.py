"""The streaming worker over the in-memory stream: folding, policies, dedupe, restart, swaps."""
from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time

import numpy as np
import orjson
import pytest
from botocore.config import Config
from prometheus_client import REGISTRY

from common import aws
from common.consumer import Consumer, consumer_for
from common.features import SessionState, features, is_purchase, parse_ms, session_features, step
from common.leases import DynamoLeaseTable, MemoryLeaseTable
from common.producer import Producer
from common.registry import Bundle
from common.streams import KinesisStream, MemoryStream, hash_key
from infra.provision import ProvisionSettings, provision
from scorer.api import ScorerApp
from scorer.config import ScorerSettings
from scorer.model import Model, Models
from scorer.sink import PredictionWriter
from scorer.worker import Row, Worker, observe_ages
from tests.conftest import memory_grown_by, unique_settings, wait_for
from tests.faults import AnswersSlowly, FaultProxy, ThrottledFor
from tests.scorer.helpers import T0, WEIGHTS, iso, logistic_onnx, logistic_reference, model_meta, session_events
from tests.scorer.helpers import event as make_event


def model(version="v1", weights=None) -> Model:
    return Model.from_bundle(Bundle("m", version, logistic_onnx(weights), model_meta("m", version)))


class Rig:
    """A worker wired to memory streams and leases; predictions land in ``self.out``."""

    def __init__(self, events_stream=None, leases=None, lease_ms=10_000, models=None, **settings):
        self.stream = events_stream or MemoryStream("enriched", shard_count=2)
        self.leases = leases or MemoryLeaseTable()
        self.out = MemoryStream("predictions")
        self.models = models or Models(None, "bucket", "m")
        self.models.champion = self.models.champion or model()
        self.settings = ScorerSettings(**settings)
        writer = PredictionWriter(Producer(self.out), None, None, 3600)
        self.worker = Worker(self.settings, self.models, writer,
                             lambda **hooks: Consumer(self.stream, self.leases, lease_ms=lease_ms,
                                                      **hooks))

    def put(self, events):
        self.stream.put_records([(e["domain_sessionid"], orjson.dumps(e)) for e in events])

    def drain(self, rounds=50):
        for _ in range(rounds):
            idle = self.worker.poll_once() == 0 and not self.worker.pending_batches
            if idle and self.worker.poll_once() == 0:
                break
        self.worker.flush()

    def predictions(self):
        return [orjson.loads(r.data) for r in self.out.all_records()]

    def split_during(self, events, at: int, until: int, parent: str = "shardId-000000000000"):
        """Read ``events[:at]``, split ``parent`` (as a live reshard does), then read ``events[at:until]``."""
        self.put(events[:at])
        self.drain()
        self.stream.split(parent)
        self.put(events[at:until])
        self.drain()



def use_consumer(worker, stream, leases, **options) -> None:
    """Give the worker consumers with these options, from now on and after its restarts."""
    worker.make_consumer = lambda **hooks: Consumer(stream, leases, **options, **hooks)
    worker.consumer = worker.make_consumer(start_after=worker._start_after, on_lost=worker._on_lost)

def interleave(sessions):
    """Round-robin the sessions' events, as concurrent visitors would produce them."""
    out, longest = [], max(len(s) for s in sessions)
    for i in range(longest):
        out += [s[i] for s in sessions if i < len(s)]
    return out


def reference(events):
    """(event_id -> (p_buy, events_in_session)) from the plain fold, event by event."""
    state, expected = SessionState(), {}
    for event in events:
        step(state, event)
        if not is_purchase(event):
            expected[event["event_id"]] = (float(logistic_reference([features(state)])[0]), state.events)
    return expected


def test_every_event_of_every_session_is_scored_once_like_the_plain_fold():
    sessions = [session_events(f"s{i}", seed=i, n=12, buyer=i % 2 == 0) for i in range(6)]
    rig = Rig()
    rig.put(interleave(sessions))
    rig.drain()
    got = {p["event_id"]: p for p in rig.predictions()}
    assert len(got) == len(rig.predictions())
    for events in sessions:
        for event_id, (p, count) in reference(events).items():
            assert got[event_id]["p_buy"] == pytest.approx(p, abs=1e-5)
            assert got[event_id]["events_in_session"] == count
            assert got[event_id]["model_version"] == "v1"
            assert got[event_id]["schema"] == "iglu:com.clickstream/prediction/jsonschema/1-0-0"
            assert got[event_id]["decision"] == ("buy" if got[event_id]["p_buy"] >= 0.5 else "defer")
    purchases = [e["event_id"] for s in sessions for e in s if is_purchase(e)]
    assert purchases and not set(purchases) & set(got)


def test_the_decision_is_made_on_the_p_buy_published_not_on_the_unrounded_score():
    """docs/contracts.md: `decision` is `buy` when `p_buy` >= `threshold`, and p_buy is published to 6 decimals."""
    first = make_event("r", T0, path="/p/1")
    p = float(model().predict(np.asarray([features(step(SessionState(), first))], dtype=np.float32))[0])
    assert round(p, 6) != p
    threshold = (p + round(p, 6)) / 2               # the score and its rounding on either side of it
    models = Models(None, "bucket", "m")
    models.champion = Model.from_bundle(Bundle("m", "v1", logistic_onnx(), model_meta("m", "v1", threshold=threshold)))
    rig = Rig(models=models)
    rig.put([first])
    rig.drain()
    [published] = rig.predictions()
    assert published["p_buy"] == round(p, 6) and published["threshold"] == threshold
    assert published["decision"] == ("buy" if round(p, 6) >= threshold else "defer")


def test_predictions_waiting_for_the_stream_take_about_their_length_in_memory():
    """orjson's bytes hold a buffer of 4 KiB or more whatever their length: a poll's predictions,
    kept until the stream has them, took 8 KiB each (20x), and a fresh worker a page fault per
    prediction (a third of its speed)."""
    rig = Rig()
    rig.put(interleave([session_events(f"s{i}", seed=i, n=20) for i in range(100)]))
    _, grown = memory_grown_by(rig.drain)
    records = rig.out.all_records()
    payload = sum(len(record.data) for record in records)
    assert len(records) > 1500 and grown < 3 * payload, (grown, payload)


def test_redelivered_events_are_not_counted_twice():
    events = session_events("dup", seed=4, n=8, buyer=False)
    rig = Rig()
    rig.put(events[:5] + events[2:5] + events[5:])        # 3 events delivered twice
    rig.drain()
    predictions = rig.predictions()
    assert [p["event_id"] for p in predictions] == [e["event_id"] for e in events]
    assert predictions[-1]["events_in_session"] == 8
    assert rig.worker.store.get("dup").state.events == 8


def test_a_late_copy_of_an_ended_sessions_event_is_not_counted_in_the_next_session_under_its_id():
    """The ids seen went with the session that timed out: the copy was folded into the next one (4
    events, its counts and cart included), while training keeps each event id once."""
    first = [make_event("again", T0 + i * 10_000) for i in range(3)]
    second = [make_event("again", T0 + 3_600_000 + i * 10_000) for i in range(3)]     # the same id, an hour later
    rig = Rig()
    rig.put(first + second + [first[1]])
    rig.drain()
    assert rig.worker.store.get("again").state.events == 3
    assert [p["event_id"] for p in rig.predictions()] == [e["event_id"] for e in first + second]


@pytest.mark.parametrize("policy, n", [("change", 5), ("every_n", 3)])
def test_emit_policies(policy, n):
    events = session_events("pol", seed=11, n=14, buyer=True)
    expected = reference(events)
    rig = Rig(emit=policy, emit_every_n=n)
    rig.put(events)
    rig.drain()
    emitted = [p["event_id"] for p in rig.predictions()]
    decisions = [(eid, "buy" if p >= 0.5 else "defer") for eid, (p, _) in expected.items()]
    want, last, since = [], None, 0
    for eid, decision in decisions:
        since += 1
        if decision != last or (policy == "every_n" and since >= n):
            want.append(eid)
            since = 0
        last = decision
    assert emitted == want
    assert 1 < len(emitted) < len(decisions)


def folded(mode: str) -> float:
    return REGISTRY.get_sample_value("scorer_events_total", {"mode": mode}) or 0.0


def test_restart_rebuilds_live_sessions_quietly_and_continues_like_an_uninterrupted_run():
    sessions = [session_events(f"r{i}", seed=20 + i, n=12) for i in range(4)]
    first = interleave([s[:6] for s in sessions])
    second = interleave([s[6:] for s in sessions])
    leases = MemoryLeaseTable()
    stream = MemoryStream("enriched", shard_count=2)
    crashed = Rig(stream, leases, lease_ms=300)
    crashed.put(first)
    crashed.drain()
    emitted_before = {p["event_id"] for p in crashed.predictions()}
    counted_before = {mode: folded(mode) for mode in ("live", "replay")}
    # The first worker dies without a clean close. The next one, just started, takes its leases once it
    # has seen them unrenewed for a lease period, and replays.
    crashed.put(second)
    restarted = Rig(stream, leases, lease_ms=300)

    def took_over():
        restarted.worker.poll_once()
        return len(restarted.worker.consumer.owned) == 2

    wait_for(took_over, 5, interval=0.02, what="the takeover")
    restarted.drain()
    after = restarted.predictions()
    assert {p["event_id"] for p in after}.isdisjoint(emitted_before)
    assert {mode: folded(mode) - counted_before[mode] for mode in counted_before} == \
        {"live": len(second), "replay": len(first)}
    got = {p["event_id"]: p for p in after}
    for events in sessions:
        expected = reference(events)
        for event in events[6:]:
            if event["event_id"] in expected:
                p, count = expected[event["event_id"]]
                assert got[event["event_id"]]["p_buy"] == pytest.approx(p, abs=1e-5)
                assert got[event["event_id"]]["events_in_session"] == count
        live = restarted.worker.store.get(events[0]["domain_sessionid"]).state
        assert features(live) == session_features(events)[-1]


def test_a_model_swap_lands_between_batches_and_each_prediction_names_its_model():
    events = interleave([session_events(f"h{i}", seed=40 + i, n=10, buyer=False) for i in range(4)])
    rig = Rig()
    rig.put(events[:20])
    rig.drain()
    heavy = {**WEIGHTS, "events": 0.4}
    rig.models.champion = model("v2", heavy)
    rig.put(events[20:])
    rig.drain()
    predictions = rig.predictions()
    assert sorted(p["event_id"] for p in predictions) == sorted(e["event_id"] for e in events)
    assert {p["model_version"] for p in predictions[:20]} == {"v1"}
    assert {p["model_version"] for p in predictions[20:]} == {"v2"}
    by_session: dict[str, SessionState] = {}
    for event in events:
        state = by_session.setdefault(event["domain_sessionid"], SessionState())
        step(state, event)
        p = next(x for x in predictions if x["event_id"] == event["event_id"])
        weights = WEIGHTS if p["model_version"] == "v1" else heavy
        assert p["p_buy"] == pytest.approx(float(logistic_reference([features(state)], weights)[0]), abs=1e-5)


def test_a_micro_batch_is_folded_and_scored_without_a_garbage_collection_and_the_collector_comes_back():
    rig = Rig(flush_ms=3_600_000)
    rig.put(interleave([session_events(f"g{i}", seed=i, n=20, buyer=False) for i in range(60)]))
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        assert rig.worker.poll_once() == 1200 and rig.worker.pending_count == 1200
    finally:
        gc.callbacks.remove(count)
    # At most one, once the batch has ended and the collector is back; without the pause it runs ~10
    # times while the 1,200 events are folded and scored.
    assert len(collections) <= 1 and gc.isenabled()

    def fail(inputs):
        raise RuntimeError("scoring broke")

    rig.models.champion.predict = fail
    rig.put(session_events("late", seed=1, n=2, buyer=False))
    with pytest.raises(RuntimeError):
        rig.worker.poll_once()
    assert gc.isenabled()


def test_the_api_reads_a_live_session_between_two_batches_never_half_way_through_one():
    rig = Rig(batch_limit=500)
    paths = ["/", "/c/shoes", "/p/SH-0001", "/search", "/cart", "/about"]
    rig.put([make_event("S", T0 + i * 100, path=paths[i % len(paths)]) for i in range(20_000)])
    app = ScorerApp(rig.models, worker=rig.worker)
    done = threading.Event()

    def work():
        while rig.worker.poll_once():
            pass
        done.set()

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads as often as possible: mid-step reads if unguarded
    try:
        threading.Thread(target=work, daemon=True).start()
        torn = reads = 0
        while not done.is_set():
            response = app.session_features("S")
            if response.status != 200:
                continue
            body = orjson.loads(response.body)
            values = body["features"]
            reads += 1
            pages = sum(value for name, value in values.items() if name.startswith("pages_"))
            torn += body["events_in_session"] != values["events"] or pages != values["page_views"]
    finally:
        sys.setswitchinterval(switching)
    assert reads and torn == 0


def test_ping_fails_once_the_worker_thread_has_ended_so_the_process_is_replaced():
    # It kept answering 200 with a model loaded: a scorer that no longer read the stream looked healthy.
    rig = Rig()
    app = ScorerApp(rig.models, worker=rig.worker)
    stop = threading.Event()
    thread = threading.Thread(target=rig.worker.run, args=(stop.is_set,), daemon=True)
    thread.start()
    wait_for(lambda: rig.worker.running, 10, what="the worker")
    assert app.ping({}, b"").status == 200
    assert REGISTRY.get_sample_value("scorer_worker_running") == 1
    stop.set()
    thread.join(10)
    assert app.ping({}, b"").status == 503 and b"worker is not running" in app.ping({}, b"").body
    # An orchestrator that ignores /ping sees it in the metrics: the lag and checkpoint gauges read 0 now.
    assert REGISTRY.get_sample_value("scorer_worker_running") == 0


def test_batch_time_is_recorded_when_light_traffic_is_flushed_by_an_empty_poll():
    # It was observed only for a flush on a poll that read records: at a few events a second every
    # flush came from the next, empty poll, and scorer_batch_seconds stayed empty.
    rig = Rig(flush_ms=3_600_000)
    before = REGISTRY.get_sample_value("scorer_batch_seconds_count") or 0
    rig.put(session_events("light", seed=5, n=3, buyer=False))
    assert rig.worker.poll_once() == 3 and rig.worker.pending_batches    # buffered
    assert rig.worker.poll_once() == 0 and not rig.worker.pending_batches  # flushed by the empty poll
    assert REGISTRY.get_sample_value("scorer_batch_seconds_count") == before + 1
    assert rig.worker.poll_once() == 0                                      # nothing buffered: no sample
    assert REGISTRY.get_sample_value("scorer_batch_seconds_count") == before + 1


def test_a_record_that_is_not_an_event_is_reported_and_skipped_not_fatal(caplog, monkeypatch):
    import scorer.worker

    rig = Rig()
    odd = make_event("odd", T0, shop="checkout_step", data=["not", "an", "object"])    # read as a step of none
    failing = make_event("failing", T0)
    fold = scorer.worker.step

    def step(state, event, at_ms=None):         # whatever else the fold could fail on, a bug say
        if event["event_id"] == failing["event_id"]:
            raise RuntimeError("a bug")
        return fold(state, event, at_ms)

    monkeypatch.setattr(scorer.worker, "step", step)
    rig.stream.put_records([("k", b"{not json"), ("k", b"[1, 2]"), ("odd", orjson.dumps(odd)),
                            ("failing", orjson.dumps(failing))])
    rig.put(session_events("ok", seed=3, n=3, buyer=False))
    rig.drain()
    assert sorted(p["session_id"] for p in rig.predictions()) == ["odd", "ok", "ok", "ok"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("not JSON" in m for m in errors) and any("expected a JSON object" in m for m in errors)
    assert any(failing["event_id"] in m and "could not be folded" in m for m in errors)


def test_records_with_ids_or_times_the_fold_cannot_take_are_skipped_not_replayed_for_ever(caplog):
    poison = [make_event("p1", T0, event_id=["a", "list"]), make_event({"an": "object"}, T0),
              make_event("p3", T0, collector_tstamp=1e20, derived_tstamp=None),
              make_event("p4", T0, derived_tstamp=1e200),          # clamped to its collector time: fine
              make_event("p5", T0 - 1000), make_event("p6", T0, derived_tstamp=T0 - 5000)]      # epoch ms: fine
    poison[-2]["collector_tstamp"] = poison[-2]["collector_tstamp"][:11] + "99" + poison[-2]["collector_tstamp"][13:]
    rig = Rig()
    rig.stream.put_records([("k", orjson.dumps(e)) for e in poison])
    rig.put(session_events("ok", seed=3, n=3, buyer=False))
    rig.drain()
    assert sorted(p["session_id"] for p in rig.predictions()) == ["ok", "ok", "ok", "p4", "p6"]
    # Their times as the contract has them, ISO: 1e200 went to the predictions table as a number,
    # which DynamoDB refuses past 1e125, and its write was retried for ever.
    published = {p["session_id"]: (p["collector_tstamp"], p["derived_tstamp"]) for p in rig.predictions()}
    assert published["p4"] == (iso(T0), None) and published["p6"] == (iso(T0), iso(T0 - 5000))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 4 and all("skipped" in m for m in errors) and "bad collector_tstamp" in errors[-1]


def test_an_event_dated_decades_ahead_does_not_expire_the_other_sessions_of_its_shard():
    """A tracker may send any true timestamp (ttm): event time never passes the collector's, so
    the shard's replay start stays before alice's session too."""
    stream = MemoryStream("enriched", shard_count=1)
    rig = Rig(stream, session_timeout_s=1800)
    rig.put(session_events("alice", seed=1, n=5, buyer=False))
    rig.put([make_event("mallory", T0 + 60_000, derived_tstamp="2096-10-02T07:06:40.000Z")])
    rig.drain()
    assert rig.leases.leases()[0][0].meta["state_after"] == "TRIM_HORIZON"       # from alice's first record
    rig.put([make_event("alice", T0 + 400_000)])
    rig.drain()
    alice = [p for p in rig.predictions() if p["session_id"] == "alice"]
    assert [p["events_in_session"] for p in alice] == [1, 2, 3, 4, 5, 6]


def test_absurd_numbers_and_events_after_a_purchase_do_not_stall_or_reach_the_engine():
    huge = [make_event("huge", T0 + i, shop="add_to_cart", data={"sku": "X", "price": 1e39, "quantity": 1.7e308})
            for i in range(2)]
    bought = session_events("bought", seed=0, n=12, buyer=True)
    after = make_event("bought", parse_ms(bought[-1]["derived_tstamp"]) + 1000, path="/thanks")
    rig = Rig()
    rig.put(huge + bought + [after])
    rig.put(session_events("later", seed=5, n=3, buyer=False))
    rig.drain()
    got = {p["event_id"]: p for p in rig.predictions()}
    assert all(0.0 <= got[e["event_id"]]["p_buy"] <= 1.0 for e in huge)
    assert after["event_id"] not in got and len([p for p in got.values() if p["session_id"] == "later"]) == 3


def test_a_quiet_replay_never_moves_the_checkpoint_back():
    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    first = Rig(stream, leases)
    first.put(interleave([session_events(f"q{i}", seed=i, n=12, buyer=False) for i in range(6)]))
    first.drain()
    first.worker.close()                                   # a clean stop: the lease is free at once
    emitted = leases.leases()[0][0].checkpoint
    second = Rig(stream, leases, flush_ms=0)
    second.worker.consumer.batch_limit = 10                # replay in several batches, flushing between them
    second.worker.poll_once()
    second.worker.poll_once()
    assert second.worker.replay_until and leases.leases()[0][0].checkpoint == emitted


def test_the_table_row_carries_the_sessions_latest_time_so_an_earlier_stamped_later_event_still_lands():
    events = session_events("late", seed=2, n=4, buyer=False)
    late = make_event("late", parse_ms(events[-1]["derived_tstamp"]) - 5_000, path="/tab2")
    rig = Rig(flush_ms=3_600_000)
    rig.put(events + [late])
    rig.worker.poll_once()
    [(prediction, table_ms)] = rig.worker.pending[next(iter(rig.worker.pending))][-1:]
    assert prediction["event_id"] == late["event_id"] and table_ms == parse_ms(events[-1]["derived_tstamp"])


def test_a_stop_ends_a_flush_whose_writes_keep_failing():
    rig = Rig(flush_ms=0)
    rig.out.fail_next = 10**9                              # the predictions stream refuses everything
    rig.put(session_events("stuck", seed=1, n=3, buyer=False))
    stop_at = time.monotonic() + 1.0
    runner = threading.Thread(target=rig.worker.run, args=(lambda: time.monotonic() > stop_at,), daemon=True)
    runner.start()
    runner.join(60)                                        # a liveness bound, not a speed target
    assert not runner.is_alive(), "run() kept retrying the flush after the stop"
    assert rig.worker.pending_count == 3 and not rig.predictions()   # kept for the next owner, not dropped


def test_a_quiet_shard_does_not_hold_up_expiry_and_the_replay_start_of_the_others():
    from scorer.sessions import SessionStore

    store = SessionStore(timeout_ms=60_000, max_sessions=100, dedupe_window=8)

    def seen(session_id, shard, at_ms, start_after):
        store.session_for(session_id, shard, at_ms, at_ms, start_after).state.seen_ms = at_ms

    seen("quiet", "shard-A", 0, None)                       # the least recently seen of all, and live on A
    for i in range(5):
        seen(f"old{i}", "shard-B", 1000 * i, str(i))
    seen("now", "shard-B", 10**7, "9")                      # B's event time moves hours ahead
    assert store.sweep() == 5
    assert store.get("quiet") and store.state_after("shard-B", None) == "9"



def test_an_event_exactly_the_timeout_after_the_last_one_continues_the_session_as_in_training():
    """Training starts a new session only after more than session_gap_minutes (train_features.sessionise)."""
    from scorer.sessions import SessionStore

    store = SessionStore(timeout_ms=1_800_000, max_sessions=100, dedupe_window=8, clock=lambda: T0 / 1000)
    first = store.session_for("s", "shard-A", T0 - 1_800_000, T0 - 1_800_000, "1")
    first.state.seen_ms = T0 - 1_800_000
    assert store.session_for("s", "shard-A", T0, T0, "2") is first
    first.state.seen_ms = T0
    assert store.session_for("s", "shard-A", T0 + 1_800_001, T0 + 1_800_001, "3") is not first


def test_a_session_that_happened_days_ago_but_arrived_now_is_replayed_whole_after_a_restart():
    """The replay start skipped sessions that began over replay_max_s before the shard's watermark by
    event time: a session from an offline queue or a backfill was rebuilt from the middle after a
    restart, with wrong counts, and scored again after its purchase."""
    from scorer.sessions import SessionStore

    now_ms = T0 + 3 * 86_400_000
    store = SessionStore(timeout_ms=1_800_000, max_sessions=100, dedupe_window=8, replay_max_ms=7_200_000,
                         clock=lambda: now_ms / 1000)
    store.session_for("offline", "shard-A", T0, now_ms - 60_000, "1").state.start_ms = T0   # 3 days old, sent now
    store.session_for("live", "shard-A", now_ms - 30_000, now_ms - 30_000, "2").state.start_ms = now_ms - 30_000
    assert store.state_after("shard-A", None) == "1"
    store.session_for("kiosk", "shard-B", T0, T0, "5").state.start_ms = T0                   # collected days ago
    store.session_for("visitor", "shard-B", now_ms, now_ms, "9").state.start_ms = now_ms
    assert store.state_after("shard-B", None) == "9"


def test_one_event_stamped_in_the_future_does_not_end_the_live_sessions_of_its_shard():
    from scorer.sessions import SessionStore

    now_ms = T0 + 3_600_000
    store = SessionStore(timeout_ms=1_800_000, max_sessions=100, dedupe_window=8, clock=lambda: now_ms / 1000)

    def seen(session_id, at_ms):
        store.session_for(session_id, "shard-A", at_ms, at_ms, None).state.seen_ms = at_ms

    seen("browsing", now_ms - 60_000)
    seen("skewed", now_ms + 2 * 3_600_000)                 # a collector clock two hours ahead
    assert store.sweep() == 0 and store.get("browsing")
    assert store.watermark_ms["shard-A"] == now_ms + 300_000           # at most 5 min ahead of our clock
    seen("late", now_ms + 3_600_000)                       # our own clock has not moved: still capped
    assert store.get("browsing") and store.watermark_ms["shard-A"] == now_ms + 300_000

def test_a_session_that_never_idles_does_not_pin_the_replay_start_for_ever():
    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    rig = Rig(stream, leases, replay_max_s=3600)
    kiosk = [make_event("kiosk", T0 + i * 600_000) for i in range(2 * 6 * 24)]       # every 10 min for 2 days
    rig.put(kiosk[:-1])
    rig.put(session_events("visitor", seed=4, n=3, buyer=False, start_ms=T0 + 285 * 600_000))
    rig.put(kiosk[-1:])
    rig.drain()
    [lease] = leases.leases()[0]
    first_visitor_record = 2 * 6 * 24                  # sequence numbers of the memory stream count from 1
    assert lease.meta["state_after"] == str(first_visitor_record - 1)
    assert rig.worker.store.get("kiosk").state.events == 2 * 6 * 24                  # live, as scored


def test_sessions_expire_by_event_time_and_memory_is_capped():
    rig = Rig(session_timeout_s=60, max_sessions=3)
    old = session_events("old", seed=1, n=3, buyer=False)
    rig.put(old)
    rig.drain()
    later = session_events("old", seed=2, n=2, buyer=False, start_ms=T0 + 500_000)
    rig.put(later)
    rig.drain()
    # A gap longer than the timeout starts a new session under the same id.
    assert rig.worker.store.get("old").state.events == 2
    assert rig.predictions()[-1]["events_in_session"] == 2
    rig.put([e for i in range(5) for e in session_events(f"many{i}", seed=50 + i, n=1, start_ms=T0 + 600_000 + i)])
    rig.drain()
    assert len(rig.worker.store) == 3
    assert rig.worker.store.get("many4") is not None and rig.worker.store.get("many0") is None


def test_sessions_left_on_a_shard_closed_by_a_reshard_expire_and_those_that_go_on_keep_their_state():
    rig = Rig(events_stream=MemoryStream("enriched", shard_count=1), session_timeout_s=1800)
    rig.put([make_event(f"old{i}", T0 + k * 60_000) for k in range(3) for i in range(40)])
    rig.drain()
    rig.stream.split("shardId-000000000000")
    later = T0 + 3_600_000                      # an hour on: past the timeout of every old session
    rig.put([make_event("old0", T0 + 10 * 60_000)] + [make_event(f"new{i}", later) for i in range(10)])
    rig.drain()
    rig.put([make_event("new0", later + 60_000)])
    rig.drain()
    store = rig.worker.store
    assert sorted(store.sessions) == [f"new{i}" for i in range(10)]
    assert "shardId-000000000000" not in store.recent | store.by_shard | store.watermark_ms
    continued = [p for p in rig.predictions() if p["session_id"] == "old0"]
    assert [p["events_in_session"] for p in continued] == [1, 2, 3, 4]    # it went on on a child, state kept


def test_a_session_going_on_on_a_child_shard_read_behind_its_sibling_keeps_its_state():
    def ids(on_low_child: bool, n: int) -> list[str]:      # session ids by the child they hash to
        found = (f"c{i}" for i in range(10_000))
        return [name for name in found if (hash_key(name) < 2**127) == on_low_child][:n]

    x, *dense = ids(False, 41)
    sparse = ids(True, 40)
    rig = Rig(events_stream=MemoryStream("enriched", shard_count=1), flush_ms=1)
    worker = rig.worker                 # pages of 20 records, as a reader catching up sees them
    use_consumer(worker, rig.stream, rig.leases, lease_ms=10_000, batch_limit=20)
    rig.put([make_event(x, T0)])
    rig.drain()
    rig.stream.split("shardId-000000000000")
    minute = 60_000        # the sparse child's time runs an hour ahead while the dense one is read
    rig.put([make_event(sparse[i], T0 + minute + i * 90_000) for i in range(40)]
            + [make_event(dense[i % 40], T0 + minute + i * 2_700) for i in range(200)]
            + [make_event(x, T0 + 10 * minute)])
    rig.drain()
    assert [p["events_in_session"] for p in rig.predictions() if p["session_id"] == x] == [1, 2]


def two_scorers(stream: MemoryStream, leases: MemoryLeaseTable) -> tuple[Rig, Rig]:
    """Two workers on one stream and lease table with short leases, writing one predictions stream,
    both seeing a reshard's children soon after it."""
    a = Rig(stream, leases, lease_ms=600, flush_ms=1)
    b = Rig(stream, leases, lease_ms=600, flush_ms=1)
    b.out, b.worker.writer = a.out, a.worker.writer
    for worker in (a.worker, b.worker):
        use_consumer(worker, stream, leases, lease_ms=600, shard_refresh_s=0.1)
    return a, b


def test_a_worker_taking_a_child_shard_rebuilds_the_sessions_its_peer_read_on_the_parent():
    # Two scorers, a live split: the one taking a child it never read started every session that
    # began on the parent from nothing (wrong scores; a session that had bought was scored again).
    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    a, b = two_scorers(stream, leases)
    sessions = [session_events(f"s{i}", seed=100 + i, n=14, buyer=False) for i in range(8)]
    # Two sessions that bought before the split, one on each child.
    buyers = [next(f"paid{i}" for i in range(1000) if (hash_key(f"paid{i}") < 2**127) == low) for low in (True, False)]
    bought = [[make_event(sid, T0, path="/p/1"), make_event(sid, T0 + 60_000, shop="purchase",
                                                            data={"order_id": "o", "total": 5.0, "items": 1})]
              for sid in buyers]
    a.put([e for events in sessions for e in events[:9]] + [e for events in bought for e in events])
    a.drain()
    b.drain()
    stream.split("shardId-000000000000")
    a.put([e for events in sessions for e in events[9:]] + [make_event(sid, T0 + 120_000, path="/p/2") for sid in buyers])
    owners = {}
    for _ in range(200):
        a.drain()
        b.drain()
        owners = {lease.shard_id: lease.owner for lease in leases.leases()[0] if lease.checkpoint != "SHARD_END"}
        if len(a.predictions()) >= 8 * 14 + 2 and len(set(owners.values())) == 2:
            break
        time.sleep(0.02)
    assert len(set(owners.values())) == 2                    # each worker reads one child
    got = {p["event_id"]: p for p in a.predictions()}
    for events in sessions:
        for event_id, (p_buy, count) in reference(events).items():
            assert got[event_id]["events_in_session"] == count
            assert got[event_id]["p_buy"] == pytest.approx(p_buy, abs=1e-5)
    scored_buyers = [p["event_id"] for p in a.predictions() if p["session_id"] in buyers]
    assert scored_buyers == [events[0]["event_id"] for events in bought]      # not again after the purchase
    # b rebuilt only the sessions of its own child, none of a's (a, which read the parent, holds all).
    [child] = [shard for shard in stream.list_shards() if owners.get(shard.shard_id) == b.worker.consumer.worker_id]
    assert b.worker.store.sessions and all(child.takes(session_id) for session_id in b.worker.store.sessions)


def test_a_worker_that_read_the_parent_rebuilds_a_session_it_let_expire_when_it_takes_the_peers_child():
    # It skipped the rebuild while it held any of the parent's sessions: X, expired from its store by
    # its own child's time while X went on on the peer's child, lost its events read on the parent.
    minute = 60_000
    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    a, b = two_scorers(stream, leases)
    names = [f"s{i}" for i in range(1000)]
    x, y = [name for name in names if hash_key(name) < 2**127][:2]
    w = next(name for name in names if hash_key(name) >= 2**127)
    a.put([make_event(x, T0), make_event(y, T0 + 20 * minute)])
    a.drain()                                       # a reads the parent
    stream.split("shardId-000000000000")
    for rig in (a, a, b, a):                        # a finishes it and takes both children; b steals one
        time.sleep(0.3)
        rig.drain()
    assert {lease.owner for lease in leases.leases()[0] if lease.checkpoint != "SHARD_END"} == {
        a.worker.consumer.worker_id, b.worker.consumer.worker_id}
    a.put([make_event(x, T0 + 25 * minute), make_event(w, T0 + 36 * minute)])   # past timeout and grace
    time.sleep(0.3)
    b.drain()
    a.drain()
    assert a.worker.store.get(x) is None and a.worker.store.get(y) is not None
    b.worker.stopping = True
    b.worker.close()                                # b goes away: a takes its child
    a.put([make_event(x, T0 + 40 * minute)])
    for _ in range(2):
        time.sleep(0.3)
        a.drain()
    assert [p["events_in_session"] for p in a.predictions() if p["session_id"] == x] == [1, 2, 3]


def test_the_parent_is_not_read_again_by_its_reader_nor_after_a_restart_long_after_the_reshard(caplog):
    hour = 3_600_000
    rig = Rig(events_stream=MemoryStream("enriched", shard_count=1), flush_ms=1)
    with caplog.at_level(logging.INFO, logger="scorer.worker"):
        rig.put([make_event(f"old{i}", T0 + i) for i in range(50)])
        rig.drain()
        rig.stream.split("shardId-000000000000")
        rig.drain()                             # it read the parent itself: it holds all its sessions
        rig.put([make_event(f"new{i}", T0 + 10 * hour + i) for i in range(50)])    # the children go on
        rig.drain()
        rig.worker.restart()
        rig.drain()
    # After the restart every session of the parent had ended hours before the children's checkpoints.
    assert not [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert sorted(rig.worker.store.sessions) == sorted(f"new{i}" for i in range(50))


def test_a_restart_right_after_a_reshard_rebuilds_the_part_of_a_session_read_on_the_parent():
    rig = Rig(events_stream=MemoryStream("enriched", shard_count=1), flush_ms=1)
    events = session_events("x", seed=3, n=10, buyer=False)
    rig.put(events[:5])
    rig.drain()
    rig.stream.split("shardId-000000000000")
    rig.put(events[5:8])
    rig.drain()
    rig.worker.restart()                   # an error mid-batch, or a new process: sessions from checkpoints
    rig.put(events[8:])
    rig.drain()
    assert [p["events_in_session"] for p in rig.predictions()] == list(range(1, 11))


def test_a_shard_read_to_its_end_leaves_no_position_behind_and_its_row_goes_once_it_ages_out(caplog):
    # A reshard a day left one entry in ``positions`` and one lease row for ever per closed shard.
    parent, children = "shardId-000000000000", {"shardId-000000000001", "shardId-000000000002"}
    rig = Rig(events_stream=MemoryStream("enriched", shard_count=1), flush_ms=1)
    worker = rig.worker
    use_consumer(worker, rig.stream, rig.leases, shard_refresh_s=0)
    events = session_events("x", seed=3, n=10, buyer=False)
    rig.split_during(events, 5, 8)
    assert set(worker.positions) == children
    rig.stream.age_out(parent)
    worker.consumer.balance()                   # as poll() does every lease_ms / 3
    rig.put(events[8:])
    with caplog.at_level(logging.INFO, logger="scorer.worker"):
        rig.drain()
    assert {lease.shard_id for lease in rig.leases.leases()[0]} == children and set(worker.positions) == children
    assert [p["events_in_session"] for p in rig.predictions()] == list(range(1, 11))
    assert not [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]


class ParentReadsFail(MemoryStream):
    """A stream whose next ``failures`` page reads of ``shard`` raise after its first page (throttling)."""

    def __init__(self, shard: str):
        super().__init__("enriched", shard_count=1)
        self.shard, self.failures, self.pages = shard, 0, 0

    def reader(self, shard_id, after_sequence):
        inner = super().reader(shard_id, after_sequence)
        if shard_id != self.shard:
            return inner
        stream = self

        class Reader:
            def read(self, limit):
                stream.pages += 1
                if stream.pages > 1 and stream.failures > 0:
                    stream.failures -= 1
                    raise ConnectionError("throttled")
                return inner.read(limit)
        return Reader()


def test_a_parent_rebuild_whose_reads_fail_reads_again_after_its_last_record(caplog):
    parent = "shardId-000000000000"
    rig = Rig(events_stream=ParentReadsFail(parent), lease_ms=300, flush_ms=1)
    worker = rig.worker                             # pages of 4 records: the failures fall mid-shard
    use_consumer(worker, rig.stream, rig.leases, lease_ms=300, batch_limit=4)
    events = session_events("x", seed=3, n=14, buyer=False)
    rig.split_during(events, 10, 12)
    rig.stream.failures, rig.stream.pages = 2, 0
    worker.restart()
    rig.put(events[12:])
    with caplog.at_level(logging.WARNING, logger="scorer.worker"):
        rig.drain()
    assert [p["events_in_session"] for p in rig.predictions()] == list(range(1, 15))
    assert rig.stream.failures == 0 and sum("reading closed shard" in r.getMessage() for r in caplog.records) == 2


def test_browsing_on_after_a_purchase_stays_the_bought_session_and_is_not_scored():
    """Checkout, the purchase 20 minutes later, the next page 20 minutes after that: 40 minutes after
    the last scored event, but never 30 without activity, so the session (and training's) goes on."""
    rig = Rig(session_timeout_s=1800)
    minute = 60_000
    events = [make_event("paid", T0, path="/checkout"),
              make_event("paid", T0 + minute, shop="checkout_step", data={"step": 3}),
              make_event("paid", T0 + 21 * minute, shop="purchase", data={"order_id": "o1", "total": 9.0}),
              make_event("paid", T0 + 41 * minute, path="/"), make_event("paid", T0 + 42 * minute, path="/p/1")]
    rig.put(events)
    rig.drain()
    assert [p["event_id"] for p in rig.predictions()] == [e["event_id"] for e in events[:2]]
    assert rig.worker.store.get("paid").state.purchased


def test_a_purchase_marks_the_sessions_row_once_and_a_quiet_replay_does_not_mark_it_again(aws_endpoint):
    """The discount engine reads the mark: no offer on a prediction it reads after the purchase."""
    settings = unique_settings(ProvisionSettings)
    provision(settings)
    dynamodb = aws.client("dynamodb")
    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    bought = session_events("bought", seed=0, n=12, buyer=True)
    after = make_event("bought", parse_ms(bought[-1]["derived_tstamp"]) + 1000, path="/thanks")
    browsing = session_events("browsing", seed=3, n=6, buyer=False)
    first = Rig(stream, leases, flush_ms=3_600_000)
    first.worker.writer = PredictionWriter(Producer(first.out), dynamodb, settings.predictions_table, 3600)
    first.put(interleave([bought + [after], browsing]))
    assert first.worker.poll_once() == len(bought) + 1 + len(browsing)        # one batch, not yet written
    [[session]] = first.worker.pending_bought.values()                     # once, not again after the purchase
    assert session.session_id == "bought"
    last_ms = parse_ms(after["derived_tstamp"])            # the row's time: the batch's last event of the session
    first.worker.flush()
    first.worker.close()
    rows = {item["session_id"]["S"]: item for item in dynamodb.scan(TableName=settings.predictions_table)["Items"]}
    assert rows["bought"]["bought_ms"] == {"N": str(last_ms)} and "bought_ms" not in rows["browsing"]
    second = Rig(stream, leases, flush_ms=3_600_000)            # rebuilds the sessions from the stream, quietly
    for _ in range(3):
        second.worker.poll_once()
        assert second.worker.pending_bought == {}
    assert second.worker.store.get("bought").state.purchased and second.predictions() == []


def test_a_model_trained_on_another_session_gap_is_warned_about_once(caplog):
    gap_45 = Model.from_bundle(Bundle("m", "v45", logistic_onnx(), model_meta("m", "v45", session_gap_s=2700)))
    rig = Rig(models=Models(None, "bucket", "m"), session_timeout_s=1800)
    rig.models.champion = gap_45
    for seed in (1, 2):
        rig.put(session_events(f"s{seed}", seed=seed, n=3, buyer=False))
        with caplog.at_level("WARNING", logger="scorer.worker"):
            rig.drain()
    warnings = [r.getMessage() for r in caplog.records if "session_timeout_s" in r.getMessage()]
    assert len(warnings) == 1 and "v45" in warnings[0] and "2700 s" in warnings[0] and "is 1800" in warnings[0]
    caplog.clear()
    rig.models.champion = model("v30", None)
    rig.models.champion.meta["session_gap_s"] = 1800
    rig.put(session_events("s3", seed=3, n=3, buyer=False))
    with caplog.at_level("WARNING", logger="scorer.worker"):
        rig.drain()
    assert not [r for r in caplog.records if "session_timeout_s" in r.getMessage()]


def test_a_shadow_model_is_scored_and_logged_but_the_champion_decides(caplog, monkeypatch):
    monkeypatch.setattr("scorer.worker.SHADOW_SUMMARY_S", 0.0)        # a summary line per batch, to check them
    rig = Rig()
    rig.models.shadow = model("challenger", {**WEIGHTS, "events": 1.0})
    events = session_events("shadow", seed=77, n=8, buyer=False)
    rig.put(events)
    with caplog.at_level("INFO", logger="scorer.worker"):
        rig.drain()
    predictions = rig.predictions()
    assert {p["model_version"] for p in predictions} == {"v1"}
    expected = reference(events)
    assert [p["p_buy"] for p in predictions] == pytest.approx([expected[e["event_id"]][0] for e in events], abs=1e-5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shadow challenger vs champion v1")]
    rows = np.asarray(session_features(events), dtype=np.float32)
    differ = int(np.sum((rig.models.champion.predict(rows) >= 0.5) != (rig.models.shadow.predict(rows) >= 0.5)))
    assert differ > 0                                      # the challenger's weights make it disagree
    assert sum(int(line.split(": ")[1].split(" rows")[0]) for line in lines) == len(events)
    assert sum(int(line.split("rows, ")[1].split(" ")[0]) for line in lines) == differ


def test_a_shadow_model_is_summarised_once_a_minute_not_logged_per_batch(caplog):
    from scorer import metrics

    rig = Rig()
    rig.models.shadow = model("challenger", {**WEIGHTS, "events": 1.0})
    scored = metrics.SHADOW_ROWS._value.get()
    with caplog.at_level("INFO", logger="scorer.worker"):
        for i in range(20):                                # twenty batches, seconds apart at most
            rig.put(session_events(f"shadow{i}", seed=i, n=3, buyer=False))
            rig.drain()
    lines = [r for r in caplog.records if r.getMessage().startswith("shadow challenger")]
    assert len(lines) <= 1
    assert metrics.SHADOW_ROWS._value.get() - scored == 60             # every row still counted


class FlakyStream(MemoryStream):
    """A memory stream whose next ``failures`` reads fail after handing out records, like a dropped
    connection; failing every shard in one poll makes the poll itself fail."""

    def __init__(self, *args, failures=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures = failures

    def reader(self, shard_id, after_sequence):
        inner = super().reader(shard_id, after_sequence)
        stream = self

        class Reader:
            def read(self, limit):
                result = inner.read(limit)          # the position advances, then the call fails
                if result.records and stream.failures:
                    stream.failures -= 1
                    raise ConnectionError("connection reset while reading")
                return result
        return Reader()


def test_a_read_failing_on_one_shard_loses_nothing():
    stream = FlakyStream("enriched", shard_count=2, failures=1)
    rig = Rig(stream)
    sessions = [session_events(f"g{i}", seed=70 + i, n=8, buyer=False) for i in range(4)]
    rig.put(interleave(sessions))
    rig.drain()
    time.sleep(0.3)                     # the failing shard is read again after a backoff (0.2 s)
    rig.drain()
    got = {p["event_id"] for p in rig.predictions()}
    assert stream.failures == 0 and got == {e["event_id"] for s in sessions for e in s}


def test_a_failed_read_backs_off_keeping_the_sessions_and_loses_no_event(caplog):
    stream = FlakyStream("enriched", shard_count=2, failures=6)
    rig = Rig(stream)
    sessions = [session_events(f"f{i}", seed=90 + i, n=8, buyer=False) for i in range(4)]
    rig.put(interleave(sessions))
    rounds = iter(range(200))
    rig.worker.run(lambda: next(rounds) >= 60 or len(rig.predictions()) >= 32)
    got = {p["event_id"]: p for p in rig.predictions()}
    messages = [r.getMessage() for r in caplog.records]
    # An outage fails every poll, a second apart: one line, the next one 30 s later with the count.
    assert stream.failures == 0 and rig.worker.read_failures.count >= 1
    assert len([m for m in messages if m.startswith("reading the enriched stream failed 1 times")]) == 1
    assert not any("re-reading from the checkpoints" in m for m in messages)      # no replay of every session
    for events in sessions:
        for event_id, (p, count) in reference(events).items():
            assert got[event_id]["p_buy"] == pytest.approx(p, abs=1e-5)
            assert got[event_id]["events_in_session"] == count


# ---------------------------------------------------------------- leases through a long flush

def throttled_rig(shards: int, during, seconds: float = 1.0) -> Rig:
    """A rig with 300 ms leases (for the default 10 s) whose predictions stream refuses writes for
    ``seconds`` (for minutes of throttling)."""
    rig = Rig(MemoryStream("enriched", shard_count=shards), lease_ms=300, flush_ms=0)
    rig.out = ThrottledFor("predictions", seconds, during)
    rig.worker.writer = PredictionWriter(Producer(rig.out, max_attempts=1), None, None, 3600,
                                         sleep=lambda s: time.sleep(min(s, 0.02)))
    return rig


def test_a_flush_retried_longer_than_the_lease_keeps_the_lease():
    peer_read = []
    rig = throttled_rig(1, lambda: peer_read.extend(r for b in peer.poll() for r in b.records))
    peer = Consumer(rig.stream, rig.leases, worker_id="peer", lease_ms=300)
    events = session_events("slow", seed=5, n=6, buyer=False)
    rig.put(events)
    assert rig.worker.poll_once() == len(events)       # folds, scores and flushes: over three leases
    [lease] = rig.leases.leases()[0]
    assert lease.owner == rig.worker.consumer.worker_id and lease.checkpoint is not None
    assert peer_read == [] and not peer.owned
    assert [p["event_id"] for p in rig.predictions()] == [e["event_id"] for e in events]


def test_a_flush_whose_one_send_outlasts_the_lease_keeps_the_lease():
    """The lease was renewed between sends only: one PutRecords answered after longer than the lease
    (or a hung one through the producer's and botocore's retries, minutes) let a peer take the shard,
    rebuild its sessions and publish the predictions again."""
    peer_read = []
    rig = Rig(MemoryStream("enriched", shard_count=1), lease_ms=300, flush_ms=0)
    rig.out = AnswersSlowly("predictions", 1.0, lambda: peer_read.extend(r for b in peer.poll() for r in b.records))
    rig.worker.writer = PredictionWriter(Producer(rig.out, max_attempts=1), None, None, 3600)
    peer = Consumer(rig.stream, rig.leases, worker_id="peer", lease_ms=300)
    events = session_events("slow", seed=5, n=6, buyer=False)
    rig.put(events)
    assert rig.worker.poll_once() == len(events)       # one send over three leases
    [lease] = rig.leases.leases()[0]
    assert lease.owner == rig.worker.consumer.worker_id and lease.checkpoint is not None
    assert peer_read == [] and not peer.owned
    assert [p["event_id"] for p in rig.predictions()] == [e["event_id"] for e in events]


def test_a_flush_never_waits_between_retries_past_a_lease_renewal():
    # Its waits grew to 2 s whatever the lease: under a lease of about 3 s a peer took the shard mid-wait.
    rig = throttled_rig(1, lambda: None)
    waits = []
    rig.worker.writer.sleep = lambda s: waits.append(s) or time.sleep(min(s, 0.02))
    rig.put(session_events("slow", seed=5, n=6, buyer=False))
    rig.worker.poll_once()
    assert len(waits) > 10 and max(waits) == rig.worker.consumer.renew_interval_s == 0.1
    assert len(rig.predictions()) == 6


def test_a_flush_stops_writing_a_shard_another_worker_took_and_writes_the_others():
    first = "shardId-000000000000"

    def take_first_shard():
        row = next(lease for lease in rig.leases.leases()[0] if lease.shard_id == first)
        if row.owner != "peer":
            rig.leases.take(row, "peer", 60_000)       # taken over while the flush was throttled

    rig = throttled_rig(2, take_first_shard)
    sessions = [session_events(f"t{i}", seed=40 + i, n=5, buyer=False) for i in range(8)]
    rig.put(interleave(sessions))
    on_first = {r.partition_key for r in rig.stream.all_records() if r.shard_id == first}
    assert 0 < len(on_first) < len(sessions)
    rig.worker.poll_once()
    rows = {lease.shard_id: lease for lease in rig.leases.leases()[0]}
    assert rows[first].owner == "peer" and rows[first].checkpoint is None
    assert all(lease.checkpoint for shard, lease in rows.items() if shard != first)
    written = {p["session_id"] for p in rig.predictions()}
    assert written == {s[0]["domain_sessionid"] for s in sessions} - on_first
    assert first not in rig.worker.consumer.owned and not rig.worker.pending


# ---------------------------------------------------------------- a failing lease table

def test_a_checkpoint_the_lease_table_refuses_is_retried_once_a_second_not_a_restart(aws_settings):
    # It raised into run(), whose restart dropped every session and built a consumer that, unable to
    # balance, owned no shards: nothing was scored, and lag and checkpoint age read 0.
    sessions = [session_events(f"c{i}", seed=100 + i, n=9, buyer=False) for i in range(4)]
    parts = [interleave([s[i:i + 3] for s in sessions]) for i in (0, 3, 6)]
    direct = DynamoLeaseTable(aws.client("dynamodb"), aws_settings.lease_table, "scorer#enriched")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        # The lease table through the proxy (down = every call refused), without botocore's retries.
        client = aws.session().client("dynamodb", endpoint_url=proxy.endpoint, config=Config(retries={"max_attempts": 1}))
        rig = Rig(leases=DynamoLeaseTable(client, aws_settings.lease_table, "scorer#enriched"), flush_ms=0)
        worker = rig.worker
        rig.put(parts[0])
        rig.drain()
        assert len(worker.consumer.owned) == 2
        checkpoints = {lease.shard_id: lease.checkpoint for lease in direct.leases()[0]}
        restarts = REGISTRY.get_sample_value("scorer_worker_restarts_total")
        proxy.down = True
        for part in parts[1:]:
            rig.put(part)
            assert worker.poll_once() == len(part)        # read, scored, written; the checkpoints fail
        assert set(worker.pending_batches) == set(checkpoints) and worker.consumer.checkpoint_age_s > 0
        assert {lease.shard_id: lease.checkpoint for lease in direct.leases()[0]} == checkpoints
        assert len(worker.consumer.owned) == 2 and len(worker.store) == len(sessions)
        assert not worker._flush_due(0)                   # idle polls retry once a second, not each time
        proxy.down = False
        wait_for(lambda: worker.poll_once() == 0 and not worker.pending_batches, 10, what="the checkpoints")
        assert worker.consumer.checkpoint_age_s == 0
        last = {record.shard_id: record.sequence_number for record in rig.stream.all_records()}
        assert {lease.shard_id: lease.checkpoint for lease in direct.leases()[0]} == last
        assert REGISTRY.get_sample_value("scorer_worker_restarts_total") == restarts
        got = {p["event_id"]: p for p in rig.predictions()}
        assert len(got) == len(rig.predictions()) == sum(len(s) for s in sessions)      # each event once
        for events in sessions:
            for event_id, (p, count) in reference(events).items():
                assert got[event_id]["p_buy"] == pytest.approx(p, abs=1e-5)
                assert got[event_id]["events_in_session"] == count
        worker.restart()                                  # what an unexpected error still leads to
        assert REGISTRY.get_sample_value("scorer_worker_restarts_total") == restarts + 1
        worker.consumer.close()


def test_a_shard_taken_before_its_checkpoint_is_dropped_and_the_others_are_checkpointed():
    first = "shardId-000000000000"
    rig = Rig(flush_ms=3_600_000)
    sessions = [session_events(f"l{i}", seed=120 + i, n=4, buyer=False) for i in range(8)]
    rig.put(interleave(sessions))
    rig.worker.poll_once()                                # buffered, not flushed
    row = next(lease for lease in rig.leases.leases()[0] if lease.shard_id == first)
    rig.leases.take(row, "peer", 60_000)
    assert rig.worker.flush()
    rows = {lease.shard_id: lease for lease in rig.leases.leases()[0]}
    assert rows[first].owner == "peer" and rows[first].checkpoint is None
    assert all(lease.checkpoint for shard, lease in rows.items() if shard != first)
    assert first not in rig.worker.consumer.owned and not rig.worker.pending_batches
    assert not any(session.shard_id == first for session in rig.worker.store.sessions.values())


def _events_in_session(arrivals, sweep_after: set[int], of: str, clock_ms: int) -> tuple[list[int], list]:
    """Fold ``(session, happened_ms, collected_ms)`` records in order through one shard's session
    store, sweeping after the records at ``sweep_after``: the session's event count after each of
    its records, and the store."""
    from scorer.sessions import SessionStore

    store = SessionStore(30 * 60_000, 100, 8, clock=lambda: clock_ms / 1000)
    counts = []
    for index, (session_id, at_ms, collected_ms) in enumerate(arrivals):
        session = store.session_for(session_id, "shard-A", at_ms, collected_ms, None)
        step(session.state, {"event_id": str(index), "event": "page_view", "collector_tstamp": collected_ms}, at_ms)
        if session_id == of:
            counts.append(session.state.events)
        if index in sweep_after:
            store.sweep()
    return counts, store


def test_a_late_event_continues_its_session_however_the_records_were_batched():
    """X's third event happened 29 min 50 s after its second but arrives 30 s late, after another
    session moved the shard's watermark past X's timeout. Whether a flush (and its sweep) fell
    between the two records decided whether it continued X (events 3) or started a new session
    (events 1), so a replay batched otherwise rebuilt another state."""
    minute = 60_000
    arrivals = [("X", T0, T0), ("X", T0 + minute, T0 + minute), ("Y", T0 + 31 * minute + 10_000, T0 + 31 * minute + 10_000),
                ("X", T0 + 30 * minute + 50_000, T0 + 31 * minute + 20_000)]
    clock_ms = T0 + 10**8
    assert _events_in_session(arrivals, set(), "X", clock_ms)[0] == [1, 2, 3]
    assert _events_in_session(arrivals, {2}, "X", clock_ms)[0] == [1, 2, 3]


def test_a_backfill_sent_through_the_collector_keeps_its_sessions_however_the_records_were_batched():
    """History sent through the collector as fast as it goes crosses days of event time in a minute
    of collection, and its records reach the shard a little out of event-time order (the sender's
    threads). A sweep by event time cut a session whenever another one's record, hours later in event
    time but milliseconds in arrival, came between two of its records and a flush fell there: the
    demo's scorer scored 23 of its 1,740 sessions as two. Sweeps go by collection time, in which
    nothing of A went quiet; 36 minutes of it do free A."""
    minute = 60_000
    collected = T0 + 10 * 24 * 60 * minute
    arrivals = [("A", T0, collected), ("B", T0 + 3 * 60 * minute, collected + 5), ("A", T0 + minute, collected + 10)]
    clock_ms = collected + minute
    assert _events_in_session(arrivals, set(), "A", clock_ms)[0] == [1, 2]
    assert _events_in_session(arrivals, {0, 1, 2}, "A", clock_ms)[0] == [1, 2]
    _, store = _events_in_session(arrivals + [("C", T0 + 4 * 60 * minute, collected + 36 * minute)], {3}, "A",
                                  clock_ms + 36 * minute)
    assert store.get("A") is None and store.get("C") is not None


def test_a_throttled_lease_table_read_in_a_parent_rebuild_is_read_again_not_a_restart():
    """The rebuild of a closed parent reads the lease table once; throttled there, the error reached
    run()'s catch-all, which restarted the worker: every session dropped, every shard let go."""
    from botocore.exceptions import ClientError

    stream, leases = MemoryStream("enriched", shard_count=1), MemoryLeaseTable()
    a, b = two_scorers(stream, leases)
    sessions = [session_events(f"s{i}", seed=300 + i, n=10, buyer=False) for i in range(6)]
    a.put([e for events in sessions for e in events[:6]])
    a.drain()
    stream.split("shardId-000000000000")
    read_rows, throttled = leases.leases, []

    def throttled_once_in_a_rebuild():
        if sys._getframe(1).f_code.co_name in ("_lease_rows", "_rebuild_parents") and not throttled:
            throttled.append(True)
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "Query")
        return read_rows()

    leases.leases = throttled_once_in_a_rebuild
    a.put([e for events in sessions for e in events[6:]])
    owners = {}
    for _ in range(200):
        a.drain()
        b.drain()
        owners = {lease.shard_id: lease.owner for lease in leases.leases()[0] if lease.checkpoint != "SHARD_END"}
        if len(a.predictions()) >= 6 * 10 and len(set(owners.values())) == 2:
            break
        time.sleep(0.02)
    assert throttled and len(set(owners.values())) == 2                 # b took a child and rebuilt it
    got = {p["event_id"]: p for p in a.predictions()}
    for events in sessions:
        for event_id, (_, count) in reference(events).items():
            assert got[event_id]["events_in_session"] == count


# ---------------------------------------------------------------- pacing


def test_an_idle_worker_waits_until_its_shards_are_due_not_its_shorter_idle_sleep(aws_settings):
    """0.2 s after an empty poll, with shards read at most every 0.4 s, often found none due yet and
    slept again; the idle wait is the time to the next shard read the interval allows."""
    sleeps: list[float] = []
    models = Models(None, "bucket", "m")
    models.champion = model()
    writer = PredictionWriter(Producer(KinesisStream(aws.client("kinesis"), aws_settings.predictions_stream)),
                              None, None, 3600)
    worker = Worker(ScorerSettings(), models, writer,
                    lambda **hooks: consumer_for(aws_settings, aws_settings.enriched_stream, "scorer",
                                                 read_interval_s=2.0, lease_ms=30_000, **hooks))
    worker.sleep = sleeps.append
    deadline = time.monotonic() + 10
    worker.run(stop=lambda: bool(sleeps) or time.monotonic() > deadline)
    assert len(sleeps) == 1 and 1.0 < sleeps[0] <= 2.0     # one empty poll, then until the shards' next read


def test_each_live_event_scored_shows_its_age_since_collection_a_quiet_replay_none(aws_settings):
    """scorer_event_age_seconds: scored_at minus collector_tstamp, the time to act up to the prediction.
    An event collected now that happened long ago (an offline queue) is young."""
    now_ms = int(time.time() * 1000)
    events = [make_event("fresh", now_ms - 5_000), make_event("behind", now_ms - 40_000),
              make_event("queued", now_ms - 3 * 86_400_000, collector_tstamp=iso(now_ms - 5_000))]
    kinesis = aws.client("kinesis")
    Producer(KinesisStream(kinesis, aws_settings.enriched_stream)).send(
        [(e["domain_sessionid"], orjson.dumps(e)) for e in events])
    models = Models(None, "bucket", "m")
    models.champion = model()
    writer = PredictionWriter(Producer(KinesisStream(kinesis, aws_settings.predictions_stream)), None, None, 3600)
    worker = Worker(ScorerSettings(), models, writer,
                    lambda **hooks: consumer_for(aws_settings, aws_settings.enriched_stream, "scorer", **hooks))

    def bucket(le: str) -> float:
        return REGISTRY.get_sample_value("scorer_event_age_seconds_bucket", {"le": le})

    before = {le: bucket(le) for le in ("1.0", "10.0", "30.0", "60.0")}
    wait_for(lambda: worker.poll_once() == 0 and worker.store.sessions, 20, what="the events scored")
    worker.close()
    assert {le: bucket(le) - before[le] for le in before} == {"1.0": 0, "10.0": 2, "30.0": 2, "60.0": 3}
    replay = Row(worker.store.sessions["fresh"], events[0], now_ms, quiet=True, events=1, collected_ms=0)
    sum_before = REGISTRY.get_sample_value("scorer_event_age_seconds_count")
    observe_ages([replay], now_ms)
    assert REGISTRY.get_sample_value("scorer_event_age_seconds_count") == sum_before
