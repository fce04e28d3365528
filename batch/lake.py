"""The lake: Parquet schema, object names, event conversion, bad rows, reading and the local sync.

Layout (docs/contracts.md "Lake")::

    enriched/date=YYYY-MM-DD/hour=HH/<shard>-<first_seq>-<last_seq>.parquet         (zstd)
    bad/date=YYYY-MM-DD/hour=HH/<shard>-<first_seq>-<last_seq>.jsonl.gz             (bad stream)
    bad/date=YYYY-MM-DD/hour=HH/<shard>-<first_seq>-<last_seq>.loader.jsonl.gz      (rows the loader rejected)
    enriched/date=YYYY-MM-DD/hour=HH/compacted-<hash>.parquet                        (batch.compact)

A name depends only on the shard and the range of sequence numbers, so writing a range again
overwrites the same objects. Enriched events are partitioned by ``collector_tstamp``; bad rows by
the Kinesis arrival time of their record (always present, and stable across replays).
"""
from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.features import parse_ms
from common.logs import first_few
from common.service import gc_paused

log = logging.getLogger(__name__)

LOADER_ARTIFACT = "clickstream-lake-loader"
LOADER_VERSION = "0.1.0"
LOADER_BAD_SCHEMA = "iglu:com.snowplowanalytics.snowplow.badrows/loader_parsing_error/jsonschema/2-0-0"
HOUR_MS = 3_600_000

# ---------------------------------------------------------------------------------------- schema

TIMESTAMPS = ("collector_tstamp", "dvce_created_tstamp", "dvce_sent_tstamp", "derived_tstamp",
              "etl_tstamp", "true_tstamp", "refr_dvce_tstamp")
INTS = ("domain_sessionidx", "page_urlport", "refr_urlport", "pp_xoffset_min", "pp_xoffset_max", "pp_yoffset_min",
        "pp_yoffset_max", "ti_quantity", "br_viewwidth", "br_viewheight", "dvce_screenwidth",
        "dvce_screenheight", "doc_width", "doc_height")
FLOATS = ("se_value", "tr_total", "tr_tax", "tr_shipping", "ti_price")
BOOLS = ("dvce_ismobile", "br_cookies", "br_features_pdf", "br_features_flash", "br_features_java",
         "br_features_director", "br_features_quicktime", "br_features_realplayer", "br_features_windowsmedia",
         "br_features_gears", "br_features_silverlight")
STRINGS = (
    "app_id", "platform", "event", "event_id", "event_fingerprint", "v_tracker", "v_collector", "v_etl",
    "name_tracker", "user_id", "domain_userid", "network_userid", "user_ipaddress", "user_fingerprint", "mac_address",
    "domain_sessionid", "page_url", "page_urlscheme", "page_urlhost", "page_urlpath", "page_urlquery",
    "page_urlfragment", "page_title", "page_referrer", "refr_urlscheme", "refr_urlhost",
    "refr_urlpath", "refr_urlquery", "refr_urlfragment", "refr_medium", "refr_source", "refr_term",
    "mkt_medium", "mkt_source", "mkt_term", "mkt_content", "mkt_campaign", "mkt_clickid", "mkt_network",
    "se_category", "se_action", "se_label", "se_property",
    "tr_orderid", "tr_affiliation", "tr_city", "tr_state", "tr_country", "tr_currency",
    "ti_orderid", "ti_sku", "ti_name", "ti_category", "ti_currency",
    "event_vendor", "event_name", "event_format", "event_version",
    "useragent", "br_name", "br_family", "br_version", "os_name", "os_family", "dvce_type",
    "br_lang", "br_colordepth", "os_timezone", "doc_charset", "refr_domain_userid",
)
JSON_COLUMNS = ("unstruct_event", "contexts", "derived_contexts")

_TYPES = {**{n: pa.timestamp("ms", tz="UTC") for n in TIMESTAMPS}, **{n: pa.int64() for n in INTS},
          **{n: pa.float64() for n in FLOATS}, **{n: pa.bool_() for n in BOOLS},
          **{n: pa.string() for n in STRINGS}}
TYPED_COLUMNS = TIMESTAMPS + INTS + FLOATS + BOOLS + STRINGS

SCHEMA = pa.schema(
    [pa.field(name, _TYPES[name], nullable=name not in ("collector_tstamp", "event_id")) for name in TYPED_COLUMNS]
    + [pa.field(name, pa.string()) for name in JSON_COLUMNS]
    + [pa.field("unstruct_event_schema", pa.string()),
       pa.field("contexts_schemas", pa.list_(pa.string())),
       pa.field("derived_contexts_schemas", pa.list_(pa.string())),
       # Fields the schema does not know yet, as one JSON object: a new field never fails the loader.
       pa.field("extra", pa.string())]
)

# ---------------------------------------------------------------------------------------- names

MIN_PARTITION_MS = int(dt.datetime(1000, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
MAX_PARTITION_MS = int(dt.datetime(9999, 12, 31, 23, tzinfo=dt.UTC).timestamp() * 1000) + 3_600_000


def object_name(shard_id: str, first_seq: str, last_seq: str) -> str:
    """Deterministic for a shard and range, so a replay of the range overwrites, never duplicates."""
    return f"{shard_id}-{first_seq}-{last_seq}"


def partition(hour_start_ms: int) -> str:
    at = dt.datetime.fromtimestamp(hour_start_ms / 1000, tz=dt.UTC)
    return f"date={at:%Y-%m-%d}/hour={at:%H}"


def enriched_key(hour: int, name: str) -> str:
    """``hour`` counts hours since the epoch (collector_tstamp // 1 h)."""
    return f"enriched/{partition(hour * HOUR_MS)}/{name}.parquet"


def bad_key(hour: int, name: str, *, from_loader: bool = False) -> str:
    # The bad stream and the enriched stream have shards of the same ids: a suffix keeps them apart.
    suffix = ".loader.jsonl.gz" if from_loader else ".jsonl.gz"
    return f"bad/{partition(hour * HOUR_MS)}/{name}{suffix}"


# ---------------------------------------------------------------------------------------- bad rows


def payload_text(data: bytes) -> tuple[str, str]:
    """The record as text when it is UTF-8, else base64, so a bad row always keeps the input."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def loader_bad_row(data: bytes, errors: list[dict]) -> dict:
    """A loader_parsing_error 2-0-0 row: a RowDecodingError with ``errors`` (``invalid_value`` or
    ``unhandled`` items, the shapes of Snowplow's schema)."""
    payload, encoding = payload_text(data)
    failure = {"type": "RowDecodingError", "errors": errors}
    if encoding != "utf-8":
        failure["payload_encoding"] = encoding
    return {"schema": LOADER_BAD_SCHEMA,
            "data": {"processor": {"artifact": LOADER_ARTIFACT, "version": LOADER_VERSION},
                     "failure": failure, "payload": payload}}


def unhandled(message: str) -> dict:
    return {"type": "UnhandledRowDecodingError", "message": message}


def invalid_value(key: str, value: object, message: str) -> dict:
    text = "" if value is None else value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return {"type": "InvalidValue", "key": key, "value": text[:1024], "message": message}


def jsonl_gz(rows: Iterable[dict]) -> bytes:
    body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    # mtime=0: the same rows give the same bytes, so a replayed object is identical.
    return gzip.compress(body, compresslevel=6, mtime=0)


# ---------------------------------------------------------------------------------------- conversion


@dataclass
class Converted:
    """Good events as a table in SCHEMA, and rejected inputs as (input index, bad row)."""

    table: pa.Table
    bad: list[tuple[int, dict]] = field(default_factory=list)

    def hours(self) -> dict[int, pa.Table]:
        """The table split by hour of collector_tstamp (hours since the epoch)."""
        if self.table.num_rows == 0:
            return {}
        ms = self.table.column("collector_tstamp").cast(pa.int64()).to_numpy()
        buckets = ms // HOUR_MS
        return {int(h): self.table.filter(pa.array(buckets == h)) for h in np.unique(buckets)}


def _parse_timestamp(value) -> int:
    """Epoch ms from an ISO 8601 string (any precision, any offset; no offset means UTC)."""
    if not isinstance(value, str):
        raise TypeError("expected an ISO 8601 string")
    return parse_ms(value)


def _column(name: str, values: list) -> tuple[pa.Array | None, dict[int, str]]:
    """Build one typed column; on failure, return the offending positions with a reason each."""
    kind = _TYPES[name]
    integral = pa.types.is_integer(kind)
    try:
        if name in TIMESTAMPS:
            return pa.array(values, pa.string()).cast(kind), {}
        if not (integral and any(map(_fractional, values))):
            return pa.array(values, kind), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    if name in TIMESTAMPS:
        # Slow path: fractions beyond ms, other offsets, or junk; only junk is an error.
        millis, errors = [], {}
        for i, value in enumerate(values):
            try:
                millis.append(None if value is None else _parse_timestamp(value))
            except (ValueError, TypeError) as exc:
                errors[i] = f"{name}: {exc}"
                millis.append(None)
        return (pa.array(millis, pa.int64()).cast(kind) if not errors else None), errors
    errors = {}
    for i, value in enumerate(values):
        try:
            if integral and _fractional(value):
                raise ValueError
            pa.array([value], kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            errors[i] = f"{name}: expected {kind}, got {type(value).__name__}"
    return None, errors


def _fractional(value) -> bool:
    # pyarrow would store 2.5 in an int column as 2 without a word: not lossless, so an error here.
    return isinstance(value, float) and not value.is_integer()


def _as_object(value):
    if isinstance(value, (str, bytes)):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


def _json_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def unstruct_schema(value) -> str | None:
    """The event's own schema key; looks inside Snowplow's ``unstruct_event`` wrapper when present."""
    obj = _as_object(value)
    if not isinstance(obj, dict):
        return None
    inner = obj.get("data")
    if "/unstruct_event/" in str(obj.get("schema", "")) and isinstance(inner, dict):
        obj = inner
    schema = obj.get("schema")
    return schema if isinstance(schema, str) else None


def context_schemas(value) -> list[str]:
    """Schema keys of a list of contexts, or of Snowplow's ``{"schema": …/contexts/…, "data": [...]}``."""
    obj = _as_object(value)
    if isinstance(obj, dict):
        obj = obj.get("data")
    if not isinstance(obj, list):
        return []
    return [item["schema"] for item in obj if isinstance(item, dict) and isinstance(item.get("schema"), str)]


_POSITION = {name: i for i, name in enumerate(TYPED_COLUMNS + JSON_COLUMNS)}


def _pivot(events: list[dict]) -> tuple[dict[str, list], list[str | None]]:
    """Rows to column lists in one pass over each event's own keys (cheaper than a lookup per column)."""
    columns = [[None] * len(events) for _ in _POSITION]
    extra: list[str | None] = [None] * len(events)
    position = _POSITION.get
    for row, event in enumerate(events):
        unknown = None
        for key, value in event.items():
            index = position(key)
            if index is None:
                unknown = unknown or {}
                unknown[key] = value
            else:
                columns[index][row] = value
        if unknown:
            extra[row] = orjson.dumps(unknown, option=orjson.OPT_SORT_KEYS).decode()
    return dict(zip(_POSITION, columns)), extra


def _typed_columns(values: dict[str, list]) -> tuple[dict[str, pa.Array], dict[int, list[str]]]:
    arrays, errors = {}, {}
    for name in TYPED_COLUMNS:
        array, bad = _column(name, values[name])
        arrays[name] = array
        for i, reason in bad.items():
            errors.setdefault(i, []).append(reason)
    for name in ("collector_tstamp", "event_id"):
        array = arrays[name]
        if array is not None and array.null_count:
            for i in np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)):
                errors.setdefault(int(i), []).append(f"{name}: missing (never null by contract)")
    stamps = arrays["collector_tstamp"]
    if stamps is not None:
        # The partition names need a four-digit year (date=YYYY-MM-DD).
        millis = stamps.cast(pa.int64()).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero((millis < MIN_PARTITION_MS) | (millis >= MAX_PARTITION_MS)):
            errors.setdefault(int(i), []).append("collector_tstamp: outside the years 1000-9999")
    return arrays, errors


def convert(payloads: list[bytes]) -> Converted:
    """Enriched-event records to a typed table; anything unusable becomes a loader bad row."""
    # Parsing allocates a dict or list per field and never a cycle: see gc_paused.
    with gc_paused():
        return _convert(payloads)


def _convert(payloads: list[bytes]) -> Converted:
    bad: list[tuple[int, dict]] = []
    events, origin = [], []
    for i, data in enumerate(payloads):
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            bad.append((i, loader_bad_row(data, [unhandled(f"not JSON: {exc}")])))
            continue
        if not isinstance(event, dict):
            bad.append((i, loader_bad_row(data, [unhandled("not a JSON object")])))
            continue
        events.append(event)
        origin.append(i)
    values, extra = _pivot(events)
    arrays, errors = _typed_columns(values)
    while errors:
        # Move the offending events to bad rows and convert the rest again: a column that failed
        # on one event hid the checks on its other values (a missing collector_tstamp, say).
        for i in sorted(errors):
            # Each reason reads "<column>: <what is wrong>".
            messages = [invalid_value(m.partition(":")[0], events[i].get(m.partition(":")[0]), m) for m in errors[i]]
            bad.append((origin[i], loader_bad_row(payloads[origin[i]], messages)))
        events = [event for i, event in enumerate(events) if i not in errors]
        origin = [position for i, position in enumerate(origin) if i not in errors]
        values, extra = _pivot(events)
        arrays, errors = _typed_columns(values)
    columns = [arrays[name] for name in TYPED_COLUMNS]
    columns += [pa.array([_json_text(v) for v in values[name]], pa.string()) for name in JSON_COLUMNS]
    columns += [
        pa.array([unstruct_schema(v) for v in values["unstruct_event"]], pa.string()),
        pa.array([context_schemas(v) for v in values["contexts"]], pa.list_(pa.string())),
        pa.array([context_schemas(v) for v in values["derived_contexts"]], pa.list_(pa.string())),
        pa.array(extra, pa.string()),
    ]
    bad.sort(key=lambda item: item[0])
    return Converted(pa.Table.from_arrays(columns, schema=SCHEMA), bad)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{f"clickstream.{k}": str(v) for k, v in metadata.items()}})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


# ---------------------------------------------------------------------------------------- sinks


class S3Sink:
    """Writes lake objects to a bucket; a put either succeeds whole or raises."""

    def __init__(self, s3, bucket: str):
        self.s3 = s3
        self.bucket = bucket

    def put(self, key: str, data: bytes, content_type: str, *, if_absent: bool = False) -> None:
        """``if_absent``: leave an object already there as it is."""
        if not if_absent:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            return
        from common import aws

        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
        except aws.ClientError as exc:
            if not aws.precondition_failed(exc):
                raise


class MemorySink:
    """Keeps objects in a dict: the benchmark's baseline, to price the S3 round trips."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str, *, if_absent: bool = False) -> None:
        if not (if_absent and key in self.objects):
            self.objects[key] = data


# ---------------------------------------------------------------------------------------- reading


def as_date(value: str | dt.date) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(value)


def dates_between(start: str | dt.date, end: str | dt.date) -> list[dt.date]:
    start, end = as_date(start), as_date(end)
    return [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]


def list_objects(s3, bucket: str, prefix: str) -> Iterator[dict]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def list_old_versions(s3, bucket: str, prefix: str) -> Iterator[dict]:
    """Versions that are no longer the object's (deleted or overwritten: the bucket is versioned), with
    their ``Key`` and ``VersionId``. An unversioned bucket has none."""
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        yield from (version for version in page.get("Versions", []) if not version["IsLatest"])


def objects_between(s3, bucket: str, area: str, start: str | dt.date | None = None,
                    end: str | dt.date | None = None, lister=list_objects) -> list[dict]:
    """Objects under ``area`` ("enriched" or "bad") from ``start`` to ``end`` (dates, both included):
    ``end`` alone means everything up to it, ``start`` alone that one day, neither everything.
    ``lister``: ``list_old_versions`` for the earlier versions of the objects there instead."""
    if start is None:
        objects = list(lister(s3, bucket, f"{area}/"))
        last = None if end is None else as_date(end).isoformat()
        return objects if last is None else [obj for obj in objects if key_partition(obj["Key"])[0] <= last]
    days = dates_between(start, end or start)
    return [obj for day in days for obj in lister(s3, bucket, f"{area}/date={day.isoformat()}/")]


def key_partition(key: str) -> tuple[str, str]:
    """("YYYY-MM-DD", "HH") from a lake key."""
    parts = dict(part.split("=", 1) for part in key.split("/") if "=" in part)
    return parts.get("date", ""), parts.get("hour", "")


def read_parquet_object(s3, bucket: str, key: str, columns: list[str] | None = None) -> pa.Table:
    return parquet_table(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), columns)


# What reading a corrupt or cut object raises (OSError: pyarrow's IO errors).
UNREADABLE = (pa.ArrowException, OSError)


def parquet_table(body: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.ParquetFile(io.BytesIO(body)).read(columns=columns)


def read_enriched(s3, bucket: str, start=None, end=None, columns: list[str] | None = None) -> pa.Table:
    """Every enriched event in the range as one table of the union of the files' columns (a column a
    file lacks is null for its rows), values written before their column's promotion lifted from
    ``extra`` (``lift_from_extra``)."""
    read = columns if columns is None or "extra" in columns else [*columns, "extra"]      # to lift from
    tables = [read_parquet_object(s3, bucket, obj["Key"], read)
              for obj in objects_between(s3, bucket, "enriched", start, end) if obj["Key"].endswith(".parquet")]
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    table = lift_from_extra(pa.concat_tables(tables, promote_options="permissive"), columns)
    # A column asked for that no file has is left out, as before the lift.
    return table if columns is None else table.select([name for name in columns if name in table.column_names])


def lift_from_extra(table: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """Values a file written before their column's promotion keeps in ``extra`` (docs/lake.md), moved
    into that column where it is null, converted as the loader does; a value the column cannot hold
    stays in ``extra``. With ``columns``, only into those (a value moved into a column the caller
    then leaves out would be nowhere). A table without such values comes back as it is."""
    if "extra" not in table.column_names or table["extra"].null_count == table.num_rows:
        return table
    extras = [orjson.loads(text) if text else None for text in table["extra"].to_pylist()]
    keys = set().union(*(extra for extra in extras if isinstance(extra, dict)))
    changed = set()
    for name in (name for name in TYPED_COLUMNS if name in keys and (columns is None or name in columns)):
        present = table[name] if name in table.column_names else pa.chunked_array([pa.nulls(table.num_rows, _TYPES[name])])
        empty = present.is_null().to_pylist()
        values = [extra.get(name) if empty[row] and isinstance(extra, dict) else None for row, extra in enumerate(extras)]
        array, errors = _column(name, values)
        if errors:
            values = [None if row in errors else value for row, value in enumerate(values)]
            array, _ = _column(name, values)
        for row in (row for row, value in enumerate(values) if value is not None):
            del extras[row][name]
            changed.add(row)
        lifted = pa.chunked_array([pc.coalesce(present.combine_chunks(), array)])
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, lifted)
        else:
            table = table.append_column(pa.field(name, _TYPES[name]), lifted)
    if not changed:
        return table
    texts = [(orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else None) if row in changed else text
             for row, (extra, text) in enumerate(zip(extras, table["extra"].to_pylist()))]
    return table.set_column(table.column_names.index("extra"), "extra", pa.array(texts, pa.string()))




# ---------------------------------------------------------------------------------------- local sync

MANIFEST = ".sync-manifest.json"
SYNC_THREADS = 8
SYNC_LISTINGS = 3          # listings of a lake that changes under the sync before it gives up
DOWNLOAD_ATTEMPTS = 4      # per file: a body cut off mid-read is fetched again
LAKE_FILE = re.compile(r"enriched/date=\d{4}-\d{2}-\d{2}/hour=\d{2}/[^/.][^/]*\.parquet")


def sync_partitions(bucket: str, start_date: str | dt.date, end_date: str | dt.date, cache_dir: str | Path,
                    *, s3=None, region: str | None = None, progress: bool = True) -> Path:
    """Copy ``enriched/date=…/hour=…`` objects of the date range to ``cache_dir``; return the local root.

    Spark cannot read ``s3a://`` here, so training reads this copy (``spark.read.parquet(root)``
    discovers the date/hour partitions). Objects already cached with the same size and ETag are
    skipped. Every other cached file is removed: those of the range that are gone from S3 (expired,
    erased) and every date outside the range, so the copy never holds more than this range of the
    lake. Files appear atomically (written aside, then renamed). Without ``s3``, the client is built
    for ``region`` (the settings' region; empty: boto3's own).
    """
    from common import aws

    s3 = s3 or aws.client("s3", region)
    cache = Path(cache_dir)
    root = cache / "enriched"
    manifest_path = cache / MANIFEST
    manifest = _read_manifest(manifest_path)
    for listing in range(1, SYNC_LISTINGS + 1):
        objects = _lake_files(objects_between(s3, bucket, "enriched", start_date, end_date))
        todo = [obj for obj in objects if not _cached(cache, manifest, obj)]
        try:
            gone = _download_all(s3, bucket, cache, todo, manifest, progress)
        except BaseException:
            _write_manifest(manifest_path, manifest)      # what was copied before the failure: the next sync resumes
            raise
        if not gone:
            break
        # Deleted or rewritten since the listing: a compaction merged them (into a file written before
        # it deleted them) or an erasure took or rewrote them. The lake changed: list it again, so the
        # copy is one state of it.
        log.info("sync: %d lake file(s) went or changed while they were copied (%s); listing again (%d of %d)", len(gone),
                 first_few(gone), listing, SYNC_LISTINGS)
    else:
        raise OSError(f"the lake kept changing under the sync ({SYNC_LISTINGS} listings): is a compaction or an "
                      "erasure running? Try again once it has finished")
    wanted = {obj["Key"] for obj in objects}
    _drop_unwanted(cache, wanted)
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(manifest_path, {key: entry for key, entry in manifest.items() if key in wanted})
    return root


def _download_all(s3, bucket: str, cache: Path, objects: list[dict], manifest: dict, progress: bool) -> list[str]:
    """Copy ``objects`` into the cache, SYNC_THREADS at a time, adding each to ``manifest`` once whole;
    returns the keys that were gone by then. A lake holds many small files and one GET waits mostly
    on the network: one at a time, a 30-day window of 17,857 files took minutes."""
    from tqdm import tqdm

    with tqdm(total=sum(obj["Size"] for obj in objects), unit="B", unit_scale=True, desc="sync lake",
              disable=not progress) as bar, ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="sync") as pool:
        futures = [pool.submit(_download, s3, bucket, cache, obj) for obj in objects]
        gone = []
        try:
            for future in as_completed(futures):
                obj, digest = future.result()
                if digest is None:
                    gone.append(obj["Key"])
                else:
                    manifest[obj["Key"]] = {"etag": obj["ETag"], "size": obj["Size"], "md5": digest}
                bar.update(obj["Size"])
        except BaseException:
            pool.shutdown(cancel_futures=True)          # the first failure stops the copy
            raise
    return sorted(gone)


def _download(s3, bucket: str, cache: Path, obj: dict) -> tuple[dict, str | None]:
    """Copy one object; with the MD5 of the copy, which later syncs check it against (None: gone)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from common import aws

    target = cache / obj["Key"]
    target.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot: Spark and pyarrow skip hidden files, so a crashed sync leaves nothing they read.
    partial = target.with_name(f".{target.name}.part")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            return obj, _copy(s3, bucket, obj, partial, target)
        except ClientError as exc:
            if aws.no_such_key(exc) or aws.precondition_failed(exc):
                return obj, None
            raise
        except (BotoCoreError, OSError) as exc:
            # A body cut off mid-read (a reset, a read timeout): download_file retried those itself.
            if attempt == DOWNLOAD_ATTEMPTS - 1 or isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            log.info("sync: copying %s failed (%s); trying again", obj["Key"], exc)
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _copy(s3, bucket: str, obj: dict, partial: Path, target: Path) -> str:
    """One GET of the version listed (download_file sent a HEAD first: two round trips a file, most
    lake files being small), hashed as it is written; the copy's MD5. One that changed since (an
    erase, a compaction) fails its If-Match and is listed again."""
    body = s3.get_object(Bucket=bucket, Key=obj["Key"], IfMatch=obj["ETag"])["Body"]
    digest = hashlib.md5(usedforsecurity=False)
    with body, open(partial, "wb") as copy:
        for chunk in body.iter_chunks(1 << 20):
            copy.write(chunk)
            digest.update(chunk)
    os.replace(partial, target)
    return digest.hexdigest()


def _md5(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{MANIFEST}.part")
    partial.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    os.replace(partial, path)          # a full disk leaves the previous manifest whole


def _lake_files(objects: list[dict]) -> list[dict]:
    """The Parquet objects laid out as the loader writes them. A key is a local path here, and S3
    takes any key: one with ``..`` or more folders would be written outside the cache."""
    files, strays = [], []
    for obj in objects:
        if LAKE_FILE.fullmatch(obj["Key"]):
            files.append(obj)
        elif obj["Key"].endswith(".parquet"):
            strays.append(obj["Key"])
    if strays:
        log.warning("sync skipped %d object(s) not laid out as enriched/date=YYYY-MM-DD/hour=HH/<name>.parquet: %s",
                    len(strays), first_few(strays))
    return files


def _read_manifest(path: Path) -> dict:
    """What the last sync copied; empty when there is none or it cannot be read (every file of the
    range is then downloaded again)."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError):
        manifest = None
    return manifest if isinstance(manifest, dict) else {}


def _drop_unwanted(cache: Path, wanted: set[str]) -> None:
    """Remove every cached partition file (a crashed download's hidden ``.part`` too) that is not
    one of the ``wanted`` keys, then the partition folders left empty. Only the local copy is
    walked: dates outside the range cost no S3 listing."""
    partitions = [folder for folder in (cache / "enriched").glob("date=*/hour=*") if folder.is_dir()]
    for partition in partitions:
        for file in partition.iterdir():
            if file.is_file() and file.relative_to(cache).as_posix() not in wanted:
                file.unlink()
        for folder in (partition, partition.parent):
            if not any(folder.iterdir()):
                folder.rmdir()


def _cached(cache: Path, manifest: dict, obj: dict) -> bool:
    """The local copy is the object's, whole: a copy damaged on disk is downloaded again, not
    reported as a corrupt file of the lake at every run. Its MD5 must be the one taken when it was
    copied: a footer that reads fine says nothing of the data pages, and a copy damaged there failed
    every run's Spark job, naming the file as if the lake's were corrupt. (Not the ETag: under SSE-KMS
    or a multipart upload it is not the content's MD5.) A manifest from before the MD5s falls back
    to the footer, and the MD5 is taken then."""
    entry = manifest.get(obj["Key"])
    local = cache / obj["Key"]
    if not (isinstance(entry, dict) and entry.get("etag") == obj["ETag"] and entry.get("size") == obj["Size"]
            and local.exists() and local.stat().st_size == obj["Size"]):
        return False
    if "md5" in entry:
        return entry["md5"] == _md5(local)
    try:
        pq.ParquetFile(local).close()            # the footer: cheap
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        return False
    entry["md5"] = _md5(local)
    return True


if __name__ == "__main__":
    from batch.cli import main

    main()
