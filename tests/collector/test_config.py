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
    assert settings.trusted_proxy_hops == 1                  # the ALB of deploy/cloudformation.yaml


@pytest.mark.parametrize("key, value", [("CLICKSTREAM_FSYNC", "sometimes"), ("CLICKSTREAM_SINK", "kafka"),
                                        ("CLICKSTREAM_CUSTOM_PATHS", "/a=/nowhere"),
                                        ("CLICKSTREAM_MAX_PAYLOAD_BYTES", "2000000"),
                                        ("CLICKSTREAM_LINGER_MS", "0"),
                                        ("CLICKSTREAM_BAD_PAYLOAD_KEEP_BYTES", "3000000"),
                                        ("CLICKSTREAM_REDIRECT_DOMAINS", "example.com,."),
                                        ("CLICKSTREAM_COOKIE_DOMAINS", ".."),
                                        ("CLICKSTREAM_TRUSTED_PROXY_HOPS", "-1")])
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
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        answer = wait_for(lambda: _health(port) or server.poll() is not None, timeout=30, what="the collector")
        assert answer == 200, server.stderr.read() if server.poll() is not None else answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def _health(port: int, host: str = "127.0.0.1") -> int | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
            return response.status
    except OSError:
        return None


def _collector(args: list[str], tmp_path, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")} | {
        "CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": str(tmp_path)} | extra
    return subprocess.run([sys.executable, "-m", "collector", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", timeout=60, check=False)


@pytest.mark.parametrize("args, extra, line", [
    (["--host", "no-such-host.invalid"], {}, "cannot listen on no-such-host.invalid:{port} (host, port): "),
    ([], {"CLICKSTREAM_COLLECTOR_HOST": ""}, "cannot listen on :{port} (host, port): "),
    (["--port", "70000"], {}, "config error: --port: expected a port number from 0 to 65535, got 70000"),
])
def test_an_address_it_cannot_listen_on_is_one_line_naming_the_keys(tmp_path, args, extra, line):
    port = free_port()
    result = _collector(["--port", str(port), *args], tmp_path, **extra)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(line.format(port=port)), result.stderr


def test_a_host_name_such_as_localhost_is_resolved(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")} | {
        "CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "collector", "--host", "localhost", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        answer = wait_for(lambda: _health(port, "localhost") or server.poll() is not None, timeout=30,
                          what="the collector")
        assert answer == 200, server.stderr.read() if server.poll() is not None else answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_name_with_ipv6_and_ipv4_addresses_listens_on_the_ipv4_one(monkeypatch):
    """A dual-stack /etc/hosts lists ::1 first for localhost; the README's clients use 127.0.0.1."""
    import socket

    from collector.__main__ import bindable_address

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert bindable_address("localhost", free_port()) == "127.0.0.1"


def test_granians_own_bind_failure_is_an_os_error():
    """A port taken between the check and granian's bind: its RuntimeError becomes the OSError it is."""
    from collector.__main__ import _as_os_error

    error = _as_os_error(RuntimeError("Address already in use (os error 98)"))
    assert isinstance(error, OSError) and error.errno == 98 and error.strerror == "Address already in use"
    other = RuntimeError("something else")
    assert _as_os_error(other) is other


def test_a_spool_dir_that_cannot_be_used_is_one_error_line_naming_it_not_a_stack_trace(tmp_path):
    """A spool_dir that is a file logged '[Errno 17] File exists' inside a stack trace, naming no setting."""
    spool_dir = tmp_path / "spool"
    spool_dir.write_text("a file")
    result = _collector(["--port", str(free_port())], tmp_path, CLICKSTREAM_SPOOL_DIR=str(spool_dir))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert f"collector failed to start: spool_dir (CLICKSTREAM_SPOOL_DIR) {spool_dir} cannot be created: File exists" in result.stderr


def test_workers_keep_their_metrics_under_a_given_folder_and_one_they_cannot_use_is_one_line(tmp_path):
    """A read-only root has no /tmp: PROMETHEUS_MULTIPROC_DIR pointing at a volume was overwritten by a
    folder under /tmp, and failing to make that was mkdtemp's traceback."""
    given = tmp_path / "metrics"
    given.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")} | {
        "CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(given)}
    server = subprocess.Popen([sys.executable, "-m", "collector", "--port", str(port), "--workers", "2"], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        assert wait_for(lambda: _health(port) or server.poll() is not None, timeout=30, what="the collector") == 200
        [folder] = given.glob("collector-metrics-*")
        wait_for(lambda: list(folder.glob("*.db")), timeout=10, what="the workers' metric files")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not list(given.iterdir())                                   # its own subfolder, removed at the end
    (tmp_path / "a-file").write_text("")
    result = _collector(["--port", str(free_port()), "--workers", "2"], tmp_path / "spool",
                        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "a-file"))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "no writable folder for the workers' metrics" in result.stderr and "set PROMETHEUS_MULTIPROC_DIR" in result.stderr
