"""Settings of ``make train`` (section ``[train]``, env ``CLICKSTREAM_<FIELD>``)."""
from __future__ import annotations

import datetime as dt
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from common.config import AwsSettings, ConfigError, require_positive
from common.logs import first_line
from common.registry import DEFAULT_MODEL

ALGORITHMS = ("gbt", "rf", "lr")
OBJECTIVES = ("f1", "precision")
CLASS_WEIGHTS = ("none", "balanced")
TREATED_SESSIONS = ("leave_out", "keep")
LAKE_URL_SCHEMES = ("s3a://", "s3://", "hdfs://", "gs://", "abfss://", "file://")


@dataclass(frozen=True)
class TrainSettings(AwsSettings):
    model_name: str = DEFAULT_MODEL
    # the window: the last `window_days` days up to `window_end` (YYYY-MM-DD, inclusive; empty = today UTC)
    window_days: int = 7
    window_end: str = ""
    cache_dir: Path = Path(".cache/lake")
    lake_path: str = ""                 # read this folder (or s3a:// URL on a cluster) instead of syncing
    skip_corrupt_files: bool = False
    session_gap_minutes: int = 30
    # a session with more events is left out (a bot, not a shopper): the fold holds one session's
    # events in memory at once; 0 = no limit
    max_session_events: int = 100_000
    # a longer session gives this many examples, spread over it, so that one long visit (a kiosk, a
    # bot under max_session_events) does not outweigh the others; 0 = every event
    max_examples_per_session: int = 500
    eval_fraction: float = 0.25         # the latest sessions (by start time) are the evaluation set
    # "leave_out": the sessions offered a discount (the uplift records' lists) are not trained on, and
    # the held-out ones weigh 100 / holdout_percent (batch/train_treated.py); "keep": every session.
    # Not the default: with the engine's default control group (none) leave_out would drop every
    # qualifying session, and with a small one its few sessions give noisy probabilities (docs/training.md).
    treated_sessions: str = "keep"
    # the model
    algorithm: str = "gbt"
    max_iter: int = 60
    max_depth: int = 5
    step_size: float = 0.1
    num_trees: int = 100
    subsampling_rate: float = 1.0
    min_instances_per_node: int = 1
    max_bins: int = 32
    reg_param: float = 0.0
    elastic_net: float = 0.0
    seed: int = 42
    # "balanced" weighs each buying example by non-buyers/buyers in the training rows: buyers are rare,
    # and weighting ranks them better (higher AUC); probabilities then run high, the threshold follows.
    class_weight: str = "none"
    # the decision threshold
    threshold_objective: str = "f1"
    target_precision: float = 0.5
    # the gates
    parity_tolerance: float = 1e-5
    auc_floor: float = 0.65
    champion_margin: float = 0.005      # a challenger may be this much worse than CURRENT and still win
    # after publishing, delete all but the newest keep_versions bundles (CURRENT and its rollback
    # targets always stay: docs/operations.md); 0 keeps every version
    keep_versions: int = 0
    # Spark
    spark_master: str = "local[*]"
    spark_driver_memory: str = "2g"
    spark_shuffle_partitions: int = 8
    progress: bool = True

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"CLICKSTREAM_ALGORITHM: expected one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ConfigError(f"CLICKSTREAM_CLASS_WEIGHT: expected one of {', '.join(CLASS_WEIGHTS)}, "
                              f"got {self.class_weight!r}")
        if self.treated_sessions not in TREATED_SESSIONS:
            raise ConfigError(f"CLICKSTREAM_TREATED_SESSIONS: expected one of {', '.join(TREATED_SESSIONS)}, "
                              f"got {self.treated_sessions!r}")
        if self.threshold_objective not in OBJECTIVES:
            raise ConfigError(f"CLICKSTREAM_THRESHOLD_OBJECTIVE: expected one of {', '.join(OBJECTIVES)}, "
                              f"got {self.threshold_objective!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"CLICKSTREAM_EVAL_FRACTION: expected a number between 0 and 1, got {self.eval_fraction}")
        require_positive(self, "window_days", "session_gap_minutes", "max_iter", "max_depth", "num_trees",
                         "step_size", "max_bins", "parity_tolerance", "min_instances_per_node",
                         "spark_shuffle_partitions")
        # Spark checks these only when it fits, minutes into a run; say so before it starts.
        for name, allowed, ok in (("subsampling_rate", "above 0 and at most 1", lambda v: 0 < v <= 1),
                                  ("step_size", "above 0 and at most 1", lambda v: 0 < v <= 1),
                                  ("max_depth", "from 1 to 30", lambda v: 1 <= v <= 30),
                                  ("max_bins", "of at least 2", lambda v: v >= 2),
                                  ("target_precision", "above 0 and at most 1", lambda v: 0 < v <= 1),
                                  ("elastic_net", "from 0 to 1", lambda v: 0 <= v <= 1),
                                  ("auc_floor", "from 0 to 1", lambda v: 0 <= v <= 1),
                                  ("reg_param", "of at least 0", lambda v: v >= 0),
                                  ("champion_margin", "of at least 0", lambda v: v >= 0),
                                  ("keep_versions", "of at least 0", lambda v: v >= 0),
                                  ("max_session_events", "of at least 0", lambda v: v >= 0),
                                  ("max_examples_per_session", "of at least 0", lambda v: v >= 0)):
            if not ok(getattr(self, name)):
                raise ConfigError(f"CLICKSTREAM_{name.upper()}: expected a number {allowed}, got {getattr(self, name)}")
        if not re.fullmatch(r"\d+[kmgt]?", self.spark_driver_memory.lower()):
            raise ConfigError(f"CLICKSTREAM_SPARK_DRIVER_MEMORY: expected a size such as 2g or 512m, "
                              f"got {self.spark_driver_memory!r}")
        if self.window_end:
            try:
                dt.date.fromisoformat(self.window_end)
            except ValueError:
                raise ConfigError(f"CLICKSTREAM_WINDOW_END: expected a date YYYY-MM-DD, got {self.window_end!r}") from None
        if not 0 <= self.seed < 2**32:          # numpy's generators take no negative seed, minutes into a run
            raise ConfigError(f"CLICKSTREAM_SEED: expected an integer from 0 to 2**32 - 1, got {self.seed}")
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"CLICKSTREAM_MODEL_NAME: expected a name without '/', got {self.model_name!r}")
        self._check_lake_path()

    def _check_lake_path(self) -> None:
        """A mistyped URL (``s3a:/lake``) read as a local folder said the window was empty."""
        path = self.lake_path
        if not path or path.startswith(LAKE_URL_SCHEMES):
            return
        if re.match(r"[A-Za-z][\w+.-]*:/", path):
            raise ConfigError(f"CLICKSTREAM_LAKE_PATH: {path!r} is neither a folder nor a URL of "
                              f"{', '.join(LAKE_URL_SCHEMES)}")
        if not Path(path).is_dir():
            raise ConfigError(f"CLICKSTREAM_LAKE_PATH: no folder {path!r}")


SPARK_LOG_CONFIG = Path(__file__).with_name("spark-log4j2.properties")


def spark_session(settings: TrainSettings, app_name: str = "clickstream-train"):
    """A Spark session for training (the existing one when there is one, e.g. under spark-submit)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # pandas 3 works for what we use (toPandas, the feature-table mode); the warning repeats on every call.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    from pyspark.sql import SparkSession

    scratch = _writable_temp_dir()
    # The JVM takes neither TMPDIR nor a home from a uid without a passwd entry (an arbitrary runAsUser):
    # it used /tmp whatever TMPDIR said, and stopped on "basedir must be absolute: ?/.ivy2".
    java_options = (f"-Dlog4j2.configurationFile={SPARK_LOG_CONFIG.as_uri()} -Djava.io.tmpdir={scratch} "
                    f"-Duser.home={os.environ.get('HOME') or scratch}")
    builder = SparkSession.builder.appName(app_name)
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Not under spark-submit: there, .master() overrode its --master and the job ran local[*].
        builder = builder.master(settings.spark_master)
    builder = (builder
               .config("spark.driver.memory", settings.spark_driver_memory)
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", str(settings.spark_shuffle_partitions))
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.showConsoleProgress", "false")      # our own progress bars say where we are
               # Read when this process starts the JVM (not under spark-submit, whose JVM already runs).
               .config("spark.driver.extraJavaOptions", java_options))
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - py4j and PySpark raise plain errors for a bad master or JVM option
        raise ConfigError(f"Spark did not start: {first_line(exc)} (check CLICKSTREAM_SPARK_MASTER "
                          f"{settings.spark_master!r}, CLICKSTREAM_SPARK_DRIVER_MEMORY {settings.spark_driver_memory!r} "
                          "and that `java` runs; its log above says more)") from None
    spark.sparkContext.setLogLevel("ERROR")
    if not in_process(spark.sparkContext.master):
        ship_code(spark)
    return spark


def in_process(master: str) -> bool:
    """Whether executors run inside this process (local, local[4]; not local-cluster[...] or a cluster)."""
    return re.fullmatch(r"local(\[[^\]]*\])?", master) is not None


# What executors import: the fold (batch.train_features -> batch.lake, common.features, ...).
SHIPPED_PACKAGES = ("common", "batch")


def ship_code(spark) -> Path:
    """Outside local mode each executor starts Python in its own work folder, where ``batch`` and
    ``common`` are not importable: the fold failed with "No module named 'batch'". Ship this
    process's copy of them (a zip, first on the executors' sys.path, so they run the driver's code)."""
    import atexit
    import shutil
    import tempfile
    import zipfile

    root = Path(__file__).resolve().parent.parent
    folder = tempfile.mkdtemp(prefix="clickstream-pyfiles-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = Path(folder) / "clickstream.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in SHIPPED_PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                zf.write(path, path.relative_to(root).as_posix())
    spark.sparkContext.addPyFile(str(archive))
    return archive


def _writable_temp_dir() -> str:
    """The temporary folder Python would use (TMPDIR, else /tmp, ...), checked writable: without one
    the JVM failed to start and the error blamed the Spark master and memory settings."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix="clickstream-probe-")
    except OSError as exc:
        raise ConfigError(f"no writable temporary folder for Spark ({exc.strerror or exc}): set TMPDIR to one, or mount "
                          "a volume at /tmp (a read-only root filesystem has none)") from None
    os.rmdir(probe)
    return os.path.dirname(probe)
