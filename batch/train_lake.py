"""The training window of the lake: which dates, a local copy for Spark, and a corrupt-file check.

Spark cannot read ``s3a://`` on this machine, so ``make train`` copies the window's partitions to a
local cache with ``batch.lake.sync_partitions`` and reads that; on a cluster, ``lake_path`` points
Spark at ``s3a://bucket/enriched`` directly and no copy is made.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from batch.lake import dates_between

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """Training cannot go on; the message says why and what to do, for an operator."""


@dataclass(frozen=True)
class Window:
    start: dt.date
    end: dt.date            # inclusive

    @classmethod
    def last_days(cls, days: int, end: str | dt.date | None = None) -> Window:
        if days < 1:
            raise TrainError(f"window_days must be at least 1, got {days}")
        last = dt.date.fromisoformat(end) if isinstance(end, str) and end else end or dt.datetime.now(dt.UTC).date()
        return cls(last - dt.timedelta(days=days - 1), last)

    def days(self) -> list[dt.date]:
        return dates_between(self.start, self.end)

    def as_dict(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"


def midnight_ms(day: dt.date) -> int:
    """Epoch ms of a date's first midnight (UTC)."""
    return int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() * 1000)


def window_files(root: Path, window: Window) -> list[Path]:
    """Parquet files of the window's date partitions under a local ``enriched`` root."""
    return [file for day in window.days() for file in sorted((root / f"date={day}").glob("hour=*/*.parquet"))]


def spark_paths(root: Path, files: list[Path]) -> list[Path]:
    """What to give Spark to read ``files`` (under ``root``'s date folders): a date folder when it
    holds those files and nothing else Spark could read, else the files themselves. Spark lists a
    folder in one call but looks up each file path it is given: 36 s for the 17,857 files of a
    30-day window."""
    by_day: dict[Path, set[Path]] = {}
    for file in files:
        by_day.setdefault(root / file.relative_to(root).parts[0], set()).add(file)
    paths: list[Path] = []
    for folder, chosen in by_day.items():
        visible = {path for path in folder.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts)}
        # Spark skips names starting with "_" in a folder, but reads such a file when named.
        only_chosen = visible == chosen and not any(part.startswith("_") for file in chosen
                                                    for part in file.relative_to(folder).parts)
        paths.extend([folder] if only_chosen else sorted(chosen))
    return paths


CORRUPT_ADVICE = ("Re-run the lake loader for those hours, move the files away, or set "
                  "CLICKSTREAM_SKIP_CORRUPT_FILES=true to train without them.")


def check_files(files: list[Path], *, skip_corrupt: bool = False) -> list[Path]:
    """Read every file's footer (cheap) so a corrupt object fails here with its name, not deep
    inside a Spark stage. With ``skip_corrupt`` they are left out, loudly, instead."""
    good, bad = [], []
    for path in files:
        try:
            _ = pq.ParquetFile(path).metadata     # raises on a truncated or non-Parquet file
            good.append(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
            bad.append((path, exc))
    for path, exc in bad:
        log.warning("corrupt Parquet file %s: %s", path, exc)
    if bad and not skip_corrupt:
        names = "; ".join(f"{path}: {exc}" for path, exc in bad[:5])
        raise TrainError(f"{len(bad)} corrupt Parquet file(s) in the training window: {names}. {CORRUPT_ADVICE}")
    return good


def unreadable_file_error(exc: Exception) -> TrainError | None:
    """A clear error for a Spark job that failed on a file whose footer read fine but whose data did
    not (``check_files`` reads footers only); None for any other failure."""
    found = re.search(r"Encountered error while reading file (\S+?)\.?\s", str(exc))
    if found is None:
        return None
    return TrainError(f"corrupt Parquet data in {found.group(1)}. {CORRUPT_ADVICE}")


def local_window(bucket: str, window: Window, cache_dir: Path, *, region: str = "", progress: bool = True) -> Path:
    """Copy the window's partitions from S3 to ``cache_dir``; return the local ``enriched`` root."""
    from botocore.exceptions import BotoCoreError

    from batch.lake import sync_partitions

    try:
        return Path(sync_partitions(bucket, window.start, window.end, cache_dir, region=region, progress=progress))
    except BotoCoreError:
        raise                       # timeouts are OSErrors too: the AWS failure's own one line says it
    except OSError as exc:
        raise TrainError(f"could not copy the lake to cache_dir {cache_dir}: {exc}") from exc
