"""The whole pipeline at once, each component killed (``kill -9``) in turn while a shop's traffic flows:
collector -> enricher -> lake loader and scorer -> discount engine, over the emulator. Each component's
own tests crash it alone; this one counts events in and out across all of them: every hit the
collector acknowledged reaches the lake and is scored, no redelivery is counted twice in a session,
and every session gets one offer, paid for once from the hour's budget.

The components reach the emulator through a fault proxy, so that each kill comes at the worst moment:
with a write to the next stream done but not acknowledged (its batch is sent again after the restart).
Then the proxy answers every call with 503 for longer than a lease, as an AWS outage, and the traffic
goes on.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import requests

from common import aws
from discount.offers import OfferTable, hour_of
from tests.batch.conftest import lake_event_ids
from tests.conftest import ROOT, settings_env, wait_for
from tests.discount.test_engine import offers
from tests.enrich.helpers import read_stream
from tests.faults import PUT_RECORDS, FaultProxy
from tests.scorer.conftest import MODEL
from tests.scorer.helpers import free_port
from tests.scorer.test_restart import predictions

SESSIONS = 30
TP2 = "/com.snowplowanalytics.snowplow/tp2"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")


class Component:
    """``python -m <module>`` in a process group of its own (the collector forks workers), restartable
    with the same settings; ``ready`` is a URL answering 200 once it serves."""

    def __init__(self, module: str, env: dict, log: Path, ready: str):
        self.module, self.env, self.log, self.ready = module, env, log, ready
        self.process: subprocess.Popen | None = None

    def start(self) -> Component:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._up, 60, what=f"{self.module} at {self.ready}")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.module} exited {self.process.returncode}:\n"
                                 f"{self.log.read_text(encoding='utf-8')[-3000:]}")
        try:
            return requests.get(self.ready, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def kill9(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


def pipeline(settings, tmp_path: Path, endpoint: str) -> dict[str, Component]:
    ports = {name: free_port() for name in ("collector", "enrich", "loader", "scorer", "discount")}

    def component(name: str, module: str, ready: str, **env) -> Component:
        variables = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": endpoint,
                     **{f"CLICKSTREAM_{key.upper()}": str(value) for key, value in env.items()}}
        return Component(module, variables, tmp_path / f"{name}.log", f"http://127.0.0.1:{ports[name]}{ready}")

    return {
        "collector": component("collector", "collector", "/health", port=ports["collector"], spool_dir=tmp_path / "spool",
                               linger_ms=50),
        "enrich": component("enrich", "enrich", "/metrics", enrich_metrics_port=ports["enrich"], lease_ms=3000,
                            pseudonymisation_key="crash-test-pseudonymisation-key"),
        "loader": component("loader", "batch.loader", "/metrics", lake_metrics_port=ports["loader"], lake_lease_ms=3000,
                            lake_flush_seconds=2),
        "scorer": component("scorer", "scorer", "/ping", port=ports["scorer"], model_name=MODEL, model_poll_s=0.5,
                            lease_ms=3000),
        # An offer for every session at its third event, whatever its P(buy): each session qualifies once.
        "discount": component("discount", "discount", "/metrics", discount_metrics_port=ports["discount"], lease_ms=3000,
                              offer_threshold=0, offer_ceiling=1, min_events=3, budget_per_hour=100_000),
    }


def hit(session_id: str, user_id: str, index: int) -> dict:
    """One page view of a session, as the JavaScript tracker posts it (every value a string)."""
    kind = "product" if index % 3 else "home"
    context = {"schema": CONTEXTS, "data": [{"schema": "iglu:com.clickshop/page_type/jsonschema/1-0-0",
                                             "data": {"type": kind, "category": "shoes"}}]}
    now = str(int(time.time() * 1000))
    return {"e": "pv", "eid": str(uuid.uuid4()), "p": "web", "tv": "js-3.24.0", "aid": "clickshop", "tna": "sp",
            "url": f"https://clickshop.test/{kind}/{index}", "page": f"Page {index}", "duid": user_id,
            "sid": session_id, "vid": "1", "dtm": now, "stm": now, "ua": CHROME, "co": orjson.dumps(context).decode()}


class Shop(threading.Thread):
    """Sends page views of every session, round robin, until stopped; each until the collector
    acknowledges it (through a collector's restart a hit is sent again, as a tracker does). ``sent``
    maps each session to its acknowledged hits."""

    def __init__(self, collector_url: str):
        super().__init__(daemon=True)
        self.url = collector_url + TP2
        self.sent: dict[str, list[str]] = {str(uuid.uuid4()): [] for _ in range(SESSIONS)}
        self.users = {session_id: str(uuid.uuid4()) for session_id in self.sent}
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for index in range(10_000):
                for session_id, ids in self.sent.items():
                    if self.stopping.is_set():
                        return
                    event = hit(session_id, self.users[session_id], index)
                    self._send(event)
                    ids.append(event["eid"])
                    time.sleep(0.03)
        except BaseException as exc:       # noqa: BLE001 - reported by the test
            self.error = exc

    def _send(self, event: dict) -> None:
        body = orjson.dumps({"schema": PAYLOAD_DATA, "data": [event]})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = requests.post(self.url, data=body, timeout=5,
                                       headers={"Content-Type": "application/json; charset=UTF-8", "User-Agent": CHROME})
                if answer.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the collector did not take event {event['eid']} in 60 s")

    def count(self) -> int:
        return sum(len(ids) for ids in self.sent.values())


def test_every_component_killed_in_turn_mid_traffic_loses_no_event_and_counts_none_twice(published, tmp_path):
    settings = published
    # (component, hits sent since the last kill, the write it is killed in: the call to hang and whether
    # before or after it is forwarded). The discount engine's first: its offers come at each session's
    # third hit, so its hang is set before them.
    kills = [("discount", 0, ("DynamoDB_20120810.TransactWriteItems", "after")),   # an offer and its budget unit
             ("collector", 60, (PUT_RECORDS, "after", settings.raw_stream)),
             ("enrich", 60, (PUT_RECORDS, "after", settings.enriched_stream)),
             ("scorer", 60, (PUT_RECORDS, "after", settings.predictions_stream)),
             ("loader", 60, None),                     # its buffer of up to lake_flush_seconds is read again
             ("enrich", 60, (PUT_RECORDS, "before", settings.enriched_stream))]
    started = time.time()
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        components = pipeline(settings, tmp_path, proxy.endpoint)
        try:
            for component in components.values():
                component.start()
            shop = Shop(components["collector"].ready.removesuffix("/health"))
            for name, hits, write in kills:
                target = shop.count() + hits
                wait_for(lambda target=target: shop.count() >= target or shop.error, 120, what=f"hits before {name}")
                if write:
                    proxy.hanging.clear()
                    proxy.hang_next = write
                if shop.ident is None:                 # the traffic starts once the first hang is set
                    shop.start()
                if write:
                    wait_for(proxy.hanging.is_set, 60, interval=0.05, what=f"{name}'s write {write}")
                components[name].kill9()
                components[name].start()
            # Then AWS itself is out (503s) for longer than a lease (3 s), the hits still coming.
            proxy.down, target, back_at = True, shop.count() + 60, time.monotonic() + 7
            wait_for(lambda: (shop.count() >= target and time.monotonic() > back_at) or shop.error, 120,
                     what="hits during the outage")
            proxy.down = False
            shop.stopping.set()
            shop.join(90)
            assert shop.error is None and not shop.is_alive(), shop.error
            sent = {event_id: session_id for session_id, ids in shop.sent.items() for event_id in ids}
            assert len(sent) == shop.count() > 5 * 60

            # Every acknowledged hit lands in the lake; the enricher's unacknowledged write landed twice.
            landed = wait_for(lambda: (ids := lake_event_ids(settings.bucket)) and set(ids) >= set(sent) and ids,
                              180, interval=1, what="every event in the lake")
            assert set(landed) == set(sent)
            copies = Counter(landed)
            assert len(landed) > len(sent) and max(copies.values()) == 2, Counter(copies.values())

            # Every event is scored; what came out twice is the same prediction twice, and each session's
            # count is its events: a redelivered event is not counted again.
            scored = wait_for(lambda: (got := predictions(settings)) and {p["event_id"] for p in got} >= set(sent) and got,
                              180, interval=1, what="a prediction for every event")
            by_event: dict[str, list[dict]] = {}
            for prediction in scored:
                assert prediction["session_id"] == sent[prediction["event_id"]]
                by_event.setdefault(prediction["event_id"], []).append(prediction)
            assert set(by_event) == set(sent)
            repeated = [answers for answers in by_event.values() if len(answers) > 1]
            assert repeated, "the scorer's unacknowledged write should have come out again"
            for answers in repeated:
                assert {(a["p_buy"], a["events_in_session"], a["decision"]) for a in answers} == \
                    {(answers[0]["p_buy"], answers[0]["events_in_session"], answers[0]["decision"])}
            counts = Counter({sid: 0 for sid in shop.sent})
            for answers in by_event.values():
                counts[answers[0]["session_id"]] = max(counts[answers[0]["session_id"]], answers[0]["events_in_session"])
            assert counts == Counter({session_id: len(ids) for session_id, ids in shop.sent.items()})
            assert read_stream(settings.bad_stream) == []

            # Every session has its offer, and the hour's budget paid for each once.
            wait_for(lambda: set(offers(settings)) == set(shop.sent), 120, interval=1, what="an offer for every session")
            table = OfferTable(aws.client("dynamodb"), settings.offers_table, budget_per_hour=100_000,
                               discount_percent=10, ttl_hours=24)
            hours = {hour_of(started), hour_of(time.time())}                  # the run may cross an hour
            assert sum(table.spent(dt.datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC).timestamp())
                       for hour in hours) == SESSIONS
        finally:
            proxy.release()
            for component in components.values():
                component.stop()
