"""Bring back files deleted from the lake bucket by mistake: model bundles, lake files, records.

The bucket is versioned (infra.provision, deploy/cloudformation.yaml): a delete only lays a delete
marker over the file's last version, which the lifecycle rule removes ``deleted_retention_days``
later (raw/ and bad/ a day). Removing the marker makes that version the file again, byte for byte.
Nothing is restored that an erasure removed: it deletes the versions holding the person's rows too.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Deleted:
    key: str
    markers: tuple[str, ...]    # version ids of the delete markers over its last version (a retried delete lays two)
    at: dt.datetime             # when it was deleted (the latest marker)
    restorable: bool            # a version lies under them (not expired, not erased)


def deleted_since(s3, bucket: str, prefix: str, since: dt.datetime) -> list[Deleted]:
    """Files under ``prefix`` deleted at or after ``since``, and not written again since: their latest
    version is a delete marker, and every marker over their last version is that recent."""
    markers: dict[str, list[dict]] = {}
    newest_version: dict[str, dt.datetime] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for marker in page.get("DeleteMarkers", []):
            markers.setdefault(marker["Key"], []).append(marker)
        for version in page.get("Versions", []):
            if version["Key"] not in newest_version or version["LastModified"] > newest_version[version["Key"]]:
                newest_version[version["Key"]] = version["LastModified"]
    found = []
    for key, laid in sorted(markers.items()):
        if not any(marker["IsLatest"] for marker in laid):
            continue                    # written again after its delete: it is there
        under = newest_version.get(key)
        # A delete in the same second as the write it hides has the same time: it is on top.
        on_top = [marker for marker in laid if under is None or marker["LastModified"] >= under]
        if all(marker["LastModified"] >= since for marker in on_top):
            found.append(Deleted(key, tuple(marker["VersionId"] for marker in on_top),
                                 max(marker["LastModified"] for marker in on_top), under is not None))
    return found


def undelete(s3, bucket: str, deleted: Deleted) -> None:
    """Remove the delete markers, so the version under them is the file again."""
    for marker in deleted.markers:
        s3.delete_object(Bucket=bucket, Key=deleted.key, VersionId=marker)
