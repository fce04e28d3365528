import dataclasses
import importlib
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from common import aws
from common.config import SECTION_KEYS, SECTIONS, AwsSettings, ConfigError, load, require_positive


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


@pytest.mark.parametrize(("line", "expected"), [
    ('bucket = ["a", "b"]', "expected a quoted string, got ['a', 'b']"),
    ("bucket = 12", "expected a quoted string, got 12"),
    ("bucket = { name = \"a\" }", "expected a quoted string"),
    ('paths = ["/a", 2]', "expected a list of quoted strings"),
])
def test_a_toml_value_of_the_wrong_kind_for_text_is_named_not_loaded_as_its_python_text(tmp_path, line, expected):
    """`bucket = ["a", "b"]` loaded as the bucket name "['a', 'b']"."""
    file = tmp_path / "c.toml"
    file.write_text(f"[example]\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(f"[example] {line.split(' = ')[0]}: {expected}")):
        load(Example, section="example", file=file, env={})
    file.write_text('[example]\nbucket = "lake"\npaths = ["/a", "/b"]\n')
    assert load(Example, section="example", file=file, env={}).paths == ("/a", "/b")


def test_a_variable_no_component_reads_is_warned_about_once_with_a_hint(caplog):
    env = {"CLICKSTREAM_SESION_TIMEOUT_S": "60", "CLICKSTREAM_SCORER_PORT": "9000", "CLICKSTREAM_FLUSH_MS": "5",
           "CLICKSTREAM_CONFIG": "", "OTHER_THING": "x"}
    with caplog.at_level("WARNING", logger="common.config"):
        assert load(Example, env=env).flush_ms == 5
        load(Example, env=env)
    assert [r.getMessage() for r in caplog.records] == [
        ("CLICKSTREAM_SESION_TIMEOUT_S (did you mean CLICKSTREAM_SESSION_TIMEOUT_S?) is not a setting of any "
         "component; ignored")]


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


@pytest.mark.parametrize(("encoding", "says"), [("latin-1", "is not UTF-8 text"), ("utf-16", "is not UTF-8 text"),
                                                ("utf-8-sig", "byte-order mark")])
def test_a_file_saved_in_another_encoding_is_a_config_error_that_says_so(tmp_path, encoding, says):
    """A Latin-1 or UTF-16 file raised UnicodeDecodeError, a traceback naming no file."""
    file = tmp_path / "shop.toml"
    file.write_bytes('[example]\nname = "café"\n'.encode(encoding))
    with pytest.raises(ConfigError, match=f"CLICKSTREAM_CONFIG: {file} .*{says}"):
        load(Example, section="example", file=file, env={})


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
        text = source.read_text(encoding="utf-8")
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


# ----------------------------------------------------------------------------- [common] and where a value came from

def test_a_misspelled_key_in_common_is_refused_naming_it_and_the_section(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[common]\nbukcet = "mine"\n')
    with pytest.raises(ConfigError, match=r"\[common\] unknown key.*bukcet \(did you mean bucket\?\)"):
        load(Example, section="example", file=file, env={})


def test_a_key_in_common_that_another_component_has_is_left_to_it(tmp_path):
    """[common] is shared: the scorer's model_name or a server's port there must not stop the others."""
    file = tmp_path / "c.toml"
    file.write_text('[common]\nbucket = "b"\nmodel_name = "m"\nport = 8090\nflush_ms = 7\n')
    settings = load(Example, section="example", file=file, env={})
    assert (settings.bucket, settings.flush_ms) == ("b", 7)
    assert load(Served, section="web", file=file, env={}).port == 8090


def test_a_key_of_another_component_in_a_components_own_section_is_refused(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[example]\nport = 8090\n")
    with pytest.raises(ConfigError, match=r"\[example\] unknown key\(s\): port"):
        load(Example, section="example", file=file, env={})


def _settings_classes() -> dict[str, type]:
    """Every settings class of the repository, found in the sources (not a hand-kept list)."""
    root = Path(__file__).resolve().parents[2]
    found = {}
    for source in root.glob("*/*.py"):
        for name in re.findall(r"^class (\w+)\(\w*Settings\):", source.read_text(encoding="utf-8"), flags=re.MULTILINE):
            module = importlib.import_module(".".join(source.relative_to(root).with_suffix("").parts))
            found[f"{module.__name__}.{name}"] = getattr(module, name)
    return found


SECTION_OF = {"collector.config.CollectorSettings": "collector", "enrich.config.EnrichSettings": "enrich",
              "scorer.config.ScorerSettings": "scorer", "batch.loader.LoaderSettings": "lake",
              "batch.train_config.TrainSettings": "train", "batch.registry.RegistrySettings": "train",
              "discount.settings.DiscountSettings": "discount", "infra.provision.ProvisionSettings": "provision",
              "demo.web.WebSettings": "web", "demo.summary.SummarySettings": "summary",
              "demo.liveview.LiveViewSettings": "liveview"}


def test_the_keys_common_accepts_are_exactly_those_of_the_settings_classes():
    """common/ cannot import the components, so it lists their keys (SECTION_KEYS); a key added to a
    class and not to the list would be refused in [common], a stale one would let a misspelling by."""
    classes = _settings_classes()
    assert set(classes) == set(SECTION_OF), "a settings class was added or renamed: map it to its section"
    shared = {field.name for field in dataclasses.fields(AwsSettings)}
    for name, cls in classes.items():
        assert issubclass(cls, AwsSettings), name
        own = {field.name for field in dataclasses.fields(cls)} - shared
        assert own == SECTION_KEYS[SECTION_OF[name]], f"{name}: SECTION_KEYS[{SECTION_OF[name]!r}] differs"
    assert set(SECTION_KEYS) == set(SECTIONS) - {"common"}


@pytest.mark.parametrize("file_text, named", [
    ("[common]\nport = 99999\n", "[common] port: expected a port number"),
    ("[common]\nlog_level = 'LOUD'\n", "[common] log_level: expected one of DEBUG"),
    ("[common]\nport = 1\n[web]\nport = 99999\n", "[web] port: expected a port number"),
])
def test_a_bad_value_is_named_by_the_section_it_was_written_in(tmp_path, file_text, named):
    file = tmp_path / "c.toml"
    file.write_text(file_text)
    with pytest.raises(ConfigError) as refused:
        load(Served, section="web", file=file, env={})
    assert str(refused.value).startswith(named)


def test_a_components_own_check_names_a_value_from_common_by_common(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[common]\nflush_ms = 0\n")
    with pytest.raises(ConfigError, match=r"^\[common\] flush_ms: expected a positive number"):
        load(Checked, section="example", file=file, env={})


@dataclasses.dataclass(frozen=True)
class Flagged(Checked):
    web_port: int = 8083
    run_worker: bool = True

    def validate(self):
        super().validate()
        if not self.run_worker:
            raise ConfigError("CLICKSTREAM_RUN_WORKER: refused")


@click.command()
@click.option("--flush-ms", type=int)
@click.option("--port", type=int)
@click.option("--worker/--no-worker", "run_worker", default=None)
def flagged(flush_ms, port, run_worker):
    try:
        load(Flagged, section="example", env={}, flush_ms=flush_ms, web_port=port, run_worker=run_worker)
    except ConfigError as exc:
        click.echo(str(exc))


@pytest.mark.parametrize("args, named", [
    (["--flush-ms", "0"], "--flush-ms: expected a positive number"),           # a component's own check
    (["--port", "70000"], "--port: expected a port number"),                   # the option of web_port
    (["--no-worker"], "--no-worker: refused"),
])
def test_a_value_given_as_an_option_is_named_by_the_option(args, named):
    result = CliRunner().invoke(flagged, args)
    assert result.output.startswith(named), result.output


def test_a_value_passed_in_code_is_named_by_its_field():
    with pytest.raises(ConfigError, match=r"^port: expected a port number"):
        load(Served, env={}, port=70000)


# ----------------------------------------------------------------------------- GetRecords page size

@pytest.mark.parametrize("cls, section, env", [
    ("scorer.config.ScorerSettings", "scorer", {}),
    ("enrich.config.EnrichSettings", "enrich", {"CLICKSTREAM_PSEUDONYMISATION": "false"}),
    ("batch.loader.LoaderSettings", "lake", {}),
    ("discount.settings.DiscountSettings", "discount", {}),
])
def test_a_batch_limit_above_what_getrecords_returns_is_refused_naming_the_key(cls, section, env):
    module, name = cls.rsplit(".", 1)
    settings_class = getattr(importlib.import_module(module), name)
    key = "CLICKSTREAM_LAKE_BATCH_LIMIT" if section == "lake" else f"CLICKSTREAM_{section.upper()}_BATCH_LIMIT"
    with pytest.raises(ConfigError, match=rf"^{key}: expected at most 10,000"):
        load(settings_class, section=section, env=env | {key: "10001"})
    assert load(settings_class, section=section, env=env | {key: "10000"})


# ----------------------------------------------------------------------------- values that pass a sign check and fail later

@pytest.mark.parametrize("env, file_text, named", [
    ({"CLICKSTREAM_RATIO": "nan"}, "", "CLICKSTREAM_RATIO: expected a finite number, got 'nan'"),
    ({"CLICKSTREAM_EXAMPLE_RATIO": "-inf"}, "", "CLICKSTREAM_EXAMPLE_RATIO: expected a finite number"),
    ({}, "[example]\nratio = nan\n", "[example] ratio: expected a finite number, got nan"),
    ({"CLICKSTREAM_FLUSH_MS": str(10**30)}, "", "CLICKSTREAM_FLUSH_MS: expected at most ten years (315,360,000,000)"),
    ({}, "[common]\nflush_ms = 315_360_000_001\n", "[common] flush_ms: expected at most ten years"),
    ({"CLICKSTREAM_BUCKET": ""}, "", "CLICKSTREAM_BUCKET: expected a name, got an empty value"),
    ({}, "[common]\nraw_stream = ' '\n", "[common] raw_stream: expected a name"),
])
def test_nan_endless_durations_and_empty_names_are_refused_naming_the_key(tmp_path, env, file_text, named):
    """NaN passed `<= 0` and then never compared true (a read interval of NaN never read); 1e30 ms
    overflowed a timestamp in a thread that died while the process went on; an empty stream name
    failed at the first AWS call as a parameter error naming no setting."""
    file = tmp_path / "c.toml"
    file.write_text(file_text)
    with pytest.raises(ConfigError) as refused:
        load(Checked, section="example", file=file, env=env)
    assert str(refused.value).startswith(named)
    assert load(Checked, section="example", env={"CLICKSTREAM_FLUSH_MS": "315360000000"}).flush_ms == 315_360_000_000


@pytest.mark.parametrize("cls, section, env, named", [
    ("collector.config.CollectorSettings", "collector", {"CLICKSTREAM_SPOOL_SEGMENT_BYTES": str(10**30)},
     "CLICKSTREAM_SPOOL_SEGMENT_BYTES: expected at most 1,073,741,824"),      # was written out as zeros
    ("collector.config.CollectorSettings", "collector", {"CLICKSTREAM_WORKERS": "100000"},
     "CLICKSTREAM_WORKERS: expected at most 256"),
    ("collector.config.CollectorSettings", "collector", {"CLICKSTREAM_SHUTDOWN_TIMEOUT_S": "-1"},
     "CLICKSTREAM_SHUTDOWN_TIMEOUT_S: expected 0 or more"),
    ("collector.config.CollectorSettings", "collector", {"CLICKSTREAM_SINK_TIMEOUT_MAX_S": "2"},
     "CLICKSTREAM_SINK_TIMEOUT_MAX_S: expected at least sink_timeout_s (5.0)"),
    ("enrich.config.EnrichSettings", "enrich", {"CLICKSTREAM_PSEUDONYMISATION": "false",
                                                "CLICKSTREAM_UA_CACHE_SIZE": str(10**30)},
     "CLICKSTREAM_UA_CACHE_SIZE: expected at most 10,000,000"),
    ("batch.train_config.TrainSettings", "train", {"CLICKSTREAM_AUC_FLOOR": "2"},
     "CLICKSTREAM_AUC_FLOOR: expected a number from 0 to 1"),
    ("discount.settings.DiscountSettings", "discount", {"CLICKSTREAM_MIN_EVENTS": "-1"},
     "CLICKSTREAM_MIN_EVENTS: expected 0 or more"),
    ("demo.liveview.LiveViewSettings", "liveview", {"CLICKSTREAM_LOOKBACK_S": "-1"},
     "CLICKSTREAM_LOOKBACK_S: expected 0 or more"),
])
def test_component_limits_are_checked_at_start_naming_the_key(cls, section, env, named):
    module, name = cls.rsplit(".", 1)
    with pytest.raises(ConfigError, match=f"^{re.escape(named)}"):
        load(getattr(importlib.import_module(module), name), section=section, env=env)


def test_a_bad_setting_in_any_aws_command_is_one_line_and_exit_status_2():
    """`python -m demo` with a blank bucket name ended in a traceback and exit status 1."""
    from common.cli import AwsCommand

    @click.command(cls=AwsCommand)
    def command():
        load(Example, env={"CLICKSTREAM_BUCKET": " "})

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 2, result.output
    assert result.output == "Error: config error: CLICKSTREAM_BUCKET: expected a name, got an empty value\n"


@pytest.mark.parametrize("module, name, lease, wait, extra", [
    ("scorer.config", "ScorerSettings", "lease_ms", "read_interval_s", {}),
    ("enrich.config", "EnrichSettings", "lease_ms", "read_interval_s", {"CLICKSTREAM_PSEUDONYMISATION": "false"}),
    ("batch.loader", "LoaderSettings", "lake_lease_ms", "lake_idle_sleep_s", {}),
    ("discount.settings", "DiscountSettings", "lease_ms", "read_interval_s", {}),
])
def test_a_wait_between_reads_longer_than_a_third_of_the_lease_is_refused(module, name, lease, wait, extra):
    """Leases are renewed between reads: a loader idling 30 s on a 10 s lease lost its shards to a peer
    while it still read them, and both wrote them."""
    settings_class = getattr(importlib.import_module(module), name)
    env = {**extra, f"CLICKSTREAM_{lease.upper()}": "10000"}
    with pytest.raises(ConfigError, match=f"CLICKSTREAM_{wait.upper()}: expected at most a third of "
                                          f"CLICKSTREAM_{lease.upper()} \\(3.33333 s\\)"):
        load(settings_class, env={**env, f"CLICKSTREAM_{wait.upper()}": "30"})
    with pytest.raises(ConfigError, match=f"CLICKSTREAM_{lease.upper()}: expected at least 1000 ms"):
        load(settings_class, env={**extra, f"CLICKSTREAM_{lease.upper()}": "1"})
    assert getattr(load(settings_class, env={**env, f"CLICKSTREAM_{wait.upper()}": "3"}), wait) == 3


@pytest.mark.parametrize("app", ["", "scorer", "enrich"])
def test_the_lake_loaders_lease_group_is_its_own(app):
    """lake_app=scorer shared the scorer's leases and checkpoints: each skipped what the other had read."""
    from batch.loader import LoaderSettings

    with pytest.raises(ConfigError, match="CLICKSTREAM_LAKE_APP: expected a name of its own"):
        load(LoaderSettings, env={"CLICKSTREAM_LAKE_APP": app})


@pytest.mark.parametrize(("given", "refused"), [("nan", "'nan' is not a finite number"), ("inf", "'inf' is not a finite number"),
                                                ("-1", "-1.0 is not in the range x>=0"), ("0.5", None)])
def test_a_float_option_of_any_command_refuses_nan_and_infinity(given, refused):
    """click's FloatRange passes nan (it fails every comparison, bounds included) and inf when open above."""
    from common.cli import FiniteRange

    @click.command()
    @click.option("--minutes", type=FiniteRange(min=0))
    def command(minutes):
        click.echo(f"got {minutes}")

    result = CliRunner().invoke(command, ["--minutes", given])
    assert result.exit_code == (2 if refused else 0)
    assert (refused or "got 0.5") in result.output
