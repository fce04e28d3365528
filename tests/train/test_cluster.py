"""make train with its executors outside the driver's process, as on a cluster: a ``local-cluster``
master starts a worker and an executor JVM of their own, whose Python workers run in the worker's
work folder with the trainer's dependencies but not this checkout (as a cluster's image would)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[2]

TRAIN = """
import datetime as dt, json, pathlib, sys
sys.path.insert(0, sys.argv[1])     # the driver's checkout; not on PYTHONPATH, which executors inherit
from batch.train import read_events, train_from_events
from batch.train_config import spark_session
from batch.train_lake import Window
from tests.train import synth
from tests.train.conftest import fast_settings
settings = fast_settings(spark_master="local-cluster[1,1,1024]", max_iter=3, max_depth=2)
spark = spark_session(settings, app_name="clickstream-cluster-test")
events = synth.make_events(40, dt.datetime(2026, 11, 20, tzinfo=dt.UTC), hours=40, seed=3)
root = synth.write_lake_dir(pathlib.Path(sys.argv[2]), events)
result = train_from_events(spark, read_events(spark, root), settings, window=Window.last_days(2, "2026-11-21"))
print(json.dumps({"master": spark.sparkContext.master, "parity": result.parity.passed,
                  "max_abs_diff": result.meta["parity"]["max_abs_diff"]}))
spark.stop()
"""


def cluster_python(folder: Path) -> Path:
    """A Python with the venv's packages but without its editable install of this checkout."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site = next((folder / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


def spark_home(folder: Path) -> Path:
    """pyspark's folder, by links: the worker writes its work folder into SPARK_HOME (into the venv)."""
    import pyspark

    folder.mkdir()
    for entry in Path(pyspark.__file__).parent.iterdir():
        (folder / entry.name).symlink_to(entry)
    return folder


def test_the_fold_and_the_export_run_on_executors_that_do_not_have_the_code(tmp_path):
    # Executors failed on "No module named 'batch'" (the fold), then the export read the trees from
    # a folder the executors had written to their own disks.
    python = cluster_python(tmp_path / "cluster-python")
    probe = subprocess.run([python, "-c", "import pyspark, batch"], cwd=tmp_path, capture_output=True, text=True,
                           check=False, timeout=60)
    assert "No module named 'batch'" in probe.stderr                # the executors' Python lacks the code
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME")}
    env |= {"PYSPARK_PYTHON": str(python), "SPARK_HOME": str(spark_home(tmp_path / "spark-home"))}
    result = subprocess.run([sys.executable, "-c", TRAIN, str(ROOT), str(tmp_path / "lake")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, check=False, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["master"].startswith("local-cluster") and summary["parity"] is True
    assert summary["max_abs_diff"] <= 1e-5
    assert list((tmp_path / "spark-home" / "work").iterdir())          # the executor ran in its own folder


PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from batch.train_config import spark_session
from tests.train.conftest import fast_settings
spark = spark_session(fast_settings(spark_master="local[2]"))
print("master", spark.sparkContext.master)
spark.stop()
"""


def test_under_spark_submit_its_master_is_the_one_used(tmp_path):
    # spark_session set the configured master (local[*] by default) over spark-submit's --master:
    # submitted to a cluster, the job ran in the driver alone.
    import pyspark

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME")} | {"PYSPARK_PYTHON": sys.executable}
    result = subprocess.run([str(submit), "--master", "local[1]", "--driver-memory", "1g", str(probe), str(ROOT)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "master local[1]" in result.stdout.splitlines()
