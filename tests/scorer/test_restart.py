"""kill -9 in the middle of sessions, then two workers share the shards: nothing re-emitted,
nothing lost, and the rebuilt sessions score exactly like an uninterrupted fold."""
from __future__ import annotations

import os
import time
from collections import Counter

import orjson
import pytest
import requests

from common import aws
from common.features import SessionState, features, is_purchase, session_features, step
from common.leases import DynamoLeaseTable
from common.streams import KinesisStream
from tests.faults import PUT_RECORDS, FaultProxy
from tests.scorer.conftest import MODEL
from tests.scorer.helpers import logistic_reference, session_events, wait_for


def put(settings, events) -> dict[str, str]:
    """Put events on the enriched stream; returns shard -> last sequence number written."""
    stream = KinesisStream(aws.client("kinesis"), settings.enriched_stream)
    last = {}
    for event in events:       # one by one, so each shard's order is the list's order
        result = stream.put_records([(event["domain_sessionid"], orjson.dumps(event))])[0]
        assert result.ok
        last[result.shard_id] = result.sequence_number
    return last


def predictions(settings) -> list[dict]:
    stream = KinesisStream(aws.client("kinesis"), settings.predictions_stream)
    out = []
    for shard in stream.list_shards():
        reader = stream.reader(shard.shard_id, None)
        while True:
            page = reader.read(1000)
            out += [orjson.loads(r.data) for r in page.records]
            if not page.records:
                break
    return out


def reference(sessions) -> dict[str, tuple[float, int]]:
    expected = {}
    for events in sessions:
        state = SessionState()
        for event in events:
            step(state, event)
            if not is_purchase(event):
                expected[event["event_id"]] = (float(logistic_reference([features(state)])[0]), state.events)
    return expected


def test_kill_9_mid_session_then_two_workers_continue_like_an_uninterrupted_run(published, start_scorer):
    settings = published
    sessions = [session_events(f"k{i}", seed=60 + i, n=12, buyer=i % 2 == 0) for i in range(6)]
    first = [e for s in sessions for e in s[:6]]
    second = [e for s in sessions for e in s[6:]]
    expected = reference(sessions)
    leases = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"scorer#{settings.enriched_stream}")

    last = put(settings, first)
    worker = start_scorer(settings).wait_ready()
    first_ids = {e["event_id"] for e in first if not is_purchase(e)}
    wait_for(lambda: first_ids <= {p["event_id"] for p in predictions(settings)}, what="first-half predictions")
    wait_for(lambda: all(l.checkpoint == last.get(l.shard_id, l.checkpoint) and "state_after" in l.meta
                         for l in leases.leases()[0]), what="checkpoints with state_after")
    worker.kill9()

    workers = [start_scorer(settings).wait_ready() for _ in range(2)]
    wait_for(lambda: len({l.owner for l in leases.leases()[0] if l.owner}) == 2, what="two owners", timeout=60)
    put(settings, second)
    all_ids = set(expected)
    wait_for(lambda: all_ids <= {p["event_id"] for p in predictions(settings)}, what="all predictions")

    emitted = predictions(settings)
    first_half = [p for p in emitted if p["event_id"] in first_ids]
    assert len(first_half) == len(first_ids), "the restart re-emitted predictions already written"
    for prediction in emitted:
        p_buy, count = expected[prediction["event_id"]]
        assert prediction["p_buy"] == pytest.approx(p_buy, abs=1e-5), prediction
        assert prediction["events_in_session"] == count
        assert prediction["model_version"] == "v1"
    for events in sessions:
        session_id = events[0]["domain_sessionid"]
        answers = [requests.get(f"{w.url}/sessions/{session_id}/features", timeout=5) for w in workers]
        live = [a.json() for a in answers if a.status_code == 200]
        assert len(live) == 1, f"session {session_id} should live in exactly one worker"
        assert list(live[0]["features"].values()) == session_features(events)[-1]
    latest = requests.get(f"{workers[0].url}/sessions/{sessions[1][0]['domain_sessionid']}/prediction",
                          timeout=5).json()
    assert latest["event_id"] == sessions[1][-1]["event_id"] and latest["events_in_session"] == 12
    assert latest["expires_at"] > 0


def test_kill_9_mid_write_twice_then_every_event_is_scored_as_by_an_uninterrupted_fold(published, start_scorer):
    # Through a proxy that hangs one write of predictions, the scorer is killed first with a flush
    # written but not acknowledged, then with one not written yet. The third process rebuilds the
    # sessions from the checkpoints: every event gets its uninterrupted prediction, and whatever comes
    # out twice is the same prediction twice.
    settings = published
    sessions = [session_events(f"w{i}", seed=90 + i, n=12, buyer=i % 2 == 0) for i in range(6)]
    parts = [[e for s in sessions for e in s[start:start + 4]] for start in (0, 4, 8)]
    expected = reference(sessions)
    scored = [{e["event_id"] for e in part if not is_purchase(e)} for part in parts]

    def emitted_ids() -> set[str]:
        return {p["event_id"] for p in predictions(settings)}

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.hang_next = (PUT_RECORDS, "after")
        put(settings, parts[0])
        first = start_scorer(settings, proxy.endpoint).wait_ready()
        wait_for(proxy.hanging.is_set, what="the first write of predictions")
        first.kill9()
        assert emitted_ids() == scored[0]                  # written, never acknowledged

        proxy.hanging.clear()
        second = start_scorer(settings, proxy.endpoint).wait_ready()
        put(settings, parts[1])
        wait_for(lambda: scored[1] <= emitted_ids(), timeout=60, what="the second part's predictions")
        proxy.hang_next = (PUT_RECORDS, "before")
        put(settings, parts[2])
        wait_for(proxy.hanging.is_set, what="a write of the third part's predictions")
        second.kill9()
        assert not scored[2] & emitted_ids()

        start_scorer(settings, proxy.endpoint).wait_ready()
        wait_for(lambda: set(expected) <= emitted_ids(), timeout=60, what="every prediction")

    emitted = predictions(settings)
    for prediction in emitted:
        p_buy, count = expected[prediction["event_id"]]
        assert prediction["p_buy"] == pytest.approx(p_buy, abs=1e-5), prediction
        assert prediction["events_in_session"] == count, prediction
    assert len(emitted) - len(expected) == len(scored[0])     # the unacknowledged write, once more


def test_a_predictions_stream_answering_slower_than_output_timeout_s_gets_each_prediction_a_bounded_number_of_times(
        published, start_scorer):
    # Each PutRecords lands 1.1 s after it was made, past the 1 s read timeout. Retried at that timeout
    # (by botocore, the producer, then the writer's loop), a flush landed once per attempt for as long
    # as the stream was slow. (Just past the timeout, so the raised waits of 2 and 3 s have ample room.)
    settings = published
    events = [e for i in range(4) for e in session_events(f"slow{i}", seed=40 + i, n=8, buyer=False)]
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.delays[PUT_RECORDS] = 1.1
        scorer = start_scorer(settings, proxy.endpoint, output_timeout_s=1).wait_ready()
        put(settings, events)
        wanted = {e["event_id"] for e in events}
        wait_for(lambda: wanted <= {p["event_id"] for p in predictions(settings)}, timeout=60, what="every prediction")
        time.sleep(2)          # a copy sent by a call given up on lands 1.1 s after it was made
        scorer.proc.terminate()
        assert scorer.proc.wait(timeout=30) == 0
    counts = Counter(p["event_id"] for p in predictions(settings))
    # Timed out at 1 s, a flush is answered within 2 s (3 s at worst): three copies at most; the flushes
    # after it go at the raised timeout and land once.
    assert max(counts.values()) <= 3, Counter(counts.values())
    assert "did not answer PutRecords within 1.0 s" in scorer.log_path.read_text(encoding="utf-8")


def test_a_clean_stop_writes_checkpoints_and_hands_the_shards_back(published, start_scorer):
    settings = published
    sessions = [session_events(f"c{i}", seed=80 + i, n=6, buyer=False) for i in range(3)]
    events = [e for s in sessions for e in s]
    last = put(settings, events)
    worker = start_scorer(settings).wait_ready()
    wait_for(lambda: len(predictions(settings)) >= len(events), what="predictions")
    worker.proc.terminate()
    assert worker.proc.wait(timeout=30) == 0
    leases = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"scorer#{settings.enriched_stream}")
    rows = {lease.shard_id: lease for lease in leases.leases()[0]}
    for shard_id, sequence in last.items():
        assert rows[shard_id].owner == ""                       # released, not left to expire
        assert rows[shard_id].checkpoint == sequence
        assert rows[shard_id].meta["state_after"]               # where a successor starts replaying
    assert len(predictions(settings)) == len(events)


def test_a_stop_while_the_model_loads_ends_the_process_before_it_takes_a_shard(published, start_scorer):
    """As PID 1 in a container, Python dropped a SIGTERM sent before its handler was in place: the
    scorer stopped during its model load took the shards and ran on until the stop timeout killed it."""
    settings = published
    put(settings, session_events("early-stop", seed=5, n=3))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.hang_next = (f"GET /{settings.bucket}/models/{MODEL}/v1/model.onnx", "before")
        scorer = start_scorer(settings, proxy.endpoint)
        wait_for(proxy.hanging.is_set, what="the model's download")
        scorer.proc.terminate()
        proxy.release()
        assert scorer.proc.wait(timeout=60) == 0
    leases = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"scorer#{settings.enriched_stream}")
    assert not [lease for lease in leases.leases()[0] if lease.owner]
    assert not predictions(settings)


def test_without_the_lookup_table_every_prediction_is_on_the_stream_and_the_lookup_says_why(published, start_scorer):
    """lookup_table off spares the conditional write per session and flush (most of the AWS bill at
    high rates); the stream still gets every prediction."""
    settings = published
    events = [e for i in range(2) for e in session_events(f"n{i}", seed=90 + i, n=5, buyer=False)]
    put(settings, events)
    scorer = start_scorer(settings, lookup_table="false").wait_ready()
    wait_for(lambda: len(predictions(settings)) >= len(events), what="predictions")
    assert sorted(p["event_id"] for p in predictions(settings)) == sorted(e["event_id"] for e in events)
    assert aws.client("dynamodb").scan(TableName=settings.predictions_table)["Items"] == []
    answer = requests.get(f"{scorer.url}/sessions/{events[0]['domain_sessionid']}/prediction", timeout=5)
    assert answer.status_code == 404 and "CLICKSTREAM_LOOKUP_TABLE" in answer.json()["error"]
