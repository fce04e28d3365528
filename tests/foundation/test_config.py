import dataclasses
import re
from pathlib import Path

import pytest

from common import aws
from common.config import SECTIONS, AwsSettings, ConfigError, load, require_positive


@dataclasses.dataclass(frozen=True)
class Example(AwsSettings):
    flush_ms: int = 200
    ratio: float = 0.5
    enabled: bool = True
    paths: tuple[str, ...] = ("/i",)


def test_defaults_match_the_design():
    settings = load(Example, env={})
    assert (settings.raw_stream, settings.enriched_stream, settings.bad_stream, settings.predictions_stream) == (
        "clickstream-raw", "clickstream-enriched", "clickstream-bad", "clickstream-predictions")
    assert settings.bucket == "clickstream-lake"


def test_region_is_aws_region_unless_set(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert aws.session(load(Example, env={}).region).region_name == "eu-west-1"
    assert aws.session(load(Example, env={"CLICKSTREAM_REGION": "ap-south-1"}).region).region_name == "ap-south-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert aws.session(load(Example, env={}).region).region_name == "us-east-1"


def test_environment_overrides_file_overrides_defaults(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[common]\nbucket = "from-file"\n[example]\nflush_ms = 50\nratio = 0.25\n')
    settings = load(Example, section="example", file=file, env={"CLICKSTREAM_FLUSH_MS": "75"})
    assert settings.bucket == "from-file"
    assert settings.flush_ms == 75
    assert settings.ratio == 0.25


def test_types_are_converted():
    settings = load(Example, env={"CLICKSTREAM_ENABLED": "off", "CLICKSTREAM_PATHS": "/a, /b"})
    assert settings.enabled is False
    assert settings.paths == ("/a", "/b")


@pytest.mark.parametrize("key,value,expected", [
    ("CLICKSTREAM_FLUSH_MS", "soon", "expected an integer"),
    ("CLICKSTREAM_RATIO", "half", "expected a number"),
    ("CLICKSTREAM_ENABLED", "maybe", "expected true or false"),
])
def test_a_bad_value_names_the_key_and_the_form(key, value, expected):
    with pytest.raises(ConfigError) as error:
        load(Example, env={key: value})
    assert key in str(error.value) and expected in str(error.value) and value in str(error.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[example]\nflush_msec = 5\n")
    with pytest.raises(ConfigError, match="flush_msec"):
        load(Example, section="example", file=file, env={})


def test_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Example, env={"CLICKSTREAM_CONFIG": str(tmp_path / "nope.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("[example\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(Example, file=broken, env={})


@dataclasses.dataclass(frozen=True)
class Served:
    port: int = 8080
    metrics_port: int = 0
    log_level: str = "INFO"


@pytest.mark.parametrize("env, named", [
    ({"CLICKSTREAM_PORT": "70000"}, "CLICKSTREAM_PORT: expected a port number from 0 to 65535, got 70000"),
    ({"CLICKSTREAM_WEB_METRICS_PORT": "-1"}, "CLICKSTREAM_WEB_METRICS_PORT: expected a port number"),
    ({"CLICKSTREAM_LOG_LEVEL": "LOUD"}, "CLICKSTREAM_LOG_LEVEL: expected one of DEBUG, INFO, WARNING"),
])
def test_ports_and_log_levels_are_checked_for_every_component_naming_the_key_set(env, named):
    with pytest.raises(ConfigError, match=named):
        load(Served, section="web", env=env)
    assert load(Served, env={"CLICKSTREAM_LOG_LEVEL": "debug", "CLICKSTREAM_PORT": "0"}).port == 0


def test_a_config_path_that_is_a_folder_or_a_key_outside_a_table_is_named(tmp_path):
    with pytest.raises(ConfigError, match="CLICKSTREAM_CONFIG: cannot read"):
        load(Example, env={"CLICKSTREAM_CONFIG": str(tmp_path)})
    flat = tmp_path / "flat.toml"
    flat.write_text("common = 5\n")
    with pytest.raises(ConfigError, match=r"common must be a \[common\] table"):
        load(Example, file=flat, env={})


def test_a_section_variable_wins_over_the_shared_one():
    env = {"CLICKSTREAM_FLUSH_MS": "75", "CLICKSTREAM_EXAMPLE_FLUSH_MS": "20"}
    assert load(Example, section="example", env=env).flush_ms == 20
    assert load(Example, section="other", env=env).flush_ms == 75


def test_a_toml_array_gives_a_tuple(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[example]\npaths = ["/a", "/b"]\n')
    assert load(Example, section="example", file=file, env={}).paths == ("/a", "/b")


def test_a_misspelled_section_is_refused_by_every_component_naming_it(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[common]\nbucket = "b"\n[provison]\nraw_shards = 4\n')
    with pytest.raises(ConfigError, match=r"unknown section \[provison\].*\[provision\]"):
        load(Example, section="scorer", file=file, env={})


def test_every_section_a_component_loads_is_a_known_one():
    root = Path(__file__).resolve().parents[2]
    loaded = set()
    for source in root.glob("*/*.py"):
        text = source.read_text()
        loaded |= set(re.findall(r'section="([a-z_-]+)"', text))
        loaded |= set(re.findall(r'settings_or_exit\(\w+, "([a-z_-]+)"', text))
    assert {"collector", "enrich", "scorer", "lake", "train", "discount", "liveview"} <= loaded
    assert loaded <= set(SECTIONS)


@dataclasses.dataclass(frozen=True)
class Checked(Example):
    def validate(self):
        require_positive(self, "flush_ms")


@pytest.mark.parametrize("env, file_text, named", [
    ({}, "[example]\nflush_ms = 0\n", "[example] flush_ms: expected a positive number"),
    ({"CLICKSTREAM_EXAMPLE_FLUSH_MS": "0"}, "", "CLICKSTREAM_EXAMPLE_FLUSH_MS: expected a positive number"),
    ({"CLICKSTREAM_FLUSH_MS": "-1"}, "", "CLICKSTREAM_FLUSH_MS: expected a positive number"),
])
def test_a_components_own_checks_name_the_key_as_it_was_set(tmp_path, env, file_text, named):
    file = tmp_path / "c.toml"
    file.write_text(file_text)
    with pytest.raises(ConfigError) as refused:
        load(Checked, section="example", file=file, env=env)
    assert str(refused.value).startswith(named)
