"""Shard leases and checkpoints: one owner per shard, shared by N worker processes.

The DynamoDB table has a hash key ``group`` ("<app>#<stream>") and a range key ``item``: one row
per shard (owner, lease expiry, checkpoint, optional metadata) and one heartbeat row per live worker
("worker#<id>"), so a worker can count its peers and aim for an even share. Every ownership change
and every checkpoint is a conditional write on the owner, so a worker that lost a lease can never
move the checkpoint of a shard someone else now reads.

A row's ``expires_ms`` is stamped by the wall clock of the host that wrote it, so other hosts use it
only as a version that changes on every renewal: ``RenewalWatch`` decides expiry on the reader's own
monotonic clock. Heartbeat rows also carry ``expires_at`` (epoch seconds) for the table's TTL, which
removes the rows of workers that died without ``leave()``; shard rows never do, as they hold the
checkpoints. The row of a shard read to its end goes once the shard has aged out of the stream
(``remove_aged_out``): until then ``ensure()`` would recreate it, and the shard be read again.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from botocore.exceptions import ClientError

from common.streams import SHARD_END

WORKER_PREFIX = "worker#"
# How long after its last heartbeat DynamoDB's TTL may delete a worker row: the backstop for a group no
# live worker balances any more. A day, so that even a clock hours wrong never expires a live row.
HEARTBEAT_TTL_S = 86_400


class LeaseLost(Exception):
    """The lease was taken by another worker (or expired) before this write."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Lease:
    shard_id: str
    owner: str = ""
    expires_ms: int = 0
    checkpoint: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def version(self) -> tuple[str, int]:
        """Changes on every take and renewal; never compare ``expires_ms`` with this host's clock."""
        return self.owner, self.expires_ms


class RenewalWatch:
    """Which leases and heartbeats have stopped being renewed, judged on this host's monotonic clock.

    Comparing another host's wall-clock stamp with ours would make a host whose clock runs ahead see
    every peer as dead and take every shard, over and over. As in the Kinesis Client Library, a row is
    compared only with itself: it has expired once we have seen the same version of it for
    ``duration_ms`` of our own time. A row first seen counts from then, so a worker that has just
    started waits one lease period before taking a lease someone holds (a released one is free at once).
    """

    def __init__(self, duration_ms: int, clock=time.monotonic):
        self.duration_ms = duration_ms
        self.clock = clock
        self._seen: dict[str, tuple[object, float]] = {}

    def unchanged_ms(self, key: str, version) -> float:
        """How long we have seen this ``version`` of row ``key``: 0 when it is new to us."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != version:
            self._seen[key] = (version, now)
            return 0.0
        return (now - seen[1]) * 1000

    def expired(self, key: str, version) -> bool:
        return self.unchanged_ms(key, version) >= self.duration_ms

    def keep_only(self, keys: set[str]) -> None:
        """Forget the rows gone from the table (a removed worker, an aged-out shard)."""
        for key in self._seen.keys() - keys:
            del self._seen[key]


class LeaseTable(Protocol):
    def leases(self) -> tuple[list[Lease], dict[str, int]]: ...
    def ensure(self, shard_id: str) -> None: ...
    def take(self, lease: Lease, owner: str, duration_ms: int) -> Lease: ...
    def renew(self, shard_id: str, owner: str, duration_ms: int) -> None: ...
    def checkpoint(self, shard_id: str, owner: str, sequence: str | None, meta: dict | None) -> None:
        """Set the checkpoint and/or replace the meta (None leaves either as it is), if ``owner`` holds it."""
    def release(self, shard_id: str, owner: str) -> None: ...
    def heartbeat(self, worker_id: str, duration_ms: int) -> None: ...
    def leave(self, worker_id: str) -> None: ...
    def remove_worker(self, worker_id: str, beat: int) -> bool:
        """Delete the worker's heartbeat row if it still holds ``beat`` (a worker that beat since keeps
        it); whether it was deleted here."""
    def remove_aged_out(self, shard_id: str) -> bool:
        """Delete the row of a shard gone from the stream (the caller listed it so) if it holds nothing
        to resume from: checkpointed at ``SHARD_END``, or never checkpointed (recreated by a peer's
        ``ensure()`` from a listing older than the deletion, or aged out unread: its records are gone
        either way). Whether it was deleted here (a row gone already is no error)."""


def _lease_of(row: dict) -> Lease:
    """A lease from its DynamoDB row."""
    return Lease(row["item"]["S"], row.get("owner", {"S": ""})["S"], int(row.get("expires_ms", {"N": "0"})["N"]),
                 row["checkpoint"]["S"] if "checkpoint" in row else None,
                 {k: v["S"] for k, v in row.get("meta", {"M": {}})["M"].items()})


class DynamoLeaseTable:
    def __init__(self, client, table: str, group: str):
        self.client = client
        self.table = table
        self.group = group

    def _key(self, item: str) -> dict:
        return {"group": {"S": self.group}, "item": {"S": item}}

    def leases(self) -> tuple[list[Lease], dict[str, int]]:
        leases, workers, start = [], {}, None
        while True:
            kwargs = {"TableName": self.table, "KeyConditionExpression": "#g = :g",
                      "ExpressionAttributeNames": {"#g": "group"},
                      "ExpressionAttributeValues": {":g": {"S": self.group}}, "ConsistentRead": True}
            if start:
                kwargs["ExclusiveStartKey"] = start
            response = self.client.query(**kwargs)
            for row in response["Items"]:
                name = row["item"]["S"]
                expires = int(row.get("expires_ms", {"N": "0"})["N"])
                if name.startswith(WORKER_PREFIX):
                    workers[name[len(WORKER_PREFIX):]] = expires
                else:
                    leases.append(_lease_of(row))
            start = response.get("LastEvaluatedKey")
            if not start:
                return leases, workers

    def _update(self, item: str, expression: str, condition: str, values: dict, names: dict | None = None) -> dict:
        """The conditional update; returns the row as written."""
        kwargs = {"TableName": self.table, "Key": self._key(item), "UpdateExpression": expression,
                  "ConditionExpression": condition, "ExpressionAttributeValues": values, "ReturnValues": "ALL_NEW"}
        if names:
            kwargs["ExpressionAttributeNames"] = names
        try:
            return self.client.update_item(**kwargs)["Attributes"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise LeaseLost(item) from None
            raise

    def ensure(self, shard_id: str) -> None:
        try:
            self.client.put_item(TableName=self.table, Item={**self._key(shard_id), "owner": {"S": ""},
                                                             "expires_ms": {"N": "0"}},
                                 ConditionExpression="attribute_not_exists(#i)",
                                 ExpressionAttributeNames={"#i": "item"})
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def take(self, lease: Lease, owner: str, duration_ms: int) -> Lease:
        """The lease, now ``owner``'s, with the checkpoint the table holds: the snapshot ``lease`` may
        be older (another worker may have taken, moved and released it since it was read)."""
        # The second alternative is this very write, done: botocore retries a call whose answer was
        # lost, and the retry failed its own condition (LeaseLost), leaving the shard ours but unread.
        row = self._update(lease.shard_id, "SET #o = :me, expires_ms = :exp",
                           "(#o = :prev AND expires_ms = :prev_exp) OR (#o = :me AND expires_ms = :exp)",
                           {":me": {"S": owner}, ":exp": {"N": str(now_ms() + duration_ms)},
                            ":prev": {"S": lease.owner}, ":prev_exp": {"N": str(lease.expires_ms)}}, {"#o": "owner"})
        return _lease_of(row)

    def renew(self, shard_id: str, owner: str, duration_ms: int) -> None:
        self._update(shard_id, "SET expires_ms = :exp", "#o = :me",
                     {":me": {"S": owner}, ":exp": {"N": str(now_ms() + duration_ms)}}, {"#o": "owner"})

    def checkpoint(self, shard_id: str, owner: str, sequence: str | None, meta: dict | None) -> None:
        values, updates = {":me": {"S": owner}}, []
        if sequence is not None:
            updates.append("checkpoint = :seq")
            values[":seq"] = {"S": sequence}
        if meta is not None:
            updates.append("meta = :meta")
            values[":meta"] = {"M": {k: {"S": str(v)} for k, v in meta.items()}}
        if updates:
            self._update(shard_id, "SET " + ", ".join(updates), "#o = :me", values, {"#o": "owner"})

    def release(self, shard_id: str, owner: str) -> None:
        try:
            self._update(shard_id, "SET #o = :none, expires_ms = :zero", "#o = :me",
                         {":me": {"S": owner}, ":none": {"S": ""}, ":zero": {"N": "0"}}, {"#o": "owner"})
        except LeaseLost:
            pass

    def heartbeat(self, worker_id: str, duration_ms: int) -> None:
        self.client.put_item(TableName=self.table, Item={
            **self._key(WORKER_PREFIX + worker_id), "expires_ms": {"N": str(now_ms() + duration_ms)},
            "expires_at": {"N": str(int(time.time()) + HEARTBEAT_TTL_S)}})

    def leave(self, worker_id: str) -> None:
        self.client.delete_item(TableName=self.table, Key=self._key(WORKER_PREFIX + worker_id))

    def remove_worker(self, worker_id: str, beat: int) -> bool:
        return self._delete_if(WORKER_PREFIX + worker_id, "expires_ms = :beat", {":beat": {"N": str(beat)}})

    def remove_aged_out(self, shard_id: str) -> bool:
        # expires_ms exists in every row: without it, a row gone already would pass attribute_not_exists.
        return self._delete_if(shard_id, "attribute_exists(expires_ms) AND "
                                         "(attribute_not_exists(checkpoint) OR checkpoint = :end)",
                               {":end": {"S": SHARD_END}})

    def _delete_if(self, item: str, condition: str, values: dict) -> bool:
        """Delete the row if ``condition`` holds; one that changed meanwhile, or is gone (a peer deleted
        it first), is left as it is. Whether it was deleted here."""
        try:
            self.client.delete_item(TableName=self.table, Key=self._key(item), ConditionExpression=condition,
                                    ExpressionAttributeValues=values)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return False
        return True


class MemoryLeaseTable:
    """The same contract in process memory, for unit tests and benchmarks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._workers: dict[str, int] = {}

    def leases(self) -> tuple[list[Lease], dict[str, int]]:
        with self._lock:
            return list(self._leases.values()), dict(self._workers)

    def ensure(self, shard_id: str) -> None:
        with self._lock:
            self._leases.setdefault(shard_id, Lease(shard_id))

    def _swap(self, shard_id: str, check, **changes) -> Lease:
        with self._lock:
            current = self._leases.get(shard_id)
            if current is None or not check(current):     # gone: DynamoDB's condition fails on no row too
                raise LeaseLost(shard_id)
            self._leases[shard_id] = replace(current, **changes)
            return self._leases[shard_id]

    def take(self, lease: Lease, owner: str, duration_ms: int) -> Lease:
        return self._swap(lease.shard_id, lambda c: (c.owner, c.expires_ms) == (lease.owner, lease.expires_ms),
                          owner=owner, expires_ms=now_ms() + duration_ms)

    def renew(self, shard_id: str, owner: str, duration_ms: int) -> None:
        self._swap(shard_id, lambda c: c.owner == owner, expires_ms=now_ms() + duration_ms)

    def checkpoint(self, shard_id: str, owner: str, sequence: str | None, meta: dict | None) -> None:
        changes = {} if sequence is None else {"checkpoint": sequence}
        if meta is not None:
            changes["meta"] = {k: str(v) for k, v in meta.items()}
        self._swap(shard_id, lambda c: c.owner == owner, **changes)

    def release(self, shard_id: str, owner: str) -> None:
        try:
            self._swap(shard_id, lambda c: c.owner == owner, owner="", expires_ms=0)
        except LeaseLost:
            pass

    def heartbeat(self, worker_id: str, duration_ms: int) -> None:
        with self._lock:
            self._workers[worker_id] = now_ms() + duration_ms

    def leave(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def remove_worker(self, worker_id: str, beat: int) -> bool:
        with self._lock:
            if self._workers.get(worker_id) != beat:
                return False
            del self._workers[worker_id]
            return True

    def remove_aged_out(self, shard_id: str) -> bool:
        with self._lock:
            if shard_id not in self._leases or self._leases[shard_id].checkpoint not in (None, SHARD_END):
                return False
            del self._leases[shard_id]
            return True
