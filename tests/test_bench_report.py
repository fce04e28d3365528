"""Unit tests of the benchmark harness' arithmetic and parsing (bench/report.py, bench/wrk.py), and
one smoke run of the quick suites that need neither Spark nor wrk, so a change that breaks a suite's
code fails here rather than in the next `make bench`. Nothing is timed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import wrk
from bench.report import Report, percentiles, verdict
from bench.sink import CountingStream
from common.producer import Producer

# wrk 4.1.0 --latency output, as it prints it (the Socket errors line only appears when one is non-zero).
WRK_CLEAN = """Running 3s test @ http://127.0.0.1:8080/i
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms    1.05ms  20.31ms   85.00%
    Req/Sec    15.20k     1.10k   17.80k    70.00%
  Latency Distribution
     50%  850.00us
     75%    2.50ms
     90%    3.20ms
     99%    6.10ms
  90770 requests in 3.00s, 12.03MB read
Requests/sec:  30223.41
Transfer/sec:      4.01MB
"""
WRK_SOCKET_ERRORS = WRK_CLEAN.replace(
    "  90770 requests in 3.00s, 12.03MB read\n",
    "  90770 requests in 3.00s, 12.03MB read\n  Socket errors: connect 0, read 3, write 0, timeout 2\n")
WRK_NON_2XX = WRK_CLEAN.replace(
    "  90770 requests in 3.00s, 12.03MB read\n",
    "  90770 requests in 3.00s, 12.03MB read\n  Non-2xx or 3xx responses: 17\n")


def test_percentile_is_nearest_rank():
    twenty = list(range(1, 21))
    assert percentiles(twenty, 50) == [10]                 # ceil(0.5 * 20) = 10th value
    hundred = list(range(1, 101))
    assert percentiles(hundred, 99, 50, 100) == [99, 50, 100]
    assert percentiles(hundred, 7) == [7]                  # not the 8th that 0.07 * 100 = 7.000000000000001 gives
    assert percentiles(list(range(1, 1001)), 99.9) == [999]
    assert percentiles(list(range(1, 2401)), 99) == [2376]
    assert percentiles(list(range(1, 6)), 50) == [3]        # ceil(2.5) = 3rd of 5


def test_percentile_unsorted_single_and_empty():
    assert percentiles([5.0, 1.0, 3.0, 2.0, 4.0], 0, 99) == [1.0, 5.0]
    assert percentiles([42.0], 50, 99) == [42.0, 42.0]
    with pytest.raises(ValueError):
        percentiles([], 50)


def test_verdict_has_one_form():
    assert verdict("p99 ≤ 2 ms at 16 connections", True, "p99 1.40 ms") == \
        "target p99 ≤ 2 ms at 16 connections: met (p99 1.40 ms)"
    assert verdict("≥ 50 % of the bare app with p99 ≤ 10 ms", False, "46.0%, p99 16.00 ms") == \
        "target ≥ 50 % of the bare app with p99 ≤ 10 ms: not met (46.0%, p99 16.00 ms)"
    assert verdict("p99 ≤ 50 µs (100-tree GBT)", None, "p99 20.0 µs; 20 trees") == \
        "target p99 ≤ 50 µs (100-tree GBT): not judged (p99 20.0 µs; 20 trees)"


def test_wrk_parse_reads_rate_and_latencies_in_ms():
    rps, p50, p99 = wrk.parse(WRK_CLEAN)
    assert rps == 30223.41
    assert p50 == pytest.approx(0.85)
    assert p99 == pytest.approx(6.1)
    assert wrk.parse(WRK_CLEAN.replace("99%    6.10ms", "99%    1.20s"))[2] == pytest.approx(1200.0)


def test_wrk_socket_errors_fail_the_measurement():
    with pytest.raises(wrk.WrkError, match="connect 0, read 3, write 0, timeout 2"):
        wrk.parse(WRK_SOCKET_ERRORS, "http://127.0.0.1:8080/i")
    zero = WRK_CLEAN.replace("Requests/sec:", "  Socket errors: connect 0, read 0, write 0, timeout 0\nRequests/sec:")
    assert wrk.parse(zero)[0] == 30223.41


def test_wrk_error_answers_and_missing_figures_fail():
    with pytest.raises(wrk.WrkError, match="17 error responses"):
        wrk.parse(WRK_NON_2XX)
    with pytest.raises(wrk.WrkError, match="Requests/sec"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")
    with pytest.raises(wrk.WrkError, match="99%"):
        wrk.parse(WRK_CLEAN.replace("     99%    6.10ms\n", ""))


def test_a_missing_wrk_names_the_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))          # an empty folder: no wrk on the PATH
    with pytest.raises(wrk.WrkError, match="apt-get install wrk"):
        wrk.run("http://127.0.0.1:1/", 1, 1)

def test_the_benchmarks_output_stream_counts_every_entry_and_keeps_none():
    stream = CountingStream("out")
    entries = [(f"key-{i}", b"x" * 2048) for i in range(1_200)]     # three PutRecords calls of 500 at most
    assert Producer(stream).send(entries) == []
    assert Producer(stream).send(entries[:7]) == []
    assert vars(stream) == {"name": "out", "count": 1_207}       # a count, no records


def test_report_header_names_mode_and_suites_and_failures(tmp_path):
    report = Report(tmp_path / "report.md", mode="quick", suites=["okay", "halfway", "later"])
    report.suite("okay", "a suite that works")
    report.row(report.section("okay table", ["what", "value"]), "figure", 1.0)
    report.suite("halfway", "a suite that fails midway")
    report.row(report.section("halfway table", ["what", "value"]), "first row", 2.0)
    report.fail(RuntimeError("wrk is not installed"))
    report.write()
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Mode: **quick**" in text
    assert "Suites run: okay (ok), halfway (FAILED). Not reached: later." in text
    assert "**FAILED: RuntimeError: wrk is not installed**" in text
    assert text.index("## halfway") < text.index("FAILED: RuntimeError") < text.index("### halfway table")
    assert report.failed == ["halfway"]


def test_the_quick_in_process_suites_run_to_the_end(tmp_path):
    report = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "-m", "bench", "enrich", "streams", "loader", "--quick", "--report",
                          str(report)], cwd=Path(__file__).resolve().parent.parent, capture_output=True, encoding="utf-8",
                         timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = report.read_text(encoding="utf-8")
    assert "FAILED" not in text and text.count("## ") >= 3, text
