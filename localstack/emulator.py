"""Start, health-check and stop local AWS emulators as child processes.

``moto`` (moto server) serves Kinesis, S3 and DynamoDB over real HTTP and is the default.
``kinesis-mock`` (npm ``kinesis-local``) is AWS-faithful for Kinesis alone (resharding, real
sequence numbers, the 1 MiB limit), for the tests that need that. Each runs in its own process
group, so stopping it never leaves a grandchild behind; ``python -m localstack.emulator`` (what
``make up`` runs) keeps it in its own group instead, so stopping that group stops both.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def probe(url: str) -> tuple[int, str] | None:
    """What ``url`` answers: its status and the start of its body; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status, response.read(200).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(200).decode(errors="replace").strip()
    except OSError:
        return None


def healthy(url: str) -> bool:
    """True when ``url`` answers HTTP with a status below 500."""
    answer = probe(url)
    return answer is not None and answer[0] < 500


@dataclass
class Emulator:
    kind: str
    port: int
    process: subprocess.Popen
    own_group: bool = True          # the emulator leads a process group of its own (see start)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        # Both emulators ignore SIGTERM but stop at once on SIGINT (as on Ctrl-C).
        if self.own_group:
            stop_group(self.process.pid, timeout, signal.SIGINT, self.process)
        else:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(timeout)


def _reap(pid: int, process: subprocess.Popen | None) -> None:
    if process is not None:
        process.poll()
        return
    try:
        os.waitpid(pid, os.WNOHANG)     # our child from another Popen: reap it if it has exited
    except ChildProcessError:
        pass                            # not our child: its own parent reaps it


def stop_group(pid: int, timeout: float = 10, first: signal.Signals = signal.SIGTERM,
               process: subprocess.Popen | None = None) -> None:
    """Send ``first`` to the process group, then SIGKILL whatever is left after ``timeout``."""
    try:
        os.killpg(pid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid, process)         # an un-reaped leader (a zombie) keeps the group "alive"
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _command(kind: str, port: int) -> tuple[list[str], dict, str, Path]:
    """The command line, environment, health path and working folder of an emulator."""
    env = dict(os.environ)
    if kind == "moto":
        return [sys.executable, "-m", "localstack.moto_server", "-H", "127.0.0.1", "-p", str(port)], env, "/moto-api/", ROOT
    if kind == "kinesis-mock":
        main = ROOT / "node_modules" / "kinesis-local" / "main.js"
        if not main.exists():
            raise RuntimeError("kinesis-mock is not installed: run `make setup` (npm install)")
        env.update(KINESIS_MOCK_PLAIN_PORT=str(port), KINESIS_MOCK_TLS_PORT=str(free_port()),
                   LOG_LEVEL="WARN", SHOULD_PERSIST_DATA="false",
                   CREATE_STREAM_DURATION="0ms", DELETE_STREAM_DURATION="0ms",
                   UPDATE_SHARD_COUNT_DURATION="0ms", SHARD_LIMIT="100")
        # It reads its server.json (TLS material) from the working folder.
        return ["node", str(main)], env, "/", main.parent
    raise ValueError(f"unknown emulator {kind!r}: expected moto or kinesis-mock")


def start(kind: str = "moto", port: int | None = None, log_path: Path | None = None,
          timeout: float = 60, own_group: bool = True) -> Emulator:
    """Start an emulator and wait until it answers HTTP; raise with its log if it does not.
    ``own_group``: in a process group of its own (tests stop it with its children), else in ours
    (whoever stops our group stops it too)."""
    port = port or free_port()
    if not _port_free(port):
        # Otherwise the health check would be answered by whatever already listens there.
        raise RuntimeError(f"port {port} is in use: stop what listens there or choose another port")
    command, env, health, cwd = _command(kind, port)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=own_group, cwd=cwd)
    emulator = Emulator(kind, port, process, own_group)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited with code {process.returncode} (log: {log_path})")
        if healthy(emulator.endpoint + health):
            return emulator
        time.sleep(0.1)
    emulator.stop()
    raise RuntimeError(f"{kind} did not answer on port {port} within {timeout:.0f} s (log: {log_path})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localstack.emulator", description="Run a local AWS emulator in the foreground.",
        epilog="Point the components at it with AWS_ENDPOINT_URL=http://127.0.0.1:PORT (docs/foundation.md).")
    parser.add_argument("--kind", choices=["moto", "kinesis-mock"], default="moto",
                        help="moto: Kinesis, S3 and DynamoDB (default); kinesis-mock: Kinesis alone, AWS-faithful "
                             "(resharding, real sequence numbers, the 1 MiB limit)")
    parser.add_argument("--port", type=int, default=4566, help="port to listen on (default 4566)")
    args = parser.parse_args(argv)
    # Our own handlers, set before the emulator starts: a shell that runs us in the background hands
    # SIGINT down ignored, and we (and the emulator, which would inherit that) never stopped. In our
    # process group, the emulator goes with us when `make down` has to kill the group.
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.append(True))
    emulator = start(args.kind, args.port, own_group=False)
    print(f"{args.kind} listening on {emulator.endpoint}", flush=True)
    try:
        while not stopping and emulator.process.poll() is None:
            time.sleep(0.5)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
