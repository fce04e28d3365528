"""boto3 clients that work unchanged against the emulator, LocalStack or real AWS.

Endpoints come from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>`` variables that
boto3 honours itself. Only when such a variable names an emulator (set and not empty, and not an AWS
host such as a VPC or FIPS endpoint) and no credentials are configured do we fall back to dummy
credentials, because emulators accept any key but botocore refuses to sign without one. The region
is boto3's own (``AWS_DEFAULT_REGION``, the profile in ``~/.aws/config``), with ``AWS_REGION`` first
and us-east-1 only when nothing names one.
"""
from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

_LOCAL_DEFAULTS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
# What a failed AWS call raises: botocore's own errors (no credentials, no connection) and the service's answers.
ERRORS = (BotoCoreError, ClientError)
# Error codes of a service that answers but is at its limit (a Kinesis shard's reads or writes,
# DynamoDB capacity, API call rates): back off and try again, nothing is wrong with the request.
THROTTLING_CODES = ("ProvisionedThroughputExceededException", "ThrottlingException", "KMSThrottlingException",
                    "LimitExceededException", "RequestLimitExceeded", "SlowDown")


def throttled(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in THROTTLING_CODES
LOCAL_STACK_HINT = "for the local stack of `make up` and `make demo`: export AWS_ENDPOINT_URL=http://127.0.0.1:4566"


def precondition_failed(exc: ClientError) -> bool:
    """S3 refused a conditional write (If-Match / If-None-Match): someone else wrote the key first."""
    return exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412")


def no_such_key(exc: ClientError) -> bool:
    """S3 found no object at the key (a GET's NoSuchKey, a HEAD's bare 404, a conditional write's)."""
    return exc.response["Error"]["Code"] in ("NoSuchKey", "404")


DEFAULT_REGION = "us-east-1"


def _is_aws_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def uses_local_endpoint() -> bool:
    """An endpoint variable names an emulator. README tells AWS users to set ``AWS_ENDPOINT_URL=``
    (empty), which boto3 ignores: so do we, and an AWS endpoint (VPC, FIPS) is no emulator either."""
    return any(key.startswith("AWS_ENDPOINT_URL") and value.strip() and not _is_aws_host(value.strip())
               for key, value in os.environ.items())


def session(region: str | None = None) -> boto3.session.Session:
    """A session in ``region``, else AWS_REGION, else the region boto3 resolves (AWS_DEFAULT_REGION,
    the profile's ``region``), else us-east-1."""
    found = boto3.session.Session()
    kwargs = {"region_name": region or os.environ.get("AWS_REGION") or found.region_name or DEFAULT_REGION}
    if uses_local_endpoint() and not found.get_credentials():
        kwargs.update(aws_access_key_id=_LOCAL_DEFAULTS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=_LOCAL_DEFAULTS["AWS_SECRET_ACCESS_KEY"])
    return boto3.session.Session(**kwargs)


def client(service: str, region: str | None = None, *, timeout: float = 10.0, read_timeout: float | None = None,
           retries: int = 2, **options):
    """A client with short timeouts: our own code retries, so botocore should fail fast. ``timeout`` is
    the connect timeout, and the read timeout unless ``read_timeout`` is given. ``retries`` is
    botocore's count of retries after the first attempt (0: one attempt).
    ``options`` are further botocore Config settings (e.g. parameter_validation=False on hot paths)."""
    options.setdefault("max_pool_connections", 32)
    config = Config(connect_timeout=timeout, read_timeout=timeout if read_timeout is None else read_timeout,
                    retries={"max_attempts": retries, "mode": "standard"}, **options)
    return session(region).client(service, config=config)


class ByReadTimeout:
    """Clients by read timeout, each made by ``make(read_timeout)`` when first needed: botocore fixes a
    client's timeouts when it is made, and a producer raises its read timeout while a stream answers
    slowly (common.producer.ReadTimeouts)."""

    def __init__(self, make):
        self.make = make
        self._made: dict[float, object] = {}

    def __call__(self, read_timeout: float):
        if read_timeout not in self._made:
            self._made[read_timeout] = self.make(read_timeout)
        return self._made[read_timeout]

    def switching(self, *streams):
        """A ``ReadTimeouts.use``: point each stream (one ``.client`` each) at the new timeout's client."""
        def use(read_timeout: float) -> None:
            for stream in streams:
                stream.client = self(read_timeout)
        return use


def get_object_bytes(s3, bucket: str, key: str) -> bytes | None:
    """The object's body, or None when there is no such key (any other error raises)."""
    return get_object_and_etag(s3, bucket, key)[0]


def get_object_and_etag(s3, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    """The object's body and ETag (for a conditional write back), (None, None) when there is none."""
    try:
        found = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if no_such_key(exc):
            return None, None
        raise
    return found["Body"].read(), found["ETag"]


def ttl_expired(item: dict, now: float | None = None, attribute: str = "expires_at") -> bool:
    """Whether a DynamoDB item is past its TTL (epoch seconds). DynamoDB deletes expired items only
    some time later, typically within two days, and reads return them until then: a reader that
    decides on an item must treat an expired one as absent."""
    expires = item.get(attribute, {}).get("N")
    return expires is not None and float(expires) <= (time.time() if now is None else now)


# Answers that mean the credentials themselves are refused, whatever the call (STS, S3, JSON services).
BAD_CREDENTIALS = {"ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "InvalidClientTokenId",
                   "SignatureDoesNotMatch", "InvalidSignatureException", "UnrecognizedClientException"}


def explain(exc: Exception) -> str:
    """One line for a person: what the AWS call said and, when nothing was reached, what to check."""
    if isinstance(exc, NoCredentialsError):
        return f"no AWS credentials found ({LOCAL_STACK_HINT}; for AWS, configure your usual credentials)"
    if isinstance(exc, EndpointConnectionError):
        return f"{exc} (is the emulator or LocalStack running? `make up` starts the local stack)"
    error = getattr(exc, "response", {}).get("Error", {})
    code, operation = str(error.get("Code", "")), getattr(exc, "operation_name", "the call")
    if code == "NoSuchBucket":
        return (f"AWS: there is no bucket {error.get('BucketName', '?')!r} (set by CLICKSTREAM_BUCKET, the config "
                "file's bucket key or --bucket; `make up` or `python -m infra.provision` creates it)")
    if code in BAD_CREDENTIALS:
        return (f"AWS: {exc} (the credentials in use are expired or not valid: renew them, e.g. `aws sso login`, "
                "or check AWS_PROFILE and the AWS_* variables)")
    if "AccessDenied" in code or code == "403":
        return f"AWS: {exc} (the credentials in use may not call {operation} on that resource: check their policy)"
    if code == "400" and operation.startswith("Head"):
        return (f"AWS: {exc} (a HEAD answer carries no reason: often expired credentials, or a bucket in another "
                "region than the `region` setting)")
    return f"AWS: {exc}"
