"""The model registry on S3: versioned bundles and a CURRENT pointer per model name.

Layout: ``models/<name>/<version>/{model.onnx, model.json, report.html}``,
``models/<name>/CURRENT`` (the version string) and ``models/<name>/HISTORY`` (JSON lines of every
move of CURRENT, newest last) so a rollback knows where to go back to. Versions are UTC timestamps
(``20261129T095300Z``), so they sort in publishing order.

Each move has an id, written on CURRENT too (its ``write-id``) and, as ``previous_id``, on the move
after it: the moves made are a chain back from CURRENT's, and a line recorded by a move that lost
its race for CURRENT (or crashed between the two writes) is off it, even when it names the same
version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import ClientError

from common import aws
from common.features import FEATURE_NAMES, FEATURE_VERSION

PREFIX = "models"
DEFAULT_MODEL = "buy-propensity"
ROLLBACK_REASON = "rollback from "     # HISTORY entries of rollbacks start with it
WRITE_ID = "write-id"                  # user metadata of a conditional write: whose it is

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    onnx: bytes
    meta: dict


def feature_names(meta: dict) -> list[str]:
    """A bundle's input columns, in order, from its model.json (none when ``features`` is no list)."""
    features = meta.get("features")
    return [f.get("name") for f in features if isinstance(f, dict)] if isinstance(features, list) else []


def has_fold_features(meta: dict) -> bool:
    """Whether a model takes the features common.features computes, in its order: the only model
    the scorers serve (they refuse any other)."""
    return meta.get("feature_version") == FEATURE_VERSION and feature_names(meta) == list(FEATURE_NAMES)


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def current_version(s3, bucket: str, name: str = DEFAULT_MODEL) -> str | None:
    raw = aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/CURRENT")
    return raw.decode().strip() if raw else None


def _current(s3, bucket: str, name: str) -> tuple[str | None, str | None, str | None]:
    """CURRENT's version, ETag and move id (None, None, None when there is no CURRENT)."""
    try:
        found = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}/CURRENT")
    except ClientError as exc:
        if aws.no_such_key(exc):
            return None, None, None
        raise
    return found["Body"].read().decode().strip(), found["ETag"], found.get("Metadata", {}).get(WRITE_ID)


def onnx_digest(onnx: bytes) -> str:
    """What model.json records of its model.onnx (``onnx.sha256``)."""
    return hashlib.sha256(onnx).hexdigest()


def load(s3, bucket: str, name: str = DEFAULT_MODEL, version: str | None = None) -> Bundle:
    """The bundle of ``version`` (default: CURRENT). Raises LookupError when there is none."""
    version = version or current_version(s3, bucket, name)
    if not version:
        raise LookupError(f"model {name!r} has no CURRENT version in s3://{bucket}/{PREFIX}/{name}/")
    onnx = aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/{version}/model.onnx")
    meta = aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/{version}/model.json")
    if onnx is None and meta is None:
        raise LookupError(f"model {name!r} has no version {version} in s3://{bucket}/{PREFIX}/{name}/")
    if onnx is None or meta is None:
        missing = "model.onnx" if onnx is None else "model.json"
        raise LookupError(f"model {name!r} version {version} is incomplete in s3://{bucket}: no {missing}")
    try:
        meta = json.loads(meta)
    except ValueError as exc:
        raise ValueError(f"model.json does not parse: {exc}") from None
    spec = (meta.get("onnx") or {}) if isinstance(meta, dict) else {}
    if not isinstance(spec, dict):
        # ValueError, as for every bundle that cannot be served: the scorers refuse it (409), the CLI names it.
        raise ValueError(f"model.json's onnx is not an object but {type(spec).__name__}")  # noqa: TRY004
    recorded = spec.get("sha256")
    if recorded and recorded != onnx_digest(onnx):
        # Overwritten or damaged after publishing: serving it would serve another model under this version.
        raise ValueError(f"model.onnx of version {version} is not the one published: its sha256 is not "
                         f"the {str(recorded)[:12]}… its model.json records")
    return Bundle(name, version, onnx, meta)


class Conflict(Exception):
    """Another writer got there first: the version folder is taken, or CURRENT moved meanwhile."""


def _put(s3, bucket: str, key: str, body: bytes, etag: str | None, write_id: str | None = None, **extra) -> None:
    """Write ``key`` only if it is still as read: ``etag`` None means it must not exist yet.
    S3's conditional writes make two concurrent writers a Conflict instead of a silent overwrite."""
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    # When a write's answer is lost, botocore sends it again, and the retry fails its condition on
    # our own write: the id tells that apart from another writer's.
    write_id = write_id or uuid.uuid4().hex
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={WRITE_ID: write_id}, **condition, **extra)
    except ClientError as exc:
        if aws.precondition_failed(exc):
            if _written_by(s3, bucket, key, write_id):
                return
            raise Conflict(f"s3://{bucket}/{key} changed while we wrote it") from None
        raise


def _written_by(s3, bucket: str, key: str, write_id: str) -> bool:
    try:
        found = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if aws.no_such_key(exc):
            return False
        raise
    return found.get("Metadata", {}).get(WRITE_ID) == write_id


def replace_file(s3, bucket: str, name: str, version: str, file: str, body: bytes) -> None:
    """Rewrite one file of a published version (its promotion record after a Conflict)."""
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}/{version}/{file}", Body=body, ContentType=_content_type(file))


def _content_type(file: str) -> str:
    return {"json": "application/json", "html": "text/html"}.get(file.rsplit(".", 1)[-1], "application/octet-stream")


def publish(s3, bucket: str, name: str, version: str, files: dict[str, bytes]) -> None:
    """Upload a bundle's files under its version; model.json last, so a reader that finds it
    finds the rest. The first file claims the folder: Conflict when another run took this version.
    Does not move CURRENT."""
    ordered = sorted(files, key=lambda file: file == "model.json")
    for index, file in enumerate(ordered):
        content_type = _content_type(file)
        key = f"{PREFIX}/{name}/{version}/{file}"
        if index == 0:
            _put(s3, bucket, key, files[file], None, ContentType=content_type)
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=files[file], ContentType=content_type)


def history(s3, bucket: str, name: str = DEFAULT_MODEL) -> list[dict]:
    """The moves of CURRENT that were made, oldest first."""
    return [entry for entry, made in recorded_moves(s3, bucket, name) if made]


def recorded_moves(s3, bucket: str, name: str = DEFAULT_MODEL) -> list[tuple[dict, bool]]:
    """Every line of HISTORY, oldest first, with whether it was made (one read of each object)."""
    current_id = _current(s3, bucket, name)[2]        # first: a move made after it is not made yet
    entries = _entries(aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/HISTORY"), name)
    made = {id(entry) for entry in moves_made(entries, current_id)}
    return [(entry, id(entry) in made) for entry in entries]


def _entries(raw: bytes | None, name: str) -> list[dict]:
    """HISTORY's JSON lines, oldest first. A damaged line is passed over with a warning: a rollback
    is wanted most in an incident, when a hand's edit may have left one."""
    entries = []
    for number, line in enumerate(raw.decode(errors="replace").splitlines() if raw else [], 1):
        try:
            entry = json.loads(line) if line.strip() else None
        except ValueError:
            entry = "damaged"
        if entry is None:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("version"), str) and "previous" in entry:
            entries.append(entry)
        else:
            log.warning("model %s: line %d of HISTORY is not a move of CURRENT, passed over: %.80s", name, number, line)
    return entries


def moves_made(entries: list[dict], current_id: str | None) -> list[dict]:
    """The entries on the chain of moves that ends at CURRENT's (``current_id``), oldest first, and
    those older than the first move with an id (recorded by code before ids: for them
    ``previous_version`` passes over what is off the chain by version). Without CURRENT's move among
    the entries, all of them. A chain that ends at an id no line has followed a move of code from
    before ids (a rolling upgrade: its CURRENT had a write id, its line none): every entry before
    it is kept, as before ids; keeping only those without an id dropped the moves made before it."""
    at = {entry["id"]: index for index, entry in enumerate(entries) if entry.get("id")}
    if current_id not in at:
        return entries
    index, chain = at[current_id], []
    while True:
        chain.append(entries[index])
        previous_id = entries[index].get("previous_id")
        before = at.get(previous_id)
        if before is None or before >= index:
            break
        index = before
    if previous_id and before is None:
        return entries[:index] + chain[::-1]
    return [entry for entry in entries[:index] if not entry.get("id")] + chain[::-1]


def set_current(s3, bucket: str, name: str, version: str, reason: str, *, expected: str | None = "") -> None:
    """Move CURRENT to ``version`` and record the move. With ``expected`` (a version, or None for
    "no CURRENT yet") the move happens only from that version: Conflict when another run moved
    CURRENT since the caller decided. Both writes are conditional, so two movers never interleave."""
    current, current_etag, current_id = _current(s3, bucket, name)
    if expected != "" and current != expected:
        raise Conflict(f"CURRENT of {name!r} is {current}, no longer {expected}: another run moved it")
    raw_history, history_etag = aws.get_object_and_etag(s3, bucket, f"{PREFIX}/{name}/HISTORY")
    move = {"version": version, "previous": current, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason, "id": uuid.uuid4().hex, "previous_id": current_id}
    # Appended to the text as it is: a damaged line stays for a human to read, it is not dropped.
    text = (raw_history or b"").decode(errors="replace")
    text += ("\n" if text and not text.endswith("\n") else "") + json.dumps(move) + "\n"
    _put(s3, bucket, f"{PREFIX}/{name}/HISTORY", text.encode(), history_etag)
    _put(s3, bucket, f"{PREFIX}/{name}/CURRENT", version.encode(), current_etag, write_id=move["id"])


def rollback(s3, bucket: str, name: str = DEFAULT_MODEL, check: Callable[[str], None] | None = None) -> str:
    """Undo the last move of CURRENT that is not undone yet: after A -> B -> C, rollback goes to B,
    and a second one to A (not back to C); moving forward again is ``promote``. ``check`` may refuse
    the target (raise) before CURRENT moves."""
    current = current_version(s3, bucket, name)
    previous = previous_version(history(s3, bucket, name), current)
    if not previous:
        raise LookupError(f"model {name!r}: no earlier version to roll back to from "
                          f"{current or 'nothing (no CURRENT yet)'}")
    if check:
        check(previous)
    set_current(s3, bucket, name, previous, reason=f"{ROLLBACK_REASON}{current}", expected=current)
    return previous


def previous_version(entries: list[dict], current: str | None) -> str | None:
    """Where CURRENT was before its last move not yet undone. Walks the chain of moves back from
    CURRENT (each move's version is where the one after it started), so an entry off the chain, one
    recorded but never made (a crash or a lost race between the two writes), is passed over."""
    at, undone = current, 0
    for entry in reversed(entries):
        if entry["version"] != at:
            continue                        # never made
        if entry.get("reason", "").startswith(ROLLBACK_REASON):
            undone += 1
        elif entry["previous"] == entry["version"]:
            continue                        # a promote to the version already CURRENT moved nothing
        elif undone:
            undone -= 1
        else:
            return entry["previous"]
        at = entry["previous"]
    return None


def model_names(s3, bucket: str) -> list[str]:
    """The names of the models published in ``bucket``."""
    return _folders(s3, bucket, f"{PREFIX}/")


def _folders(s3, bucket: str, prefix: str) -> list[str]:
    """The folders right under ``prefix`` that hold a file. Read from the keys, not from a listing's
    CommonPrefixes: moto (the emulator) also gives a folder whose files were all deleted when the
    bucket is versioned, as it is, so a pruned version would still be listed."""
    found = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            folder, slash, _ = item["Key"][len(prefix):].partition("/")
            if slash:
                found.add(folder)
    return sorted(found)


def versions(s3, bucket: str, name: str = DEFAULT_MODEL) -> list[str]:
    """The published versions of ``name``, oldest first (versions are UTC times, so they sort)."""
    return _folders(s3, bucket, f"{PREFIX}/{name}/")


def prunable(versions: list[str], current: str | None, moves: list[dict], keep: int,
             published: str | None = None) -> list[str]:
    """The versions a prune deletes: all but the newest ``keep``, CURRENT, every version CURRENT
    pointed to in its last ``keep`` moves, where ``keep`` rollbacks in a row lead (however old:
    after earlier rollbacks, that chain reaches further back than the last moves), and the version
    this run ``published`` (named by the publisher's clock, it may sort among the oldest)."""
    kept = set(versions[-keep:]) | {current, published} | set(rollback_targets(moves, current, keep))
    for move in moves[-keep:]:
        kept.update((move["version"], move["previous"]))
    return [version for version in versions if version not in kept]


def rollback_targets(moves: list[dict], current: str | None, count: int) -> list[str]:
    """Where ``count`` rollbacks in a row from ``current`` would lead, in order."""
    moves, at, targets = list(moves), current, []
    for _ in range(min(count, len(moves))):
        previous = previous_version(moves, at)
        if previous is None:
            break
        targets.append(previous)
        moves.append({"version": previous, "previous": at, "reason": f"{ROLLBACK_REASON}{at}"})
        at = previous
    return targets


def old_versions(s3, bucket: str, name: str, keep: int, published: str | None = None) -> tuple[list[str], int]:
    """(the versions of ``name`` a prune keeping ``keep`` deletes, how many versions there are)."""
    found = versions(s3, bucket, name)
    current = current_version(s3, bucket, name)
    return prunable(found, current, history(s3, bucket, name), keep, published), len(found)


def delete_unless_current(s3, bucket: str, name: str, version: str) -> int | None:
    """Delete a version's bundle (the number of files) unless it became CURRENT meanwhile (None)."""
    if version == current_version(s3, bucket, name):
        return None
    return delete_version(s3, bucket, name, version)


def delete_version(s3, bucket: str, name: str, version: str) -> int:
    """Delete every file of one version's bundle; how many there were."""
    prefix = f"{PREFIX}/{name}/{version}/"
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])]
    for start in range(0, len(keys), 1000):            # DeleteObjects takes 1,000 keys at most
        batch = [{"Key": key} for key in keys[start:start + 1000]]
        failed = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors")
        if failed:
            raise OSError(f"could not delete s3://{bucket}/{failed[0]['Key']}: {failed[0].get('Message')} "
                          f"({len(failed)} files of version {version} left)")
    return len(keys)
