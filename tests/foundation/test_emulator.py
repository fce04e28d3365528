import os
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
