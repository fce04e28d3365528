"""Batching producer with per-entry retries that never drops an entry silently."""
from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

from common import aws
from common.aws import THROTTLING_CODES
from common.logs import Tally
from common.retry import backoff_s
from common.streams import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_RECORD_BYTES, KinesisStream, StreamBackend

log = logging.getLogger(__name__)
MAX_KEY_CHARS = 256
Resend = Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]
TOO_LARGE = "record larger than 1 MiB"   # the reason of an entry no retry can deliver
# The longest read timeout of an output producer (``output_producer``), in base timeouts: 10 s, then 20
# and 30 s while the stream answers slowly. An entry lands at most three times so (timed out at 10 and
# 20 s, answered at 30 s), and one call, a connect and a read timeout, lasts at most 40 s.
OUTPUT_TIMEOUT_RAISE = 3


@dataclass(frozen=True)
class Undelivered:
    """An entry the producer gave up on, with the last reason; the caller must keep or report it."""

    partition_key: str
    data: bytes
    reason: str
    # Sent, and no answer within the read timeout: the stream may have taken it (outcome unknown).
    timed_out: bool = False

    @property
    def throttled(self) -> bool:
        """Refused by a stream at its limit, which answered: not a sign of an unreachable stream."""
        return any(code in self.reason for code in THROTTLING_CODES)

    @property
    def refused(self) -> bool:
        """AWS answered and refused ("An error occurred (Code) ..."): AccessDenied, a KMS key, a missing
        stream. Not a connection error or a timeout, which is an outage."""
        return "An error occurred (" in self.reason


def kinesis_key(key: str) -> str:
    """``key`` as Kinesis takes it (1 to 256 characters): a longer or empty key becomes its hash, so
    it still lands on one shard, instead of failing its whole PutRecords call on every retry."""
    if 0 < len(key) <= MAX_KEY_CHARS:
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def entry_size(partition_key: str, data: bytes) -> int:
    return len(partition_key.encode()) + len(data)


def batches(entries: list[tuple[str, bytes]]):
    """Split entries into PutRecords calls within Kinesis' count and byte limits, keeping order."""
    batch, size = [], 0
    for key, data in entries:
        item_size = entry_size(key, data)
        if batch and (len(batch) == MAX_BATCH_RECORDS or size + item_size > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((key, data))
        size += item_size
    if batch:
        yield batch


class ReadTimeouts:
    """The read timeout of a stream's PutRecords calls: ``base_s``, doubled after each call that got no
    answer in time, up to ``max_s``, and one step back down after each call answered within half the
    lower step. A call given up on may have landed: sent again at the same timeout, a batch landed once
    per attempt while the stream answered slower than that, for as long as it did. ``use`` is called
    with each new timeout (it switches the stream's client: botocore fixes a client's timeouts when it
    is made)."""

    def __init__(self, base_s: float, max_s: float, use: Callable[[float], None] = lambda seconds: None,
                 name: str = "the stream"):
        self.steps = [base_s]
        while self.steps[-1] < max_s:
            self.steps.append(min(max_s, self.steps[-1] * 2))
        self.step = 0
        self.use = use
        self.name = name
        self._at_longest = Tally(every_s=60.0)      # at the longest wait, every call times out alike

    @property
    def current(self) -> float:
        return self.steps[self.step]

    @property
    def raised(self) -> bool:
        return self.step > 0

    def timed_out(self) -> bool:
        """Wait longer next time; False when the wait is already the longest."""
        waited = self.current
        if self.step == len(self.steps) - 1:
            if count := self._at_longest.add():
                log.warning("stream %s did not answer PutRecords within %.1f s, the longest wait, %d times since "
                            "the last such line", self.name, waited, count)
            return False
        self._move(1)
        log.warning("stream %s did not answer PutRecords within %.1f s (what it was sent may have landed, and goes "
                    "again): waiting up to %.1f s for the next call", self.name, waited, self.current)
        return True

    def answered(self, elapsed_s: float) -> None:
        # Half the lower step: an answer time just under it would time out again on the next call.
        if self.step and elapsed_s < self.steps[self.step - 1] / 2:
            self._move(-1)
            if not self.step:
                log.info("stream %s answers within %.1f s again", self.name, self.current)

    def _move(self, by: int) -> None:
        self.step += by
        self.use(self.current)


class Producer:
    """Sends entries to a stream; retries only the failed ones with jittered exponential backoff.

    ``send`` returns what could not be delivered after ``max_attempts`` (an empty list on success):
    oversized entries, entries still failing, or everything when the stream cannot be reached.
    With ``retry_timeouts=False`` a call that timed out waiting for its answer ends the send at once
    (its entries marked ``timed_out``): it may have landed, and another attempt at the same timeout
    would land another copy; the caller decides when to send them again, and how patiently.
    Given ``timeouts``, the producer is that patient itself: a timed-out call ends the send likewise,
    and raises the read timeout of the next call; an answered one may lower it again.
    """

    def __init__(self, stream: StreamBackend, *, max_attempts: int = 5, base_delay: float = 0.05,
                 max_delay: float = 2.0, sleep=time.sleep, retry_timeouts: bool = True,
                 timeouts: ReadTimeouts | None = None):
        self.stream = stream
        self.max_attempts = max_attempts
        self.retry_timeouts = retry_timeouts and timeouts is None
        self.timeouts = timeouts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.retried = 0
        self.failed_sends = Tally(every_s=30.0)     # callers retry sends through an outage: a line per 30 s

    def _backoff(self, attempt: int) -> None:
        # "Full jitter": a random delay up to the exponential cap spreads retries of many producers.
        self.sleep(random.uniform(0, backoff_s(attempt, self.base_delay, self.max_delay)))

    def send(self, entries: list[tuple[str, bytes]], max_attempts: int | None = None,
             resend: Resend | None = None) -> list[Undelivered]:
        """``max_attempts`` per PutRecords call (the producer's own unless given); ``resend`` makes
        the entries of each retry from those that failed (the enricher stamps them anew)."""
        undelivered: list[Undelivered] = []
        valid = []
        for key, data in entries:
            key = kinesis_key(key)
            if entry_size(key, data) > MAX_RECORD_BYTES:
                undelivered.append(Undelivered(key, data, TOO_LARGE))
            else:
                valid.append((key, data))
        for batch in batches(valid):
            undelivered.extend(self._send_batch(batch, max_attempts or self.max_attempts, resend))
        return undelivered

    def _send_batch(self, pending: list[tuple[str, bytes]], max_attempts: int,
                    resend: Resend | None) -> list[Undelivered]:
        reasons: list[str] = ["not sent"] * len(pending)
        for attempt in range(max_attempts):
            if attempt:
                self.retried += len(pending)
                self._backoff(attempt)
                if resend:
                    pending = resend(pending)
            started = time.monotonic()
            try:
                results = self.stream.put_records(pending)
            except (BotoCoreError, ClientError, OSError) as exc:
                # Not a line per attempt, nor per send: through an outage every caller retries sends too.
                timed_out = isinstance(exc, ReadTimeoutError) and not self.retry_timeouts
                failed = self.failed_sends.add() if attempt == max_attempts - 1 and not timed_out else 0
                log.log(logging.WARNING if failed else logging.DEBUG, "put_records to %s failed (%d entries, attempt "
                        "%d of %d; %d sends failed since the last such line): %s", self.stream.name, len(pending),
                        attempt + 1, max_attempts, failed, exc)
                reasons = [f"{type(exc).__name__}: {exc}"] * len(pending)
                if timed_out:
                    if self.timeouts:
                        self.timeouts.timed_out()
                    return [Undelivered(key, data, reason, timed_out=True) for (key, data), reason in zip(pending, reasons)]
                continue
            if self.timeouts:
                self.timeouts.answered(time.monotonic() - started)
            failed = [(entry, f"{r.error_code}: {r.error_message}") for entry, r in zip(pending, results) if not r.ok]
            if not failed:
                return []
            pending = [entry for entry, _ in failed]
            reasons = [reason for _, reason in failed]
        return [Undelivered(key, data, reason) for (key, data), reason in zip(pending, reasons)]


def output_producer(region: str | None, stream_name: str, timeout: float = 10.0) -> Producer:
    """A producer for a consumer's output stream, whose caller sends what was not delivered again until
    it is (the enricher's, the scorer's). Connect and read timeout ``timeout``; a PutRecords with no
    answer in time may have landed, so it is not retried at that timeout (no botocore retry either):
    the send ends, and the next call waits twice as long, up to ``OUTPUT_TIMEOUT_RAISE`` × ``timeout``
    (``ReadTimeouts``). Retried at once at 10 s, by botocore and the producer, a batch landed up to 15
    times per send, and the caller sent it again."""
    clients = aws.ByReadTimeout(lambda read_timeout: aws.client("kinesis", region, timeout=timeout,
                                                                read_timeout=read_timeout, retries=0))
    stream = KinesisStream(clients(timeout), stream_name)
    timeouts = ReadTimeouts(timeout, OUTPUT_TIMEOUT_RAISE * timeout, clients.switching(stream), stream_name)
    return Producer(stream, timeouts=timeouts)
