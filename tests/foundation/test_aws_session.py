"""common.aws resolves the region and credentials as boto3 does: the profile's region counts, and an
empty AWS_ENDPOINT_URL (README's way of saying "real AWS") does not turn on the emulator's dummy keys."""
from __future__ import annotations

import os

import pytest
from botocore.exceptions import NoCredentialsError

from common import aws


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """No AWS variables at all, no credentials file, no instance metadata: a fresh operator's shell."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path / "config"


def test_the_profile_region_is_used_when_no_variable_names_one(bare_env, monkeypatch):
    bare_env.write_text("[default]\nregion = eu-west-1\n\n[profile ops]\nregion = ap-southeast-2\n")
    assert aws.client("kinesis").meta.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_PROFILE", "ops")
    assert aws.client("s3").meta.region_name == "ap-southeast-2"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert aws.client("dynamodb").meta.region_name == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert aws.client("dynamodb").meta.region_name == "us-west-2"
    assert aws.client("dynamodb", "eu-north-1").meta.region_name == "eu-north-1"     # the `region` setting


def test_us_east_1_only_when_nothing_names_a_region(bare_env):
    assert aws.client("kinesis").meta.region_name == "us-east-1"


def test_an_empty_endpoint_variable_means_real_aws_and_missing_credentials_are_named(bare_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    kinesis = aws.client("kinesis", retries=0)
    assert kinesis.meta.endpoint_url == "https://kinesis.us-east-1.amazonaws.com"
    with pytest.raises(NoCredentialsError) as caught:
        kinesis.list_streams()
    assert aws.explain(caught.value).startswith("no AWS credentials found")


def test_an_aws_endpoint_is_not_an_emulator_but_a_local_one_gets_dummy_credentials(bare_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://bucket.vpce-0a1b2c3d-e4f5.s3.us-east-1.vpce.amazonaws.com")
    assert aws.session().get_credentials() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    assert aws.session().get_credentials().access_key == "test"


@pytest.mark.parametrize("code, operation, hint", [
    ("ExpiredTokenException", "PutRecords", "the credentials in use are expired or not valid"),
    ("AccessDenied", "ListObjectsV2", "may not call ListObjectsV2 on that resource"),
    ("400", "HeadBucket", "a HEAD answer carries no reason"),
])
def test_refused_credentials_and_permissions_are_explained(code, operation, hint):
    """S3's AccessDenied names no bucket, and an expired token on a HEAD is a bare "400 Bad Request"."""
    from botocore.exceptions import ClientError

    explained = aws.explain(ClientError({"Error": {"Code": code, "Message": "Bad Request"}}, operation))
    assert explained.startswith(f"AWS: An error occurred ({code}) when calling the {operation} operation") and hint in explained
