"""Scorer settings: defaults from the design, errors that name the key."""
from __future__ import annotations

import pytest

from common.config import ConfigError, load
from common.registry import DEFAULT_MODEL
from scorer.config import ScorerSettings


def test_defaults():
    settings = load(ScorerSettings, section="scorer", env={})
    assert (settings.host, settings.port, settings.flush_ms, settings.session_timeout_s) == ("127.0.0.1", 8081, 100, 1800)
    assert settings.model_name == DEFAULT_MODEL and settings.emit == "every" and settings.reload_token == ""


@pytest.mark.parametrize("key, value, words", [
    ("CLICKSTREAM_EMIT", "sometimes", ["CLICKSTREAM_EMIT", "every_n"]),
    ("CLICKSTREAM_FLUSH_MS", "0", ["CLICKSTREAM_FLUSH_MS", "positive"]),
    ("CLICKSTREAM_MAX_SESSIONS", "lots", ["CLICKSTREAM_MAX_SESSIONS", "integer"]),
])
def test_bad_values_name_the_key(key, value, words):
    with pytest.raises(ConfigError) as error:
        load(ScorerSettings, section="scorer", env={key: value})
    for word in words:
        assert word in str(error.value)


def test_a_scorer_with_neither_worker_nor_api_is_refused_rather_than_idle_forever():
    with pytest.raises(ConfigError) as error:
        load(ScorerSettings, section="scorer", env={}, run_worker=False, run_api=False)
    words = ["CLICKSTREAM_RUN_WORKER", "CLICKSTREAM_RUN_API"]
    for word in words:
        assert word in str(error.value)


def test_the_prediction_writer_has_a_connection_for_each_of_its_threads():
    """64 threads on botocore's pool of 32 connections opened and discarded one per write."""
    from scorer.server import build_worker

    worker = build_worker(load(ScorerSettings, env={"CLICKSTREAM_WRITE_THREADS": "64"}), models=None)
    assert worker.writer.dynamodb.meta.config.max_pool_connections == 64
    assert build_worker(load(ScorerSettings, env={}), models=None).writer.dynamodb.meta.config.max_pool_connections == 32
