"""Commands work on a machine whose locale is not UTF-8 (a C locale with Python's UTF-8 mode off, as
some CI machines and laptops have): JSON is read as UTF-8 and log lines stay valid JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

C_LOCALE = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"} | {"PYTHONIOENCODING": ""}
PRODUCT_VIEW = "iglu:com.clickshop/product_view/jsonschema/1-0-0"
DATA = {"sku": "SKU-1", "category": "café 🛒", "price": 9.5, "currency": "EUR"}


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=C_LOCALE, capture_output=True, timeout=60,
                          check=False, **kwargs)


def test_validate_reads_a_utf8_file_and_stdin_under_a_c_locale(tmp_path):
    data = tmp_path / "event.json"
    data.write_bytes(json.dumps(DATA, ensure_ascii=False).encode())
    from_file = run(["-m", "enrich.cli", "validate", PRODUCT_VIEW, f"@{data}"])
    assert (from_file.returncode, from_file.stdout) == (0, b"valid\n"), from_file.stderr
    from_stdin = run(["-m", "enrich.cli", "validate", PRODUCT_VIEW, "-"], input=data.read_bytes())
    assert (from_stdin.returncode, from_stdin.stdout) == (0, b"valid\n"), from_stdin.stderr


def test_log_lines_stay_json_when_stderr_is_not_utf8():
    # A session id chosen by a tracker came out as `\xe9`: not a JSON escape, the line dropped by shippers.
    code = ("import logging; from common import logs; logs.setup(); "
            "logging.getLogger('t').warning('session %s', 'caf\\u00e9 \\U0001f6d2')")     # an ASCII command line
    result = run(["-c", code])
    line = json.loads(result.stderr.decode("ascii").strip().splitlines()[-1])
    assert line["msg"] == "session café 🛒"
