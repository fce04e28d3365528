"""Lake compaction: merge the small enriched Parquet files of an hour partition into few large ones.

The loader writes a file per shard every few minutes (docs/lake.md "Small files"). ``compact_lake``
merges an hour's files into ``compacted-<hash of the input names>.parquet``, at most ``max_bytes``
of input each, under these rules:

- A loader file ``<shard>-<first>-<last>.parquet`` is merged only once the loader can no longer
  rewrite it under its name: its shard's checkpoint in the loader's lease group
  (``<lake_app>#<enriched_stream>``) is at or past ``last`` (or SHARD_END), or the shard is gone
  from the stream. Other files stay, and are reported.
- The merged file is written first, recording each input's name, ETag and row count; its footer is
  read back and its row count checked; only then are the inputs deleted, each only if it is still
  as read (If-Match). A run killed in between is completed by the next: before planning a
  partition, every file a compacted file records that is still there unchanged is deleted (its
  rows are in that file). A compacted file is merged again like any other (late events keep
  arriving in old hours), and the new file records the loader files of the old one too.
- Compaction and ``erase`` hold one lock object in the bucket (``LakeLock``) while they change lake
  files: an erase between a compaction's read of a file and its delete would either miss the
  merged file (listed before it existed) or be undone by it (it holds the rows erase removed).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from botocore.exceptions import ClientError
from tqdm import tqdm

from batch import erase, lake
from batch.loader import PARQUET_TYPE
from common import aws
from common.leases import DynamoLeaseTable, RenewalWatch
from common.logs import first_line
from common.streams import SHARD_END, KinesisStream, sequence_key

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
COMPACTOR_VERSION = "1"
LOADER_NAME = re.compile(r"(?P<shard>.+)-(?P<first>\d+)-(?P<last>\d+)\.parquet")
COMPACTED_NAME = re.compile(r"compacted-[0-9a-f]{32}\.parquet")
INPUTS = "compacted_from"        # metadata: the direct inputs, [[name, etag, rows], …] in row order
LOADER_FILES = "loader_files"    # metadata: {name: etag} of every loader file whose rows it holds
FOOTER_GUESS = 64 * 1024


class Skipped(Exception):
    """A group that cannot be merged now (a file gone, a column retyped); its files stay."""


# ---------------------------------------------------------------------------------------- the lock

LOCK_KEY = "locks/lake-rewrite.json"
LOCK_TTL_S = 120.0


class LockBusy(RuntimeError):
    """Another run holds the lake lock and keeps renewing it."""


class LockLost(RuntimeError):
    """Our lock may have been broken by another run: stop changing files."""


class LakeLock:
    """The lock compaction and erase hold while they change lake files.

    Taken with a conditional put (If-None-Match: *), renewed by a thread every quarter of its TTL
    (If-Match on our own version), released with a conditional delete. The lock of a run that died
    is broken by the next taker once it has seen the same version for the TTL the holder declared,
    on its own monotonic clock (as common.leases does with lease rows: no two hosts' clocks are
    compared). The holder counts the lock as its own only while its last renewal is under half that
    TTL old, so it stops before anyone may break it. A conditional write whose answer was lost and
    that botocore retried fails its own condition: the token in the body tells it was ours.
    """

    def __init__(self, s3, bucket: str, purpose: str, *, ttl_s: float = LOCK_TTL_S, wait_s: float = 900.0,
                 poll_s: float = 1.0):
        self.s3, self.bucket, self.purpose = s3, bucket, purpose
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.renewed_at = 0.0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0

    def __enter__(self) -> Self:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_until_released, name="lake-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.release()

    @property
    def intact(self) -> bool:
        return not self.lost.is_set() and time.monotonic() - self.renewed_at < self.ttl_s / 2

    def check(self) -> None:
        if not self.intact:
            raise LockLost(f"lost s3://{self.bucket}/{LOCK_KEY} (renewals failed): stopped before deleting")

    def _body(self) -> bytes:
        self._count += 1        # every renewal changes the body, so its ETag: the version others watch
        return json.dumps({"purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "ttl_s": self.ttl_s, "renewal": self._count,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def _put(self, **condition) -> bool:
        """A conditional put of our body; whether the lock is ours now."""
        sent = time.monotonic()
        try:
            self.etag = self.s3.put_object(Bucket=self.bucket, Key=LOCK_KEY, Body=self._body(),
                                           ContentType="application/json", **condition)["ETag"]
        except ClientError as exc:
            if not (aws.precondition_failed(exc) or aws.no_such_key(exc)):
                raise
            holder, etag = self._holder()
            if holder.get("token") != self.token:
                return False
            self.etag = etag            # our own write, retried by botocore after its answer was lost
        self.renewed_at = sent
        return True

    def _holder(self) -> tuple[dict, str | None]:
        body, etag = aws.get_object_and_etag(self.s3, self.bucket, LOCK_KEY)
        try:
            return (json.loads(body) if body else {}), etag
        except ValueError:
            return {}, etag

    def acquire(self) -> None:
        watch, deadline = RenewalWatch(0), time.monotonic() + self.wait_s
        while not self._put(IfNoneMatch="*"):
            holder, etag = self._holder()
            if etag is not None and watch.unchanged_ms("lock", etag) >= 1000 * float(holder.get("ttl_s", LOCK_TTL_S)):
                if self._put(IfMatch=etag):       # its holder stopped renewing it: died
                    return
                continue
            if time.monotonic() > deadline:
                raise LockBusy(f"s3://{self.bucket}/{LOCK_KEY} is held by {holder.get('purpose', '?')} on "
                               f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}, renewed "
                               f"{holder.get('at', '?')}); try again once it has finished")
            time.sleep(self.poll_s)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self._put(IfMatch=self.etag):
                    self.lost.set()
                    return
            except aws.ERRORS:
                pass                    # tried again next time; ``intact`` turns False if it keeps failing

    def release(self) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=LOCK_KEY, IfMatch=self.etag)
        except ClientError as exc:
            if not (aws.precondition_failed(exc) or aws.no_such_key(exc)):
                raise


# ---------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class LakeFile:
    key: str
    size: int
    etag: str

    @classmethod
    def of(cls, obj: dict) -> LakeFile:
        return cls(obj["Key"], obj["Size"], obj["ETag"])

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[1]

    @property
    def folder(self) -> str:
        return self.key.rsplit("/", 1)[0]

    @property
    def compacted(self) -> bool:
        return COMPACTED_NAME.fullmatch(self.name) is not None


def compacted_name(input_names: list[str]) -> str:
    """The same inputs give the same name, so a rerun overwrites instead of adding a copy."""
    return f"compacted-{hashlib.sha256(chr(10).join(sorted(input_names)).encode()).hexdigest()[:32]}.parquet"


def merge_order(file: LakeFile) -> tuple:
    """Compacted files (older rows) first, then loader files by shard and sequence number."""
    loader = LOADER_NAME.fullmatch(file.name)
    if file.compacted or loader is None:
        return (0, file.name, 0, 0)
    return (1, loader["shard"], sequence_key(loader["first"]), sequence_key(loader["last"]))


def partitions(s3, bucket: str, start, end) -> dict[str, list[LakeFile]]:
    """Hour folder -> its compacted and loader files, for the folders holding two or more."""
    found: dict[str, list[LakeFile]] = {}
    for obj in lake.objects_between(s3, bucket, "enriched", start, end):
        file = LakeFile.of(obj)
        if lake.LAKE_FILE.fullmatch(file.key) and (file.compacted or LOADER_NAME.fullmatch(file.name)):
            found.setdefault(file.folder, []).append(file)
    return {folder: sorted(files, key=merge_order) for folder, files in sorted(found.items()) if len(files) > 1}


class _Tail(io.RawIOBase):
    """The last bytes of an object, seekable as if they were the whole object: pyarrow reads a
    Parquet footer from the end, so a ranged GET of the tail gives the metadata without the data."""

    def __init__(self, tail: bytes, size: int):
        self.tail, self.size, self.position = tail, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.size}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        start = self.position - (self.size - len(self.tail))
        if start < 0:
            raise OSError("read before the fetched tail")
        chunk = self.tail[start:start + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)


def footer(s3, bucket: str, file: LakeFile) -> pq.FileMetaData:
    """A Parquet file's metadata (row count, key/value metadata) from one or two ranged GETs."""
    if file.size < 12:                    # not even magic bytes and a footer length (and "bytes=-0" is refused)
        raise pa.ArrowInvalid(f"{file.key}: {file.size} bytes is no Parquet file")
    tail = _tail(s3, bucket, file.key, min(file.size, FOOTER_GUESS))
    needed = int.from_bytes(tail[-8:-4], "little") + 8
    if needed > len(tail):
        tail = _tail(s3, bucket, file.key, min(needed, file.size))
    try:
        return pq.read_metadata(_Tail(tail, file.size))
    except (pa.ArrowException, OSError) as exc:
        raise pa.ArrowInvalid(f"{file.key}: {first_line(exc)}") from None


def _tail(s3, bucket: str, key: str, length: int) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{length}")["Body"].read()


def _unchecked(meta: pq.FileMetaData, present: dict[str, LakeFile]) -> bool:
    """A compacted file with fewer or more rows than its recorded inputs, all of which are still there
    unchanged. (Fewer rows and inputs gone or changed is an erase's rewrite, after or during a merge:
    then the file holds rows nothing else does.)"""
    inputs = json.loads((meta.metadata or {}).get(f"clickstream.{INPUTS}".encode(), b"[]"))
    return bool(inputs) and meta.num_rows != sum(rows for _, _, rows in inputs) and all(
        name in present and present[name].etag == etag for name, etag, _ in inputs)


def recorded_files(metadata: dict[bytes, bytes] | None) -> dict[str, str]:
    """{name: etag} of every file whose rows a compacted file holds: its direct inputs and, through
    compacted inputs, the loader files before them."""
    metadata = metadata or {}
    inputs = json.loads(metadata.get(f"clickstream.{INPUTS}".encode(), b"[]"))
    return {**json.loads(metadata.get(f"clickstream.{LOADER_FILES}".encode(), b"{}")),
            **{name: etag for name, etag, _ in inputs}}


# ---------------------------------------------------------------------------------------- eligibility


@dataclass
class Checkpoints:
    """Where the loader's lease group stands: which loader files it may still rewrite."""

    group: str
    by_shard: dict[str, str | None]
    live_shards: set[str]

    def held_back(self, name: str) -> str | None:
        """Why the loader may still rewrite this file; None when it never will."""
        loader = LOADER_NAME.fullmatch(name)
        shard, last = loader["shard"], loader["last"]
        if shard not in self.live_shards:
            return None                  # aged out of the stream: no loader can read the range again
        if shard not in self.by_shard:
            return f"no lease row for {shard} in {self.group}: is lake_app the loader's?"
        checkpoint = self.by_shard[shard]
        if checkpoint == SHARD_END:
            return None
        if checkpoint is None or not checkpoint.isdigit() or sequence_key(checkpoint) < sequence_key(last):
            return f"{shard} checkpointed at {checkpoint}, before {last}"
        return None


def load_checkpoints(settings) -> Checkpoints:
    """Read after listing would be no safer: checkpoints only move forward."""
    group = f"{settings.lake_app}#{settings.enriched_stream}"
    table = DynamoLeaseTable(aws.client("dynamodb", settings.region, timeout=30), settings.lease_table, group)
    leases, _ = table.leases()
    stream = KinesisStream(aws.client("kinesis", settings.region, timeout=30), settings.enriched_stream)
    live = {shard.shard_id for shard in stream.list_shards()}    # a wrong stream name fails here, not later
    return Checkpoints(group, {lease.shard_id: lease.checkpoint for lease in leases}, live)


# ---------------------------------------------------------------------------------------- one partition


@dataclass
class Summary:
    partitions: int = 0
    files_in: int = 0
    files_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    events: int = 0
    recovered: list[str] = field(default_factory=list)               # an interrupted run's inputs, deleted
    settled: list[str] = field(default_factory=list)                 # changed after merged, but all in it: deleted
    held_back: list[tuple[str, str]] = field(default_factory=list)   # (key, why): the loader may rewrite it
    conflicts: list[tuple[str, str]] = field(default_factory=list)   # (key, what): changed under us, kept
    failed: list[tuple[str, str]] = field(default_factory=list)      # (folder, why): group not merged


@dataclass
class Run:
    s3: object
    bucket: str
    stream: str
    checkpoints: Checkpoints
    max_bytes: int
    dry_run: bool
    lock: LakeLock | None
    summary: Summary = field(default_factory=Summary)
    _erased: pa.Array | None = None

    def erased(self) -> pa.Array:
        """Every identity an erasure request named (erasures/*.json), read once per run."""
        if self._erased is None:
            found = set()
            for obj in lake.list_objects(self.s3, self.bucket, erase.RECORDS):
                record = json.loads(aws.get_object_bytes(self.s3, self.bucket, obj["Key"]) or b"{}")
                found.update(record.get("identities") or record.get("pseudonyms") or [])
            self._erased = pa.array(sorted(found), pa.string())
        return self._erased


def recover(run: Run, files: list[LakeFile]) -> list[LakeFile]:
    """Delete what an interrupted run merged but had not deleted yet: every file a compacted file of
    the partition records that is still there with the recorded ETag (so with the rows it holds).
    Returns the files left; one changed since it was merged is reported and left out of merging."""
    present = {file.name: file for file in files}
    for compacted in [file for file in files if file.compacted]:
        if compacted.name not in present:
            continue                                 # itself an input of another, deleted just now
        meta = footer(run.s3, run.bucket, compacted)
        if _unchecked(meta, present):
            # A run killed between its write and its read-back: never checked, and every input it
            # records is still there as it read it (deletes come after the check): it goes, they stay.
            if run.dry_run or _delete(run, compacted, compacted.etag):
                run.summary.recovered.append(compacted.key)
            del present[compacted.name]
            continue
        for name, etag in recorded_files(meta.metadata).items():
            found = present.get(name)
            if found is None or found is compacted:
                continue
            if found.etag != etag:
                settle(run, found, compacted)
            elif run.dry_run or _delete(run, found, etag):
                run.summary.recovered.append(found.key)
            del present[name]                        # merged already, or changed since: never merged twice
    return sorted(present.values(), key=merge_order)


def settle(run: Run, changed: LakeFile, holder: LakeFile) -> None:
    """A file changed since ``holder`` merged it: an erase rewrote both after a run was killed before
    its deletes (or one that bypassed the lock rewrote it under a run). It goes only when ``holder``
    has all its events (erase only removes rows) and no row of anyone an erasure names: while it has
    one, ``holder`` may still hold rows the erase removed from ``changed``, and it must run again."""
    held = lake.read_parquet_object(run.s3, run.bucket, holder.key)
    ids = lake.read_parquet_object(run.s3, run.bucket, changed.key, ["event_id"]).column("event_id")
    erased = run.erased()
    why = None
    if not pc.all(pc.is_in(ids, value_set=held.column("event_id").combine_chunks())).as_py():
        why = "and has events that file lacks: kept"
    elif len(erased) and pc.any(erase._matches(held, erased)).as_py():
        why = "which holds rows of an erased person: run that erase again"
    if why:
        run.summary.conflicts.append((changed.key, f"changed since it was merged into {holder.name}, {why}"))
    elif run.dry_run or _delete(run, changed, changed.etag):
        run.summary.settled.append(changed.key)


def _delete(run: Run, file: LakeFile, etag: str) -> bool:
    """Delete a merged input if it is still as read; False (a conflict) when it changed meanwhile."""
    run.lock.check()
    try:
        run.s3.delete_object(Bucket=run.bucket, Key=file.key, IfMatch=etag)
    except ClientError as exc:
        if aws.precondition_failed(exc):
            run.summary.conflicts.append((file.key, "changed between its read and its delete: kept"))
            return False
        if not aws.no_such_key(exc):             # gone: our own delete, retried by botocore
            raise
    return True


def plan(run: Run, files: list[LakeFile]) -> list[list[LakeFile]]:
    """Groups of two or more mergeable files, in merge order, each at most ``max_bytes`` of input and
    with a loader file in it: compacted files are merged again only to take in new (late) files, so
    a run with nothing new to merge changes nothing."""
    ready = []
    for file in files:
        why = None if file.compacted else run.checkpoints.held_back(file.name)
        if why:
            run.summary.held_back.append((file.key, why))
        else:
            ready.append(file)
    groups, current, size = [], [], 0
    for file in ready:
        if current and size + file.size > run.max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(file)
        size += file.size
    return [group for group in [*groups, current] if len(group) > 1 and not all(file.compacted for file in group)]


def merged_table(run: Run, group: list[LakeFile]) -> tuple[pa.Table, list, dict]:
    """The group's rows, each file's in its own order, in one table of the files' unified schema
    (SCHEMA's column order; a column older files lack is null there, or holds what they kept in
    ``extra`` for it). Also what to record."""
    tables, inputs, loader_files = [], [], {}
    with ThreadPoolExecutor(lake.SYNC_THREADS, thread_name_prefix="compact") as pool:
        # Many small objects: one GET at a time would wait mostly on the network (see sync_partitions).
        fetched = list(pool.map(lambda file: aws.get_object_and_etag(run.s3, run.bucket, file.key), group))
    for file, (body, etag) in zip(group, fetched):
        if body is None:
            raise Skipped(f"{file.key} is gone")
        try:
            table = lake.parquet_table(body)
        except (pa.ArrowException, OSError) as exc:
            raise Skipped(f"{file.key} does not read as Parquet ({first_line(exc)}): left as it is") from None
        written_from = (table.schema.metadata or {}).get(b"clickstream.stream", b"").decode()
        if not file.compacted and written_from != run.stream:
            # Its checkpoint is another stream's lease row, not the one it was judged by.
            raise Skipped(f"{file.key} was loaded from stream {written_from!r}, not {run.stream!r}: compact it "
                          "with that stream's settings")
        inputs.append([file.name, etag, table.num_rows])
        loader_files.update(recorded_files(table.schema.metadata) if file.compacted else {file.name: etag})
        tables.append(table.replace_schema_metadata(None))
    try:
        merged = pa.concat_tables(tables, promote_options="default")      # nulls for missing columns, no casts
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise Skipped(f"schemas do not merge: {exc}") from None
    merged = lake.lift_from_extra(merged)              # an older file's values into their promoted columns
    order = [name for name in lake.SCHEMA.names if name in merged.column_names]
    return merged.select(order + [name for name in merged.column_names if name not in order]), inputs, loader_files


def merge_group(run: Run, folder: str, group: list[LakeFile]) -> None:
    """Write the merged file, check it, then delete the inputs it holds."""
    table, inputs, loader_files = merged_table(run, group)
    run.lock.check()
    key = f"{folder}/{compacted_name([name for name, _, _ in inputs])}"
    data = lake.parquet_bytes(table, {INPUTS: json.dumps(inputs), LOADER_FILES: json.dumps(loader_files, sort_keys=True),
                                      "stream": run.stream, "compactor_version": COMPACTOR_VERSION})
    etag = run.s3.put_object(Bucket=run.bucket, Key=key, Body=data, ContentType=PARQUET_TYPE)["ETag"]
    written = LakeFile(key, len(data), etag)
    rows = footer(run.s3, run.bucket, written).num_rows
    if rows != table.num_rows:
        run.s3.delete_object(Bucket=run.bucket, Key=key, IfMatch=etag)
        raise Skipped(f"{key} read back {rows} rows, not {table.num_rows}: removed, inputs kept")
    for file, (_, read_etag, _) in zip(group, inputs):
        _delete(run, file, read_etag)
    _count(run.summary, group, 1, len(data), table.num_rows)


def _count(summary: Summary, group: list[LakeFile], files_out: int, bytes_out: int, events: int) -> None:
    summary.files_in += len(group)
    summary.bytes_in += sum(file.size for file in group)
    summary.files_out += files_out
    summary.bytes_out += bytes_out
    summary.events += events


def compact_partition(run: Run, folder: str, files: list[LakeFile]) -> None:
    """Recover, plan and merge one hour; an unreadable file fails this partition (exit 1), not the run:
    a corrupt object in one hour stopped every later hour's compaction, every night."""
    try:
        groups = plan(run, recover(run, files))
    except lake.UNREADABLE as exc:
        run.summary.failed.append((folder, f"a file does not read as Parquet: {first_line(exc)}"))
        return
    run.summary.partitions += bool(groups)
    for group in groups:
        try:
            if run.dry_run:
                _count(run.summary, group, 1, 0, sum(footer(run.s3, run.bucket, file).num_rows for file in group))
            else:
                merge_group(run, folder, group)
        except Skipped as exc:
            run.summary.failed.append((folder, str(exc)))
        except lake.UNREADABLE as exc:
            run.summary.failed.append((folder, f"a file does not read as Parquet: {first_line(exc)}"))



# ---------------------------------------------------------------------------------------- the command


def compact_lake(s3, settings, *, start=None, end=None, max_bytes: int = DEFAULT_MAX_BYTES, dry_run: bool = False,
                 progress: bool = True, lock_ttl_s: float = LOCK_TTL_S) -> Summary:
    """Merge the small files of every hour partition from ``start`` to ``end`` (dates, both included)."""
    lock = None if dry_run else LakeLock(s3, settings.bucket, "compact", ttl_s=lock_ttl_s)
    with lock or nullcontext():
        # Listed under the lock: a listing made while waiting for it missed what the holder merged
        # (a killed run's merged file, whose inputs a second merge then put into another: twice).
        found = partitions(s3, settings.bucket, start, end)
        run = Run(s3, settings.bucket, settings.enriched_stream, load_checkpoints(settings), max_bytes, dry_run, lock)
        with tqdm(total=len(found), unit="partition", desc="compacting", disable=not progress, file=sys.stderr) as bar:
            for folder, files in found.items():
                compact_partition(run, folder, files)
                bar.update()
    return run.summary
