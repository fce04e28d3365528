"""`python -m infra.provision` with a bucket name it cannot use says so, names the setting to change,
and creates nothing first. Bucket names are global: the default `clickstream-lake` is most likely
someone else's on AWS (HeadBucket answers a bare 403), or one's own in another region."""
from __future__ import annotations

import contextlib
import json
import os
import time
import types

import boto3
import pytest

from infra.provision import main as provision_main
from localstack import emulator
from tests.conftest import unique_settings


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("CLICKSTREAM_"):
            monkeypatch.delenv(key)
    return monkeypatch


@contextlib.contextmanager
def moto_as_user(env, log_path, statements: list[dict], setup=lambda root: None, set_up_calls: int = 0):
    """A moto server that checks IAM, with the AWS_* variables set to a user allowed ``statements``;
    ``setup(root)`` runs first as root (``set_up_calls`` calls besides the three that create the user)."""
    env.setenv("INITIAL_NO_AUTH_ACTION_COUNT", str(set_up_calls + 3))
    server = emulator.start("moto", log_path=log_path)
    env.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        root = {"endpoint_url": server.endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
                "region_name": "us-east-1"}
        setup(root)
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="operator")
        iam.put_user_policy(UserName="operator", PolicyName="own", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName="operator")["AccessKey"]
        env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        env.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        env.setenv("AWS_REGION", "us-east-1")
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def foreign_bucket_endpoint(clean_env, tmp_path):
    """Where `clickstream-lake` belongs to someone else: our user may use Kinesis, DynamoDB and its
    own buckets only, so HeadBucket on the taken name answers 403."""
    with moto_as_user(clean_env, tmp_path / "moto-iam.log", [
            {"Effect": "Allow", "Action": ["kinesis:*", "dynamodb:*"], "Resource": "*"},
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::mine-*", "arn:aws:s3:::mine-*/*"]}],
            setup=lambda root: boto3.client("s3", **root).create_bucket(Bucket="clickstream-lake"),
            set_up_calls=1) as endpoint:
        yield endpoint


def test_a_refusal_is_reported_at_once_not_waited_out(clean_env, tmp_path, capsys, monkeypatch):
    """--wait is for an emulator still starting; an endpoint that answers "access denied" will not
    change its mind, so provisioning must not sleep through the wait before saying so."""
    import infra.provision

    def no_waiting(seconds):
        raise AssertionError("waited on an endpoint that had answered")

    # The module's own reference to time only: other threads (py4j's, the server's) sleep as usual.
    monkeypatch.setattr(infra.provision, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=no_waiting))
    with moto_as_user(clean_env, tmp_path / "moto-iam.log",
                      [{"Effect": "Allow", "Action": ["dynamodb:*", "s3:*"], "Resource": "*"}]):
        assert provision_main(["--wait", "600"]) == 1
    assert "AccessDenied" in capsys.readouterr().err


def test_the_default_bucket_name_taken_by_another_account_is_named_with_the_setting_to_change(
        foreign_bucket_endpoint, capsys):
    assert provision_main(["--wait", "10"]) == 1
    error = capsys.readouterr().err
    assert "bucket clickstream-lake is taken" in error and "403" in error
    assert "set CLICKSTREAM_BUCKET to a name of your own" in error
    kinesis = boto3.client("kinesis", endpoint_url=foreign_bucket_endpoint, region_name="us-east-1")
    assert kinesis.list_streams()["StreamNames"] == []           # stopped before creating anything


def test_the_setting_is_named_as_it_was_set(foreign_bucket_endpoint, capsys, clean_env):
    clean_env.setenv("CLICKSTREAM_PROVISION_BUCKET", "clickstream-lake")
    assert provision_main(["--wait", "10"]) == 1
    assert "set CLICKSTREAM_PROVISION_BUCKET to a name of your own" in capsys.readouterr().err
    clean_env.setenv("CLICKSTREAM_PROVISION_BUCKET", "mine-lake")
    assert provision_main(["--wait", "10"]) == 0                  # a name of one's own goes through
    assert "bucket mine-lake: created" in capsys.readouterr().out


def test_an_own_bucket_in_another_region_is_named(aws_endpoint, clean_env, capsys):
    settings = unique_settings()
    boto3.client("s3", region_name="eu-west-1").create_bucket(
        Bucket=settings.bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    clean_env.setenv("AWS_REGION", "us-east-1")
    for name in ("bucket", "raw_stream", "lease_table"):
        clean_env.setenv(f"CLICKSTREAM_{name.upper()}", getattr(settings, name))
    assert provision_main(["--wait", "10"]) == 1
    error = capsys.readouterr().err
    assert f"bucket {settings.bucket} exists in eu-west-1, not in us-east-1" in error
    assert "set CLICKSTREAM_BUCKET to another name" in error and "CLICKSTREAM_REGION to eu-west-1" in error
    kinesis = boto3.client("kinesis", region_name="us-east-1")
    assert settings.raw_stream not in kinesis.list_streams()["StreamNames"]
