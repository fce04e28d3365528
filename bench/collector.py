"""Collector throughput and latency with wrk, side by side with a bare pixel app on the same stack.

Runs wrk (64 connections) against: a bare ASGI pixel app on granian (the ceiling; the same app on
granian's RSGI interface is shown for reference), the collector
with sink=memory (HTTP + record building + spool write + sender, no network), the collector with
the emulator sink (moto on a free port), and the memory sink with fsync=always (group commit).
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import wrk
from bench.report import median, verdict
from localstack import emulator

ROOT = Path(__file__).resolve().parent.parent
PATH = ("/i?e=pv&tv=js-4.0.0&p=web&aid=shop&url=http%3A%2F%2Fshop.test%2Fp%2F1&page=Product&res=1920x1080&eid=1"
        "&duid=5d1e2c7a-3b6e-4c43-9d1a-6c7c2f3e9b11&vid=3&sid=0b6f7c1e-1d2a-4f8e-9c3b-2a1e4d5f6a7b")
HEADERS = ["User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", "Referer: http://shop.test/",
           "Cookie: sp=6f1c3a52-3b6e-4c43-9d1a-6c7c2f3e9b11"]
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


async def bare_app(scope, receive, send):
    """The baseline: answer a pixel, do nothing else."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"image/gif"), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": PIXEL})


async def bare_rsgi(scope, protocol):
    """The same pixel on granian's native RSGI interface, for reference (see docs/collector.md)."""
    protocol.response_bytes(200, [("content-type", "image/gif"), ("cache-control", "no-cache")], PIXEL)


def _wait(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def _start(command: list[str], env: dict, health: str) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    _wait(health, process)
    return process


def _stop(process: subprocess.Popen) -> None:
    emulator.stop_group(process.pid, timeout=0) if process.poll() is None else None
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(5)


def _collector_env(spool: Path, port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSTREAM_")}
    env.update(CLICKSTREAM_PORT=str(port), CLICKSTREAM_SPOOL_DIR=str(spool), CLICKSTREAM_COOKIE_SECURE="true")
    env.update({f"CLICKSTREAM_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def _servers(work: Path, stack: list) -> dict[str, str]:
    """Start every server side by side (idle until wrk hits it); returns name -> URL."""
    urls = {}
    for name, target in [("bare pixel app (granian ASGI)", ("asgi", "bench.collector:bare_app")),
                         ("bare pixel app (granian RSGI, reference)", ("rsgi", "bench.collector:bare_rsgi"))]:
        port = emulator.free_port()
        stack.append(_start([sys.executable, "-m", "granian", "--interface", target[0], "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--no-ws", target[1]],
                            dict(os.environ), f"http://127.0.0.1:{port}/"))
        urls[name] = f"http://127.0.0.1:{port}/i"
    moto = emulator.start("moto", log_path=work / "moto.log")
    stack.append(moto.process)
    aws_env = {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([sys.executable, "-m", "infra.provision"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, **aws_env, "CLICKSTREAM_RAW_SHARDS": "4"})
    for name, extra in [("collector, memory sink", {"sink": "memory"}),
                        ("collector, memory sink, fsync=always", {"sink": "memory", "fsync": "always"}),
                        ("collector, emulator sink (moto)", aws_env)]:
        port = emulator.free_port()
        env = {**_collector_env(work / str(port), port, **({} if "AWS_ENDPOINT_URL" in extra else extra))}
        env.update(extra if "AWS_ENDPOINT_URL" in extra else {})
        stack.append(_start([sys.executable, "-m", "collector"], env, f"http://127.0.0.1:{port}/health"))
        urls[name] = f"http://127.0.0.1:{port}{PATH}"
    return urls


def run(report, quick: bool) -> None:
    rounds, seconds = (1, 3) if quick else (3, 4)
    cpu = report.section("collector: CPU per hit in-process (no server, no sender thread)",
                         ["app", "CPU us per request"])
    for name, value in cpu_per_hit(5000 if quick else 30000).items():
        report.row(cpu, name, value)
    section = report.section(f"collector: wrk, 64 connections, one granian worker, median of {rounds} x {seconds} s",
                             ["server", "requests/s", "p50 ms", "p99 ms", "vs bare ASGI"])
    work = Path(tempfile.mkdtemp(prefix="bench-collector-"))
    stack: list[subprocess.Popen] = []
    samples: dict[str, list[tuple[float, float, float]]] = {}
    try:
        urls = _servers(work, stack)
        emulator = "collector, emulator sink (moto)"
        # Interleaved rounds: on a shared machine the load drifts, and this spreads it over all servers.
        # The emulator sink goes last: moto ingests far slower than the hits arrive, and the sender
        # keeps draining that backlog (CPU) long after wrk stops, which would be charged to the next
        # server measured.
        for _ in range(rounds):
            for name, url in urls.items():
                if name != emulator:
                    samples.setdefault(name, []).append(wrk.run(url, 64, seconds, headers=HEADERS))
        for _ in range(rounds):
            samples.setdefault(emulator, []).append(wrk.run(urls[emulator], 64, seconds, headers=HEADERS))
        backlog = _metric(urls[emulator].split("/i?")[0] + "/metrics", "collector_spool_depth_records")
    finally:
        for process in reversed(stack):
            _stop(process)
        shutil.rmtree(work, ignore_errors=True)

    results = {name: tuple(median([s[i] for s in runs]) for i in range(3)) for name, runs in samples.items()}
    base = results["bare pixel app (granian ASGI)"][0]
    for name, (rps, p50, p99) in results.items():
        report.row(section, name, rps, p50, p99, f"{rps / base:.0%}")
    rps, _, p99 = results["collector, memory sink"]
    report.note(section, verdict("one collector process (memory sink) ≥ 50 % of the bare ASGI app's requests/s "
                                 "with p99 ≤ 10 ms", rps / base >= 0.5 and p99 <= 10.0,
                                 f"{rps / base:.1%}, p99 {p99:.2f} ms"))
    report.note(section, f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: wrk, servers and "
                         "other work share them")
    report.note(section, f"emulator sink: {backlog:,.0f} records were still in the spool when wrk stopped; "
                         "the spool absorbs what the stream cannot take as fast as the hits arrive")


def cpu_per_hit(count: int) -> dict[str, float]:
    """CPU microseconds per request of the collector app and of the bare app, called directly."""
    import asyncio

    from collector.app import Collector
    from collector.config import settings
    from collector.sink import open_sink

    folder = tempfile.mkdtemp(prefix="bench-collector-cpu-")
    app = Collector(settings(env={"CLICKSTREAM_SINK": "memory", "CLICKSTREAM_SPOOL_DIR": folder}))
    app.sink, lock_fd = open_sink(app.settings)
    app.spool = app.sink.spool
    path, _, query = PATH.partition("?")
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
             "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:8080")] + [
                 (h.split(": ")[0].lower().encode(), h.split(": ", 1)[1].encode()) for h in HEADERS]}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def loop(target) -> float:
        started = time.process_time()
        for _ in range(count):
            await target(scope, receive, send)
        return (time.process_time() - started) / count * 1e6

    try:
        return {"bare pixel app (ASGI call)": asyncio.run(loop(bare_app)),
                "collector (route, identity, record, spool write)": asyncio.run(loop(app))}
    finally:
        app.spool.close()
        os.close(lock_fd)
        shutil.rmtree(folder, ignore_errors=True)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return float("nan")
