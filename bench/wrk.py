"""Run wrk and read its figures: requests/s, p50 and p99 latency in ms."""
from __future__ import annotations

import re
import subprocess


def run(url: str, connections: int, seconds: int, *, headers: list[str] = (), script: str | None = None,
        ) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms); any non-2xx/3xx answer is an error, not a figure."""
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += [arg for header in headers for arg in ("-H", header)]
    if script:
        args += ["-s", script]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from {url}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, point: str) -> float:
    value, unit = re.search(rf"^\s+{point}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
