"""Test harness: a real emulator over HTTP, one per test session, on a free port.

When ``AWS_ENDPOINT_URL`` is already set (LocalStack, or unset with real AWS credentials and
``CLICKSTREAM_TEST_REAL_AWS=1``), the suite uses that endpoint instead of starting moto server.
Each test gets its own resource names, so tests never see each other's data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from common.config import AwsSettings
from localstack import emulator

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"      # Debian's, installed by `make setup`
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def headless_chromium(url: str, profile: Path):
    """Chromium showing ``url`` (its scripts running) until the block ends. Its scratch folder is
    removed after it (it left /tmp/org.chromium.Chromium.* behind); a short path, as it holds a
    socket, and a socket's path has at most 107 characters (a pytest folder's is longer)."""
    scratch = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "TMPDIR": scratch})
    try:
        yield browser
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def spark():
    """One Spark session for the whole run, started as make train starts it: a JVM takes its options
    once, and a second fixture's getOrCreate got the first one's session (the scorer tests' ran the
    training tests without the trainer's log, scratch and progress settings)."""
    from batch.train_config import TrainSettings, spark_session

    session = spark_session(TrainSettings(spark_master="local[2]", spark_shuffle_partitions=4, spark_driver_memory="1g",
                                          progress=False), app_name="clickstream-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory):
    """The endpoint every integration test talks to: a fresh moto server unless one is given."""
    given = os.environ.get("AWS_ENDPOINT_URL")
    if given or os.environ.get("CLICKSTREAM_TEST_REAL_AWS") == "1":
        yield given
        return
    log = tmp_path_factory.mktemp("emulator") / "moto.log"
    server = emulator.start("moto", log_path=log)
    set_here = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1"}
    set_here = {key: value for key, value in set_here.items() if key == "AWS_ENDPOINT_URL" or key not in os.environ}
    os.environ.update(set_here)
    try:
        yield server.endpoint
    finally:
        for key in set_here:        # the emulator's credentials must not outlive it (a later real-AWS test)
            os.environ.pop(key, None)
        server.stop()


@pytest.fixture(scope="session")
def kinesis_mock(tmp_path_factory):
    """kinesis-mock on a free port: AWS-faithful resharding and sequence numbers."""
    log = tmp_path_factory.mktemp("kinesis-mock") / "kinesis-mock.log"
    server = emulator.start("kinesis-mock", log_path=log)
    try:
        yield server.endpoint
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout``."""
    deadline, value = time.monotonic() + timeout, None
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {value!r}")
        time.sleep(interval)


def memory_grown_by(action):
    """``action()``'s result and how many bytes Python's allocations grew by while it ran."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = action()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def unique_settings(cls=AwsSettings, **overrides):
    """Settings whose stream, bucket and table names are unique to one test."""
    suffix = uuid.uuid4().hex[:8]
    names = {f.name: f"{f.default}-{suffix}" for f in dataclasses.fields(AwsSettings) if f.name != "region"}
    return cls(**{**names, **overrides})


@pytest.fixture
def aws_settings(aws_endpoint):
    """Provisioned, test-unique streams, bucket and tables on the emulator."""
    from infra.provision import ProvisionSettings, provision

    settings = unique_settings(ProvisionSettings, raw_shards=1, enriched_shards=2, bad_shards=1, predictions_shards=1)
    provision(settings)
    return settings


def settings_env(settings) -> dict[str, str]:
    """The CLICKSTREAM_* variables that make a child process use these settings."""
    return {f"CLICKSTREAM_{f.name.upper()}": str(getattr(settings, f.name))
            for f in dataclasses.fields(settings) if not isinstance(getattr(settings, f.name), tuple)}
