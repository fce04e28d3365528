"""Fixtures for the scorer tests: published models on the emulator, scorer processes, Spark."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from common import aws
from tests.conftest import ROOT, settings_env
from tests.scorer.helpers import free_port, logistic_onnx, publish, wait_for

MODEL = "buy-test"


@pytest.fixture
def s3(aws_endpoint):
    return aws.client("s3")


@pytest.fixture
def published(aws_settings, s3):
    """aws_settings with model MODEL version v1 (the hand-built logistic model) as CURRENT."""
    publish(s3, aws_settings.bucket, MODEL, "v1", logistic_onnx())
    return aws_settings


class ScorerProcess:
    """``python -m scorer`` as a child process on a free port, with its log in a file; ``endpoint``
    replaces the emulator's URL (a fault proxy in front of it)."""

    def __init__(self, settings, log_path: Path, endpoint: str | None = None, **overrides):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings_env(settings), "CLICKSTREAM_PORT": str(self.port),
               "CLICKSTREAM_MODEL_NAME": MODEL, "CLICKSTREAM_MODEL_POLL_S": "0.5", "CLICKSTREAM_LEASE_MS": "3000",
               "PYTHONUNBUFFERED": "1"}
        if endpoint:
            env["AWS_ENDPOINT_URL"] = endpoint
        env.update({f"CLICKSTREAM_{key.upper()}": str(value) for key, value in overrides.items()})
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", "scorer"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> ScorerProcess:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"scorer exited with {self.proc.returncode}:\n{self.log_path.read_text(encoding='utf-8')[-3000:]}")
            try:
                return requests.get(self.url + "/ping", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(up, timeout, what="scorer /ping")
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def start_scorer(tmp_path):
    started: list[ScorerProcess] = []

    def start(settings, endpoint: str | None = None, **overrides) -> ScorerProcess:
        process = ScorerProcess(settings, tmp_path / f"scorer-{len(started)}.log", endpoint, **overrides)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def trained(spark, tmp_path_factory):
    """A model trained by ``make train``'s own code (batch.train) on generated sessions.

    Returns (TrainResult, events): the events went through the lake loader's Parquet conversion,
    the fold in Spark, a GBT fit, the ONNX export and the parity gate, like a nightly run.
    """
    import orjson
    import pyarrow.parquet as pq

    from batch.lake import convert
    from batch.train import read_events, train_from_events
    from batch.train_config import TrainSettings
    from tests.scorer.helpers import T0, session_events

    events = [e for i in range(160) for e in session_events(f"t{i}", seed=3000 + i, n=8 + i % 8,
                                                            start_ms=T0 + i * 60_000)]
    converted = convert([orjson.dumps(e) for e in events])
    assert not converted.bad
    lake = tmp_path_factory.mktemp("lake")
    pq.write_table(converted.table, lake / "part.parquet")
    settings = TrainSettings(algorithm="gbt", max_iter=8, max_depth=3, progress=False, auc_floor=0.0)
    result = train_from_events(spark, read_events(spark, lake), settings)
    assert result.parity.passed
    return result, events
