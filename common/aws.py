"""boto3 clients that work unchanged against the emulator, LocalStack or real AWS.

Endpoints come from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>`` variables that
boto3 honours itself. Only when an endpoint is set and no credentials are configured do we fall back
to dummy credentials, because emulators accept any key but botocore refuses to sign without one.
"""
from __future__ import annotations

import os

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

_LOCAL_DEFAULTS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
# What a failed AWS call raises: botocore's own errors (no credentials, no connection) and the service's answers.
ERRORS = (BotoCoreError, ClientError)
LOCAL_STACK_HINT = "for the local stack of `make up` and `make demo`: export AWS_ENDPOINT_URL=http://127.0.0.1:4566"


def precondition_failed(exc: ClientError) -> bool:
    """S3 refused a conditional write (If-Match / If-None-Match): someone else wrote the key first."""
    return exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412")


def _uses_local_endpoint() -> bool:
    return any(key.startswith("AWS_ENDPOINT_URL") for key in os.environ)


def session(region: str | None = None) -> boto3.session.Session:
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs = {"region_name": region}
    if _uses_local_endpoint() and not boto3.session.Session().get_credentials():
        kwargs.update(aws_access_key_id=_LOCAL_DEFAULTS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=_LOCAL_DEFAULTS["AWS_SECRET_ACCESS_KEY"])
    return boto3.session.Session(**kwargs)


def client(service: str, region: str | None = None, *, timeout: float = 10.0, retries: int = 2, **options):
    """A client with short timeouts: our own code retries, so botocore should fail fast.
    ``options`` are further botocore Config settings (e.g. parameter_validation=False on hot paths)."""
    options.setdefault("max_pool_connections", 32)
    config = Config(connect_timeout=timeout, read_timeout=timeout,
                    retries={"max_attempts": retries, "mode": "standard"}, **options)
    return session(region).client(service, config=config)


def get_object_bytes(s3, bucket: str, key: str) -> bytes | None:
    """The object's body, or None when there is no such key (any other error raises)."""
    return get_object_and_etag(s3, bucket, key)[0]


def get_object_and_etag(s3, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    """The object's body and ETag (for a conditional write back), (None, None) when there is none."""
    try:
        found = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None, None
        raise
    return found["Body"].read(), found["ETag"]


def explain(exc: Exception) -> str:
    """One line for a person: what the AWS call said and, when nothing was reached, what to check."""
    if isinstance(exc, NoCredentialsError):
        return f"no AWS credentials found ({LOCAL_STACK_HINT}; for AWS, configure your usual credentials)"
    if isinstance(exc, EndpointConnectionError):
        return f"{exc} (is the emulator or LocalStack running? `make up` starts the local stack)"
    return f"AWS: {exc}"
