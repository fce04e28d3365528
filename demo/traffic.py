"""Send realistic shop traffic to a collector over the Snowplow tracker protocol.

    python -m demo.traffic --collector http://127.0.0.1:8080 --sessions 200 --rate 20
    python -m demo.traffic --backfill-days 7 --sessions 20000          # history, as fast as it goes

Live mode starts sessions now and sends each event when it happens (``--speed`` compresses the
sessions' time so a demo need not wait minutes for a checkout). Backfill mode spreads sessions over
the last N days with a time-of-day pattern and sends them as fast as the collector takes them, in
batches. Event time is in ``dtm`` (device created) and, in backfill, ``ttm`` (true timestamp): the
collector stamps ``collector_tstamp`` on receipt, so the enricher must prefer ``true_tstamp`` when
set (Snowplow's ``derived_tstamp`` does the same) for backfilled history to land in its own hours.

A request the collector refuses with 503 is retried after its ``Retry-After``; nothing is dropped
silently: the summary counts every event that could not be sent, and ``--failed-out`` keeps them.
"""
from __future__ import annotations

import heapq
import http.client
import json
import math
import queue
import random
import socket
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

import click
from tqdm import tqdm

from common.cli import CLI_CONTEXT, FiniteRange
from common.features import MAX_EVENT_AGE_MS
from demo import catalogue as cat
from demo.sessions import Session, SessionFactory

PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
POST_PATH = "/com.snowplowanalytics.snowplow/tp2"
GET_PATH = "/i"
BACKFILL_GAP_MS = 3_600_000          # backfilled history ends an hour ago, so no session runs into the future


# ------------------------------------------------------------------------------------ schedule


def backfill_starts(rng: random.Random, sessions: int, days: float, end_ms: int) -> list[int]:
    """Session start times over ``days`` before ``end_ms``, busier in the evening (UTC), sorted."""
    begin = end_ms - int(days * 86_400_000)
    midnight = begin - begin % 86_400_000
    span_days = math.ceil((end_ms - midnight) / 86_400_000)
    starts: list[int] = []
    while len(starts) < sessions:
        hour = rng.choices(range(24), cat.HOUR_WEIGHTS)[0]
        at = midnight + rng.randrange(span_days) * 86_400_000 + hour * 3_600_000 + rng.randrange(3_600_000)
        if begin <= at < end_ms:
            starts.append(at)
    return sorted(starts)


def live_starts(rng: random.Random, sessions: int, start_ms: int, sessions_per_s: float) -> Iterator[int]:
    """Poisson arrivals from ``start_ms``."""
    at = float(start_ms)
    for _ in range(sessions):
        yield int(at)
        at += rng.expovariate(sessions_per_s) * 1000


def timeline(factory: SessionFactory, starts: Iterator[int]) -> Iterator[tuple[int, Session, int]]:
    """Every event of every session in time order: (time ms, session, index in session).

    Sessions are built lazily as their start comes up, so days of history never sit in memory.
    """
    pending: list[tuple[int, int, int, Session]] = []
    for start in starts:
        while pending and pending[0][0] < start:
            yield _pop(pending)
        session = factory.build(start)
        heapq.heappush(pending, (int(session.events[0]["dtm"]), session.index, 0, session))
    while pending:
        yield _pop(pending)


def _pop(pending: list) -> tuple[int, Session, int]:
    at, _, position, session = heapq.heappop(pending)
    if position + 1 < len(session.events):
        heapq.heappush(pending, (int(session.events[position + 1]["dtm"]), session.index, position + 1, session))
    return at, session, position


def mean_events_per_session(seed: int, buy_share: float, sample: int = 300) -> float:
    factory = SessionFactory(seed + 7919, buy_share)
    return sum(len(factory.build(0).events) for _ in range(sample)) / sample


# ------------------------------------------------------------------------------------ requests


@dataclass
class Request:
    session: Session
    events: list[dict[str, str]]
    last: bool                              # the session's final request

    def encode(self, stm: int) -> tuple[str, str, bytes | None, dict[str, str]]:
        """(method, path with query, body, headers) as the browser tracker would send them."""
        visitor = self.session.visitor
        items = [{**event, "stm": str(stm)} for event in self.events]
        headers = {"User-Agent": visitor.device.useragent, "X-Forwarded-For": visitor.ip,
                   "Referer": self.events[0]["url"], "Origin": cat.SHOP,
                   "Accept-Language": visitor.lang}
        if visitor.cookie:
            headers["Cookie"] = f"sp={visitor.cookie}"
        if self.session.method == "GET":
            return "GET", GET_PATH + "?" + urllib.parse.urlencode(items[0]), None, headers
        body = json.dumps({"schema": PAYLOAD_DATA, "data": items}, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json; charset=UTF-8"
        return "POST", POST_PATH, body, headers


def requests_for(events: Iterator[tuple[int, Session, int]], batch_size: int,
                 backfill: bool) -> Iterator[tuple[int, Request]]:
    """Group a session's events into requests: GET sends one event, POST up to ``batch_size``."""
    buffers: dict[str, list[dict[str, str]]] = {}
    for at, session, position in events:
        event = dict(session.events[position])
        if backfill:
            event["ttm"] = event["dtm"]
        buffer = buffers.setdefault(session.key, [])
        buffer.append(event)
        last = position == len(session.events) - 1
        limit = 1 if session.method == "GET" else batch_size
        if last or len(buffer) >= limit:
            yield at, Request(session, buffers.pop(session.key), last)


# ------------------------------------------------------------------------------------ sending


@dataclass
class Stats:
    sessions: int = 0
    buying_sessions: int = 0
    requests: int = 0
    events_sent: int = 0
    events_failed: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _valid_port(url: urllib.parse.SplitResult) -> bool:
    try:
        return url.port is None or url.port > 0     # .port raises for a port out of range or not a number
    except ValueError:
        return False


def _check_listening(url: urllib.parse.SplitResult, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens there: otherwise each request would first use up its
    retries (about 13 s with the defaults) before the run reports anything."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise click.ClickException(f"no collector answers at {url.geturl()} ({exc.strerror or exc}); "
                                   "`make up` starts the local stack") from None


class Sender:
    """Worker threads with keep-alive connections; one visitor always goes through one worker,
    so a session's requests arrive in order, as from one browser."""

    def __init__(self, collector: str, *, workers: int = 4, max_attempts: int = 8, max_wait_s: float = 30.0,
                 timeout_s: float = 10.0, on_done: Callable[[Request, bool], None] | None = None,
                 failed_out: Path | None = None, clock: Callable[[], float] = time.time):
        url = urllib.parse.urlsplit(collector)
        if url.scheme not in ("http", "https") or not url.hostname or not _valid_port(url):
            raise click.BadParameter(f"expected http(s)://host:port, got {collector!r}", param_hint="--collector")
        _check_listening(url)
        self.url = url
        self.prefix = url.path.rstrip("/")
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.on_done = on_done
        self.clock = clock
        self.stats = Stats()
        # Open for the sender's whole life (closed in close()): failures are written as they happen.
        self.failed_out = open(failed_out, "a") if failed_out else None  # noqa: SIM115
        self.queues = [queue.Queue(maxsize=256) for _ in range(workers)]
        self.threads = [threading.Thread(target=self._work, args=(q,), daemon=True) for q in self.queues]
        for thread in self.threads:
            thread.start()

    def submit(self, request: Request, stm: int | None = None) -> None:
        worker = zlib.crc32(request.session.visitor.duid.encode()) % len(self.queues)
        self.queues[worker].put((request, stm))

    def close(self) -> Stats:
        for q in self.queues:
            q.put(None)
        for thread in self.threads:
            thread.join()
        if self.failed_out:
            self.failed_out.close()
        return self.stats

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        return kind(self.url.hostname, self.url.port, timeout=self.timeout_s)

    def _work(self, jobs: queue.Queue) -> None:
        connection = self._connect()
        while (job := jobs.get()) is not None:
            request, stm = job
            try:
                connection, error = self._send(connection, request, stm)
            except Exception as exc:  # noqa: BLE001 - a bug must show up as unsent events, not a hung run
                error = f"unexpected error: {type(exc).__name__}: {exc}"
            with self.stats.lock:
                self.stats.requests += 1
                if error:
                    self.stats.events_failed += len(request.events)
                    self.stats.failures[error] += len(request.events)
                    self._keep_failed(request, stm, error)
                else:
                    self.stats.events_sent += len(request.events)
            if self.on_done:
                self.on_done(request, error is None)
        connection.close()

    def _send(self, connection, request: Request, stm: int | None):
        """Send with retries; returns (connection, None) or (connection, reason it was not sent)."""
        reason = "not sent"
        for attempt in range(self.max_attempts):
            method, path, body, headers = request.encode(stm if stm is not None else int(self.clock() * 1000))
            try:
                connection.request(method, self.prefix + path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = self._connect()
                reason = f"connection error: {type(exc).__name__}"
                self._pause(attempt, None)
                continue
            if response.status < 300:
                self._remember_cookie(request, response.headers.get_all("Set-Cookie") or [])
                return connection, None
            reason = f"HTTP {response.status}"
            if response.status not in (429, 500, 502, 503, 504):
                return connection, reason          # the request itself is wrong: retrying cannot help
            self._pause(attempt, response.getheader("Retry-After"))
        return connection, reason

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        if attempt + 1 >= self.max_attempts:
            return
        with self.stats.lock:
            self.stats.retries += 1
        try:
            wait = float(retry_after) if retry_after else 0.1 * 2**attempt
        except ValueError:                         # an HTTP date: not worth parsing, back off instead
            wait = 0.1 * 2**attempt
        time.sleep(min(self.max_wait_s, wait) * random.uniform(0.8, 1.2))

    @staticmethod
    def _remember_cookie(request: Request, headers: list[str]) -> None:
        """Keep the collector's `sp` cookie for the visitor's next requests, as a browser would
        (crawlers keep none)."""
        if request.session.visitor.device.kind == "bot":
            return
        for header in headers:
            cookie = SimpleCookie()
            try:
                cookie.load(header)
            except CookieError:
                continue
            if "sp" in cookie:
                request.session.visitor.cookie = cookie["sp"].value

    def _keep_failed(self, request: Request, stm: int | None, reason: str) -> None:
        if self.failed_out:
            method, path, body, headers = request.encode(stm or int(self.clock() * 1000))
            self.failed_out.write(json.dumps({"reason": reason, "method": method, "path": path, "headers": headers,
                                              "body": body.decode() if body else None}) + "\n")


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Plan:
    sessions: int
    seed: int = 1
    buy_share: float = 0.1
    rate: float | None = None                # events/s; None: 20 live, unlimited backfill
    backfill_days: float = 0
    speed: float = 1.0
    batch_size: int | None = None            # events per POST; None: 1 live, 25 backfill


def schedule(plan: Plan, now_ms: int) -> Iterator[tuple[int, Request]]:
    """The whole run as (send time ms, request), reproducible for a seed and a start time."""
    rng = random.Random(f"{plan.seed}:starts")
    backfill = plan.backfill_days > 0
    factory = SessionFactory(plan.seed, plan.buy_share, time_scale=1.0 if backfill else 1.0 / plan.speed)
    if backfill:
        starts: Iterator[int] = iter(backfill_starts(rng, plan.sessions, plan.backfill_days, now_ms - BACKFILL_GAP_MS))
    else:
        rate = plan.rate or 20.0
        per_session = mean_events_per_session(plan.seed, plan.buy_share)
        starts = live_starts(rng, plan.sessions, now_ms, rate / per_session)
    batch = plan.batch_size or (25 if backfill else 1)
    return requests_for(timeline(factory, starts), batch, backfill)


def run(plan: Plan, sender: Sender, *, clock: Callable[[], float] = time.time,
        stop: Callable[[], bool] = lambda: False) -> Stats:
    """Feed the schedule to the sender: live requests wait for their time, all respect the rate."""
    backfill = plan.backfill_days > 0
    rate = plan.rate
    began, sent_events = clock(), 0
    seen: set[str] = set()
    for at, request in schedule(plan, int(clock() * 1000)):
        if stop():
            break
        if not backfill:
            _sleep_until(at / 1000, clock)
        if rate:
            _sleep_until(began + sent_events / rate, clock)
        if request.session.key not in seen:
            seen.add(request.session.key)
            sender.stats.sessions += 1
            sender.stats.buying_sessions += request.session.buys
        if request.last:
            seen.discard(request.session.key)
        sent_events += len(request.events)
        # Backfilled requests carry their own past send time; live ones are stamped as they go out.
        stm = int(request.events[-1]["dtm"]) + 150 if backfill else None
        sender.submit(request, stm)
    return sender.close()


def _sleep_until(when: float, clock: Callable[[], float]) -> None:
    delay = when - clock()
    if delay > 0:
        time.sleep(delay)


@click.command(context_settings=CLI_CONTEXT, help=(__doc__ or "").split("\n\n")[0])
@click.option("--collector", default="http://127.0.0.1:8080", show_default=True, help="collector base URL")
@click.option("--sessions", default=200, show_default=True, type=click.IntRange(min=1), help="sessions to send")
@click.option("--rate", type=FiniteRange(min=0, min_open=True), default=None,
              help="events per second [default: 20 live, unlimited in backfill]")
@click.option("--seed", default=1, show_default=True, type=int, help="same seed, same sessions")
@click.option("--backfill-days", default=0.0, show_default=True,
              type=FiniteRange(min=0, max=MAX_EVENT_AGE_MS / 86_400_000),
              help="spread sessions over the last D days and send them at once (0: live); at most 30, as "
                   "event times further back are taken as their collection time")
@click.option("--buy-share", default=0.1, show_default=True, type=FiniteRange(0, 1),
              help="approximate share of sessions that end in a purchase")
@click.option("--speed", default=1.0, show_default=True, type=FiniteRange(min=0, min_open=True),
              help="live mode: play sessions this many times faster than real time")
@click.option("--batch-size", default=None, type=click.IntRange(1, 500),
              help="events per POST [default: 1 live, 25 backfill]")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64), help="parallel connections")
@click.option("--max-attempts", default=8, show_default=True, type=click.IntRange(1, 100),
              help="tries per request before it counts as not sent")
@click.option("--failed-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write requests that could not be sent to this JSON-lines file")
def main(collector: str, sessions: int, rate: float | None, seed: int, backfill_days: float, buy_share: float,
         speed: float, batch_size: int | None, workers: int, max_attempts: int, failed_out: Path | None) -> None:
    plan = Plan(sessions, seed, buy_share, rate, backfill_days, speed, batch_size)
    mode = f"backfill of {backfill_days:g} day(s)" if backfill_days else f"live at {rate or 20:g} events/s"
    click.echo(f"sending {sessions} sessions to {collector} ({mode}, seed {seed})", err=True)

    def done(request: Request, ok: bool) -> None:
        if request.last:
            bar.update(1)
            bar.set_postfix(sent=sender.stats.events_sent, failed=sender.stats.events_failed, refresh=False)

    sender = Sender(collector, workers=workers, max_attempts=max_attempts, on_done=done, failed_out=failed_out)
    bar = tqdm(total=sessions, unit="session", file=sys.stderr)
    stopping = threading.Event()
    try:
        stats = run(plan, sender, stop=stopping.is_set)
    except KeyboardInterrupt:
        stopping.set()
        stats = sender.close()
    bar.close()
    click.echo(summary(stats))
    if stats.events_failed:
        sys.exit(1)


def summary(stats: Stats) -> str:
    lines = [f"sessions: {stats.sessions} ({stats.buying_sessions} with a purchase)",
             f"events sent: {stats.events_sent} in {stats.requests} requests ({stats.retries} retries)",
             f"events NOT sent: {stats.events_failed}"]
    lines += [f"  {count} events: {reason}" for reason, count in stats.failures.most_common()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
