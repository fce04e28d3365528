"""Run wrk and read its figures: requests/s, p50 and p99 latency in ms."""
from __future__ import annotations

import re
import shutil
import subprocess


class WrkError(RuntimeError):
    """wrk ran, but its figures are not a measurement: error answers or socket errors."""


def run(url: str, connections: int, seconds: int, *, headers: list[str] = (), script: str | None = None,
        ) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms); a non-2xx/3xx answer or any socket error fails the measurement."""
    if shutil.which("wrk") is None:
        raise WrkError("wrk is not installed (Debian package wrk: apt-get install wrk)")
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += [arg for header in headers for arg in ("-H", header)]
    if script:
        args += ["-s", script]
    done = subprocess.run([*args, url], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode} on {url}: {done.stderr.strip() or done.stdout.strip()}")
    return parse(done.stdout, url)


def parse(out: str, url: str = "the server") -> tuple[float, float, float]:
    """Read wrk --latency output: (requests/s, p50 ms, p99 ms); raises WrkError on any error it reports."""
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors and int(errors.group(1)):
        raise WrkError(f"wrk saw {errors.group(1)} error responses from {url}")
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sockets and any(int(count) for count in sockets.groups()):
        connect, read, write, timeout = sockets.groups()
        raise WrkError(f"wrk saw socket errors on {url}: connect {connect}, read {read}, write {write}, "
                       f"timeout {timeout}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise WrkError(f"no Requests/sec in wrk's output for {url}:\n{out}")
    return float(found.group(1)), _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, point: str) -> float:
    found = re.search(rf"^\s+{point}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if not found:
        raise WrkError(f"no {point} latency in wrk's output (was it run with --latency?):\n{out}")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
