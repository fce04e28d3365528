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


def test_status_says_why_a_component_is_unhealthy_not_just_that_it_does_not_answer(process):
    # A scorer answering 503 read "NOT answering", and the collector was "healthy" with its stream away.
    import http.server
    import threading

    class SinkHealth(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"stream unreachable")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), SinkHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        process.pid_file.parent.mkdir(parents=True)
        process.pid_file.write_text(f"{other.pid} {stack.started_at(other.pid)}")
        url = f"http://127.0.0.1:{server.server_port}"
        watched = stack.Process("sleeper", "sleeper", f"{url}/health", status_url=f"{url}/sink-health")
        assert stack.describe(watched) == f"running (pid {other.pid}), UNHEALTHY: 503 stream unreachable"
        server.shutdown()
        server.server_close()
        assert stack.describe(watched).endswith("NOT answering")
    finally:
        other.kill()
        other.wait()


def test_an_empty_local_key_file_is_replaced_not_passed_on_as_no_key(tmp_path, monkeypatch):
    """A key file cut before its write made enrich stop with 'CLICKSTREAM_PSEUDONYMISATION_KEY: required'
    while the stack said the key came from that file."""
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack, "ROOT", tmp_path)
    monkeypatch.setenv("CLICKSTREAM_PSEUDONYMISATION_KEY", "")      # undone after the test, as the key is set
    (tmp_path / "pseudonymisation.key").write_text("")
    stack.local_pseudonymisation_key()
    key = (tmp_path / "pseudonymisation.key").read_text(encoding="utf-8")
    assert len(key) == 64 and stack.os.environ["CLICKSTREAM_PSEUDONYMISATION_KEY"] == key
    assert (tmp_path / "pseudonymisation.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudonymisation.key"]
    stack.local_pseudonymisation_key()
    assert (tmp_path / "pseudonymisation.key").read_text(encoding="utf-8") == key        # kept from then on


def test_a_log_grown_past_the_limit_moves_aside_when_its_process_starts(process, monkeypatch, tmp_path):
    monkeypatch.setattr(stack, "LOG_ROTATE_BYTES", 100)
    monkeypatch.setattr(stack, "ROOT", tmp_path)
    server = stack.Process("web", "http.server", args=("--bind", "127.0.0.1", "0"))
    server.log_file.parent.mkdir(parents=True)
    server.log_file.write_text("x" * 101)                          # the runs before
    try:
        stack.start(server)
        assert server.log_file.with_name("web.log.1").read_text(encoding="utf-8") == "x" * 101
        assert not server.log_file.read_text(encoding="utf-8").startswith("x")
    finally:
        stack.stop(server)
    server.log_file.write_text("small")
    try:
        stack.start(server)                                          # below the limit: appended to
        assert server.log_file.read_text(encoding="utf-8").startswith("small")
    finally:
        stack.stop(server)
