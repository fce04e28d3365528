"""`lake undelete`: files deleted by mistake come back byte for byte from the versioned bucket; files
deleted earlier, written again, or erased do not."""
from __future__ import annotations

import datetime as dt
import time
import uuid

from click.testing import CliRunner

from batch import lake
from batch.cli import lake_cli
from common import registry
from tests.conftest import settings_env

MODEL = "models/buy-propensity/"


def _undelete(settings, *args, bucket: str | None = None):
    return CliRunner().invoke(lake_cli, ["--bucket", bucket or settings.bucket, "undelete", *args],
                              env=settings_env(settings), catch_exceptions=False)


def _contents(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    return {obj["Key"]: s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            for obj in lake.list_objects(s3, bucket, prefix)}


def _put(s3, bucket: str, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def _a_second_later() -> str:
    """A time after everything done so far, in whole seconds (S3 lists times to the second)."""
    time.sleep(1.1)
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def test_a_registry_removed_by_mistake_comes_back_as_it_was(aws_settings, s3):
    bucket = aws_settings.bucket
    models = {f"{MODEL}v1/model.onnx": b"onnx-1", f"{MODEL}v1/model.json": b'{"version": "v1"}',
              f"{MODEL}v2/model.onnx": b"onnx-2", f"{MODEL}CURRENT": b"v2"}
    _put(s3, bucket, {**models, f"{MODEL}v0/model.onnx": b"pruned"})
    s3.delete_object(Bucket=bucket, Key=f"{MODEL}v0/model.onnx")          # a prune, before the mistake
    since = _a_second_later()
    for key in models:                                                    # aws s3 rm --recursive models/
        s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_object(Bucket=bucket, Key=f"{MODEL}CURRENT")                # and once more: a retried delete
    _put(s3, bucket, {f"{MODEL}v2/model.onnx": b"onnx-2 again"})         # written again since: left alone

    assert registry.versions(s3, bucket, "buy-propensity") == ["v2"]      # only what was written again

    dry = _undelete(aws_settings, "models/", "--since", since, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would restore 3 files deleted since {since[:19]}Z under s3://{bucket}/models/" in dry.output
    assert _contents(s3, bucket, "models/") == {f"{MODEL}v2/model.onnx": b"onnx-2 again"}

    done = _undelete(aws_settings, "models/", "--since", since)
    assert done.exit_code == 0, done.output
    assert f"{MODEL}CURRENT: restored (deleted " in done.output
    assert _contents(s3, bucket, "models/") == {**models, f"{MODEL}v2/model.onnx": b"onnx-2 again"}
    assert registry.versions(s3, bucket, "buy-propensity") == ["v1", "v2"]
    assert "restored 0 files" in _undelete(aws_settings, "models/", "--since", since).output


def test_an_erased_file_is_not_brought_back(aws_settings, s3):
    """An erasure deletes a file it emptied and the version that held the person's rows."""
    bucket, key = aws_settings.bucket, "enriched/date=2026-11-29/hour=10/shardId-000000000000-5-15.parquet"
    since = _a_second_later()
    _put(s3, bucket, {key: b"their rows"})
    s3.delete_object(Bucket=bucket, Key=key)
    [version] = [v["VersionId"] for v in s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]]
    s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
    done = _undelete(aws_settings, "enriched/", "--since", since)
    assert done.exit_code == 0, done.output
    assert f"{key}: deleted " in done.output and "nothing left to restore (kept too long ago, or erased)" in done.output
    assert "restored 0 files" in done.output and _contents(s3, bucket, "enriched/") == {}


def test_a_lake_file_restored_says_its_events_may_be_there_twice(aws_settings, s3):
    bucket, key = aws_settings.bucket, "enriched/date=2026-11-29/hour=09/part.parquet"
    since = _a_second_later()
    _put(s3, bucket, {key: b"parquet"})
    s3.delete_object(Bucket=bucket, Key=key)
    done = _undelete(aws_settings, "enriched/date=2026-11-29/", "--since", since)
    assert "restored 1 files" in done.output and "in the lake twice (training reads each event id once)" in done.output
    assert _contents(s3, bucket, "enriched/") == {key: b"parquet"}


def test_an_unversioned_bucket_and_a_bad_time_are_said_plainly(aws_settings, s3):
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=plain)
    done = _undelete(aws_settings, "models/", "--since", "2026-12-06T10:00", bucket=plain)
    assert done.exit_code == 1 and f"s3://{plain} is not versioned, so it keeps no deleted file" in done.output
    bad = _undelete(aws_settings, "models/", "--since", "yesterday")
    assert bad.exit_code == 2 and "expected an ISO time such as 2026-12-06T10:00" in bad.output
