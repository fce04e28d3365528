"""Collector test helpers: the collector as a real subprocess, a fault-injecting TCP proxy in front of
the emulator, and a reader that collects what reached a stream."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from common import aws
from common.streams import KinesisStream
from localstack.emulator import free_port
from tests.conftest import ROOT, settings_env, unique_settings


class Collector:
    """``python -m collector`` in its own process group on a free port."""

    def __init__(self, env: dict, log: Path):
        self.port = int(env["CLICKSTREAM_PORT"])
        self.env = env
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Collector:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "collector"], env=self.env, cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"collector exited {self.process.returncode}:\n{self.log.read_text(encoding='utf-8')[-3000:]}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"collector did not start:\n{self.log.read_text(encoding='utf-8')[-3000:]}")

    def terminate(self, timeout: float = 30) -> int:
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        # Not localstack.emulator.stop_group: it polls the group, and our un-reaped child would keep it alive.
        if self.process and self.process.poll() is None:
            try:
                self.terminate(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def get(url: str, headers: dict | None = None, data: bytes | None = None, method: str | None = None):
    """(status, headers, body) without raising on 4xx/5xx and without following redirects."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def raw_http(port: int, request: bytes) -> bytes:
    """Send bytes exactly as given (for requests urllib refuses to build) and return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def read_stream(stream: str, *, until=None, count: int | None = None, timeout: float = 30) -> list[dict]:
    """Every record of ``stream`` as parsed JSON (with ``_seq``/``_key``), polling until ``until(records)``
    or ``count`` records are there, or ``timeout`` passes."""
    backend = KinesisStream(aws.client("kinesis"), stream)
    readers = {shard.shard_id: backend.reader(shard.shard_id, None) for shard in backend.list_shards()}
    records: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        for reader in readers.values():
            for item in reader.read(10000).records:
                parsed = orjson.loads(item.data)
                parsed["_seq"], parsed["_key"] = int(item.sequence_number), item.partition_key
                records.append(parsed)
        done = until(records) if until else (count is not None and len(records) >= count)
        if done or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def with_marker(records: list[dict], marker: str) -> list[dict]:
    return [r for r in records if marker in (r.get("querystring") or "") or marker in (r.get("body") or "")]


class FaultProxy:
    """A TCP proxy to the emulator that can be switched off (connections refused/reset) and on again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.up = True
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            with self._lock:
                for sock in self._open:
                    _close(sock)
                self._open.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while self.up:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(target)

    def close(self) -> None:
        self._closed = True
        self.set_up(False)
        _close(self._listener)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ------------------------------------------------------------------------------------ fixtures


def provision_streams():
    from infra.provision import ProvisionSettings, provision

    settings = unique_settings(ProvisionSettings, raw_shards=1, enriched_shards=1, bad_shards=1,
                               predictions_shards=1)
    provision(settings)
    return settings


def collector_env(settings, spool_dir: Path, endpoint: str | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")}
    env.update(settings_env(settings))
    env.update(CLICKSTREAM_PORT=str(free_port()), CLICKSTREAM_SPOOL_DIR=str(spool_dir), CLICKSTREAM_LINGER_MS="50",
               CLICKSTREAM_COOKIE_SECURE="true")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    # The workers' metrics folder is made in TMPDIR and removed at exit, which a kill -9 skips.
    scratch = spool_dir.parent / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(scratch)
    env.update({f"CLICKSTREAM_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def make_collector(tmp_path):
    """Start collectors with given settings; every one still running is stopped at the end."""
    started: list[Collector] = []

    def make(env: dict) -> Collector:
        collector = Collector(env, tmp_path / f"collector-{len(started)}.log")
        started.append(collector)
        return collector.start()

    yield make
    for collector in started:
        collector.stop()


@pytest.fixture
def streams(aws_endpoint):
    return provision_streams()
