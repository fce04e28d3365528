"""Create the pipeline's streams, bucket and tables; running it again changes nothing.

Works unchanged against the emulator, LocalStack or a real account: the endpoint comes from
``AWS_ENDPOINT_URL``. An existing stream with another shard count is reported, not resharded:
resharding live traffic is an operator's decision (docs/operations.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from common import aws, logs
from common.config import AwsSettings, ConfigError, load, require_positive

log = logging.getLogger("provision")


@dataclasses.dataclass(frozen=True)
class ProvisionSettings(AwsSettings):
    raw_shards: int = 2
    enriched_shards: int = 2
    bad_shards: int = 1
    predictions_shards: int = 1
    raw_retention_days: int = 7
    bad_retention_days: int = 30
    lake_retention_days: int = 400     # enriched/, as deploy/cloudformation.yaml's LakeRetentionDays
    # The bucket is versioned: a file deleted or overwritten (by hand, by a prune, by a bug) can be
    # restored for this long (batch.cli undelete); raw/ and bad/ keep theirs a day, being clear personal data.
    deleted_retention_days: int = 7
    # How long raw, enriched and bad keep records: the window for replays and for an outage of their
    # readers. deploy/cloudformation.yaml's StreamRetentionHours. Predictions keep Kinesis' 24 h,
    # which the discount engine's offer_ttl_hours is checked against.
    stream_retention_hours: int = 168

    def validate(self) -> None:
        require_positive(self, "raw_shards", "enriched_shards", "bad_shards", "predictions_shards",
                         "raw_retention_days", "bad_retention_days", "lake_retention_days", "deleted_retention_days")
        if not 24 <= self.stream_retention_hours <= 8760:
            raise ConfigError(f"CLICKSTREAM_STREAM_RETENTION_HOURS: expected 24 to 8760 (Kinesis' range), "
                              f"got {self.stream_retention_hours}")


STREAM_KEY = "alias/aws/kinesis"          # the AWS-managed key: no key policy or cost of our own
PREDICTIONS_RETENTION_HOURS = 24          # as discount.settings checks offer_ttl_hours against
TLS_ONLY = {"Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Condition": {"Bool": {"aws:SecureTransport": "false"}}}


def ensure_stream(kinesis, name: str, shards: int, retention_hours: int) -> str:
    """The stream, encrypted at rest (the AWS-managed key, unless it has a key already) and keeping
    records at least ``retention_hours``. A longer retention is left, as shard counts are: shortening
    it deletes records for good, which is the operator's decision."""
    try:
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        have = summary.get("OpenShardCount", shards)
        note = "" if have == shards else f" (configured {shards}; reshard deliberately, see docs/operations.md)"
        state = f"exists with {have} open shard(s){note}"
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        kinesis.create_stream(StreamName=name, ShardCount=shards)
        _wait_active(kinesis, name)
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        state = f"created with {shards} shard(s)"
    # Each change leaves the stream UPDATING for a while, and the next one is refused until it is ACTIVE.
    key = summary.get("KeyId") if summary.get("EncryptionType") == "KMS" else None
    if key is None:
        kinesis.start_stream_encryption(StreamName=name, EncryptionType="KMS", KeyId=STREAM_KEY)
        _wait_active(kinesis, name)
        key = STREAM_KEY
    kept = summary.get("RetentionPeriodHours", 24)
    if kept < retention_hours:
        kinesis.increase_stream_retention_period(StreamName=name, RetentionPeriodHours=retention_hours)
        _wait_active(kinesis, name)
        kept = retention_hours
    longer = f" (configured {retention_hours} h; shorten it deliberately: older records go)" \
        if kept > retention_hours else ""
    return f"stream {name}: {state}, encrypted ({key}), records kept {kept} h{longer}"


def _wait_active(kinesis, name: str) -> None:
    kinesis.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})


CLEAR_DATA_DELETED_DAYS = 1               # raw/ and bad/: how long their deleted files can be restored


def lifecycle_rules(settings: ProvisionSettings) -> list[dict]:
    # In a versioned bucket an expiry or a delete only hides the file: the version it leaves is
    # removed NoncurrentDays later. Where two rules overlap S3 keeps the shorter, so raw/ and bad/
    # keep theirs one day whatever deleted_retention_days says.
    kept_a_day = {"NoncurrentVersionExpiration": {"NoncurrentDays": CLEAR_DATA_DELETED_DAYS}}
    return [
        {"ID": "expire-raw", "Filter": {"Prefix": "raw/"}, "Status": "Enabled",
         "Expiration": {"Days": settings.raw_retention_days}, **kept_a_day},
        {"ID": "expire-bad", "Filter": {"Prefix": "bad/"}, "Status": "Enabled",
         "Expiration": {"Days": settings.bad_retention_days}, **kept_a_day},
        {"ID": "expire-enriched", "Filter": {"Prefix": "enriched/"}, "Status": "Enabled",
         "Expiration": {"Days": settings.lake_retention_days}},
        {"ID": "abort-incomplete-uploads", "Filter": {"Prefix": ""}, "Status": "Enabled",
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        {"ID": "expire-deleted-versions", "Filter": {"Prefix": ""}, "Status": "Enabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": settings.deleted_retention_days}},
        {"ID": "remove-expired-delete-markers", "Filter": {"Prefix": ""}, "Status": "Enabled",
         "Expiration": {"ExpiredObjectDeleteMarker": True}},
    ]


class BucketUnusable(Exception):
    """The bucket name cannot be used here: someone else's bucket, or ours in another region."""


def bucket_key(env: dict | None = None) -> str:
    """The setting that names the bucket, as the user sets it (or would: CLICKSTREAM_BUCKET)."""
    env = os.environ if env is None else env
    return next((key for key in ("CLICKSTREAM_PROVISION_BUCKET", "CLICKSTREAM_BUCKET") if key in env),
                "CLICKSTREAM_BUCKET")


def _unusable(name: str, region: str, code: str, bucket_region: str | None = None) -> BucketUnusable:
    """Why S3 refused the bucket (``code``: 403 someone else's, 301 ours elsewhere) and which setting to change."""
    key = bucket_key()
    if code in ("301", "PermanentRedirect"):
        where = bucket_region or "another region"
        move = f", or set CLICKSTREAM_REGION to {bucket_region}" if bucket_region else ""
        return BucketUnusable(f"bucket {name} exists in {where}, not in {region} where the streams and tables "
                              f"are: set {key} to another name (S3 bucket names are global){move}")
    answer = {"BucketAlreadyExists": "the name is in use", "403": "403 Forbidden"}.get(code, code)
    return BucketUnusable(f"bucket {name} is taken (S3: {answer}): bucket names are global, and this one most "
                          f"likely belongs to another AWS account (or your credentials may not use it); set {key} "
                          f"to a name of your own, e.g. {name}-<account id>-{region}")


def ensure_bucket(s3, name: str, settings: ProvisionSettings) -> str:
    region = s3.meta.region_name          # settings.region, or the region the client resolved
    try:
        found = s3.head_bucket(Bucket=name)
        state = "exists"
        bucket_region = found.get("BucketRegion")
        if bucket_region and bucket_region != region:     # ours, elsewhere: S3 followed the redirect
            raise _unusable(name, region, "301", bucket_region)
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in ("403", "Forbidden", "AccessDenied", "301", "PermanentRedirect"):
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            raise _unusable(name, region, code, headers.get("x-amz-bucket-region")) from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
        kwargs = {"Bucket": name}
        if region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as create_exc:
            if create_exc.response["Error"]["Code"] == "BucketAlreadyExists":    # taken since the look
                raise _unusable(name, region, "BucketAlreadyExists") from None
            raise
        state = "created"
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": lifecycle_rules(settings)})
    return (f"bucket {name}: {state}, lifecycle raw/ {settings.raw_retention_days} d, bad/ {settings.bad_retention_days} d, "
            f"enriched/ {settings.lake_retention_days} d, versioned (deleted files kept "
            f"{settings.deleted_retention_days} d, raw/ and bad/ {CLEAR_DATA_DELETED_DAYS} d), "
            f"{ensure_encrypted(s3, name)}, {ensure_tls_only(s3, name)}")


def ensure_encrypted(s3, name: str) -> str:
    """Default encryption with S3's own keys, unless the bucket has one (SSE-KMS, say) already."""
    try:
        rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
        return f"encrypted ({rules[0]['ApplyServerSideEncryptionByDefault']['SSEAlgorithm']})"
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ServerSideEncryptionConfigurationNotFoundError":
            raise
    s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    return "encrypted (AES256)"


def ensure_tls_only(s3, name: str) -> str:
    """Add a statement refusing plain-HTTP requests to the bucket's policy (keeping its others). Not on
    an emulator, which is plain HTTP and enforces bucket policies (moto does): nothing could use it."""
    if aws.uses_local_endpoint():
        return "TLS-only policy left out (the emulator is plain HTTP)"
    try:
        policy = json.loads(s3.get_bucket_policy(Bucket=name)["Policy"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucketPolicy":
            raise
        policy = {"Version": "2012-10-17", "Statement": []}
    if any(statement.get("Sid") == TLS_ONLY["Sid"] for statement in policy["Statement"]):
        return "TLS only"
    resources = [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]
    policy["Statement"].append({**TLS_ONLY, "Resource": resources})
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    return "TLS only (policy statement added)"


def ensure_table(dynamodb, name: str, keys: list[tuple[str, str]], ttl_attribute: str | None = None) -> str:
    try:
        dynamodb.describe_table(TableName=name)
        state = "exists"
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        dynamodb.create_table(
            TableName=name, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"} for key, _ in keys],
            KeySchema=[{"AttributeName": key, "KeyType": kind} for key, kind in keys],
        )
        dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        state = "created"
    if ttl_attribute:
        current = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
        if current.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification={
                "Enabled": True, "AttributeName": ttl_attribute})
        elif current.get("AttributeName") != ttl_attribute:
            # A table can expire rows by one attribute only; changing it is the operator's decision.
            return (f"table {name}: {state}, but its TTL is on {current.get('AttributeName')!r}, not "
                    f"{ttl_attribute!r}: rows will not expire; change it by hand")
        state += f", TTL on {ttl_attribute}"
    return f"table {name}: {state}"


def provision(settings: ProvisionSettings) -> list[str]:
    kinesis = aws.client("kinesis", settings.region)
    s3 = aws.client("s3", settings.region)
    dynamodb = aws.client("dynamodb", settings.region)
    bucket = ensure_bucket(s3, settings.bucket, settings)     # first: a taken name stops before anything is made
    lines = [
        ensure_stream(kinesis, settings.raw_stream, settings.raw_shards, settings.stream_retention_hours),
        ensure_stream(kinesis, settings.enriched_stream, settings.enriched_shards, settings.stream_retention_hours),
        ensure_stream(kinesis, settings.bad_stream, settings.bad_shards, settings.stream_retention_hours),
        ensure_stream(kinesis, settings.predictions_stream, settings.predictions_shards, PREDICTIONS_RETENTION_HOURS),
        bucket,
        # TTL removes the heartbeat rows of workers that died (common/leases.py); shard rows have no expires_at.
        ensure_table(dynamodb, settings.lease_table, [("group", "HASH"), ("item", "RANGE")], "expires_at"),
        ensure_table(dynamodb, settings.predictions_table, [("session_id", "HASH")], "expires_at"),
        ensure_table(dynamodb, settings.offers_table, [("session_id", "HASH")], "expires_at"),
    ]
    return lines


def wait_for_endpoint(settings: ProvisionSettings, timeout: float) -> None:
    """Wait up to ``timeout`` for the Kinesis endpoint to answer (an emulator still starting). An
    answer that refuses us (access denied, bad credentials) is raised at once: waiting will not
    change it. The probe is a call provisioning makes anyway, so it needs no extra permission."""
    kinesis = aws.client("kinesis", settings.region, timeout=2, retries=1)
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            kinesis.describe_stream_summary(StreamName=settings.raw_stream)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                return                       # it answers; the stream is created below
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) < 500:
                raise
            if time.monotonic() > deadline:
                raise
        except (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError):
            if time.monotonic() > deadline:
                raise
        if not said:                         # otherwise a stopped emulator looks like a hang
            print(f"waiting up to {timeout:.0f} s for {kinesis.meta.endpoint_url} (--wait) ...",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.provision",
        description="Create the clickstream streams, bucket and tables (idempotent). "
                    "Settings: CLICKSTREAM_* environment variables or the [provision] section of CLICKSTREAM_CONFIG.")
    parser.add_argument("--wait", type=float, default=30, help="seconds to wait for the endpoint (default 30)")
    args = parser.parse_args(argv)
    logs.setup(json_lines=False)
    try:
        settings = load(ProvisionSettings, section="provision")
        wait_for_endpoint(settings, args.wait)
        for line in provision(settings):
            print(line, flush=True)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except aws.ERRORS as exc:
        print(f"error: {aws.explain(exc)}", file=sys.stderr)
        return 1
    except BucketUnusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
