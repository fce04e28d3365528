"""Collector settings: defaults, and errors that name the key."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from collector.config import CollectorSettings
from common.config import ConfigError, load
from localstack.emulator import free_port
from tests.conftest import ROOT, wait_for


def test_defaults_match_the_interface_contract():
    settings = load(CollectorSettings, section="collector", env={})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.linger_ms == 200 and settings.max_payload_bytes == 1_000_000
    assert settings.raw_stream == "clickstream-raw" and settings.bad_stream == "clickstream-bad"


@pytest.mark.parametrize("key, value", [("CLICKSTREAM_FSYNC", "sometimes"), ("CLICKSTREAM_SINK", "kafka"),
                                        ("CLICKSTREAM_CUSTOM_PATHS", "/a=/nowhere"),
                                        ("CLICKSTREAM_MAX_PAYLOAD_BYTES", "2000000"),
                                        ("CLICKSTREAM_LINGER_MS", "0"),
                                        ("CLICKSTREAM_BAD_PAYLOAD_KEEP_BYTES", "3000000")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load(CollectorSettings, section="collector", env={key: value})


def test_custom_paths_map_onto_standard_paths():
    settings = load(CollectorSettings, section="collector",
                    env={"CLICKSTREAM_CUSTOM_PATHS": "/t=/com.snowplowanalytics.snowplow/tp2, /p=/i"})
    assert settings.path_map() == {"/t": "/com.snowplowanalytics.snowplow/tp2", "/p": "/i"}


def test_the_port_flag_reaches_the_workers_over_a_section_variable(tmp_path):
    """Workers re-read settings from the environment, where CLICKSTREAM_COLLECTOR_PORT beats CLICKSTREAM_PORT."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")} | {
        "CLICKSTREAM_COLLECTOR_PORT": "0", "CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "collector", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        answer = wait_for(lambda: _health(port) or server.poll() is not None, timeout=30, what="the collector")
        assert answer == 200, server.stderr.read() if server.poll() is not None else answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status
    except OSError:
        return None
