"""JSON-lines logging for every component: one object per line, with the event id when known."""
from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("event_id", "session_id", "shard_id", "model_version"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)       # ASCII: a non-UTF-8 stderr would make é an invalid JSON escape


def first_few(items, limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and "…" when there are more: a log line names some,
    never thousands."""
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (", …" if len(items) > limit else "")


def first_line(exc: BaseException) -> str:
    """An error's first line (Java and Arrow errors run on for pages), or its type when it says nothing."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Tally:
    """Counts a recurring failure and says when to log it: at most once per ``every_s``, with how many
    occurrences the line stands for, not one line per occurrence (a flood at the rate of hits or events)."""

    def __init__(self, every_s: float, clock=time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.count = 0                      # occurrences not yet in a log line
        self._next_at = float("-inf")

    def add(self, occurrences: int = 1) -> int:
        """Count ``occurrences``; how many to report now (these included), or 0 while the last line is recent."""
        self.count += occurrences
        now = self.clock()
        if now < self._next_at:
            return 0
        reported, self.count, self._next_at = self.count, 0, now + self.every_s
        return reported


def _not_py4j_chatter(record: logging.LogRecord) -> bool:
    """py4j logs some lines through the root logger (``logging.info``), not its own: when Spark's JVM dies, a
    page of traceback at INFO for every call it refused, above the one line that says why."""
    return record.levelno >= logging.WARNING or f"{os.sep}py4j{os.sep}" not in record.pathname


def setup(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_py4j_chatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "py4j", "onnxmltools", "skl2onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
