"""Erase one person's rows from the lake's enriched area, and the predictions and offers of their sessions.

A row is theirs when ``user_id``, ``domain_userid`` or ``network_userid`` equals one of the given
pseudonyms, or when any other text column holds one (the pseudonym of their email address in a
page URL, a redirect's target, a guest checkout's user entity). A customer's anonymous sessions
before they logged in are theirs too, so the cookie ids (``domain_userid``, ``network_userid``)
seen on rows with their ``user_id`` are erased as well (one hop, as docs/data-protection.md
describes). Each affected Parquet object is rewritten under its own name
without those rows, or deleted when none are left, so a second run finds nothing.

Each request leaves a record, ``erasures/<hash of the pseudonyms>.json``: the pseudonyms, every
identity erased, the sessions whose predictions and offers go, and one entry per run (files, rows;
never a clear identifier). It is written before each file is touched, so a run that crashes
half-way, or a later run with the same pseudonyms, erases the same cookie ids and sessions even
though the rows that revealed them are gone.

A file that does not read as Parquet (a corrupt or cut object) may hold the person's rows but cannot
be searched: the others are erased, and it is named in ``unreadable``, so the erasure is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from botocore.exceptions import ClientError
from tqdm import tqdm

from batch import lake
from batch.loader import PARQUET_TYPE
from common import aws
from common.features import NIL_USER, session_key
from common.logs import first_line

IDENTITY_COLUMNS = ("user_id", "domain_userid", "network_userid")
RECORDS = "erasures/"
CONFLICT_ATTEMPTS = 5


@dataclass
class Erasure:
    record: dict                                        # erasures/<…>.json as it will be written
    files: dict[str, int] = field(default_factory=dict)  # lake key -> rows removed
    emptied: list[str] = field(default_factory=list)     # keys deleted because no row was left
    old_versions: dict[str, int] = field(default_factory=dict)  # "key?versionId=…" of earlier versions -> rows
    sessions: set[str] = field(default_factory=set)      # domain_sessionid of every removed row
    unreadable: dict[str, str] = field(default_factory=dict)  # key (or "key?versionId=…") -> why it does not read
    predictions: int = 0
    offers: int = 0

    @property
    def rows(self) -> int:
        return sum(self.files.values())

    @property
    def identities(self) -> int:
        """Pseudonyms matched, the customer's cookie ids included."""
        return len(self.record["identities"])

    def run_summary(self) -> dict:
        return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": self.rows,
                "files": self.files, "files_deleted": self.emptied, "old_versions_deleted": self.old_versions,
                "sessions": len(self.sessions), "unreadable": sorted(self.unreadable),
                "predictions": self.predictions, "offers": self.offers}


def record_key(pseudonyms: set[str]) -> str:
    return RECORDS + hashlib.sha256(",".join(sorted(pseudonyms)).encode()).hexdigest()[:16] + ".json"


def _record(s3, bucket: str, pseudonyms: set[str]) -> dict:
    body = aws.get_object_bytes(s3, bucket, record_key(pseudonyms))
    # A record an earlier version wrote may lack a list (the first ones had no "sessions"): an empty one.
    fresh = {"pseudonyms": sorted(pseudonyms), "identities": [], "sessions": [], "runs": []}
    return fresh | json.loads(body) if body else fresh


def save_record(s3, bucket: str, erasure: Erasure) -> str:
    key = record_key(set(erasure.record["pseudonyms"]))
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(erasure.record, indent=1).encode(),
                  ContentType="application/json")
    return key


def _is_in(column: pa.ChunkedArray, values: pa.Array) -> pa.ChunkedArray:
    return pc.fill_null(pc.is_in(column, value_set=values), False)


def _matches(table: pa.Table, values: pa.Array) -> pa.ChunkedArray:
    """True for the rows whose identity columns hold one of ``values``, or whose other text columns
    contain one: pseudonyms are 64 hex digits, so no other text holds one by chance."""
    user, cookie, network = (_is_in(table.column(name), values) for name in IDENTITY_COLUMNS)
    found = pc.or_(pc.or_(user, cookie), network)
    pattern = "|".join(re.escape(value) for value in values.to_pylist())
    for name, kind in zip(table.column_names, table.schema.types):
        if name not in IDENTITY_COLUMNS and pa.types.is_string(kind):
            found = pc.or_(found, pc.fill_null(pc.match_substring_regex(table.column(name), pattern), False))
    return found


def _keys(s3, bucket: str, start, end) -> list[str]:
    return [obj["Key"] for obj in lake.objects_between(s3, bucket, "enriched", start, end)
            if obj["Key"].endswith(".parquet")]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="file", desc=desc, disable=not progress, file=sys.stderr)


def _old_versions(s3, bucket: str, start, end) -> list[tuple[str, str]]:
    """(key, version id) of the earlier versions of the enriched files in the range: the bucket keeps
    a deleted or overwritten file a while (``deleted_retention_days``), to restore it."""
    return [(version["Key"], version["VersionId"]) for version in
            lake.objects_between(s3, bucket, "enriched", start, end, lister=lake.list_old_versions)
            if version["Key"].endswith(".parquet")]


def _read_version(s3, bucket: str, key: str, version_id: str | None, unreadable: dict[str, str],
                  columns: list[str] | None = None) -> pa.Table | None:
    """A lake file, or one earlier version of it; None once gone (expired, or erased by another run),
    or when it does not read as Parquet: then noted in ``unreadable``."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key, **({"VersionId": version_id} if version_id else {}))["Body"].read()
    except ClientError as exc:
        if aws.no_such_key(exc) or exc.response["Error"]["Code"] == "NoSuchVersion":
            return None
        raise
    try:
        return lake.parquet_table(body, columns)
    except lake.UNREADABLE as exc:
        unreadable[f"{key}?versionId={version_id}" if version_id else key] = first_line(exc)
        return None


def identities_of(s3, bucket: str, files: list[tuple[str, str | None]], pseudonyms: set[str],
                  progress: bool, unreadable: dict[str, str]) -> set[str]:
    """The pseudonyms plus the cookie ids (``domain_userid``, ``network_userid``) seen on rows with one
    of them as ``user_id`` in these (key, version id or None) files; never SP-Anonymous' nil id,
    which everyone's anonymous hits share. A file that does not read is noted in ``unreadable``."""
    found = set(pseudonyms)
    values = pa.array(sorted(pseudonyms), pa.string())
    with _bar(len(files), "finding cookie ids", progress) as bar:
        for key, version_id in files:
            table = _read_version(s3, bucket, key, version_id, unreadable, list(IDENTITY_COLUMNS))
            if table is not None:
                theirs = table.filter(_is_in(table.column("user_id"), values))
                for name in ("domain_userid", "network_userid"):
                    found.update(v for v in theirs.column(name).to_pylist() if v and v != NIL_USER)
            bar.update()
    return found


def erase_lake(s3, bucket: str, pseudonyms: set[str], *, start=None, end=None, dry_run: bool = False,
               progress: bool = True) -> Erasure:
    """Rewrite every enriched object in the range without the person's rows (nothing is written with
    ``dry_run``); the files that do not read are left as they are, named in ``unreadable``."""
    keys = _keys(s3, bucket, start, end)
    erasure = Erasure(_record(s3, bucket, pseudonyms))
    record = erasure.record
    # The earlier versions too: a file deleted (by a compaction, say) may hold the only rows that tie
    # the customer to their cookie.
    files = [(key, None) for key in keys] + _old_versions(s3, bucket, start, end)
    identities = identities_of(s3, bucket, files, pseudonyms, progress, erasure.unreadable)
    record["identities"] = sorted(identities | set(record["identities"]))
    values = pa.array(record["identities"], pa.string())
    if not dry_run:
        save_record(s3, bucket, erasure)
    with _bar(len(keys), "erasing" if not dry_run else "checking", progress) as bar:
        for key in keys:
            _erase_object(s3, bucket, key, values, erasure, dry_run)
            bar.update()
    # Listed again after the rewrites: the versions they replaced are among them.
    versions = _old_versions(s3, bucket, start, end)
    with _bar(len(versions), "earlier versions", progress) as bar:
        for key, version_id in versions:
            _erase_old_version(s3, bucket, key, version_id, values, erasure, dry_run)
            bar.update()
    return erasure


def _erase_object(s3, bucket: str, key: str, values: pa.Array, erasure: Erasure, dry_run: bool) -> None:
    """Rewrite one lake object without the person's rows, only if it is still as read (S3 If-Match):
    another erase that rewrote it meanwhile makes this one read it again, instead of putting back
    the rows the other removed."""
    for _ in range(CONFLICT_ATTEMPTS):
        body, etag = aws.get_object_and_etag(s3, bucket, key)
        if body is None:                         # another erase emptied and deleted it meanwhile
            return
        try:
            table = lake.parquet_table(body)
        except lake.UNREADABLE as exc:        # it may hold their rows: the caller says the erasure is incomplete
            erasure.unreadable[key] = first_line(exc)
            return
        mask = _matches(table, values)
        removed = pc.sum(mask).as_py() or 0
        if not removed:
            return
        erasure.files[key] = removed
        _note_sessions(erasure, table.filter(mask))        # saved before the rewrite, below
        kept = table.filter(pc.invert(mask))
        if not dry_run:
            save_record(s3, bucket, erasure)
            try:
                _rewrite(s3, bucket, key, kept, etag)
            except ClientError as exc:
                if aws.no_such_key(exc) and not kept.num_rows:
                    pass        # gone as we wanted: our delete retried by botocore after its answer was lost
                elif aws.precondition_failed(exc) or aws.no_such_key(exc):
                    continue    # rewritten or deleted meanwhile (another erase, the lifecycle rule): read again
                else:
                    raise
        if not kept.num_rows:
            erasure.emptied.append(key)
        return
    raise RuntimeError(f"s3://{bucket}/{key} changed {CONFLICT_ATTEMPTS} times while being erased; run the "
                       "command again (it is idempotent)")


def _erase_old_version(s3, bucket: str, key: str, version_id: str, values: pa.Array, erasure: Erasure,
                       dry_run: bool) -> None:
    """Delete an earlier version of a lake file that holds any of the person's rows (a version is
    never changed, so it goes whole; the rewrite of the current file left one behind)."""
    table = _read_version(s3, bucket, key, version_id, erasure.unreadable)
    if table is None:
        return
    mask = _matches(table, values)
    removed = pc.sum(mask).as_py() or 0
    if not removed:
        return
    erasure.old_versions[f"{key}?versionId={version_id}"] = removed
    _note_sessions(erasure, table.filter(mask))
    if not dry_run:
        save_record(s3, bucket, erasure)
        s3.delete_object(Bucket=bucket, Key=key, VersionId=version_id)


def _note_sessions(erasure: Erasure, removed: pa.Table) -> None:
    """Add the sessions of removed rows to the erasure and its record. The record keeps every session,
    an earlier run's too: once the rows are gone, only it knows whose predictions and offers to delete,
    so it is saved before the rows go."""
    erasure.sessions.update(_session_keys(removed))
    erasure.record["sessions"] = sorted(set(erasure.record["sessions"]) | erasure.sessions)


SESSION_KEY_COLUMNS = ("domain_sessionid", "domain_userid", "user_id", "network_userid", "event_id")


def _session_keys(rows: pa.Table) -> set[str]:
    """The keys the scorer filed these rows' predictions under (common.features.session_key)."""
    return {session_key(row) for row in rows.select(SESSION_KEY_COLUMNS).to_pylist()}


def _rewrite(s3, bucket: str, key: str, kept: pa.Table, etag: str) -> None:
    if kept.num_rows:       # the schema's metadata (the loader's sequence range) travels with the table
        s3.put_object(Bucket=bucket, Key=key, Body=lake.parquet_bytes(kept), ContentType=PARQUET_TYPE, IfMatch=etag)
    else:
        s3.delete_object(Bucket=bucket, Key=key, IfMatch=etag)


def delete_sessions(dynamodb, table: str, sessions: set[str], *, dry_run: bool = False) -> int:
    """Delete the items keyed by these session ids; returns how many existed."""
    deleted = 0
    for session in sorted(sessions):
        key = {"session_id": {"S": session}}
        if dry_run:
            deleted += "Item" in dynamodb.get_item(TableName=table, Key=key, ProjectionExpression="session_id")
        else:
            deleted += "Attributes" in dynamodb.delete_item(TableName=table, Key=key, ReturnValues="ALL_OLD")
    return deleted
