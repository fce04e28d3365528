"""The local stack's pid files: `make down` stops what `make up` started, and nothing else."""
from __future__ import annotations

import subprocess
import sys

import pytest

from infra import stack


@pytest.fixture
def process(tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "RUN", tmp_path)
    return stack.Process("sleeper", "sleeper")


def test_a_pid_reused_by_another_process_is_not_taken_for_ours(process):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        process.pid_file.parent.mkdir(parents=True)
        process.pid_file.write_text(f"{other.pid} {stack.started_at(other.pid)}")
        assert stack.running_pid(process) == other.pid            # the process we started
        process.pid_file.write_text(f"{other.pid} 1")             # same pid, another start: not ours
        assert stack.running_pid(process) is None
        assert stack.stop(process) is None and other.poll() is None
    finally:
        other.kill()
        other.wait()
