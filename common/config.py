"""Typed configuration from the environment and an optional TOML file.

Every component declares a frozen dataclass of settings. Values come, in rising priority, from the
dataclass defaults, the `[section]` of the TOML file named by ``CLICKSTREAM_CONFIG`` (or passed in),
and environment variables ``CLICKSTREAM_<FIELD>`` (or ``CLICKSTREAM_<SECTION>_<FIELD>``, which wins). A bad value raises ``ConfigError`` naming the
key and the form expected, so an operator never has to guess which setting broke a start-up.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from pathlib import Path

ENV_PREFIX = "CLICKSTREAM_"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""


# The sections one TOML file may hold, one per component that reads it. A file is shared by all of
# them, so a misspelled section (`[provison]`) would otherwise be ignored by every one in silence.
SECTIONS = ("common", "collector", "enrich", "scorer", "lake", "train", "discount", "provision",
            "web", "summary", "liveview")


def _convert(key: str, raw: object, kind: type) -> object:
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    if kind is tuple and isinstance(raw, list):          # a TOML array
        return tuple(str(item) for item in raw)
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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"CLICKSTREAM_CONFIG: {path} is not valid TOML: {exc}") from None


def load(cls, *, section: str | None = None, env: typing.Mapping[str, str] | None = None,
         file: Path | str | None = None, **overrides):
    """Build ``cls`` from defaults, then the TOML file section, then the environment, then overrides."""
    env = os.environ if env is None else env
    file = file or env.get(ENV_PREFIX + "CONFIG") or None
    data = _read_file(Path(file) if file else None)
    _check_sections(data, section)
    from_file = {**data.get("common", {}), **(data.get(section, {}) if section else {})}
    values, keys = {}, {}
    for field in dataclasses.fields(cls):
        kind = _field_kind(cls, field)
        env_key = ENV_PREFIX + field.name.upper()
        # CLICKSTREAM_<SECTION>_<FIELD> wins over CLICKSTREAM_<FIELD>, so two components that share
        # a key name (port, host) can be set apart in one environment.
        section_key = f"{ENV_PREFIX}{section.upper().replace('-', '_')}_{field.name.upper()}" if section else None
        if field.name in overrides and overrides[field.name] is not None:
            keys[field.name], raw = field.name, overrides[field.name]
        elif section_key and section_key in env:
            keys[field.name], raw = section_key, env[section_key]
        elif env_key in env:
            keys[field.name], raw = env_key, env[env_key]
        elif field.name in from_file:
            keys[field.name], raw = f"[{section or 'common'}] {field.name}", from_file[field.name]
        else:
            continue
        values[field.name] = _convert(keys[field.name], raw, kind)
        _check_common_kinds(keys[field.name], field.name, values[field.name])
    unknown = set(from_file) - {f.name for f in dataclasses.fields(cls)} - set(data.get("common", {}))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s): {', '.join(sorted(unknown))}")
    settings = cls(**values)
    check = getattr(settings, "validate", None)
    if check:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(_as_set(str(exc), keys)) from None
    return settings


_ENV_KEY = re.compile(rf"\b{ENV_PREFIX}([A-Z0-9_]+)\b")


def _as_set(message: str, keys: dict[str, str]) -> str:
    """A component's checks name a setting CLICKSTREAM_<FIELD>; name it as it was actually set
    (``[discount] budget_per_hour`` in the file, or ``CLICKSTREAM_DISCOUNT_BUDGET_PER_HOUR``)."""
    def named(match: re.Match) -> str:
        key = keys.get(match.group(1).lower(), "")
        return key if key.startswith(("[", ENV_PREFIX)) else match.group(0)
    return _ENV_KEY.sub(named, message)


def _check_sections(data: dict, section: str | None) -> None:
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"CLICKSTREAM_CONFIG: {name} must be a [{name}] table of settings, got {table!r}")
        if name not in SECTIONS and name != section:
            raise ConfigError(f"CLICKSTREAM_CONFIG: unknown section [{name}]; "
                              f"the sections are {', '.join(f'[{known}]' for known in SECTIONS)}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check_common_kinds(key: str, name: str, value: object) -> None:
    """Checks every component needs for its ports and log level, named by the key that was set."""
    if (name == "port" or name.endswith("_port")) and not 0 <= value <= 65535:
        raise ConfigError(f"{key}: expected a port number from 0 to 65535, got {value!r}")
    if name == "log_level" and str(value).upper() not in LOG_LEVELS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")


def require_positive(settings, *names: str) -> None:
    """Raise ConfigError for the first named field that is not > 0."""
    for name in names:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected a positive number, got {getattr(settings, name)!r}")


@dataclasses.dataclass(frozen=True)
class AwsSettings:
    """Names of the shared AWS resources; every component reads these."""

    region: str = ""        # empty: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1 (common.aws.session)
    raw_stream: str = "clickstream-raw"
    enriched_stream: str = "clickstream-enriched"
    bad_stream: str = "clickstream-bad"
    predictions_stream: str = "clickstream-predictions"
    bucket: str = "clickstream-lake"
    lease_table: str = "clickstream-leases"
    predictions_table: str = "clickstream-predictions"
    offers_table: str = "clickstream-offers"
