import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from localstack import emulator


@pytest.mark.parametrize("kind", ["moto", "kinesis-mock"])
def test_emulator_answers_then_stops_without_leaving_a_process(kind):
    server = emulator.start(kind)
    try:
        with urllib.request.urlopen(server.endpoint + ("/moto-api/" if kind == "moto" else "/"), timeout=5):
            pass
    except urllib.error.HTTPError as exc:
        assert exc.code < 500
    server.stop()
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)          # the whole process group is gone


def test_two_emulators_run_side_by_side_on_free_ports():
    first, second = emulator.start("moto"), emulator.start("moto")
    try:
        assert first.port != second.port
    finally:
        first.stop()
        second.stop()


def test_a_port_in_use_is_reported_not_hung():
    first = emulator.start("moto")
    try:
        with pytest.raises(RuntimeError, match="in use"):
            emulator.start("moto", port=first.port, timeout=10)
    finally:
        first.stop()


def test_the_foreground_emulator_stops_with_its_group_even_started_with_sigint_ignored():
    """`make down` sends SIGINT to the group of `python -m localstack.emulator`. Started in the
    background by a shell, it inherited SIGINT ignored and never stopped; the SIGKILL that followed
    reached only its group, and the moto server, in a session of its own, lived on holding the port
    (the next `make up` used that stale emulator)."""
    port = emulator.free_port()
    # As a non-interactive shell starts a background job: SIGINT ignored, which exec keeps.
    command = f"trap '' INT; exec {sys.executable} -m localstack.emulator --port {port}"
    wrapper = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, start_new_session=True,
                               cwd=emulator.ROOT)
    try:
        assert wrapper.stdout.readline().decode().startswith("moto listening")
        started = time.monotonic()
        emulator.stop_group(wrapper.pid, timeout=15, first=signal.SIGINT, process=wrapper)
        assert time.monotonic() - started < 10                       # stopped on SIGINT, not killed
        assert emulator.probe(f"http://127.0.0.1:{port}/moto-api/") is None
    finally:
        if emulator.probe(f"http://127.0.0.1:{port}/moto-api/") is not None:
            subprocess.run(["pkill", "-f", f"moto.server -H 127.0.0.1 -p {port}"], check=False)
