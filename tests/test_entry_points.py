"""Every ``python -m`` command answers --help with its usage and starts nothing, and the commands
that call AWS say in one line what is wrong when they cannot, instead of a traceback.

A service that ignored --help would start consuming streams (or, for ``demo``, start the whole
local stack) when someone only asked what it does. The endpoint below points at a closed port, so
a command that starts work instead of answering fails or hangs instead of passing.
"""
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, settings_env

COMMANDS = ("collector", "enrich", "enrich.cli", "scorer", "discount", "discount.uplift", "batch.loader", "batch.cli", "batch.train",
            "batch.registry", "demo", "demo.liveview", "demo.summary", "demo.traffic", "demo.web", "infra.provision",
            "infra.stack")


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("module", COMMANDS)
def test_help_answers_without_starting_anything(module, flag):
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "CLICKSTREAM_PSEUDONYMISATION_KEY": ""}
    result = subprocess.run([sys.executable, "-m", module, flag], cwd=ROOT, env=env, capture_output=True,
                            encoding="utf-8", timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.lower().startswith("usage:"), result.stdout
    assert _description(result.stdout), f"{module} --help says nothing about what it does:\n{result.stdout}"


# Commands that read a settings class, with the [section] they read and the doc that lists its keys.
SETTINGS_HELP = [("collector", "[collector]", "docs/collector.md"), ("enrich", "[enrich]", "docs/enrich.md"),
                 ("enrich.cli", "[enrich]", "docs/enrich.md"), ("scorer", "[scorer]", "docs/scorer.md"),
                 ("discount", "[discount]", "docs/discount-engine.md"),
                 ("discount.uplift", "[discount]", "docs/discount-engine.md"), ("batch.loader", "[lake]", "docs/lake.md"),
                 ("batch.train", "[train]", "docs/training.md"), ("batch.registry", "[train]", "docs/training.md"),
                 ("demo.liveview", "[liveview]", "docs/liveview.md"), ("demo.summary", "[summary]", "docs/liveview.md"),
                 ("demo.web", "[web]", "docs/traffic-generator.md")]


@pytest.mark.parametrize("module, section, doc", SETTINGS_HELP)
def test_help_says_where_settings_come_from(module, section, doc):
    """README promises it: the variables, the file and its section, and the doc that lists the keys."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, encoding="utf-8",
                            timeout=60, check=False)
    text = " ".join(result.stdout.split())
    assert "CLICKSTREAM_*" in text and f"{section} section" in text and "CLICKSTREAM_CONFIG" in text, text
    assert doc in text, text


def _description(text: str) -> list[str]:
    """The lines between the usage line and the first list of arguments or options."""
    lines = []
    for line in text.splitlines()[1:]:
        if line.lower().startswith(("options:", "positional arguments:", "commands:")):
            break
        if line.strip():
            lines.append(line)
    return lines


# No credentials anywhere botocore looks: variables, files, the instance metadata service.
NO_AWS = {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("command", [["demo.summary"], ["batch.cli", "ls"], ["batch.train", "--window-days", "1"],
                                     ["batch.registry", "ls"], ["discount.uplift"],
                                     ["infra.provision", "--wait", "0"]])
@pytest.mark.parametrize("case, overrides, expected", [
    ("no credentials", {}, "export AWS_ENDPOINT_URL=http://127.0.0.1:4566"),
    ("nothing listening", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "is the emulator or LocalStack running?"),
])
def test_aws_failures_are_one_clear_line(command, case, overrides, expected):
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")} | NO_AWS | overrides
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                            timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("command", [["collector"], ["enrich"], ["scorer"], ["discount"], ["discount.uplift"],
                                     ["batch.loader"],
                                     ["batch.cli", "ls"], ["batch.train"], ["batch.registry", "ls"], ["demo.liveview"],
                                     ["demo.summary"], ["demo.web"], ["infra.provision", "--wait", "0"]])
def test_a_bad_setting_stops_every_command_with_status_2_naming_it(command):
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "CLICKSTREAM_BUCKET": ""}
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                            timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CLICKSTREAM_BUCKET: expected a name, got an empty value" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module, port_key, host_key", [
    ("discount", "CLICKSTREAM_METRICS_PORT", "metrics_host, metrics_port"),
    ("demo.web", "CLICKSTREAM_WEB_PORT", "web_host, web_port"),
    ("collector", "CLICKSTREAM_COLLECTOR_PORT", "host, port"),
    ("scorer", "CLICKSTREAM_SCORER_PORT", "host, port"),     # before its worker takes any shard
])
def test_a_server_that_cannot_listen_says_which_settings_in_one_line(module, port_key, host_key):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", port_key: str(port)}
        result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True,
                                encoding="utf-8", timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} ({host_key})" in result.stderr and "Traceback" not in result.stderr


def test_provision_says_what_it_waits_for_before_giving_up():
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "infra.provision", "--wait", "1"], cwd=ROOT, env=env,
                            capture_output=True, encoding="utf-8", timeout=120, check=False)
    first, last = result.stderr.splitlines()[0], result.stderr.splitlines()[-1]
    assert result.returncode == 1 and first == "waiting up to 1 s for http://127.0.0.1:9 (--wait) ..."
    assert "is the emulator or LocalStack running?" in last


@pytest.mark.parametrize("command", [["batch.cli", "ls"], ["batch.registry", "ls"], ["batch.cli", "stats"]])
def test_a_bucket_that_does_not_exist_is_named_with_where_it_was_set(aws_settings, command):
    env = {**os.environ, **settings_env(aws_settings), "CLICKSTREAM_BUCKET": "clickstream-lake-typo"}
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                            timeout=120, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "there is no bucket 'clickstream-lake-typo' (set by CLICKSTREAM_BUCKET" in result.stderr.splitlines()[-1]


def test_train_checks_the_registry_before_training_and_table_options_without_a_table(tmp_path):
    # A --table --publish run without credentials trained for two minutes, then failed to publish.
    table = tmp_path / "t.csv"
    table.write_text("x,bought\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")} | NO_AWS
    result = subprocess.run([sys.executable, "-m", "batch.train", "--table", str(table), "--label", "bought", "--publish"],
                            cwd=ROOT, env=env, capture_output=True, encoding="utf-8", timeout=120, check=False)
    assert result.returncode == 1 and "no AWS credentials found" in result.stderr, result.stderr
    assert result.stdout == "", "the table was read (and Spark started) before the check"
    # --label without --table was ignored: the lake was trained on instead.
    result = subprocess.run([sys.executable, "-m", "batch.train", "--label", "bought", "--cv", "5"], cwd=ROOT, env=env,
                            capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert result.returncode == 2 and "--label, --cv: only for feature-table mode" in result.stderr, result.stderr
