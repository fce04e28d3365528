"""make train's progress bar: a step of minutes shows Spark's tasks moving, not one still line."""
from __future__ import annotations

import re
import time

import pytest

from batch.train_model import Steps

pytestmark = pytest.mark.spark


def slow_partition(rows):
    time.sleep(0.8)
    return list(rows)


def test_a_long_step_shows_spark_tasks_moving(spark, capsys):
    steps = Steps(["slow"], enabled=True)
    with steps("slow"):
        assert spark.sparkContext.parallelize(range(8), 8).mapPartitions(slow_partition).count() == 8
    steps.close()
    shown = [(int(done), int(total)) for done, total in re.findall(r"Spark tasks (\d+)/(\d+)", capsys.readouterr().err)]
    # 8/8 too: the last tasks can have finished while the stage is still listed as active (CI saw it).
    assert shown and all(total == 8 and 0 <= done <= 8 for done, total in shown)
    assert "slow" in steps.timings


def test_a_quiet_run_polls_nothing(spark, capsys):
    steps = Steps(["slow"], enabled=False)
    with steps("slow"):
        spark.sparkContext.parallelize(range(4), 4).mapPartitions(slow_partition).count()
    steps.close()
    assert "Spark tasks" not in capsys.readouterr().err
