"""The components' log lines (common.logs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import py4j.java_gateway

ROOT = Path(__file__).resolve().parents[2]

# What py4j does when the JVM has gone: logging.info on the root logger, with the traceback, per call.
PY4J_CHATTER = f"""
import logging
from common import logs
logs.setup()
for path, level, message in (({py4j.java_gateway.__file__!r}, logging.INFO, "Exception while sending command."),
                             ({py4j.java_gateway.__file__!r}, logging.WARNING, "py4j warns"),
                             ("/srv/app/batch/train.py", logging.INFO, "step features done")):
    logging.getLogger().handle(logging.LogRecord("root", level, path, 1, message, None, None))
"""


def test_py4j_info_lines_through_the_root_logger_are_left_out_and_its_warnings_and_ours_kept():
    done = subprocess.run([sys.executable, "-c", PY4J_CHATTER], cwd=ROOT, capture_output=True, encoding="utf-8",
                          check=True, timeout=60)
    said = [json.loads(line)["msg"] for line in done.stderr.splitlines()]
    assert said == ["py4j warns", "step features done"]
