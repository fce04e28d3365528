"""Run the local stack in the background: the emulator, provisioning, then every component.

``up`` is idempotent (a running process is left alone), ``down`` stops everything it started
(process groups, so no grandchild survives), ``status`` says what runs where. Logs and pid files
live under ``.run/`` (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from localstack.emulator import healthy, probe, stop_group

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
LOCAL_ENDPOINT = "http://127.0.0.1:4566"


@dataclass(frozen=True)
class Process:
    name: str
    module: str
    health_url: str | None = None
    args: tuple[str, ...] = ()
    # Defaults for this process only; the same variable in the environment wins. They are the
    # section form, so a plain CLICKSTREAM_METRICS_PORT does not move them: the health URLs expect them.
    env: tuple[tuple[str, str], ...] = ()
    stop_signal: signal.Signals = signal.SIGTERM
    # What `status` asks, when it says more than the start-up check: the collector's /health answers
    # while its stream is unreachable, /sink-health does not.
    status_url: str | None = None

    @property
    def pid_file(self) -> Path:
        return RUN / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return RUN / "logs" / f"{self.name}.log"


EMULATOR = Process("emulator", "localstack.emulator", LOCAL_ENDPOINT + "/moto-api/", ("--port", "4566"),
                   stop_signal=signal.SIGINT)
# Prometheus ports, as in deploy/: collector 8080/metrics, scorer 8081/metrics, enrich 9101, loader 9102, discount 9104.
COMPONENTS = [
    Process("collector", "collector.__main__", "http://127.0.0.1:8080/health",
            status_url="http://127.0.0.1:8080/sink-health"),
    Process("enrich", "enrich.__main__", "http://127.0.0.1:9101/metrics",
            env=(("CLICKSTREAM_ENRICH_METRICS_PORT", "9101"),)),
    Process("lake-loader", "batch.loader", "http://127.0.0.1:9102/metrics",
            env=(("CLICKSTREAM_LAKE_METRICS_PORT", "9102"),)),
    Process("scorer", "scorer.__main__", "http://127.0.0.1:8081/ping"),
    Process("discount", "discount.__main__", "http://127.0.0.1:9104/metrics",
            env=(("CLICKSTREAM_DISCOUNT_METRICS_PORT", "9104"),)),
    Process("liveview", "demo.liveview", "http://127.0.0.1:8082/health"),
]


def running_pid(process: Process) -> int | None:
    """The pid of the process ``up`` started, or None; never another process that got the pid since
    (``down`` would kill its whole group): the pid file also holds the process's start time."""
    try:
        pid_text, _, started = process.pid_file.read_text().partition(" ")
        pid = int(pid_text)
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    if started_at(pid) != (started.strip() or None):
        return None
    return pid


def started_at(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]      # after the command name, which may hold spaces


LOG_ROTATE_BYTES = 50 * 1024 * 1024


def rotate(log_file: Path) -> None:
    """Each `make up` appends to its process's log: one past LOG_ROTATE_BYTES moves to ``<name>.log.1``
    (replacing the one before), so local logs stay bounded across runs."""
    try:
        if log_file.stat().st_size > LOG_ROTATE_BYTES:
            log_file.replace(log_file.with_name(log_file.name + ".1"))
    except FileNotFoundError:
        pass


def start(process: Process, wait: float = 30) -> str:
    if running_pid(process):
        return f"{process.name}: already running (pid {running_pid(process)})"
    if process.health_url and healthy(process.health_url):
        # Not ours (no pid file), yet it answers: the new one could not bind, and the check would pass.
        raise SystemExit(f"{process.name}: something else already answers on {process.health_url}; "
                         "stop it first (`make down` stops what `make up` started)")
    process.pid_file.parent.mkdir(parents=True, exist_ok=True)
    process.log_file.parent.mkdir(parents=True, exist_ok=True)
    rotate(process.log_file)
    module = process.module.removesuffix(".__main__")
    with open(process.log_file, "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", module, *process.args], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                 env={**dict(process.env), **os.environ})
    write_whole(process.pid_file, f"{child.pid} {started_at(child.pid) or ''}".strip())
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = process.log_file.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"{process.name} exited with {child.returncode}; last log lines:\n" + "\n".join(tail))
        if process.health_url is None or healthy(process.health_url):
            return f"{process.name}: started (pid {child.pid}, log {process.log_file.relative_to(ROOT)})"
        time.sleep(0.2)
    raise SystemExit(f"{process.name} did not become healthy within {wait:.0f} s; see {process.log_file}")


def write_whole(path: Path, text: str) -> None:
    """Written aside, then renamed: a crash or a full disk leaves the old file or none, never a cut one.
    Owner-only, as the key must be."""
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(text)
    partial.chmod(0o600)
    partial.replace(path)


def stop(process: Process) -> str | None:
    pid = running_pid(process)
    process.pid_file.unlink(missing_ok=True)
    if pid is None:
        return None
    stop_group(pid, timeout=15, first=process.stop_signal)
    return f"{process.name}: stopped"


def uses_local_emulator() -> bool:
    return os.environ.get("AWS_ENDPOINT_URL", LOCAL_ENDPOINT).rstrip("/") == LOCAL_ENDPOINT


def local_pseudonymisation_key() -> str:
    """A per-checkout random key for local runs; production sets CLICKSTREAM_PSEUDONYMISATION_KEY."""
    if os.environ.get("CLICKSTREAM_PSEUDONYMISATION_KEY"):
        return "pseudonymisation key: from CLICKSTREAM_PSEUDONYMISATION_KEY"
    path = RUN / "pseudonymisation.key"
    if not path.exists() or not path.read_text().strip():     # an empty one was cut before any use
        RUN.mkdir(parents=True, exist_ok=True)
        write_whole(path, secrets.token_hex(32))
    os.environ["CLICKSTREAM_PSEUDONYMISATION_KEY"] = path.read_text().strip()
    return f"pseudonymisation key: local, from {path.relative_to(ROOT)} (set CLICKSTREAM_PSEUDONYMISATION_KEY in production)"


def local_defaults() -> None:
    """The local stack talks to the emulator unless AWS_ENDPOINT_URL names another endpoint."""
    os.environ.setdefault("AWS_ENDPOINT_URL", LOCAL_ENDPOINT)
    if os.environ["AWS_ENDPOINT_URL"].rstrip("/") == LOCAL_ENDPOINT:
        for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(key, value)


def up() -> None:
    local_defaults()
    if uses_local_emulator():
        if not running_pid(EMULATOR) and healthy(EMULATOR.health_url):
            print("emulator: something already answers on 127.0.0.1:4566; using it")
        else:
            print(start(EMULATOR), flush=True)
    else:
        print(f"emulator: not started, AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL')}")
    if code := subprocess.run([sys.executable, "-m", "infra.provision"], check=False, cwd=ROOT).returncode:
        raise SystemExit(f"provisioning failed with exit code {code} (its output is above)")
    print(local_pseudonymisation_key())
    for process in COMPONENTS:
        print(start(process), flush=True)


def down() -> None:
    stopped = [line for process in [*reversed(COMPONENTS), EMULATOR] if (line := stop(process))]
    print("\n".join(stopped) if stopped else "nothing was running")


def status() -> None:
    for process in [EMULATOR, *COMPONENTS]:
        print(f"{process.name:12} {describe(process)}")


def describe(process: Process) -> str:
    """Running or not, and what its health check answers: a 503 says why (a scorer whose worker
    ended, a collector whose stream is unreachable), which "not answering" would hide."""
    pid = running_pid(process)
    url = process.status_url or process.health_url
    if not pid or not url:
        return f"running (pid {pid})" if pid else "stopped"
    answer = probe(url)
    if answer is None:
        return f"running (pid {pid}), NOT answering"
    status, body = answer
    return f"running (pid {pid}), healthy" if status < 400 else f"running (pid {pid}), UNHEALTHY: {status} {body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description="Start, stop or inspect the local clickstream stack.")
    parser.add_argument("action", choices=["up", "down", "status"],
                        help="up: start the emulator (127.0.0.1:4566), provision, start every component; "
                             "down: stop them all; status: each process, its pid and whether it answers its health check")
    args = parser.parse_args(argv)
    {"up": up, "down": down, "status": status}[args.action]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
