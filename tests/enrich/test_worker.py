"""The worker against the emulator over HTTP: tracker -> collector -> raw stream -> ``python -m enrich`` ->
enriched and bad streams; checkpoints only after both writes, also across kill -9; clean stop on SIGTERM."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import orjson
import pytest

from batch.train_features import arrival_order
from common import aws
from common.consumer import consumer_for
from common.features import parse_ms
from common.leases import DynamoLeaseTable
from common.producer import Producer
from common.streams import KinesisStream
from enrich.config import EnrichSettings
from enrich.pipeline import Enricher
from enrich.worker import Worker
from localstack.emulator import free_port, stop_group
from tests.conftest import ROOT, settings_env
from tests.enrich.helpers import KEY, SHOPPER, get_record, post_record, read_stream, track_shop_session, wait_for
from tests.faults import PUT_RECORDS, FaultProxy

EV = {"p": "web", "tv": "t", "sid": "3f2e1d0c-9b8a-4765-8432-10fedcba9876"}


def enrich_settings(aws_settings, **overrides) -> EnrichSettings:
    common = {f.name: getattr(aws_settings, f.name) for f in dataclasses.fields(EnrichSettings)
              if hasattr(aws_settings, f.name)}
    return EnrichSettings(**{**common, "pseudonymisation_key": KEY, **overrides})


def put_raw(settings, records: list[bytes]) -> None:
    stream = KinesisStream(aws.client("kinesis", settings.region), settings.raw_stream)
    assert Producer(stream).send([(f"k{i}", data) for i, data in enumerate(records)]) == []


def leases(settings) -> dict:
    table = DynamoLeaseTable(aws.client("dynamodb", settings.region), settings.lease_table,
                             f"enrich#{settings.raw_stream}")
    return {lease.shard_id: lease for lease in table.leases()[0]}


class Process:
    def __init__(self, module: str, env: dict, log):
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def terminate(self, timeout: float = 30) -> int:
        os.killpg(self.popen.pid, signal.SIGTERM)
        return self.popen.wait(timeout)

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            stop_group(self.popen.pid, timeout=10)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")[-3000:]


def at_least(items: list, count: int) -> list | None:
    return items if len(items) >= count else None


def child_env(settings, **extra) -> dict:
    return {**os.environ, **settings_env(settings), "CLICKSTREAM_PSEUDONYMISATION_KEY": KEY, **extra}


def test_tracker_to_collector_to_enricher_end_to_end(aws_settings, tmp_path):
    import urllib.request

    port, metrics_port = free_port(), free_port()
    collector = Process("collector", child_env(aws_settings, CLICKSTREAM_PORT=str(port),
                                               CLICKSTREAM_SPOOL_DIR=str(tmp_path / "spool"),
                                               CLICKSTREAM_LINGER_MS="50"), tmp_path / "collector.log")
    enrich = Process("enrich", child_env(aws_settings, CLICKSTREAM_METRICS_PORT=str(metrics_port)),
                     tmp_path / "enrich.log")
    try:
        def collector_up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
            except OSError:
                assert collector.popen.poll() is None, collector.output()
                return False

        wait_for(collector_up, timeout=60)
        sent = track_shop_session(f"http://127.0.0.1:{port}", "post", batch_size=4)
        sent += track_shop_session(f"http://127.0.0.1:{port}", "get")
        # Bad input straight onto the raw stream: a garbage record and a POST with one bad event in three.
        put_raw(aws_settings, [b"garbage", post_record([{**EV, "e": "pv"}, {**EV, "e": "se", "se_va": "NaNa"},
                                                         {**EV, "e": "pp"}])])

        enriched = wait_for(lambda: at_least(read_stream(aws_settings.enriched_stream), sent + 2), timeout=90)
        bad = wait_for(lambda: at_least(read_stream(aws_settings.bad_stream), 2))
        assert enrich.popen.poll() is None, enrich.output()
        events = [orjson.loads(data) for _, data in enriched]
        assert len(events) == sent + 2
        shop = [e for e in events if e["domain_sessionid"] == SHOPPER["sid"]]
        assert len(shop) == sent
        assert {key for key, data in enriched if orjson.loads(data)["domain_sessionid"] == SHOPPER["sid"]} == {SHOPPER["sid"]}
        assert sorted(e["event_name"] for e in shop) == sorted(
            ["page_view", "page_view", "product_view", "add_to_cart", "event", "checkout_step", "purchase",
             "transaction", "transaction_item"] * 2)
        assert all(e["v_collector"].startswith("clickstream-collector/") and e["network_userid"] for e in shop)
        # Privacy: no raw identifier in the enriched stream (data or partition keys).
        blob = b"\n".join(key.encode() + data for key, data in enriched).lower()
        for secret in (SHOPPER["user_id"], SHOPPER["duid"], SHOPPER["ip"], "127.0.0.1"):
            assert secret.lower().encode() not in blob, secret
        rows = sorted(orjson.loads(data)["schema"].split("/")[1] for _, data in bad)
        assert rows == ["collector_payload_format_violation", "enrichment_failures"]

        # Checkpointed to the last raw record once the outputs were written; SIGTERM stops cleanly.
        raw = KinesisStream(aws.client("kinesis", aws_settings.region), aws_settings.raw_stream)
        last = {shard.shard_id: raw.reader(shard.shard_id, None).read(10_000).records[-1].sequence_number
                for shard in raw.list_shards()}

        def checkpointed():
            return {shard: lease.checkpoint for shard, lease in leases(aws_settings).items()} == last

        wait_for(checkpointed, timeout=30, what=f"checkpoints at the last raw records {last}")
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f"enrich_events_total {float(sent + 2)}" in scraped
        assert 'enrich_bad_rows_total{type="collector_payload_format_violation"} 1.0' in scraped
        # Series that had no row yet exist at 0, for the alerts' rate() (deploy/prometheus/alerts.yml).
        assert 'enrich_bad_rows_total{type="size_violation"} 0.0' in scraped
        assert 'enrich_registry_errors_total{registry="embedded"} 0.0' in scraped
        assert enrich.terminate() == 0, enrich.output()
        assert all(not lease.owner for lease in leases(aws_settings).values())
        assert '"stopping:' in enrich.output()
    finally:
        enrich.cleanup()
        collector.cleanup()


def test_no_checkpoint_until_both_outputs_are_written(aws_settings):
    records = [get_record({**EV, "e": "pv", "eid": f"00000000-0000-4000-8000-00000000000{i}"}) for i in range(3)]
    records.append(b"not a raw record")
    put_raw(aws_settings, records)

    # The bad stream does not exist: the good events go out, the bad row cannot.
    broken = enrich_settings(aws_settings, bad_stream=aws_settings.bad_stream + "-missing")
    kinesis = aws.client("kinesis", broken.region, retries=0)
    stop = threading.Event()
    worker = Worker(Enricher(broken), consumer_for(broken, broken.raw_stream, "enrich", lease_ms=5000),
                    Producer(KinesisStream(kinesis, broken.enriched_stream), max_attempts=1),
                    Producer(KinesisStream(kinesis, broken.bad_stream), max_attempts=1), stop, retry_cap_s=0.2)
    thread = threading.Thread(target=worker.run, kwargs={"idle_sleep": 0.05})
    thread.start()
    try:
        wait_for(lambda: len(read_stream(aws_settings.enriched_stream)) >= 3, timeout=30)
        time.sleep(1.0)   # the worker keeps retrying the bad row meanwhile
        assert all(lease.checkpoint is None for lease in leases(aws_settings).values())
    finally:
        stop.set()
        thread.join(30)
        worker.consumer.close()
    assert not thread.is_alive() and worker.counts["batches"] == 0

    # A healthy worker re-reads from the old checkpoint: nothing is lost; events repeat with the same ids.
    healthy = enrich_settings(aws_settings)
    stop = threading.Event()
    worker = Worker(Enricher(healthy), consumer_for(healthy, healthy.raw_stream, "enrich", lease_ms=5000),
                    Producer(KinesisStream(kinesis, healthy.enriched_stream)),
                    Producer(KinesisStream(kinesis, healthy.bad_stream)), stop)
    thread = threading.Thread(target=worker.run, kwargs={"idle_sleep": 0.05})
    thread.start()
    try:
        wait_for(lambda: all(lease.checkpoint for lease in leases(aws_settings).values()), timeout=30)
    finally:
        stop.set()
        thread.join(30)
        worker.consumer.close()
    bad = read_stream(aws_settings.bad_stream)
    assert len(bad) == 1 and b"collector_payload_format_violation" in bad[0][1]
    ids = [orjson.loads(data)["event_id"] for _, data in read_stream(aws_settings.enriched_stream)]
    assert sorted(set(ids)) == sorted(f"00000000-0000-4000-8000-00000000000{i}" for i in range(3))
    assert len(ids) == 6


@pytest.mark.parametrize("attempts", [5, 1], ids=["retried-by-the-producer", "retried-by-the-worker"])
def test_events_the_stream_refused_are_stamped_anew_so_training_folds_them_as_they_landed(aws_settings, attempts):
    """Throttled, Kinesis takes some entries of a PutRecords call and refuses others; sent again, the
    refused land after later events of their session. The scorer folds them as they land, and training
    by ``arrival_order``: the retried events must get ``etl_tstamp``s that put them last there too, and a
    record enriched afterwards after them. Retried by the producer itself (``attempts`` per call) or,
    when it gives up, by the worker's delivery loop."""
    sid, at = "5e55105e-0000-4000-8000-000000000001", 1_764_409_956_000

    def event(kind: str, n: int, **fields) -> dict:
        return {**EV, "sid": sid, "e": kind, "eid": f"00000000-0000-4000-8000-00000000000{n}", **fields}
    requests = [post_record([event("pv", 1, dtm=str(at - 20)), event("se", 2, dtm=str(at - 10), se_ca="c", se_ac="a")],
                            tstamp=at),
                get_record(event("pv", 3, dtm=str(at + 990)), tstamp=at + 1_000),
                get_record(event("pp", 4, dtm=str(at + 1_990)), tstamp=at + 2_000)]
    raw = KinesisStream(aws.client("kinesis", aws_settings.region), aws_settings.raw_stream)
    assert Producer(raw).send([(sid, data) for data in requests]) == []

    def session_on_the_stream() -> list[dict]:
        return [orjson.loads(data) for key, data in read_stream(aws_settings.enriched_stream) if key == sid]

    settings = enrich_settings(aws_settings)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.fail_calls = [[0, 2]]     # the first call's events 1 and 3 refused; 2 and 4 land
        kinesis = aws.session().client("kinesis", endpoint_url=proxy.endpoint)
        stop = threading.Event()
        worker = Worker(Enricher(settings), consumer_for(settings, settings.raw_stream, "enrich", lease_ms=5000),
                        Producer(KinesisStream(kinesis, settings.enriched_stream), max_attempts=attempts, base_delay=0.01),
                        Producer(KinesisStream(kinesis, settings.bad_stream)), stop, retry_cap_s=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"idle_sleep": 0.05})
        thread.start()
        try:
            wait_for(lambda: len(session_on_the_stream()) == 4, timeout=30, what="the session's four events")
            assert Producer(raw).send([(sid, get_record(event("pv", 5, dtm=str(at + 2_990)), tstamp=at + 3_000))]) == []
            landed = wait_for(lambda: at_least(session_on_the_stream(), 5), timeout=30, what="a fifth event")
        finally:
            stop.set()
            thread.join(30)
            worker.consumer.close()
    assert proxy.failed_entries == 2
    assert [e["event_id"][-1] for e in landed] == ["2", "4", "1", "3", "5"]
    assert [e["event_id"][-1] for e in sorted(landed, key=arrival_order)] == ["2", "4", "1", "3", "5"]
    stamps = [parse_ms(e["etl_tstamp"]) for e in landed]
    assert stamps[0] < stamps[1] < stamps[2] < stamps[3] < stamps[4]     # events 1 and 3 came from two requests


class RecordedStop(threading.Event):
    """The worker's stop event, set at its first idle wait, which it records."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        self.set()
        return True


def test_an_idle_worker_waits_until_its_shards_are_due_not_its_shorter_idle_sleep(aws_settings):
    """0.2 s behind the 0.25 s interval woke to a poll with no shard due, and slept again: each raw
    shard was read every 0.4 s, and a quiet shop's hit waited up to that long here."""
    settings = enrich_settings(aws_settings)
    kinesis = aws.client("kinesis", settings.region)
    stop = RecordedStop()
    worker = Worker(Enricher(settings), consumer_for(settings, settings.raw_stream, "enrich", read_interval_s=2.0,
                                                     lease_ms=30_000),
                    Producer(KinesisStream(kinesis, settings.enriched_stream)),
                    Producer(KinesisStream(kinesis, settings.bad_stream)), stop)
    try:
        worker.run(idle_sleep=0.05)
    finally:
        worker.consumer.close()
    assert len(stop.waits) == 1 and 1.0 < stop.waits[0] <= 2.0     # until the shard's next read


def test_refuses_to_start_without_a_pseudonymisation_key(aws_settings, tmp_path):
    env = {k: v for k, v in child_env(aws_settings).items() if k != "CLICKSTREAM_PSEUDONYMISATION_KEY"}
    result = subprocess.run([sys.executable, "-m", "enrich"], env=env, cwd=ROOT, capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert b"CLICKSTREAM_PSEUDONYMISATION_KEY" in result.stderr



def test_worker_waits_for_a_raw_stream_that_does_not_exist_yet(aws_settings):
    # Started before provisioning: reading fails, the worker keeps retrying instead of exiting.
    late = enrich_settings(aws_settings, raw_stream=aws_settings.raw_stream + "-late")
    kinesis = aws.client("kinesis", late.region)
    stop = threading.Event()
    worker = Worker(Enricher(late), consumer_for(late, late.raw_stream, "enrich", lease_ms=5000),
                    Producer(KinesisStream(kinesis, late.enriched_stream)),
                    Producer(KinesisStream(kinesis, late.bad_stream)), stop, retry_cap_s=0.5)
    thread = threading.Thread(target=worker.run, kwargs={"idle_sleep": 0.05})
    thread.start()
    try:
        time.sleep(1.0)
        assert thread.is_alive()
        kinesis.create_stream(StreamName=late.raw_stream, ShardCount=1)
        kinesis.get_waiter("stream_exists").wait(StreamName=late.raw_stream, WaiterConfig={"Delay": 1})
        put_raw(late, [get_record({**EV, "e": "pv", "eid": "00000000-0000-4000-8000-0000000000aa"})])
        found = wait_for(lambda: read_stream(late.enriched_stream), timeout=30)
        assert orjson.loads(found[0][1])["event_id"] == "00000000-0000-4000-8000-0000000000aa"
    finally:
        stop.set()
        thread.join(30)
        worker.consumer.close()
    assert not thread.is_alive()



def test_kill_9_mid_write_twice_loses_nothing_and_repeats_only_the_unacknowledged_batch(aws_settings, tmp_path):
    # The enricher talks to the emulator through a proxy that hangs one write: it is killed first with
    # a batch written but not acknowledged, then with a batch not written yet. One in fifty records is garbage.
    total, batch = 1_500, 40
    eids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(total)]
    garbage = set(range(0, total, 50))
    put_raw(aws_settings, [f"garbage-{i}".encode() if i in garbage else get_record({**EV, "e": "pv", "eid": eid})
                           for i, eid in enumerate(eids)])

    def good_ids() -> list[str]:
        return [orjson.loads(data)["event_id"] for _, data in read_stream(aws_settings.enriched_stream)]

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        env = child_env(aws_settings, AWS_ENDPOINT_URL=proxy.endpoint, CLICKSTREAM_BATCH_LIMIT=str(batch),
                        CLICKSTREAM_LEASE_MS="3000", CLICKSTREAM_READ_INTERVAL_S="0.05")
        enrich = None
        try:
            # The first batch's good events are written, unacknowledged (the hang names the enriched stream:
            # a batch's bad rows are written after its good events, to another stream).
            proxy.hang_next = (PUT_RECORDS, "after", aws_settings.enriched_stream)
            enrich = Process("enrich", env, tmp_path / "first.log")
            wait_for(proxy.hanging.is_set, timeout=60, what="the first write")
            enrich.popen.kill()
            enrich.popen.wait(10)
            written_once = len(good_ids())
            assert written_once == batch - 1        # its 40 records less the garbage one

            proxy.hanging.clear()
            enrich = Process("enrich", env, tmp_path / "second.log")
            wait_for(lambda: len(good_ids()) >= 600, timeout=60, what="600 good events")
            proxy.hang_next = (PUT_RECORDS, "before", aws_settings.enriched_stream)  # one enriched, nothing written
            wait_for(proxy.hanging.is_set, timeout=30, what="a later write")
            enrich.popen.kill()
            enrich.popen.wait(10)
            assert len(set(good_ids())) < total - len(garbage)

            enrich = Process("enrich", env, tmp_path / "last.log")
            wanted = {eid for i, eid in enumerate(eids) if i not in garbage}
            wait_for(lambda: set(good_ids()) == wanted, timeout=90, interval=0.5, what="every good event")
            bad = wait_for(lambda: at_least(read_stream(aws_settings.bad_stream), len(garbage)), timeout=30)
            assert enrich.terminate() == 0, enrich.output()
        finally:
            if enrich:
                enrich.cleanup()
    ids = good_ids()
    assert len(ids) - len(set(ids)) == written_once          # only the unacknowledged batch came out twice
    assert sorted(orjson.loads(data)["data"]["payload"] for _, data in bad) == sorted(f"garbage-{i}" for i in garbage)


def test_an_enriched_stream_answering_slower_than_output_timeout_s_gets_each_event_a_bounded_number_of_times(
        aws_settings, tmp_path):
    # Each PutRecords lands 1.1 s after it was made, past the 1 s read timeout. Retried at that timeout
    # (by botocore, the producer, then the worker's delivery loop), a batch landed once per attempt for
    # as long as the stream was slow: 7 copies of each event in a minute at the 10 s default. (A delay
    # just past the timeout leaves the raised waits, 2 and 3 s, ample room on a loaded machine: with
    # 0.5 s and 1.1 s, a call through the proxy once took longer than 1.5 s.)
    total, batch = 60, 20
    eids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(total)]
    put_raw(aws_settings, [get_record({**EV, "e": "pv", "eid": eid}) for eid in eids])
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.delays[PUT_RECORDS] = 1.1
        enrich = Process("enrich", child_env(aws_settings, AWS_ENDPOINT_URL=proxy.endpoint, CLICKSTREAM_BATCH_LIMIT=str(batch),
                                             CLICKSTREAM_OUTPUT_TIMEOUT_S="1"), tmp_path / "enrich.log")
        try:
            wait_for(lambda: {orjson.loads(data)["event_id"] for _, data in read_stream(aws_settings.enriched_stream)}
                     == set(eids), timeout=60, interval=0.5, what="every event enriched")
            time.sleep(2)          # a copy sent by a call given up on lands 1.1 s after it was made
            assert enrich.terminate() == 0, enrich.output()
        finally:
            enrich.cleanup()
    counts = Counter(orjson.loads(data)["event_id"] for _, data in read_stream(aws_settings.enriched_stream))
    # Timed out at 1 s, the first batch is answered within 2 s (3 s at worst): three copies at most. The
    # batches after it go at the raised timeout and land once.
    assert max(counts.values()) <= 3, Counter(counts.values())
    assert sum(1 for copies in counts.values() if copies > 1) <= batch, Counter(counts.values())
    assert "did not answer PutRecords within 1.0 s" in enrich.output()


def test_failing_checkpoints_are_one_warning_line_per_30_s_not_one_per_batch(caplog):
    """With the lease table refusing checkpoint writes (an IAM change), every batch logged a line."""
    import logging

    from botocore.exceptions import ClientError

    from common.consumer import Consumer
    from common.leases import MemoryLeaseTable
    from common.streams import MemoryStream
    from tests.enrich.helpers import enricher

    class RefusesCheckpoints(MemoryLeaseTable):
        def checkpoint(self, shard_id, owner, sequence, meta):
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no UpdateItem"}}, "UpdateItem")

    raw, good, bad = MemoryStream("raw"), MemoryStream("enriched"), MemoryStream("bad")
    worker = Worker(enricher(), Consumer(raw, RefusesCheckpoints(), batch_limit=1), Producer(good), Producer(bad))
    raw.put_records([("k", get_record({"e": "pv", "eid": f"00000000-0000-4000-8000-{i:012d}", "p": "web",
                                       "tv": "js-4.1.0", "aid": "shop"})) for i in range(5)])
    runner = threading.Thread(target=worker.run, kwargs={"idle_sleep": 0.01}, daemon=True)
    with caplog.at_level(logging.WARNING, logger="enrich.worker"):
        runner.start()
        wait_for(lambda: len(good.all_records()) + len(bad.all_records()) == 5, timeout=10)
        worker.stop.set()
        runner.join(10)
    lines = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("1 checkpoints failed since the last such line")
