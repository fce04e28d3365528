"""The model registry on S3: versioned bundles and a CURRENT pointer per model name.

Layout: ``models/<name>/<version>/{model.onnx, model.json, report.html}``,
``models/<name>/CURRENT`` (the version string) and ``models/<name>/HISTORY`` (JSON lines of every
move of CURRENT, newest last) so a rollback knows where to go back to. Versions are UTC timestamps
(``20261129T095300Z``), so they sort in publishing order.
"""
from __future__ import annotations

import json
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


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    onnx: bytes
    meta: dict


def feature_names(meta: dict) -> list[str]:
    """A bundle's input columns, in order, from its model.json."""
    return [f.get("name") for f in meta.get("features") or [] if isinstance(f, dict)]


def has_fold_features(meta: dict) -> bool:
    """Whether a model takes the features common.features computes, in its order: the only model
    the scorers serve (they refuse any other)."""
    return meta.get("feature_version") == FEATURE_VERSION and feature_names(meta) == list(FEATURE_NAMES)


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def current_version(s3, bucket: str, name: str = DEFAULT_MODEL) -> str | None:
    raw = aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/CURRENT")
    return raw.decode().strip() if raw else None


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
    return Bundle(name, version, onnx, json.loads(meta))


class Conflict(Exception):
    """Another writer got there first: the version folder is taken, or CURRENT moved meanwhile."""


def _put(s3, bucket: str, key: str, body: bytes, etag: str | None, **extra) -> None:
    """Write ``key`` only if it is still as read: ``etag`` None means it must not exist yet.
    S3's conditional writes make two concurrent writers a Conflict instead of a silent overwrite."""
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    # When a write's answer is lost, botocore sends it again, and the retry fails its condition on
    # our own write: the id tells that apart from another writer's.
    write_id = uuid.uuid4().hex
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


def replace_meta(s3, bucket: str, name: str, version: str, meta_json: bytes) -> None:
    """Rewrite a published version's model.json (e.g. its promotion record after a Conflict)."""
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}/{version}/model.json", Body=meta_json,
                  ContentType="application/json")


def publish(s3, bucket: str, name: str, version: str, files: dict[str, bytes]) -> None:
    """Upload a bundle's files under its version; model.json last, so a reader that finds it
    finds the rest. The first file claims the folder: Conflict when another run took this version.
    Does not move CURRENT."""
    ordered = sorted(files, key=lambda file: file == "model.json")
    for index, file in enumerate(ordered):
        content_type = {"json": "application/json", "html": "text/html"}.get(file.rsplit(".", 1)[-1],
                                                                             "application/octet-stream")
        key = f"{PREFIX}/{name}/{version}/{file}"
        if index == 0:
            _put(s3, bucket, key, files[file], None, ContentType=content_type)
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=files[file], ContentType=content_type)


def history(s3, bucket: str, name: str = DEFAULT_MODEL) -> list[dict]:
    return _entries(aws.get_object_bytes(s3, bucket, f"{PREFIX}/{name}/HISTORY"))


def _entries(raw: bytes | None) -> list[dict]:
    """HISTORY's JSON lines, oldest first."""
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()] if raw else []


def set_current(s3, bucket: str, name: str, version: str, reason: str, *, expected: str | None = "") -> None:
    """Move CURRENT to ``version`` and record the move. With ``expected`` (a version, or None for
    "no CURRENT yet") the move happens only from that version: Conflict when another run moved
    CURRENT since the caller decided. Both writes are conditional, so two movers never interleave."""
    raw, current_etag = aws.get_object_and_etag(s3, bucket, f"{PREFIX}/{name}/CURRENT")
    current = raw.decode().strip() if raw else None
    if expected != "" and current != expected:
        raise Conflict(f"CURRENT of {name!r} is {current}, no longer {expected}: another run moved it")
    raw_history, history_etag = aws.get_object_and_etag(s3, bucket, f"{PREFIX}/{name}/HISTORY")
    entries = _entries(raw_history)
    entries.append({"version": version, "previous": current,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason})
    _put(s3, bucket, f"{PREFIX}/{name}/HISTORY", "".join(json.dumps(e) + "\n" for e in entries).encode(),
         history_etag)
    _put(s3, bucket, f"{PREFIX}/{name}/CURRENT", version.encode(), current_etag)


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
    paginator = s3.get_paginator("list_objects_v2")
    found = set()
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for folder in page.get("CommonPrefixes", []):
            found.add(folder["Prefix"].rstrip("/").rsplit("/", 1)[-1])
    return sorted(found)


def versions(s3, bucket: str, name: str = DEFAULT_MODEL) -> list[str]:
    """The published versions of ``name``, oldest first (versions are UTC times, so they sort)."""
    return _folders(s3, bucket, f"{PREFIX}/{name}/")


def prunable(versions: list[str], current: str | None, moves: list[dict], keep: int) -> list[str]:
    """The versions a prune deletes: all but the newest ``keep``, CURRENT, every version CURRENT
    pointed to in its last ``keep`` moves, and where ``keep`` rollbacks in a row lead (however old:
    after earlier rollbacks, that chain reaches further back than the last moves)."""
    kept = set(versions[-keep:]) | {current} | set(rollback_targets(moves, current, keep))
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


def old_versions(s3, bucket: str, name: str, keep: int) -> tuple[list[str], int]:
    """(the versions of ``name`` a prune keeping ``keep`` deletes, how many versions there are)."""
    found = versions(s3, bucket, name)
    return prunable(found, current_version(s3, bucket, name), history(s3, bucket, name), keep), len(found)


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
