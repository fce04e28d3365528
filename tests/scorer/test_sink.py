"""The prediction writer against the predictions table on the emulator, through a proxy that can fail."""
from __future__ import annotations

import itertools
import json
import logging
import os
import time

from botocore.config import Config
from prometheus_client import REGISTRY

from common import aws
from common.producer import Producer
from common.streams import MemoryStream
from infra.provision import ProvisionSettings, provision
from scorer.sink import PredictionWriter
from tests.conftest import unique_settings
from tests.faults import FaultProxy
from tests.scorer.helpers import T0


def test_a_table_outage_logs_one_line_per_retry_round_not_one_per_session(aws_endpoint, caplog):
    settings = unique_settings(ProvisionSettings)
    provision(settings)
    predictions = [({"session_id": f"s{i}", "event_id": f"e{i}", "events_in_session": 1, "p_buy": 0.25}, T0 + i)
                   for i in range(40)]
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        dynamodb = aws.session().client("dynamodb", endpoint_url=proxy.endpoint,
                                        config=Config(retries={"max_attempts": 1}))
        rounds = []

        def backoff(seconds: float) -> None:       # the table comes back after three failed rounds
            rounds.append(seconds)
            proxy.down = len(rounds) < 3

        writer = PredictionWriter(None, dynamodb, settings.predictions_table, 3600, sleep=backoff)
        proxy.down = True
        with caplog.at_level(logging.WARNING, logger="scorer.sink"):
            assert writer.write({"shardId-0": predictions})
        writer.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "scorer.sink"]
    assert len(rounds) == 3                      # three failed rounds, one line: the next waits 30 s
    assert [w[:82] for w in warnings] == [
        "predictions table writes failed in 1 rounds since the last such line; now 40 of 40"]
    table = aws.client("dynamodb").scan(TableName=settings.predictions_table)["Items"]
    assert sorted(item["session_id"]["S"] for item in table) == sorted(p["session_id"] for p, _ in predictions)


def test_leases_are_renewed_while_a_slow_table_round_runs(aws_endpoint):
    """Under throttling each put waits out botocore's retries (seconds): a round of many sessions
    outlasted the lease, renewed only between rounds, and a peer took the shard mid-write."""
    settings = unique_settings(ProvisionSettings)
    provision(settings)
    predictions = [({"session_id": f"s{i}", "event_id": f"e{i}", "events_in_session": 1, "p_buy": 0.25}, T0 + i)
                   for i in range(16)]
    renewed = []
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        dynamodb = aws.session().client("dynamodb", endpoint_url=proxy.endpoint)
        writer = PredictionWriter(None, dynamodb, settings.predictions_table, 3600, threads=2)
        proxy.delay_s = 0.25                                   # 16 puts on 2 threads: a 2 s round
        assert writer.write({"shardId-0": predictions}, renew=lambda: renewed.append(time.monotonic()), max_wait_s=0.3)
        writer.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewed)]
    assert renewed[-1] - renewed[0] > 1.5 and max(gaps) < 1.0, gaps
    table = aws.client("dynamodb").scan(TableName=settings.predictions_table)["Items"]
    assert len(table) == len(predictions)


def test_predictions_the_stream_refused_go_again_only_while_their_shard_is_owned():
    """One PutRecords call carries several shards' predictions; the ones refused are sent again by
    shard, and a shard taken meanwhile by another worker is left to it (it publishes them)."""
    out = MemoryStream("predictions")
    by_shard = {shard: [({"session_id": f"{shard}{i}", "event_id": f"{shard}-e{i}", "events_in_session": 1,
                          "p_buy": 0.25}, T0 + i) for i in range(3)] for shard in ("a", "b", "c")}
    owned = {"a", "b", "c"}

    def lose_a(seconds: float) -> None:          # between the first try and the next: a peer took "a"
        owned.discard("a")

    writer = PredictionWriter(Producer(out, max_attempts=1), None, None, 3600, sleep=lose_a)
    out.fail_next = 4                                          # a0 a1 a2 b0 refused; b1 .. c2 land
    written_before = REGISTRY.get_sample_value("scorer_predictions_total")
    assert writer.write(by_shard, owns=owned.__contains__)
    on_stream = [json.loads(record.data)["event_id"] for record in out.all_records()]
    assert on_stream == ["b-e1", "b-e2", "c-e0", "c-e1", "c-e2", "b-e0"]
    assert REGISTRY.get_sample_value("scorer_predictions_total") - written_before == 6


def test_a_purchase_marks_its_sessions_row_after_its_last_prediction_and_only_that_sessions(aws_endpoint):
    """The discount engine checks the mark before an offer: a prediction read late makes no offer to a
    session that has just bought."""
    settings = unique_settings(ProvisionSettings)
    provision(settings)
    dynamodb = aws.client("dynamodb")
    writer = PredictionWriter(None, dynamodb, settings.predictions_table, 3600)

    def row(session: str) -> dict | None:
        return dynamodb.get_item(TableName=settings.predictions_table, Key={"session_id": {"S": session}},
                                 ConsistentRead=True).get("Item")

    def prediction(session: str, events: int) -> dict:
        return {"session_id": session, "event_id": f"{session}-{events}", "events_in_session": events, "p_buy": 0.4}

    # One write holds a session's last prediction and its purchase: the put must not erase the mark.
    assert writer.write({"shardId-0": [(prediction("buyer", 1), T0), (prediction("buyer", 2), T0 + 5)]},
                        bought={"shardId-0": [("buyer", T0 + 9), ("no-prediction", T0 + 9)]})
    assert row("buyer")["bought_ms"] == {"N": str(T0 + 9)} and row("buyer")["events_in_session"] == {"N": "2"}
    assert row("no-prediction") is None                         # a mark never makes a row of its own
    # A replay after a crash writes the same prediction and purchase again: the mark stays.
    assert writer.write({"shardId-0": [(prediction("buyer", 2), T0 + 5)]}, bought={"shardId-0": [("buyer", T0 + 9)]})
    assert row("buyer")["bought_ms"] == {"N": str(T0 + 9)}
    # The same id's next session (after the session timeout) replaces the row; a late copy of the old
    # purchase does not mark it.
    assert writer.write({"shardId-0": [(prediction("buyer", 1), T0 + 3_600_000)]},
                        bought={"shardId-0": [("buyer", T0 + 9)]})
    assert "bought_ms" not in row("buyer") and row("buyer")["event_ms"] == {"N": str(T0 + 3_600_000)}
    # A shard taken by another worker meanwhile: its marks are its new owner's to write.
    assert writer.write({"shardId-1": [(prediction("other", 1), T0)]})
    assert writer.write({}, bought={"shardId-1": [("other", T0)]}, owns=lambda shard: shard == "shardId-0")
    assert "bought_ms" not in row("other")
    writer.close()
