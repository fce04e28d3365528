"""Typed configuration from the environment and an optional TOML file.

Every component declares a frozen dataclass of settings. Values come, in rising priority, from the
dataclass defaults, the `[common]` and `[section]` tables of the TOML file named by
``CLICKSTREAM_CONFIG`` (or passed in), environment variables ``CLICKSTREAM_<FIELD>`` (or
``CLICKSTREAM_<SECTION>_<FIELD>``, which wins), and command-line options. A bad value raises
``ConfigError`` naming where it was set (``[common] port``, ``CLICKSTREAM_SCORER_PORT``, ``--port``)
and the form expected, so an operator never has to guess which setting broke a start-up.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
import tomllib
import typing
from pathlib import Path

ENV_PREFIX = "CLICKSTREAM_"
# CLICKSTREAM_* variables that are no setting: read by the LocalStack init hook and the test suite.
NOT_SETTINGS = frozenset({"CONFIG", "CODE_DIR", "PYTHON", "TEST_REAL_AWS"})
log = logging.getLogger(__name__)
_warned: set[str] = set()


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""


# The sections one TOML file may hold, one per component that reads it. A file is shared by all of
# them, so a misspelled section (`[provison]`) would otherwise be ignored by every one in silence.
SECTIONS = ("common", "collector", "enrich", "scorer", "lake", "train", "discount", "provision",
            "web", "summary", "liveview")

# Every key of every component's settings class beyond the shared AwsSettings, by section. `[common]`
# is read by all of them, each with its own class, so a key there is refused only when no component
# knows it (a misspelling); one that only other components know is left to them. common/ must not
# import the components, so the names are listed here; tests/foundation/test_config.py checks the list
# against the classes themselves.
SECTION_KEYS = {section: frozenset(keys.split()) for section, keys in {
    "collector": """host port workers max_concurrent_requests sink linger_ms batch_records batch_bytes sink_timeout_s
        sink_timeout_max_s shutdown_timeout_s spool_dir spool_max_bytes spool_segment_bytes spool_segment_max_age_s fsync fsync_interval_ms retry_after_s
        max_payload_bytes max_request_bytes body_timeout_s bad_payload_keep_bytes trusted_proxy_hops cookie_name cookie_days
        cookie_domains cookie_fallback_domain cookie_secure dnt_cookie_name dnt_cookie_value custom_paths redirect_domains
        cors_max_age_s""",
    "enrich": """registries registry_cache_ttl_s registry_miss_ttl_s pseudonymisation pseudonymisation_key pii_fields ip_anon_octets
        ip_anon_segments geolocation_coarsening geolocation_decimals max_collector_ahead_s internal_domains dedupe_entries dedupe_window_s ua_cache_size max_event_bytes batch_limit
        read_interval_s lease_ms output_timeout_s metrics_port metrics_host log_level""",
    "scorer": """host port run_worker run_api model_name model_poll_s shadow_version emit emit_every_n flush_ms
        session_timeout_s max_sessions replay_max_s dedupe_window drift_window_s prediction_ttl_hours lookup_table batch_limit
        read_interval_s lease_ms output_timeout_s write_threads reload_token log_level""",
    "lake": """lake_flush_seconds lake_flush_bytes lake_flush_records lake_lease_ms lake_batch_limit lake_idle_sleep_s
        lake_read_interval_s lake_retry_s lake_app lake_metrics_port lake_metrics_host log_level""",
    "train": """model_name window_days window_end cache_dir lake_path skip_corrupt_files session_gap_minutes max_session_events
        max_examples_per_session eval_fraction treated_sessions algorithm max_iter max_depth step_size num_trees subsampling_rate
        min_instances_per_node max_bins reg_param elastic_net seed class_weight threshold_objective target_precision parity_tolerance
        auc_floor champion_margin keep_versions spark_master spark_driver_memory spark_shuffle_partitions progress""",
    "discount": """offer_threshold offer_ceiling min_events max_prediction_age_s budget_per_hour check_purchases discount_percent
        offer_ttl_hours holdout_percent
        metrics_host metrics_port batch_limit read_interval_s lease_ms log_level""",
    "provision": """raw_shards enriched_shards bad_shards predictions_shards raw_retention_days bad_retention_days
        lake_retention_days deleted_retention_days stream_retention_hours""",
    "web": "web_host web_port shop_dir tracker_dir",
    "summary": "model_name log_level",
    "liveview": """host port collector_metrics_url enrich_metrics_url scorer_metrics_url loader_metrics_url
        discount_metrics_url model_name poll_s lookback_s rate_window_s sessions_shown sessions_kept
        points_per_session decisions_shown offers_shown offers_scan_limit offers_every_s model_every_s
        count_streams shop_dir tracker_dir log_level""",
}.items()}

# GetRecords returns at most this many records per call; a larger batch_limit fails at run time.
GET_RECORDS_MAX = 10_000


def _convert(key: str, raw: object, kind: type) -> object:
    value = _parse(key, raw, kind)
    # NaN passes every `<= 0` check and then never compares true: an interval of NaN never reads.
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
    if kind is Path and not str(raw).strip():
        raise ConfigError(f"{key}: expected a path, got an empty value")    # Path("") is the working dir
    return value


def _parse(key: str, raw: object, kind: type) -> object:
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    if kind is tuple and isinstance(raw, list) and all(isinstance(item, str) for item in raw):   # a TOML array
        return tuple(raw)
    # A TOML array, table or number for a name would otherwise load as its Python text ("['a', 'b']").
    if kind in (str, Path, tuple) and not isinstance(raw, str):
        expected = "a list of quoted strings" if kind is tuple else "a quoted string"
        raise ConfigError(f"{key}: expected {expected}, got {raw!r}")
    text = str(raw).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text)
        if kind is Path:
            return Path(text)
        if kind is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        return text
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    tuple: "a comma-separated list"}.get(kind, kind.__name__)
        raise ConfigError(f"{key}: expected {expected}, got {raw!r}") from None


def _field_kind(cls: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[field.name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    return hint if isinstance(hint, type) else str


def _read_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"CLICKSTREAM_CONFIG: file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"CLICKSTREAM_CONFIG: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"CLICKSTREAM_CONFIG: {path} is not UTF-8 text, as TOML must be (byte {exc.start}); "
                          "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        bom = " (it starts with a byte-order mark: save it as UTF-8 without one)" \
            if Path(path).read_bytes().startswith(b"\xef\xbb\xbf") else ""
        raise ConfigError(f"CLICKSTREAM_CONFIG: {path} is not valid TOML: {exc}{bom}") from None


def load(cls, *, section: str | None = None, env: typing.Mapping[str, str] | None = None,
         file: Path | str | None = None, **overrides):
    """Build ``cls`` from defaults, then the TOML file's [common] and [section], then the environment,
    then ``overrides`` (command-line options; None means not given)."""
    env = os.environ if env is None else env
    file = file or env.get(ENV_PREFIX + "CONFIG") or None
    data = _read_file(Path(file) if file else None)
    _check_sections(data, section)
    names = {field.name for field in dataclasses.fields(cls)}
    _check_keys(data, section, names)
    _warn_unknown_env(env, names, section)
    # Where each file value was written, so an error sends the operator to the right table.
    from_file = {key: (f"[common] {key}", value) for key, value in data.get("common", {}).items()}
    if section:
        from_file |= {key: (f"[{section}] {key}", value) for key, value in data.get(section, {}).items()}
    values, keys = {}, {}
    for field in dataclasses.fields(cls):
        kind = _field_kind(cls, field)
        env_key = ENV_PREFIX + field.name.upper()
        # CLICKSTREAM_<SECTION>_<FIELD> wins over CLICKSTREAM_<FIELD>, so two components that share
        # a key name (port, host) can be set apart in one environment.
        section_key = f"{ENV_PREFIX}{section.upper().replace('-', '_')}_{field.name.upper()}" if section else None
        if field.name in overrides and overrides[field.name] is not None:
            keys[field.name], raw = _option_for(field.name, overrides[field.name]), overrides[field.name]
        elif section_key and section_key in env:
            keys[field.name], raw = section_key, env[section_key]
        elif env_key in env:
            keys[field.name], raw = env_key, env[env_key]
        elif field.name in from_file:
            keys[field.name], raw = from_file[field.name]
        else:
            continue
        values[field.name] = _convert(keys[field.name], raw, kind)
        _check_common_kinds(keys[field.name], field.name, values[field.name])
    settings = cls(**values)
    try:
        _require_names(settings)
        check = getattr(settings, "validate", None)
        if check:
            check()
    except ConfigError as exc:
        raise ConfigError(_as_set(str(exc), keys)) from None
    return settings


def _check_keys(data: dict, section: str | None, names: set[str]) -> None:
    """Refuse a key no one reads: in [section], one ``cls`` does not have; in [common], one that no
    component has (a key of another component is that component's business)."""
    if section and data.get(section):
        unknown = sorted(set(data[section]) - names)
        if unknown:
            raise ConfigError(f"[{section}] unknown key(s): {_with_hints(unknown, names)}")
    known = names | {field.name for field in dataclasses.fields(AwsSettings)}.union(*SECTION_KEYS.values())
    unknown = sorted(set(data.get("common", {})) - known)
    if unknown:
        raise ConfigError(f"[common] unknown key(s), not a setting of any component: {_with_hints(unknown, known)}")


def _warn_unknown_env(env: typing.Mapping[str, str], names: set[str], section: str | None) -> None:
    """Warn (once per variable) about a CLICKSTREAM_* variable no component reads: a misspelt one
    would otherwise leave its setting at the default without a word. Not an error, as an unknown
    file key is: one environment may serve several versions during a rolling deploy."""
    keys = names | {field.name for field in dataclasses.fields(AwsSettings)}.union(*SECTION_KEYS.values())
    known = {key.upper() for key in keys} | NOT_SETTINGS
    prefixes = {name.upper().replace("-", "_") for name in (*SECTIONS, section) if name}
    known |= {f"{prefix}_{key}" for prefix in prefixes for key in known}
    for variable in env:
        name = variable[len(ENV_PREFIX):] if variable.startswith(ENV_PREFIX) else None
        if name is None or name in known or variable in _warned:
            continue
        _warned.add(variable)
        log.warning("%s is not a setting of any component; ignored",
                    _with_hints([variable], {ENV_PREFIX + key for key in known}))


def _with_hints(unknown: list[str], known: set[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return ", ".join(hints)


def _option_for(name: str, value: object) -> str:
    """How an override was given: the option of the running command line that carries this value
    (``--window-end`` for window_end, ``--port`` for web_port, ``--no-worker`` for run_worker), else
    the bare field name (a value passed in code)."""
    click = sys.modules.get("click")            # not imported: no command line is running
    ctx = click.get_current_context(silent=True) if click else None
    while ctx is not None:
        for param in ctx.command.params:
            if not isinstance(param, click.Option) or not param.name or ctx.params.get(param.name) != value:
                continue
            if param.name == name or name.endswith("_" + param.name):
                if param.is_flag and value is False and param.secondary_opts:
                    return param.secondary_opts[0]
                return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
        ctx = ctx.parent
    return name


_ENV_KEY = re.compile(rf"\b{ENV_PREFIX}([A-Z0-9_]+)\b")


def _as_set(message: str, keys: dict[str, str]) -> str:
    """A component's checks name a setting CLICKSTREAM_<FIELD>; name it as it was actually set
    (``[discount] budget_per_hour`` or ``[common] …`` in the file, ``CLICKSTREAM_DISCOUNT_BUDGET_PER_HOUR``,
    or ``--window-end`` on the command line)."""
    def named(match: re.Match) -> str:
        key = keys.get(match.group(1).lower(), "")
        return key if key.startswith(("[", ENV_PREFIX, "-")) else match.group(0)
    return _ENV_KEY.sub(named, message)


def _check_sections(data: dict, section: str | None) -> None:
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"CLICKSTREAM_CONFIG: {name} must be a [{name}] table of settings, got {table!r}")
        if name not in SECTIONS and name != section:
            raise ConfigError(f"CLICKSTREAM_CONFIG: unknown section [{name}]; "
                              f"the sections are {', '.join(f'[{known}]' for known in SECTIONS)}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A duration setting is named by its unit. Ten years is more than any of them needs; a longer one
# (1e30 s) passed every check and then overflowed a sleep, a timestamp or a cookie date at run time.
DURATION_UNITS = {"_ms": 0.001, "_s": 1, "_seconds": 1, "_minutes": 60, "_hours": 3600, "_days": 86400}
MAX_DURATION_S = 10 * 365 * 86400


def _check_common_kinds(key: str, name: str, value: object) -> None:
    """Checks every component needs for its ports, durations and log level, named by the key that was set."""
    if (name == "port" or name.endswith("_port")) and not 0 <= value <= 65535:
        raise ConfigError(f"{key}: expected a port number from 0 to 65535, got {value!r}")
    unit = next((unit for suffix, unit in DURATION_UNITS.items() if name.endswith(suffix)), None)
    if unit and isinstance(value, (int, float)) and value * unit > MAX_DURATION_S:
        raise ConfigError(f"{key}: expected at most ten years ({MAX_DURATION_S / unit:,.0f}), got {value!r}")
    if name == "log_level" and str(value).upper() not in LOG_LEVELS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")


def require_batch_limit(settings, name: str) -> None:
    """A GetRecords page size: positive and at most what Kinesis allows, named by its key."""
    require_positive(settings, name)
    value = getattr(settings, name)
    if value > GET_RECORDS_MAX:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected at most {GET_RECORDS_MAX:,} (the most records "
                          f"Kinesis GetRecords returns in one call), got {value!r}")


def require_positive(settings, *names: str) -> None:
    """Raise ConfigError for the first named field that is not > 0."""
    for name in names:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected a positive number, got {getattr(settings, name)!r}")


def require_non_negative(settings, *names: str) -> None:
    """Raise ConfigError for the first named field that is below 0."""
    for name in names:
        if getattr(settings, name) < 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected 0 or more, got {getattr(settings, name)!r}")


MIN_LEASE_MS = 1000


def require_renewed_in_time(settings, lease: str, *waits: str) -> None:
    """A worker renews its leases between reads: a wait (a read interval, an idle sleep) of more than
    a third of the lease lets them lapse, and a peer takes its shards while it still reads them."""
    lease_ms = getattr(settings, lease)
    if lease_ms < MIN_LEASE_MS:
        raise ConfigError(f"{ENV_PREFIX}{lease.upper()}: expected at least {MIN_LEASE_MS} ms (a lease renewed "
                          f"several times a second only loads the table), got {lease_ms!r}")
    for name in waits:
        if getattr(settings, name) * 1000 > lease_ms / 3:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected at most a third of {ENV_PREFIX}{lease.upper()} "
                              f"({lease_ms / 3000:g} s), so leases are renewed in time; got {getattr(settings, name)!r}")


def require_at_most(settings, name: str, limit: float, why: str) -> None:
    """Raise ConfigError when a field is above ``limit`` (a value no deployment needs, which would
    fail later, deep inside a thread, or take the disk)."""
    value = getattr(settings, name)
    if value > limit:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected at most {limit:,} ({why}), got {value!r}")


@dataclasses.dataclass(frozen=True)
class AwsSettings:
    """Names of the shared AWS resources; every component reads these."""

    region: str = ""        # empty: AWS_REGION, else boto3's own (AWS_DEFAULT_REGION, the profile's region), else us-east-1 (common.aws.session)
    raw_stream: str = "clickstream-raw"
    enriched_stream: str = "clickstream-enriched"
    bad_stream: str = "clickstream-bad"
    predictions_stream: str = "clickstream-predictions"
    bucket: str = "clickstream-lake"
    lease_table: str = "clickstream-leases"
    predictions_table: str = "clickstream-predictions"
    offers_table: str = "clickstream-offers"


def _require_names(settings) -> None:
    """An empty stream, bucket or table name failed only at the first AWS call, naming no setting."""
    if isinstance(settings, AwsSettings):
        for field in dataclasses.fields(AwsSettings):
            if field.name != "region" and not getattr(settings, field.name).strip():
                raise ConfigError(f"{ENV_PREFIX}{field.name.upper()}: expected a name, got an empty value")
