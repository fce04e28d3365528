"""`lake`: look at the lake, replay fixed bad rows, erase a person's data, merge small files, restore
deleted ones.

    python -m batch.cli ls [--area enriched|bad] [--start D] [--end D] [--files]
    python -m batch.cli stats [--start D] [--end D]
    python -m batch.cli replay-bad [--start D] [--end D] [--type T]... [--from-file F] [--fix mod:func] [--dry-run]
                                   [--rate N] [--rate-mib M] [--give-up-after S] [--unsent-to F]
    python -m batch.cli erase PSEUDONYM... [--from-file F] [--start D] [--end D] [--dry-run]
    python -m batch.cli compact [--start D] [--end D] [--last-days N] [--max-bytes N] [--dry-run]
    python -m batch.cli undelete PREFIX --since TIME [--dry-run]

(``python -m batch.lake …`` is the same.) Bucket and stream names come from the usual ``CLICKSTREAM_*``
settings, section ``[lake]``; ``--bucket`` overrides.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import importlib
import io
import os
import random
import re
import sys
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import click
import orjson
from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from batch import compact, erase, lake, undelete
from batch.loader import LoaderSettings, hard_exit
from common import aws
from common.badrows import raw_record_of
from common.cli import CLI_CONTEXT, AwsGroup, FiniteRange, iso_time
from common.config import ConfigError, load
from common.logs import first_few, first_line
from common.producer import TOO_LARGE, entry_size, kinesis_key
from common.rawkey import record_key
from common.streams import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_RECORD_BYTES, KinesisStream, StreamBackend


@click.group(cls=AwsGroup, context_settings=CLI_CONTEXT, help="Inspect the S3 lake, replay bad rows, erase a person's data, merge small files, restore deleted ones.\n\n"
             "Settings come from CLICKSTREAM_* variables and the [lake] section of the TOML file named "
             "by CLICKSTREAM_CONFIG (docs/lake.md), as the lake loader reads them.")
@click.option("--bucket", help="lake bucket (default: CLICKSTREAM_BUCKET or clickstream-lake)")
@click.pass_context
def lake_cli(ctx: click.Context, bucket: str | None) -> None:
    try:
        settings = load(LoaderSettings, section="lake", bucket=bucket)
    except ConfigError as exc:
        raise click.UsageError(f"config error: {exc}") from None
    ctx.obj = {"settings": settings, "s3": aws.client("s3", settings.region, timeout=30)}


def _date(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A YYYY-MM-DD date, and --start not after --end (checked by whichever of the two comes second)."""
    if value is None:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected a date YYYY-MM-DD, got {value!r}") from None
    other = ctx.params.get("end" if param.name == "start" else "start")
    first, last = (day.isoformat(), other) if param.name == "start" else (other, day.isoformat())
    if first and last and first > last:
        raise click.BadParameter(f"--start {first} is after --end {last}")
    return day.isoformat()


_start = click.option("--start", callback=_date, help="first date, YYYY-MM-DD (default: everything)")
_end = click.option("--end", callback=_date,
                    help="last date, YYYY-MM-DD (default: --start; without --start, everything up to it)")


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


@lake_cli.command("ls", help="Partitions with their file counts and sizes (or every file with --files).")
@click.option("--area", type=click.Choice(["enriched", "bad", "all"]), default="all", show_default=True)
@_start
@_end
@click.option("--files", is_flag=True, help="list every object instead of a line per partition")
@click.pass_obj
def ls_command(obj: dict, area: str, start: str | None, end: str | None, files: bool) -> None:
    settings, s3 = obj["settings"], obj["s3"]
    areas = ["enriched", "bad"] if area == "all" else [area]
    total_files = total_bytes = 0
    for name in areas:
        objects = lake.objects_between(s3, settings.bucket, name, start, end)
        partitions: dict[str, list[int]] = defaultdict(list)
        for item in objects:
            if files:
                click.echo(f"{item['Size']:>12}  {item['Key']}")
            date, hour = lake.key_partition(item["Key"])
            partitions[f"{name}/date={date}/hour={hour}"].append(item["Size"])
        if not files:
            for partition, sizes in sorted(partitions.items()):
                click.echo(f"{partition}  {len(sizes):>5} files  {_human(sum(sizes)):>10}")
        total_files += len(objects)
        total_bytes += sum(item["Size"] for item in objects)
    click.echo(f"total: {total_files} files, {_human(total_bytes)} in s3://{settings.bucket}")


@lake_cli.command("stats", help="Events per day and hour, sessions, duplicates and the bad rate.")
@_start
@_end
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr")
@click.pass_obj
def stats_command(obj: dict, start: str | None, end: str | None, progress: bool) -> None:
    settings, s3 = obj["settings"], obj["s3"]
    events, bad = Counter(), Counter()
    sessions_by_hour: dict[tuple, set] = defaultdict(set)
    sessions, event_ids, rows = set(), set(), 0
    # A file that does not read is named and left out, and the exit code is 1: one corrupt object
    # should not hide the rest of the lake's numbers (nor stop at the first of several).
    unreadable: list[str] = []
    parquet = [o["Key"] for o in lake.objects_between(s3, settings.bucket, "enriched", start, end)
               if o["Key"].endswith(".parquet")]
    bad_keys = _bad_keys(s3, settings.bucket, start, end)
    with tqdm(total=len(parquet) + len(bad_keys), unit="file", desc="reading lake", disable=not progress,
              file=sys.stderr) as bar:
        for key in parquet:
            bar.update()
            try:
                table = lake.read_parquet_object(s3, settings.bucket, key, ["event_id", "domain_sessionid"])
            except lake.UNREADABLE as exc:
                unreadable.append(f"{key}: does not read as Parquet ({first_line(exc)})")
                continue
            hour = lake.key_partition(key)
            events[hour] += table.num_rows
            rows += table.num_rows
            ids = table.column("domain_sessionid").to_pylist()
            sessions_by_hour[hour].update(ids)
            sessions.update(ids)
            event_ids.update(table.column("event_id").to_pylist())
        for key in bad_keys:
            bar.update()
            try:
                bad[lake.key_partition(key)] += sum(1 for _ in _rows_from_object(s3, settings.bucket, key))
            except click.ClickException as exc:
                unreadable.append(exc.message)
    click.echo(f"{'date':<10} {'hour':>4} {'events':>9} {'sessions':>9} {'bad':>7} {'bad rate':>8}")
    for date, hour in sorted(set(events) | set(bad)):
        key = (date, hour)
        click.echo(f"{date:<10} {hour:>4} {events[key]:>9} {len(sessions_by_hour[key] - {None}):>9} "
                   f"{bad[key]:>7} {_rate(bad[key], events[key]):>8}")
    total_bad = sum(bad.values())
    click.echo(f"total: {rows} events, {len(event_ids)} distinct event ids ({rows - len(event_ids)} duplicates), "
               f"{len(sessions - {None})} sessions, {total_bad} bad rows, bad rate {_rate(total_bad, rows)}")
    _exit_if_unreadable(unreadable, f"the counts above leave out these {len(unreadable)} file(s)")


def _exit_if_unreadable(unreadable: Iterable[str], consequence: str) -> None:
    """Name each lake file that did not read, on stderr, and say what that means; then exit 1."""
    unreadable = list(unreadable)
    if unreadable:
        for line in unreadable:
            click.echo(line, err=True)
        click.echo(consequence, err=True)
        sys.exit(1)


def _rate(bad: int, good: int) -> str:
    return f"{100 * bad / (bad + good):.2f}%" if bad + good else "-"


# ------------------------------------------------------------------------------------ replay-bad


def bad_row_type(row: dict) -> str:
    """`schema_violations` from `iglu:com.snowplowanalytics.snowplow.badrows/schema_violations/jsonschema/2-0-0`."""
    parts = str(row.get("schema", "")).split("/")
    return parts[1] if len(parts) > 2 else ""


def _load_fix(spec: str | None) -> Callable[[dict | None, dict], dict | None] | None:
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise click.BadParameter("expected module:function", param_hint="--fix")
    sys.path.insert(0, str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec}: {exc}", param_hint="--fix") from None


def _rows_from_file(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    return _json_lines(str(path), lambda: opener(path, "rb"))


def _rows_from_object(s3, bucket: str, key: str) -> Iterator[dict]:
    """The rows of a bad-row file of the lake: a cut or damaged one is named as a local file is."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return _json_lines(key, lambda: gzip.GzipFile(fileobj=io.BytesIO(body)))


def _bad_keys(s3, bucket: str, start: str | None, end: str | None) -> list[str]:
    return [o["Key"] for o in lake.objects_between(s3, bucket, "bad", start, end) if o["Key"].endswith(".jsonl.gz")]


def _json_lines(source: str, open_lines: Callable[[], IO[bytes]]) -> Iterator[dict]:
    """The rows of a JSON-lines file; a click error naming ``source`` (and the line) when it is cut,
    damaged or not JSON, rather than a traceback or click's bare "Aborted!" (an EOFError)."""
    number = 0
    try:
        with open_lines() as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise click.ClickException(f"{source}, line {number}: not JSON ({exc})") from None
    except (EOFError, OSError, zlib.error) as exc:      # a cut or damaged gzip file (BadGzipFile is an OSError)
        raise click.ClickException(f"{source}: unreadable after line {number} ({exc or type(exc).__name__})") from None


# What no retry can fix: the stream is not there, the caller may not write to it, the request is wrong.
PERMANENT = ("ResourceNotFoundException", "AccessDenied", "ValidationException", "InvalidArgumentException",
             "NoCredentialsError", "KMSAccessDeniedException", "KMSDisabledException", "KMSNotFoundException",
             "KMSInvalidStateException", *aws.BAD_CREDENTIALS)


@dataclass
class Sent:
    """What became of one source file's rows: how many went out, and the positions of those that did
    not, with the last reason; ``stopped`` when the replay gave up (the files after it are not sent).
    ``uncertain`` rows (among ``unsent``) were in a call cut short by Ctrl-C: they may have gone out."""

    delivered: int
    unsent: list[int]
    reason: str = ""
    stopped: bool = False
    uncertain: int = 0


class Replayer:
    """Puts raw records into the stream at a steady pace, retrying throttled entries until they go
    through. It gives up only when no entry has gone through for ``give_up_after`` seconds, or on an
    error no retry can fix, and then says exactly which entries were not sent."""

    def __init__(self, stream: StreamBackend, rows_per_s: float, mib_per_s: float, give_up_after: float, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.stream = stream
        self.rows_per_s = rows_per_s
        self.bytes_per_s = mib_per_s * 1024 * 1024
        self.give_up_after = give_up_after
        self.clock = clock
        self.sleep = sleep
        # Calls of about half a second's worth each, so the pace is even (and a call can hold any record).
        self.call_rows = max(1, min(MAX_BATCH_RECORDS, int(rows_per_s / 2)))
        self.call_bytes = max(MAX_RECORD_BYTES, min(MAX_BATCH_BYTES, int(self.bytes_per_s / 2)))
        self._next_at = 0.0
        self._progress_at: float | None = None

    def _pace(self, rows: int, size: int) -> None:
        now = self.clock()
        if self._next_at > now:
            self.sleep(self._next_at - now)
            now = self._next_at
        self._next_at = now + max(rows / self.rows_per_s, size / self.bytes_per_s)

    def _next_call(self, entries: list[tuple[str, bytes]], pending: deque) -> tuple[list[int], int]:
        call, size = [], 0
        while pending and len(call) < self.call_rows:
            item = entry_size(*entries[pending[0]])
            if call and size + item > self.call_bytes:
                break
            call.append(pending.popleft())
            size += item
        return call, size

    def send(self, entries: list[tuple[str, bytes]]) -> Sent:
        entries = [(kinesis_key(key), data) for key, data in entries]
        too_large = [i for i, (key, data) in enumerate(entries) if entry_size(key, data) > MAX_RECORD_BYTES]
        skip = set(too_large)
        pending = deque(i for i in range(len(entries)) if i not in skip)
        delivered, delay, call, sending = 0, 0.0, [], False
        if self._progress_at is None:
            self._progress_at = self.clock()
        try:
            while pending:
                call, size = self._next_call(entries, pending)
                self._pace(len(call), size)
                sending = True
                try:
                    results = self.stream.put_records([entries[i] for i in call])
                    failed = [(i, f"{r.error_code}: {r.error_message}") for i, r in zip(call, results) if not r.ok]
                except (BotoCoreError, ClientError, OSError) as exc:
                    failed = [(i, f"{type(exc).__name__}: {exc}") for i in call]
                went = len(call) - len(failed)
                sending, call = False, []
                delivered += went
                if went:
                    self._progress_at = self.clock()
                if not failed:
                    delay = 0.0
                    continue
                pending.extendleft(i for i, _ in reversed(failed))
                reason = failed[-1][1]
                if any(code in reason for code in PERMANENT) or self.clock() - self._progress_at >= self.give_up_after:
                    return Sent(delivered, list(pending) + too_large, reason, stopped=True)
                delay = min(2.0, max(0.05, delay * 2))
                self.sleep(random.uniform(delay / 2, delay))     # throttled: back off, jittered
        except KeyboardInterrupt:
            return Sent(delivered, call + list(pending) + too_large, "interrupted", stopped=True,
                        uncertain=len(call) if sending else 0)
        return Sent(delivered, too_large, TOO_LARGE if too_large else "")


@lake_cli.command("replay-bad", help="Put fixed bad rows back into the raw stream, so they are enriched again.")
@_start
@_end
@click.option("--type", "types", multiple=True, help="only these bad-row types (e.g. schema_violations)")
@click.option("--from-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="read bad rows from a local JSON-lines file (.gz too) instead of the lake, e.g. after editing")
@click.option("--fix", "fix_spec", help="module:function(raw_record | None, bad_row) -> raw record or None to skip")
@click.option("--dry-run", is_flag=True, help="count what would be replayed, send nothing")
@click.option("--rate", type=FiniteRange(min=0, min_open=True), default=500, show_default=True,
              help="rows per second at most: a shard takes 1,000 a second, shared with live traffic")
@click.option("--rate-mib", type=FiniteRange(min=0, min_open=True), default=1.0, show_default=True,
              help="MiB per second at most: a shard takes 1 MiB a second, shared with live traffic")
@click.option("--give-up-after", type=FiniteRange(min=0), default=300, show_default=True,
              help="seconds without any row getting through (throttling, an outage) before stopping")
@click.option("--unsent-to", type=click.Path(dir_okay=False, path_type=Path),
              help="where to write the rows not sent, should it stop (default: ./replay-unsent-<UTC time>.jsonl.gz)")
@click.pass_obj
def replay_bad_command(obj: dict, start: str | None, end: str | None, types: tuple[str, ...],
                       from_file: Path | None, fix_spec: str | None, dry_run: bool, rate: float, rate_mib: float,
                       give_up_after: float, unsent_to: Path | None) -> None:
    settings, s3 = obj["settings"], obj["s3"]
    fix = _load_fix(fix_spec)
    rows = ((str(from_file), row) for row in _rows_from_file(from_file)) if from_file else \
        ((key, row) for key in _bad_keys(s3, settings.bucket, start, end)
         for row in _rows_from_object(s3, settings.bucket, key))
    try:
        sources, counts, seen_types = _replayable(rows, types, fix)
    except click.ClickException as exc:         # every row is read before any is sent
        raise click.ClickException(f"{exc.message}; nothing was sent") from None
    ready = sum(len(items) for items in sources.values())
    found = ", ".join(f"{kind} ({n})" for kind, n in sorted(seen_types.items())) or "none"
    if dry_run:
        click.echo(f"bad rows by type: {found}")
    for wanted in sorted(set(types) - set(seen_types)):
        click.echo(f"no bad row of type {wanted!r}; types found: {found}", err=True)
    counts["replayed"] = 0
    if dry_run or not sources:
        _report(counts, settings.raw_stream, dry_run, ready)
        return
    unsent_to = unsent_to or Path(f"replay-unsent-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.jsonl.gz")
    if not os.access(unsent_to.parent, os.W_OK):
        # Checked before sending: rows that do not go through must have somewhere to go (a container's
        # working folder is often read-only or not the app user's).
        raise click.BadParameter(f"cannot write to the folder {unsent_to.parent.absolute()}, where the rows not sent "
                                 "would go: give --unsent-to a writable path. Nothing was sent",
                                 param_hint="--unsent-to")
    stream = KinesisStream(aws.client("kinesis", settings.region), settings.raw_stream)
    unsent = _send_by_source(Replayer(stream, rate, rate_mib, give_up_after), sources, counts)
    if unsent:
        path = _write_unsent(unsent_to, unsent)
        click.echo(f"{len(unsent)} rows were not sent (the {counts['replayed']} others were); they are in {path}. "
                   f"Send exactly those, and nothing twice, with:\n"
                   f"  python -m batch.cli replay-bad --from-file {path}\n"
                   "(without --fix or --type: the file holds the raw records as they were to be sent). Running "
                   "this command again instead would send the rows that went through a second time.", err=True)
        _report(counts, settings.raw_stream, dry_run, ready)
        sys.exit(1)
    _report(counts, settings.raw_stream, dry_run, ready)


# source file -> its rows to replay: (bad row schema, partition key, raw record as JSON)
BySource = dict[str, list[tuple[str, str, bytes]]]


def _replayable(rows: Iterable[tuple[str, object]], types: tuple[str, ...],
                fix: Callable[[dict | None, dict], dict | None] | None) -> tuple[BySource, Counter, Counter]:
    """The rows to replay by source file, in the order read, so a stop can say exactly which files
    went out in full and which rows did not; with the counts of rows left out and of the types seen."""
    sources: BySource = {}
    counts, seen_types = Counter(), Counter()
    for source, row in tqdm(rows, unit="row", desc="bad rows", file=sys.stderr):
        if not isinstance(row, dict) or not isinstance(row.get("data"), dict):
            counts["not replayable"] += 1            # not a bad row at all
            continue
        kind = bad_row_type(row)
        seen_types[kind] += 1
        if types and kind not in types:
            continue
        raw = raw_record_of(row["data"].get("payload"))
        if fix:
            raw = fix(raw, row)
        if raw is None:
            counts["not replayable" if not fix else "skipped by --fix"] += 1
            continue
        sources.setdefault(source, []).append((str(row.get("schema", "")), record_key(raw), orjson.dumps(raw)))
    return sources, counts, seen_types


def _send_by_source(replayer: Replayer, sources: BySource, counts: Counter) -> list[tuple[str, str, bytes, str]]:
    """Send file after file, saying how each went; the rows not sent as (source, schema, raw record,
    reason): on a stop, the rest of its file and every later file."""
    unsent: list[tuple[str, str, bytes, str]] = []
    names = list(sources)
    for number, source in enumerate(names):
        items = sources[source]
        sent = replayer.send([(key, data) for _, key, data in items])
        counts["replayed"] += sent.delivered
        unsent += [(source, items[i][0], items[i][2], sent.reason) for i in sent.unsent]
        if not sent.stopped:
            note = f"; {len(sent.unsent)} not sent: {sent.reason}" if sent.unsent else ""
            click.echo(f"sent {sent.delivered} of {len(items)} rows from {source}{note}")
            continue
        later = names[number + 1:]
        unsent += [(name, schema, data, "not started") for name in later for schema, _, data in sources[name]]
        click.echo(f"stopped at {source}: {sent.delivered} of its {len(items)} rows sent, the rest not "
                   f"({sent.reason}); {len(later)} later file(s) not started", err=True)
        if sent.uncertain:
            click.echo(f"the {sent.uncertain} rows of the call cut short may or may not have gone out; "
                       "they are counted as not sent", err=True)
        break
    return unsent


def _write_unsent(path: Path, unsent: list[tuple[str, str, bytes, str]]) -> Path:
    """The rows not sent, as bad rows ``--from-file`` takes: their raw record (fixed) as the payload."""
    lines = b"".join(orjson.dumps({"schema": schema, "data": {"payload": orjson.loads(data)},
                                   "replay": {"source": source, "reason": reason}}) + b"\n"
                     for source, schema, data, reason in unsent)
    # Written aside, then renamed: a full disk leaves no cut file, and the file these rows were read
    # from (``--unsent-to`` may name it) stays whole until they are all on disk.
    partial = path.with_name(f".{path.name}.part")
    try:
        # Raw records hold IP addresses and cookie ids in clear: readable by their owner only.
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)          # a file already there keeps its mode otherwise
            out.write(gzip.compress(lines) if path.suffix == ".gz" else lines)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):      # a read-only folder refuses this too: the message matters
            partial.unlink(missing_ok=True)
        raise click.ClickException(f"could not write the {len(unsent)} unsent rows to {path}: {exc}; the files "
                                   "sent in full are listed above") from None
    return path


def _report(counts: Counter, stream: str, dry_run: bool, ready: int) -> None:
    verb = f"would replay {ready}" if dry_run else f"replayed {counts['replayed']}"
    others = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()) if why != "replayed" and n)
    click.echo(f"{verb} raw records into {stream}" + (f"; {others}" if others else ""))


PSEUDONYM = re.compile(r"[0-9a-f]{64}")


@lake_cli.command("erase", help="Remove a person's rows from the enriched lake, found by their pseudonyms "
                                "(in user_id, domain_userid, network_userid or any other text column; see "
                                "docs/data-protection.md), "
                                "and delete the predictions and offers of their sessions.")
@click.argument("pseudonyms", nargs=-1)
@click.option("--from-file", type=click.File("r"), help="more pseudonyms, one per line ('-' for stdin)")
@_start
@_end
@click.option("--dry-run", is_flag=True, help="say what would be removed, change nothing")
@click.option("--progress/--no-progress", default=True, help="progress bars on stderr")
@click.pass_obj
def erase_command(obj: dict, pseudonyms: tuple[str, ...], from_file, start: str | None, end: str | None,
                  dry_run: bool, progress: bool) -> None:
    wanted = {p.strip().lower() for p in (*pseudonyms, *(from_file or ())) if p.strip()}
    if not wanted:
        raise click.UsageError("no pseudonyms: give them as arguments or with --from-file")
    malformed = sorted(p for p in wanted if not PSEUDONYM.fullmatch(p))
    if malformed:
        # A clear identifier matches nothing (the lake holds pseudonyms), so a silent "0 rows" would mislead.
        raise click.UsageError(f"{len(malformed)} value(s) are not 64-hex-digit pseudonyms, e.g. {malformed[0][:12]!r}…;"
                               " compute them with the pseudonymisation key (docs/data-protection.md)")
    settings, s3 = obj["settings"], obj["s3"]
    # Held against `compact`, which would otherwise merge a file before or after this rewrote it.
    lock = None if dry_run else compact.LakeLock(s3, settings.bucket, "erase")
    try:
        with lock or contextlib.nullcontext():
            done = erase.erase_lake(s3, settings.bucket, wanted, start=start, end=end, dry_run=dry_run,
                                    progress=progress)
    except compact.LockBusy as exc:
        raise click.ClickException(str(exc)) from None
    if lock and not lock.intact:
        click.echo(f"warning: the lake lock s3://{settings.bucket}/{compact.LOCK_KEY} could not be renewed during "
                   "the erase, so a compaction may have run meanwhile: run this again", err=True)
    dynamodb = aws.client("dynamodb", settings.region, timeout=30)
    sessions = set(done.record["sessions"])     # this run's and any earlier run's
    done.predictions = erase.delete_sessions(dynamodb, settings.predictions_table, sessions, dry_run=dry_run)
    done.offers = erase.delete_sessions(dynamodb, settings.offers_table, sessions, dry_run=dry_run)
    if not dry_run:
        done.record["runs"].append(done.run_summary())
        click.echo(f"recorded in s3://{settings.bucket}/{erase.save_record(s3, settings.bucket, done)}")
    verb = "would remove" if dry_run else "removed"
    for key, rows in sorted(done.files.items()):
        click.echo(f"{key}: {verb} {rows} rows" + (" (no rows left: file deleted)" if key in done.emptied else ""))
    for version, rows in sorted(done.old_versions.items()):
        click.echo(f"{version}: {verb} this earlier version ({rows} of the rows)")
    click.echo(f"{verb} {done.rows} rows in {len(done.files)} files ({done.identities} pseudonyms matched, "
               f"{len(done.sessions)} sessions), {len(done.old_versions)} earlier versions of lake files (kept "
               f"to restore a deleted file), {done.predictions} predictions, {done.offers} offers")
    # Named, since [lake] (or a variable) must name the tables the scorer and discount engine write.
    click.echo(f"(lake s3://{settings.bucket}/enriched/, tables {settings.predictions_table} and {settings.offers_table})")
    if done.files and not dry_run:
        click.echo("note: a lake loader replaying a shard after a crash rewrites its files from the enriched stream; "
                   "run this again once the stream's retention has passed")
    _exit_if_unreadable((f"{key}: does not read as Parquet ({why})" for key, why in sorted(done.unreadable.items())),
                        f"erasure {'would be ' if dry_run else ''}incomplete: {len(done.unreadable)} lake file(s) "
                        "above do not read, and may hold the person's rows; restore a readable version or delete "
                        "every version of each (docs/data-protection.md), then run this again")


@lake_cli.command("undelete", help="Bring back the files under PREFIX of the bucket (models/, enriched/, "
                                   "erasures/, ...) deleted since --since: the bucket keeps a deleted file "
                                   "deleted_retention_days (7; raw/ and bad/ 1). See docs/operations.md.")
@click.argument("prefix")
@click.option("--since", required=True, callback=iso_time, help="ISO time, UTC unless it says: 2026-12-06T10:00")
@click.option("--dry-run", is_flag=True, help="say what would be restored, change nothing")
@click.pass_obj
def undelete_command(obj: dict, prefix: str, since: dt.datetime, dry_run: bool) -> None:
    settings, s3 = obj["settings"], obj["s3"]
    where = f"s3://{settings.bucket}/{prefix}"
    if s3.get_bucket_versioning(Bucket=settings.bucket).get("Status") != "Enabled":
        raise click.ClickException(f"s3://{settings.bucket} is not versioned, so it keeps no deleted file: nothing "
                                   "to restore (python -m infra.provision turns versioning on, for the next time)")
    verb = "would restore" if dry_run else "restored"
    restored = []
    for deleted in undelete.deleted_since(s3, settings.bucket, prefix, since):
        when = f"deleted {deleted.at.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
        if not deleted.restorable:
            click.echo(f"{deleted.key}: {when}, nothing left to restore (kept too long ago, or erased)")
            continue
        if not dry_run:
            undelete.undelete(s3, settings.bucket, deleted)
        click.echo(f"{deleted.key}: {verb} ({when})")
        restored.append(deleted.key)
    click.echo(f"{verb} {len(restored)} files deleted since {since.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ} "
               f"under {where}")
    if any(key.startswith("enriched/") for key in restored):
        click.echo("note: a compaction deletes the files it merged; restored, their events are in the lake twice "
                   "(training reads each event id once)")


@lake_cli.command("compact", help="Merge the small enriched Parquet files of each hour partition into few large "
                                  "ones, only those the lake loader has checkpointed (docs/lake.md).")
@_start
@_end
@click.option("--last-days", type=click.IntRange(min=1), metavar="N",
              help="the last N days (UTC), today included: 8 is today and the seven before; for a "
                   "schedule, instead of --start/--end")
@click.option("--max-bytes", type=click.IntRange(min=1), default=compact.DEFAULT_MAX_BYTES,
              help="input bytes per merged file at most: a busy hour gives several")
@click.option("--dry-run", is_flag=True, help="say what would be merged, change nothing")
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr")
@click.option("--lock-ttl", type=FiniteRange(min=1), default=compact.LOCK_TTL_S,
              help="seconds after which another run may break this run's lake lock, should it die "
                   "(renewed every quarter of it)")
@click.pass_obj
def compact_command(obj: dict, start: str | None, end: str | None, last_days: int | None, max_bytes: int,
                    dry_run: bool, progress: bool, lock_ttl: float) -> None:
    if last_days is not None:
        if start or end:
            raise click.UsageError("--last-days N is instead of --start/--end: give one or the other")
        today = _utc_today()
        start, end = (today - dt.timedelta(days=last_days - 1)).isoformat(), today.isoformat()
    settings, s3 = obj["settings"], obj["s3"]
    try:
        done = compact.compact_lake(s3, settings, start=start, end=end, max_bytes=max_bytes, dry_run=dry_run,
                                    progress=progress, lock_ttl_s=lock_ttl)
    except (compact.LockBusy, compact.LockLost) as exc:
        raise click.ClickException(str(exc)) from None
    _report_compaction(done, dry_run)
    click.echo(f"(s3://{settings.bucket}/enriched/, lease group {settings.lake_app}#{settings.enriched_stream})")
    if done.conflicts or done.failed:
        sys.exit(1)


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _report_compaction(done: compact.Summary, dry_run: bool) -> None:
    verb, deleted = ("would merge", "would delete") if dry_run else ("merged", "deleted")
    size = _human(done.bytes_in) + ("" if dry_run else f" -> {_human(done.bytes_out)}")
    click.echo(f"{verb} {done.partitions} partitions: {done.files_in} files -> {done.files_out} ({size}), "
               f"{done.events} events")
    if done.recovered:
        click.echo(f"{deleted} {len(done.recovered)} files an interrupted run had merged already: "
                   f"{first_few(done.recovered)}")
    if done.settled:
        click.echo(f"{deleted} {len(done.settled)} files changed after they were merged, whose events are all in the "
                   f"merged file (an erase after a killed run): {first_few(done.settled)}")
    if done.held_back:
        click.echo(f"left {len(done.held_back)} files the loader may still rewrite: "
                   + first_few(f"{key} ({why})" for key, why in done.held_back))
    for key, what in done.conflicts:
        click.echo(f"conflict: {key} {what} (see docs/lake.md, Compaction)", err=True)
    for folder, why in done.failed:
        click.echo(f"not merged in {folder}: {why}", err=True)

def main() -> None:
    try:
        code = lake_cli.main(prog_name="python -m batch.cli", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    hard_exit(code)


if __name__ == "__main__":
    main()
