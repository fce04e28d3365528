"""``python -m enrich.cli``: list, lint and try schemas; enrich a file of raw records offline."""
from __future__ import annotations

import gzip
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import orjson
from tqdm import tqdm

from common.badrows import is_bad_row, raw_record_of
from common.cli import CLI_CONTEXT, ConfigFailed
from common.config import ConfigError, load
from common.features import FOLD_SCHEMAS, READ_MAJOR
from enrich.config import EnrichSettings
from enrich.registry import EMBEDDED, Resolver, SchemaKey, SchemaKeyError, lint


def _resolver(registries: str | None) -> Resolver:
    """The registries of --registries, else of the enricher's settings, checked as the enricher checks them."""
    try:
        settings = load(EnrichSettings, section="enrich", pseudonymisation=False, registries=registries)
    except ConfigError as exc:
        raise click.UsageError(f"config error: {exc}") from None
    return Resolver.from_specs(settings.registries)


@click.group(context_settings=CLI_CONTEXT)
def cli() -> None:
    """Schema registry tools and offline enrichment.

    Settings (registries, pii_fields, pseudonymisation_key, ...) come from CLICKSTREAM_* variables and
    the [enrich] section of the TOML file named by CLICKSTREAM_CONFIG (docs/enrich.md lists the keys);
    --registries overrides them.
    """


@cli.command()
@click.option("--registries", help="comma-separated registries (default: CLICKSTREAM_REGISTRIES or embedded)")
def schemas(registries: str | None) -> None:
    """List the schemas of every listable registry (folders; HTTP registries have no listing)."""
    for name, key in _resolver(registries).schemas():
        click.echo(f"{key}\t{name}")


@cli.command("lint")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def lint_command(paths: tuple[Path, ...]) -> None:
    """Lint schema files, or every schema under a registry folder (default: the embedded one)."""
    files: list[tuple[Path, SchemaKey | None, bool]] = []      # path, its key, inside a registry folder
    failed = 0
    for path in paths or (EMBEDDED,):
        if path.is_dir():
            found = sorted(p for p in (path / "schemas").rglob("*") if p.is_file())
            if not found:
                click.echo(f"{path}: no schema files under {path / 'schemas'} (a registry folder holds "
                           "schemas/<vendor>/<name>/<format>/<M-R-A>)")
                failed += 1
            files += [(p, _key_of(p), True) for p in found]
        else:
            files.append((path, _key_of(path), False))
    for path, key, in_registry in files:
        if in_registry and key is None:
            problems = ["not at schemas/<vendor>/<name>/<format>/<M-R-A>: the registry would never serve it"]
        else:
            try:
                problems = lint(orjson.loads(path.read_bytes()), key)
            except orjson.JSONDecodeError as exc:
                problems = [f"not JSON: {exc}"]
        for problem in problems:
            click.echo(f"{path}: {problem}")
        failed += bool(problems)
        if key is not None and (key.vendor, key.name) in FOLD_SCHEMAS and not key.version.startswith(READ_MAJOR):
            click.echo(f"{path}: note: the feature fold reads the fields of version 1-*-* of {key.vendor}/{key.name}; "
                       f"events of {key.version} count by name only until it learns them (docs/training.md)")
    click.echo(f"{len(files)} schema(s), {failed} with problems")
    sys.exit(1 if failed else 0)


def _key_of(path: Path) -> SchemaKey | None:
    try:
        return SchemaKey.from_path(path)
    except SchemaKeyError:
        return None


@cli.command()
@click.argument("schema_key")
@click.argument("data", default="-")
@click.option("--registries", help="comma-separated registries (default: CLICKSTREAM_REGISTRIES or embedded)")
def validate(schema_key: str, data: str, registries: str | None) -> None:
    """Validate DATA (JSON text, @file, or - for stdin) against SCHEMA_KEY."""
    try:
        # Bytes: JSON is UTF-8 whatever the locale says.
        text = sys.stdin.buffer.read() if data == "-" else Path(data[1:]).read_bytes() if data.startswith("@") else data
    except OSError as exc:
        raise click.ClickException(f"cannot read {data[1:]}: {exc.strerror or exc}") from None
    try:
        instance = orjson.loads(text)
        errors = _resolver(registries).validate(schema_key, instance)
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"data is not JSON: {exc}")
    except SchemaKeyError as exc:
        raise click.ClickException(str(exc))
    except LookupError as exc:
        raise click.ClickException(f"{schema_key} not found: {orjson.dumps(exc.args[0]).decode()}")
    for error in errors:
        click.echo(f"invalid: {error}")
    if errors:
        sys.exit(1)
    click.echo("valid")


@cli.command()
@click.argument("raw_file", type=click.File("rb"))
@click.option("--good", "good_file", type=click.File("wb"), default="-", help="enriched events (JSON lines)")
@click.option("--bad", "bad_file", type=click.File("wb"), default="-", help="bad rows (JSON lines)")
def process(raw_file, good_file, bad_file) -> None:
    """Enrich a file of raw records (one JSON per line, gzip or not), e.g. to check a replay before
    sending it. Bad rows (a file `python -m batch.cli` downloaded, or replay-bad's unsent rows) are
    read for the raw record they carry, as replay-bad sends it. Counts go to stderr."""
    from enrich.pipeline import Enricher

    try:
        enricher = Enricher(load(EnrichSettings, section="enrich"))
    except ConfigError as exc:
        raise ConfigFailed(exc) from None
    counts = dict.fromkeys(("records", "from bad rows", "bad rows without a record", "events", "bad rows"), 0)
    for line in tqdm(_lines(raw_file), unit="record", disable=None):
        record = _raw_record(line, counts)
        if record is None:
            continue
        counts["records"] += 1
        events, rows = enricher.process(record)
        for _, event in events:
            good_file.write(orjson.dumps(event) + b"\n")
        for row in rows:
            bad_file.write(orjson.dumps(row) + b"\n")
        counts["events"] += len(events)
        counts["bad rows"] += len(rows)
    click.echo(", ".join(f"{count} {what}" for what, count in counts.items()), err=True)


def _lines(file) -> Iterator[bytes]:
    """The file's non-empty lines, gunzipped when it is gzip."""
    if file.peek(2)[:2] == b"\x1f\x8b":       # gzip's magic number (click opens files buffered)
        file = gzip.GzipFile(fileobj=file)
    return (line.rstrip(b"\n") for line in file if line.strip())


def _raw_record(line: bytes, counts: dict[str, int]) -> bytes | None:
    """The raw record of a line: the line itself, or the record a bad row carries (None: it has none)."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line                     # not JSON: the enricher says so in a bad row of its own
    if not is_bad_row(row):
        return line
    data = row.get("data")
    record = raw_record_of(data.get("payload")) if isinstance(data, dict) else None
    counts["from bad rows" if record is not None else "bad rows without a record"] += 1
    return orjson.dumps(record) if record is not None else None


if __name__ == "__main__":
    cli()
