"""Where predictions go: the predictions stream and the latest-per-session DynamoDB table.

Both writes are retried until they succeed (or the worker stops, or the predictions' shard goes to
another worker), because the worker checkpoints only after they are durable. The table write is
conditional on the event time and the session's event count, so a replay after a crash can rewrite
the same prediction but never an older one. A session's purchase marks its row (``bought_ms``), after
its predictions of the same write: the discount engine makes no offer on a prediction read after it.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from botocore.exceptions import BotoCoreError, ClientError

from common import jsonbytes, logs
from common.producer import Producer, Undelivered
from common.producer import batches as put_record_calls
from common.retry import backoff_s
from scorer import metrics

log = logging.getLogger("scorer.sink")

_NEWER_OR_SAME = ("attribute_not_exists(session_id) OR event_ms < :ms "
                  "OR (event_ms = :ms AND events_in_session <= :n)")
# Only the row of the session that bought: not one a later session under the same id has since written.
_SAME_SESSION = "attribute_exists(session_id) AND event_ms <= :ms"


def table_item(prediction: dict, event_ms: int, expires_at: int) -> dict:
    item = {"event_ms": {"N": str(event_ms)}, "expires_at": {"N": str(expires_at)}}
    for key, value in prediction.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            item[key] = {"S": str(value)}
        else:
            item[key] = {"N": repr(value)}
    return item


def from_item(item: dict) -> dict:
    """A table item back to the prediction record (numbers as int or float)."""
    out = {}
    for key, value in item.items():
        if "S" in value:
            out[key] = value["S"]
        elif "N" in value:
            number = value["N"]
            out[key] = float(number) if any(c in number for c in ".eE") else int(number)
    return out


class PredictionWriter:
    """Writes predictions durably; ``table`` may be empty to write only the stream (benchmarks)."""

    def __init__(self, producer: Producer | None, dynamodb, table: str | None, ttl_s: int, threads: int = 8,
                 sleep: Callable[[float], None] = time.sleep):
        self.producer = producer
        self.dynamodb = dynamodb
        self.table = table
        self.ttl_s = ttl_s
        self.sleep = sleep
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="predictions") if table else None
        # A throttled stream or table is retried every ~2 s for as long as it lasts: once per 30 s in the log.
        self.stream_retries = logs.Tally(every_s=30.0)
        self.table_retries = logs.Tally(every_s=30.0)

    def write(self, by_shard: dict[str, list[tuple[dict, int]]], stop: Callable[[], bool] = lambda: False,
              owns: Callable[[str], bool] = lambda shard: True, renew: Callable[[], object] = lambda: None,
              max_wait_s: float = 2.0, run: Callable[..., list] = lambda call, *args: call(*args),
              bought: dict[str, list[tuple[str, int]]] | None = None) -> bool:
        """Write each shard's (prediction, event_ms) pairs, then mark the rows of its ``bought``
        (session_id, event_ms) pairs; True once all are durable, False if stopped first.

        ``stop`` is asked before every retry. ``renew`` is called before every PutRecords call and
        every table round (cheap: the worker's consumer renews its leases only when due), since a
        write retried through throttling can outlast the leases; for the same reason no wait between
        retries is longer than ``max_wait_s`` (the lease renewal interval), and each PutRecords send goes
        through ``run`` (the consumer's ``while_renewing``: one send against a stream answering in seconds
        outlasted the lease by itself). ``owns`` is asked then, once per shard: the predictions of a
        shard it refuses are dropped from the write (the shard went to another worker, which reads
        those events again from the checkpoint and publishes them).
        """
        entries = {shard: [(p["session_id"], jsonbytes.dumps(p)) for p, _ in pairs] for shard, pairs in by_shard.items()}
        # The table holds the latest prediction per session: a benchmark's writer without one skips this.
        latest = [(shard, pair) for shard, pairs in by_shard.items() for pair in self._latest(pairs)] if self.pool else []
        marks = [(shard, mark) for shard, shard_marks in (bought or {}).items() for mark in shard_marks] \
            if self.pool else []
        attempt = 0
        while entries or latest or marks:
            if attempt:
                if stop():
                    return False
                metrics.WRITE_FAILURES.inc()
                self.sleep(backoff_s(attempt, 0.05, min(2.0, max_wait_s)))
            attempt += 1
            entries = self._send(entries, owns, renew, run) if self.producer is not None else {}
            renew()
            owned = {shard for shard in {*by_shard, *(bought or {})} if owns(shard)}
            put = functools.partial(self._put, expires_at=int(time.time()) + self.ttl_s)
            latest = self._in_parallel([item for item in latest if item[0] in owned], put, renew, max_wait_s)
            if not latest:      # a mark goes after its session's last put, which would otherwise erase it
                marks = self._in_parallel([item for item in marks if item[0] in owned], self._mark, renew, max_wait_s)
        metrics.PREDICTIONS.inc(sum(len(pairs) for shard, pairs in by_shard.items() if owns(shard)))
        return True

    def _send(self, entries: dict[str, list[tuple[str, bytes]]], owns: Callable[[str], bool],
              renew: Callable[[], object], run: Callable[..., list]) -> dict[str, list[tuple[str, bytes]]]:
        """One try at the stream for the shards still owned, in calls that mix shards (a round trip for
        up to 500 predictions); what was not delivered, by shard."""
        undelivered: list[Undelivered] = []
        for call in put_record_calls([entry for shard_entries in entries.values() for entry in shard_entries]):
            renew()
            if lost := [shard for shard in entries if not owns(shard)]:
                dropped = {data for shard in lost for _, data in entries[shard]}
                call = [entry for entry in call if entry[1] not in dropped]
            undelivered += run(self.producer.send, call) if call else []
        if not undelivered:
            return {}
        if retries := self.stream_retries.add():
            log.warning("predictions not yet on the stream after %d tries since the last such line: now %d, %s",
                        retries, len(undelivered), undelivered[0].reason)
        shard_of = {data: shard for shard, shard_entries in entries.items() for _, data in shard_entries}
        again: dict[str, list[tuple[str, bytes]]] = {}
        for entry in undelivered:
            again.setdefault(shard_of[entry.data], []).append((entry.partition_key, entry.data))
        return again

    @staticmethod
    def _latest(predictions: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        # Only the last prediction of each session in this flush needs to reach the table.
        last: dict[str, tuple[dict, int]] = {}
        for prediction, event_ms in predictions:
            last[prediction["session_id"]] = (prediction, event_ms)
        return list(last.values())

    def _in_parallel(self, items: list[tuple[str, object]], write: Callable[[object], str | None],
                     renew: Callable[[], object] = lambda: None, renew_every_s: float = 2.0) -> list:
        """Conditional writes of (shard, item) in parallel; returns the ones to retry. ``renew`` is called every
        ``renew_every_s`` meanwhile: a throttled table makes each write wait for botocore's retries
        (seconds), and a round of a thousand sessions then outlasts the leases."""
        if not items or self.pool is None:
            return []
        futures = [self.pool.submit(write, item) for _, item in items]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=renew_every_s)
            renew()
        errors = [future.result() for future in futures]
        failed = [error for error in errors if error]
        if failed and (rounds := self.table_retries.add()):     # one line per round at most, not one per session
            log.warning("predictions table writes failed in %d rounds since the last such line; now %d of %d: %s",
                        rounds, len(failed), len(items), failed[0])
        return [item for item, error in zip(items, errors) if error]

    def _put(self, pair: tuple[dict, int], expires_at: int) -> str | None:
        """None once the table holds this prediction or a later one, else the error."""
        prediction, event_ms = pair
        return self._conditional(self.dynamodb.put_item, Item=table_item(prediction, event_ms, expires_at),
                                 ConditionExpression=_NEWER_OR_SAME,
                                 ExpressionAttributeValues={":ms": {"N": str(event_ms)},
                                                            ":n": {"N": str(prediction["events_in_session"])}})

    def _mark(self, mark: tuple[str, int]) -> str | None:
        """None once the session's row says it bought, or holds no prediction of that session (none
        yet: too early, or emit=change; or a later session's), else the error."""
        session_id, event_ms = mark
        return self._conditional(self.dynamodb.update_item, Key={"session_id": {"S": session_id}},
                                 UpdateExpression="SET bought_ms = :ms", ConditionExpression=_SAME_SESSION,
                                 ExpressionAttributeValues={":ms": {"N": str(event_ms)}})

    def _conditional(self, write: Callable[..., object], **request) -> str | None:
        """None when the write was made or its condition says it need not be, else the error."""
        try:
            write(TableName=self.table, **request)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return None
            return str(exc)
        except BotoCoreError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True)
