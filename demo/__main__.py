"""`make demo`: the whole loop on generated traffic, from a fresh clone, in a few minutes.

Steps: start the local stack → backfill days of shop history through the real collector →
wait until the lake holds it → `make train` (Spark → ONNX, parity gate, publish) → the running
scorer hot-loads the model and scores the history → live traffic for DEMO_MINUTES (default 2) →
a summary. The stack stays up for exploring until `make down`. Every step reports progress at
least every few seconds.

Knobs (environment): DEMO_MINUTES (2), DEMO_HISTORY_SESSIONS (1500), DEMO_HISTORY_DAYS (7),
DEMO_LIVE_RATE (events/s, 40), DEMO_SEED (7 on a fresh stack, a new one on a running stack).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import click
from prometheus_client.parser import text_string_to_metric_families

from common import aws, registry
from common.cli import run_command
from common.config import AwsSettings, ConfigError, load
from demo.summary import count_raw, latency_line, latency_of_events_since
from infra import stack

# The lake loader flushes every few minutes in production; the demo wants its history now.
# A fifth of the sessions that qualify for an offer are held out, so the summary can compare the two groups.
DEMO_ENV = {"CLICKSTREAM_LAKE_FLUSH_SECONDS": "5", "CLICKSTREAM_SCORER_MODEL_POLL_S": "2",
            "CLICKSTREAM_HOLDOUT_PERCENT": "20"}
STARTED = time.monotonic()


def say(text: str) -> None:
    click.echo(f"[{time.monotonic() - STARTED:6.1f}s] {text}")


def knob(name: str, default: float) -> float:
    value = os.environ.get(name, str(default))
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None


def run(*args: str) -> None:
    """Run a step as a child process whose progress bars go straight to the terminal."""
    command = [sys.executable, "-m", *args]
    say("$ " + " ".join(["python", "-m", *args]))
    if code := subprocess.run(command, check=False, cwd=stack.ROOT).returncode:
        raise SystemExit(f"`python -m {' '.join(args)}` failed with exit code {code} (its output is above); "
                         "the stack is still up: `make down` stops it")


def iso(at_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_s))


def demo_seed(stack_was_up: bool) -> int:
    """DEMO_SEED; else 7 on a fresh stack (the documented run), and a new seed on a stack that still
    holds an earlier run: the same session and event ids again would be dropped as duplicates by the
    scorer and find their offers already made."""
    if "DEMO_SEED" in os.environ or not stack_was_up:
        return int(knob("DEMO_SEED", 7))
    seed = 9 + int(time.time()) % 1_000_000          # never 7 or 8, the first run's two seeds
    say(f"the stack already holds an earlier run: traffic seed {seed}, so its sessions are new "
        "(DEMO_SEED=N picks one; `make down` starts afresh)")
    return seed


def restart_with_demo_settings(names: list[str]) -> None:
    """Components that were already running (with production flush times) get the demo's settings."""
    for process in stack.COMPONENTS:
        if process.name in names:
            say(f"restarting {process.name} with the demo's settings")
            stack.stop(process)
            say(stack.start(process))


def already_running() -> list[str]:
    return [p.name for p in stack.COMPONENTS if p.name in ("lake-loader", "scorer", "discount") and stack.running_pid(p)]


def lake_rows(settings: AwsSettings) -> int:
    from demo.summary import lake_rows as count
    return count(aws.client("s3"), settings.bucket).get("rows", 0)


def wait_for_count(count: Callable[[], int], expected: int, progress: str, failure: str, poll_s: float,
                   timeout: float) -> int:
    """Poll ``count()`` until it reaches ``expected``, saying ``progress`` (formatted with the count and
    ``expected``) each time; or, once it counts something, until it has not grown for 30 s (some events
    were bad rows: go on with what arrived). ``failure`` ends the demo after ``timeout`` seconds."""
    deadline, last, still = time.monotonic() + timeout, -1, 0
    while time.monotonic() < deadline:
        counted = count()
        say(progress.format(counted, expected))
        if counted >= expected:
            return counted
        still = still + 1 if counted == last and counted > 0 else 0
        if still * poll_s >= 30:
            say(f"nothing more for 30 s; going on with {counted:,}")
            return counted
        last = counted
        time.sleep(poll_s)
    raise SystemExit(failure.format(timeout))


def wait_for_lake(settings: AwsSettings, expected: int, timeout: float = 300) -> int:
    """Wait until the lake's row count reaches ``expected`` events or stops growing."""
    return wait_for_count(lambda: lake_rows(settings), expected, "lake holds {:,} / {:,} events",
                          "the lake did not receive the history within {:.0f} s; see .run/logs/", 5, timeout)


def wait_for_model(version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:8081/v2/models/{registry.DEFAULT_MODEL}", timeout=2) as r:
                served = json.load(r)
            if version in json.dumps(served):
                say(f"scorer serves model version {version}")
                return
        except OSError:
            pass
        say(f"waiting for the scorer to hot-load {version}")
        time.sleep(2)
    raise SystemExit(f"the scorer did not load model {version} within {timeout:.0f} s; see .run/logs/scorer.log")


SCORER_METRICS = "http://127.0.0.1:8081/metrics"


def scorer_samples(url: str = SCORER_METRICS) -> list | None:
    """The samples of the scorer's /metrics; None while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scorer_events_read(url: str = SCORER_METRICS) -> int | None:
    """Events the scorer has folded since it started, not counting the replays that rebuild sessions
    after a restart (from its /metrics); None while it does not answer."""
    samples = scorer_samples(url)
    if samples is None:
        return None
    return int(sum(sample.value for sample in samples
                   if sample.name == "scorer_events_total" and sample.labels.get("mode") == "live"))


def drift_line(url: str = SCORER_METRICS) -> str:
    """The scorer's live scores against those the model was chosen on (scorer/drift.py), one line, and
    a second naming the input that moved most, once enough rows are sampled to say."""
    samples = scorer_samples(url) or []
    gauges = {sample.name: sample.value for sample in samples if not sample.labels}
    rows = int(gauges.get("scorer_score_window_rows", 0))
    if not rows:
        return "  score drift    not measured: no live scores against the model's score_reference yet"
    psi = gauges["scorer_score_psi"]
    measured = "under 1,000 scores, too few to say" if math.isnan(psi) else f"PSI {psi:.3f} (ScoreDrift alerts above 0.25)"
    line = (f"  score drift    {measured} over {rows:,} live scores; decided buy {gauges['scorer_buy_rate']:.1%}, "
            f"in training {gauges['scorer_expected_buy_rate']:.1%}")
    inputs = {sample.labels["feature"]: sample.value for sample in samples
              if sample.name == "scorer_feature_psi" and not math.isnan(sample.value)}
    if inputs:
        feature = max(inputs, key=inputs.get)
        line += f"\n  input drift    moved most: {feature}, PSI {inputs[feature]:.3f} (scorer_feature_psi)"
    return line


def wait_for_scorer(expected: int, url: str = SCORER_METRICS, timeout: float = 300) -> None:
    """Wait until the scorer has read ``expected`` events: it waits for its first model before reading,
    and live events sent before it caught up would queue behind the history."""
    started = time.monotonic()
    read = wait_for_count(lambda: scorer_events_read(url) or 0, expected, "scorer has read {:,} / {:,} events",
                          "the scorer did not catch up within {:.0f} s; see .run/logs/scorer.log", 3, timeout)
    if read >= expected:
        say(f"scorer caught up with the history in {time.monotonic() - started:.0f} s")


def main() -> int:
    """Run the whole loop on generated traffic: start the local stack, backfill shop history through
    the collector, wait for the lake, train and publish a model, watch the scorer hot-load it and
    score the history, then send live traffic and print a summary: counts, live scores against
    training's, and the offered sessions' purchases against a control group held out from the
    offers (20 %). The stack stays up until `make down`.

    Knobs (environment): DEMO_MINUTES (2), DEMO_HISTORY_SESSIONS (1500), DEMO_HISTORY_DAYS (7),
    DEMO_LIVE_RATE (events/s, 40), DEMO_SEED (7 on a fresh stack, a new one on a running stack).
    Stream, bucket and table names come from the CLICKSTREAM_* settings (CLICKSTREAM_CONFIG, README).
    """
    for key, value in DEMO_ENV.items():
        os.environ.setdefault(key, value)
    minutes = knob("DEMO_MINUTES", 2)
    history = int(knob("DEMO_HISTORY_SESSIONS", 1500))
    days = knob("DEMO_HISTORY_DAYS", 7)
    live_rate = knob("DEMO_LIVE_RATE", 40)
    seed = demo_seed(stack_was_up=stack.healthy(stack.EMULATOR.health_url))
    settings = load(AwsSettings)
    if minutes * live_rate > 15 * 40 and stack.uses_local_emulator():
        say(f"note: the embedded emulator keeps every record and slows down as they pile up (a soak at 40 "
            f"events/s failed after ~35 minutes); {minutes:g} minutes at {live_rate:g} events/s may outlast it: "
            "for longer runs use LocalStack (docs/foundation.md)")

    say("1/6 starting the local stack (emulator, streams, bucket, tables, components)")
    running = already_running()
    stack.up()
    restart_with_demo_settings(running)
    started_at = time.time()

    say(f"2/6 backfilling {days:g} days of history: {history:,} sessions through the collector")
    before, scorer_before = lake_rows(settings), scorer_events_read() or 0
    run("demo.traffic", "--sessions", str(history), "--backfill-days", str(days), "--seed", str(seed),
        "--buy-share", "0.15")
    sent = count_raw(aws.client("kinesis"), settings.raw_stream, started_at)["events"]

    say("3/6 waiting for the enricher and the lake loader to land the history in S3 as Parquet")
    landed = wait_for_lake(settings, before + sent) - before      # without bad rows: what the scorer gets too

    say("4/6 training: make train (Spark, ONNX export, parity gate, publish)")
    run("batch.train", "--window-days", "2")
    version = registry.current_version(aws.client("s3"), settings.bucket)
    if not version:
        raise SystemExit("training published no CURRENT model; see the output above")

    say("5/6 the running scorer picks the new model up without a restart, and scores the history")
    wait_for_model(version)
    wait_for_scorer(scorer_before + landed)

    sessions = max(10, int(live_rate * minutes * 60 / 20))     # ~20 events per session
    say(f"6/6 live traffic for {minutes:g} min at ~{live_rate:g} events/s ({sessions} sessions); "
        "watch http://127.0.0.1:8082/")
    live_started = time.time()
    run("demo.traffic", "--sessions", str(sessions), "--rate", str(live_rate), "--seed", str(seed + 1),
        "--speed", "30")
    traffic_ended = time.time()
    time.sleep(3)                  # let the last predictions flush

    say("summary")
    run("demo.summary", "--since-minutes", f"{(time.time() - started_at) / 60 + 1:.1f}")
    # The scorer waits for its first model, then reads the whole history at once, thousands of records
    # per poll: the line above is mostly that. The live events on their own:
    live = latency_of_events_since(aws.client("kinesis"), settings.predictions_stream, live_started)
    click.echo(latency_line("  live only", live, "events received during the live traffic"))
    click.echo(drift_line())

    # The lake loader writes its files every 5 s here: the last 15 s of collections are left out.
    say("live vs training: each session's latest prediction, the one each offer or holdout was decided on "
        "(mid-session), and every prediction on the stream, against the fold of its events in the lake")
    run("batch.skew", "--rows", "all", "--since", iso(started_at), "--until", iso(traffic_ended - 15),
        "--sample", "100000", "--no-progress")
    say("offers against the control group (the demo's generated visitors ignore offers: expect no effect)")
    run("discount.uplift", "--settle-minutes", "0")
    click.echo("\nThe stack is still running:\n"
          "  live view     http://127.0.0.1:8082/\n"
          "  demo shop     http://127.0.0.1:8082/shop/\n"
          "  scorer API    http://127.0.0.1:8081/openapi.json\n"
          "  collector     http://127.0.0.1:8080/health\n"
          "Commands run by hand against it (python -m demo.summary, python -m batch.cli ls, ...) need\n"
          "  export AWS_ENDPOINT_URL=http://127.0.0.1:4566\n"
          "Stop it with `make down`.")
    return 0


if __name__ == "__main__":
    run_command(main)
