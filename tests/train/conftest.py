"""Shared fixtures of the training tests: one synthetic lake per test session (Spark: tests/conftest.py)."""
from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from batch.train_config import TrainSettings
from tests.train import synth

START = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)     # aware: .timestamp() of a naive one reads the machine's zone


def fast_settings(**overrides) -> TrainSettings:
    """Small, quick models: the tests check behaviour, not accuracy."""
    base = TrainSettings(spark_master="local[2]", spark_shuffle_partitions=4, spark_driver_memory="1g",
                         max_iter=8, max_depth=3, num_trees=8, progress=False, auc_floor=0.6,
                         window_end="2026-11-21", window_days=2)
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def events():
    """300 synthetic sessions over two days (2026-11-20 and 21)."""
    return synth.make_events(300, START, hours=46, seed=11)


@pytest.fixture(scope="session")
def lake_dir(tmp_path_factory, events):
    return synth.write_lake_dir(tmp_path_factory.mktemp("lake"), events)
