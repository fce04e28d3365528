"""The lake format, reading it back (pyarrow, Spark via the local sync), the CLI and replay-bad."""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import io
import logging
import os
import subprocess
import sys
import time

import click
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner

from batch import lake
from batch.cli import lake_cli
from batch.loader import write_bad, write_enriched
from common import aws
from common.badrows import raw_record_of
from common.streams import KinesisStream
from tests.batch.conftest import BASE, ROOT_DIR, event_records, make_bad_row, make_event, make_raw, stream_records
from tests.faults import FaultProxy

# ------------------------------------------------------------------------------ conversion


def test_canonical_columns_are_typed_and_new_fields_go_to_extra():
    event = make_event(1, se_value=3, tr_total=19.99, ti_quantity=2, brand_new_field={"a": 1},
                       derived_tstamp="2026-11-29T09:58:01.123456+01:00")
    converted = lake.convert([orjson.dumps(event)])
    assert converted.bad == []
    row = converted.table.to_pylist()[0]
    assert converted.table.schema.equals(lake.SCHEMA)
    assert converted.table.schema.field("collector_tstamp").type == pa.timestamp("ms", tz="UTC")
    assert row["collector_tstamp"] == dt.datetime(2026, 11, 29, 9, 58, 1, tzinfo=dt.UTC)
    assert row["derived_tstamp"] == dt.datetime(2026, 11, 29, 8, 58, 1, 123000, tzinfo=dt.UTC)
    assert (row["se_value"], row["tr_total"], row["ti_quantity"], row["domain_sessionidx"]) == (3.0, 19.99, 2, 2)
    assert row["dvce_ismobile"] is False and row["page_urlport"] == 443
    assert orjson.loads(row["unstruct_event"]) == event["unstruct_event"]
    assert row["unstruct_event_schema"] == "iglu:com.clickshop/product_view/jsonschema/1-0-0"
    assert row["contexts_schemas"] == ["iglu:com.clickshop/page_type/jsonschema/1-0-0"]
    assert row["derived_contexts"] == "[]" and row["derived_contexts_schemas"] == []
    assert orjson.loads(row["extra"]) == {"brand_new_field": {"a": 1}}


def test_every_field_the_enricher_writes_is_a_typed_column_not_extra():
    # 14 of them (click id and network, MAC address, colour depth, cookie and plugin flags) were only
    # in `extra`: an analyst parsed JSON for them, and `extra` was never null, so it hid new fields.
    from tests.enrich.helpers import enricher, get_record

    hit = {"e": "pv", "p": "web", "tv": "js-4.1.0", "eid": "5b0e3a1c-6d1e-4f55-8c0a-2f9e7d6c5b4a", "aid": "shop",
           "url": "https://shop.test/p?gclid=EAIaIQ&_sp=d0.1764409950123", "mac": "00:1b:44:11:3a:b7", "cd": "24", "cookie": "1",
           "f_pdf": "1", "f_fla": "0", "duid": "d1", "sid": "s1", "vid": "2", "dtm": "1764409955000"}
    good, bad = enricher().process_serialized(get_record(hit))
    assert bad == [] and len(good) == 1
    event = orjson.loads(good[0][1])
    assert event["mkt_clickid"] == "EAIaIQ" and event["br_cookies"] is True and event["mac_address"]
    row = lake.convert([good[0][1]]).table.to_pylist()[0]
    assert row["extra"] is None, row["extra"]
    assert (row["mkt_network"], row["br_colordepth"], row["br_features_pdf"], row["br_features_flash"]) == (
        "Google", "24", True, False)
    assert row["refr_domain_userid"] == event["refr_domain_userid"] and len(event["refr_domain_userid"]) == 64
    assert row["refr_dvce_tstamp"] == dt.datetime(2025, 11, 29, 9, 52, 30, 123000, tzinfo=dt.UTC)


def test_snowplow_wrapped_self_describing_shapes_give_inner_schema_keys():
    inner = {"schema": "iglu:com.clickshop/purchase/jsonschema/1-0-0", "data": {"order_id": "o1"}}
    event = make_event(1, unstruct_event={"schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
                                          "data": inner},
                       contexts={"schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1",
                                 "data": [{"schema": "iglu:a/b/jsonschema/1-0-0", "data": {}}]})
    row = lake.convert([orjson.dumps(event)]).table.to_pylist()[0]
    assert row["unstruct_event_schema"] == inner["schema"]
    assert row["contexts_schemas"] == ["iglu:a/b/jsonschema/1-0-0"]


def loader_row_problems(row: dict) -> list[str]:
    """Where a loader bad row departs from Snowplow's loader_parsing_error 2-0-0 (our reading of it)."""
    failure, problems = row["data"]["failure"], []
    if failure["type"] != "RowDecodingError" or not failure["errors"]:
        problems.append(f"failure type {failure['type']}")
    for error in failure["errors"]:
        shape = {"InvalidValue": {"type", "key", "value", "message"}, "UnhandledRowDecodingError": {"type", "message"}}
        if set(error) != shape.get(error["type"]) or len(error.get("key", "")) > 32 or not all(
                isinstance(value, str) for value in error.values()):
            problems.append(f"error {error}")
    return problems


def test_unusable_records_become_loader_bad_rows_keeping_the_payload():
    good = make_event(1)
    wrong_type = orjson.dumps(make_event(2, domain_sessionidx="three"))
    bad_time = orjson.dumps(make_event(3, collector_tstamp="yesterday"))
    no_id = orjson.dumps(make_event(4, event_id=None))
    payloads = [orjson.dumps(good), b"{oops", wrong_type, b"[1, 2]", bad_time, no_id, b"\xff\x00"]
    converted = lake.convert(payloads)
    assert converted.table.column("event_id").to_pylist() == [good["event_id"]]
    assert [i for i, _ in converted.bad] == [1, 2, 3, 4, 5, 6]
    rows = dict(converted.bad)
    assert all(loader_row_problems(row) == [] for row in rows.values())
    assert rows[1]["data"]["payload"] == "{oops" and "not JSON" in rows[1]["data"]["failure"]["errors"][0]["message"]
    assert rows[2]["data"]["payload"] == wrong_type.decode()
    assert rows[2]["data"]["failure"]["errors"][0] | {"message": ""} == {
        "type": "InvalidValue", "key": "domain_sessionidx", "value": "three", "message": ""}
    assert "domain_sessionidx" in rows[2]["data"]["failure"]["errors"][0]["message"]
    assert "collector_tstamp" in rows[4]["data"]["failure"]["errors"][0]["message"]
    assert "event_id" in rows[5]["data"]["failure"]["errors"][0]["message"]
    assert rows[6]["data"]["failure"]["payload_encoding"] == "base64"
    assert all(row["schema"] == lake.LOADER_BAD_SCHEMA for row in rows.values())


def test_a_fraction_in_an_integer_column_is_a_bad_row_not_rounded():
    whole, fraction = make_event(1, domain_sessionidx=2.0), make_event(2, domain_sessionidx=2.5)
    converted = lake.convert([orjson.dumps(whole), orjson.dumps(fraction)])
    assert converted.table.column("domain_sessionidx").to_pylist() == [2]
    [(position, row)] = converted.bad
    assert position == 1 and "domain_sessionidx" in row["data"]["failure"]["errors"][0]["message"]


@pytest.mark.parametrize("broken", [
    [{"collector_tstamp": "junk"}, {"collector_tstamp": None}],      # the junk hid the missing one
    [{"event_id": 123}, {"event_id": None}],
    [{"domain_sessionidx": 2**63}],                                   # beyond int64
    [{"collector_tstamp": "0000-01-01T00:00:00Z"}],                   # no four-digit partition year
], ids=["junk-and-missing-time", "junk-and-missing-id", "int-overflow", "year-0"])
def test_odd_values_become_bad_rows_and_the_rest_is_written(broken):
    events = [make_event(i, **fields) for i, fields in enumerate(broken)] + [make_event(len(broken))]
    sink = lake.MemorySink()
    write_enriched(sink, "shardId-000000000000", event_records(events), "enriched")
    tables = [pq.read_table(io.BytesIO(body)) for key, body in sink.objects.items() if key.endswith(".parquet")]
    assert [t.column("event_id").to_pylist() for t in tables] == [[events[-1]["event_id"]]]
    bad = [key for key in sink.objects if key.endswith(".loader.jsonl.gz")]
    rows = [orjson.loads(line) for key in bad for line in gzip.decompress(sink.objects[key]).splitlines()]
    assert len(rows) == len(broken)


def test_a_conversion_that_raises_costs_only_its_record(monkeypatch):
    convert = lake.convert

    def breaks_on_poison(payloads):           # stands for a bug no test has found yet
        if any(b"poison" in data for data in payloads):
            raise RuntimeError("unforeseen")
        return convert(payloads)

    monkeypatch.setattr(lake, "convert", breaks_on_poison)
    events = [make_event(1), make_event(2, page_title="poison"), make_event(3)]
    sink = lake.MemorySink()
    assert write_enriched(sink, "shardId-000000000000", event_records(events), "enriched")["events"] == 2
    [bad] = [body for key, body in sink.objects.items() if key.endswith(".loader.jsonl.gz")]
    row = orjson.loads(gzip.decompress(bad))
    assert "poison" in row["data"]["payload"] and loader_row_problems(row) == []
    assert row["data"]["failure"]["errors"][0]["message"] == "RuntimeError: unforeseen"


def test_names_depend_only_on_shard_range_and_hour():
    assert lake.object_name("shardId-000000000001", "49590", "49600") == "shardId-000000000001-49590-49600"
    hour = int(dt.datetime(2026, 11, 29, 23, tzinfo=dt.UTC).timestamp()) // 3600
    assert lake.enriched_key(hour, "s-1-2") == "enriched/date=2026-11-29/hour=23/s-1-2.parquet"
    assert lake.bad_key(hour, "s-1-2") == "bad/date=2026-11-29/hour=23/s-1-2.jsonl.gz"
    assert lake.bad_key(hour, "s-1-2", from_loader=True) == "bad/date=2026-11-29/hour=23/s-1-2.loader.jsonl.gz"


# ------------------------------------------------------------------------------ S3 and reading


def test_a_range_spanning_two_hours_writes_two_readable_files_and_a_replay_overwrites(aws_settings, s3):
    events = [make_event(i, at=BASE + dt.timedelta(minutes=i)) for i in range(4)]  # 09:58 .. 10:01
    records = event_records(events, start=41)
    sink = lake.S3Sink(s3, aws_settings.bucket)
    assert write_enriched(sink, "shardId-000000000001", records, "enriched") == {"events": 4, "bad": 0, "files": 2}
    write_enriched(sink, "shardId-000000000001", records, "enriched")  # the replay after a crash
    keys = sorted(o["Key"] for o in lake.list_objects(s3, aws_settings.bucket, ""))
    assert keys == ["enriched/date=2026-11-29/hour=09/shardId-000000000001-41-44.parquet",
                    "enriched/date=2026-11-29/hour=10/shardId-000000000001-41-44.parquet"]
    body = s3.get_object(Bucket=aws_settings.bucket, Key=keys[1])["Body"].read()
    parquet = pq.ParquetFile(io.BytesIO(body))
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    assert parquet.schema_arrow.metadata[b"clickstream.first_seq"] == b"41"
    table = lake.read_enriched(s3, aws_settings.bucket, "2026-11-29", "2026-11-29")
    assert sorted(table.column("event_id").to_pylist()) == sorted(e["event_id"] for e in events)
    assert lake.read_enriched(s3, aws_settings.bucket, "2026-11-30").num_rows == 0


def test_bad_stream_rows_land_as_gzip_json_lines(aws_settings, s3):
    rows = [make_bad_row(make_raw(i)) for i in range(3)]
    records = stream_records([orjson.dumps(r) for r in rows] + [b"garbage"], shard="shardId-000000000000", start=7)
    write_bad(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", records, "bad")
    key = "bad/date=2026-11-30/hour=09/shardId-000000000000-7-10.jsonl.gz"
    body = s3.get_object(Bucket=aws_settings.bucket, Key=key)["Body"].read()
    lines = [orjson.loads(line) for line in gzip.decompress(body).splitlines()]
    assert lines[:3] == rows
    assert lines[3]["data"]["payload"] == "garbage"


def test_a_bad_stream_row_nested_too_deep_to_write_back_is_wrapped_not_a_stopped_loader(aws_settings, s3):
    """Not from our enricher: orjson reads it but cannot write it, and the loader raised on it at
    every restart."""
    deep, row = b'{"schema":"x","data":' + b"[" * 300 + b"]" * 300 + b"}", make_bad_row(make_raw(0))
    records = stream_records([deep, orjson.dumps(row)], shard="shardId-000000000000", start=7)
    assert write_bad(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", records, "bad")["bad"] == 2
    body = s3.get_object(Bucket=aws_settings.bucket, Key="bad/date=2026-11-30/hour=09/shardId-000000000000-7-8.jsonl.gz")
    lines = [orjson.loads(line) for line in gzip.decompress(body["Body"].read()).splitlines()]
    assert lines[0]["data"]["payload"] == deep.decode() and "nested over 254 levels" in str(lines[0]["data"]["failure"])
    assert lines[1] == row


def test_sync_partitions_copies_skips_cached_and_removes_stale(aws_settings, s3, tmp_path):
    sink = lake.S3Sink(s3, aws_settings.bucket)
    day1 = [make_event(i, at=BASE + dt.timedelta(minutes=i)) for i in range(3)]
    day2 = [make_event(i, at=BASE + dt.timedelta(days=1)) for i in range(2)]
    write_enriched(sink, "shardId-000000000000", event_records(day1, start=1), "enriched")
    write_enriched(sink, "shardId-000000000000", event_records(day2, start=10), "enriched")
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert files == ["date=2026-11-29/hour=09/shardId-000000000000-1-3.parquet",
                     "date=2026-11-29/hour=10/shardId-000000000000-1-3.parquet"]

    # Unchanged objects are not fetched again; a changed one is; one gone from S3 is removed locally.
    changed = "enriched/date=2026-11-29/hour=10/shardId-000000000000-1-3.parquet"
    replacement = lake.convert([orjson.dumps(make_event(9, at=BASE + dt.timedelta(hours=1)))]).table
    s3.put_object(Bucket=aws_settings.bucket, Key=changed, Body=lake.parquet_bytes(replacement))
    s3.delete_object(Bucket=aws_settings.bucket, Key="enriched/date=2026-11-29/hour=09/shardId-000000000000-1-3.parquet")
    lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    now = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert now == ["date=2026-11-29/hour=10/shardId-000000000000-1-3.parquet"]
    local = pq.read_table(root / "date=2026-11-29/hour=10/shardId-000000000000-1-3.parquet")
    assert local.column("event_id").to_pylist() == replacement.column("event_id").to_pylist()
    again = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == again
    assert not list(root.glob("date=2026-11-30/*/*.parquet"))  # outside the range: not copied


def test_a_local_copy_damaged_on_disk_or_a_torn_manifest_is_mended_by_the_next_sync(aws_settings, s3, tmp_path):
    """A cached file zeroed in place (same size) was taken as cached and reported as a corrupt file of
    the lake at every run; a manifest torn by a full disk stopped every later sync."""
    events = [make_event(i, at=BASE + dt.timedelta(minutes=i)) for i in range(3)]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events, start=1),
                   "enriched")
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    cached, *others = sorted(root.rglob("*.parquet"))
    whole = cached.read_bytes()
    cached.write_bytes(whole[:-20] + bytes(20))                   # the footer zeroed, the size kept
    (tmp_path / lake.MANIFEST).write_text('{"enriched/date=2026-11-29/hour=09/shardId-000000000000-1-3.par')
    lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    assert cached.read_bytes() == whole
    assert sorted(orjson.loads((tmp_path / lake.MANIFEST).read_bytes())) == \
        [file.relative_to(tmp_path).as_posix() for file in (cached, *others)]
    assert not list(tmp_path.glob("*.part"))
    # Data pages zeroed, the footer intact: pyarrow opens it, Spark failed on it at every run, naming
    # the file as if the lake's were corrupt.
    cached.write_bytes(whole[:8] + bytes(64) + whole[72:])
    assert pq.ParquetFile(cached).metadata.num_rows > 0                 # the footer reads fine
    lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
    assert cached.read_bytes() == whole


def test_a_sync_that_fails_part_way_resumes_where_it_stopped(aws_settings, s3, tmp_path):
    """Downloads run in parallel; when one fails the sync fails, and the files already copied are in the
    manifest, so the next sync fetches only the rest."""
    sink = lake.S3Sink(s3, aws_settings.bucket)
    for hour in range(12):
        events = [make_event(i, at=BASE + dt.timedelta(hours=hour, minutes=i)) for i in range(2)]
        write_enriched(sink, "shardId-000000000000", event_records(events, start=10 * hour + 1), "enriched")
    keys = sorted(obj["Key"] for obj in lake.objects_between(s3, aws_settings.bucket, "enriched", "2026-11-29"))
    broken, fetched = keys[-1], []

    def fail_one(params, **_):
        if params["Key"] == broken:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": f"denied: {broken}"}}, "GetObject")
        fetched.append(params["Key"])

    s3.meta.events.register("before-parameter-build.s3.GetObject", fail_one)
    with pytest.raises(ClientError, match="AccessDenied"):
        lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, s3=s3, progress=False)
    copied = set(orjson.loads((tmp_path / lake.MANIFEST).read_bytes()))
    assert broken not in copied and copied <= set(fetched)

    s3.meta.events.unregister("before-parameter-build.s3.GetObject", fail_one)
    fetched.clear()
    s3.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: fetched.append(params["Key"]))
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, s3=s3, progress=False)
    assert set(fetched) == set(keys) - copied and broken in fetched
    assert sorted(p.relative_to(tmp_path).as_posix() for p in root.rglob("*.parquet")) == keys
    assert not list(root.rglob(".*.part"))


def test_a_file_merged_or_erased_while_the_sync_copies_is_listed_again_not_a_failure(aws_settings, s3, tmp_path, caplog):
    """A compaction deletes the files it merged (after writing the merged one): a sync that listed
    them before failed on the 404, and nightly training with it."""
    sink = lake.S3Sink(s3, aws_settings.bucket)
    for hour in range(3):
        events = [make_event(i, at=BASE + dt.timedelta(hours=hour, minutes=i)) for i in range(2)]
        write_enriched(sink, "shardId-000000000000", event_records(events, start=10 * hour + 1), "enriched")
    keys = sorted(obj["Key"] for obj in lake.objects_between(s3, aws_settings.bucket, "enriched", "2026-11-29"))
    merged_key = keys[0].rsplit("/", 1)[0] + "/compacted-" + "0" * 32 + ".parquet"
    body = s3.get_object(Bucket=aws_settings.bucket, Key=keys[0])["Body"].read()

    def compaction_meanwhile(params, **_):
        if params["Key"] == keys[0] and not merged:
            merged.append(merged_key)
            s3.put_object(Bucket=aws_settings.bucket, Key=merged_key, Body=body)      # written first,
            s3.delete_object(Bucket=aws_settings.bucket, Key=keys[0])                # then the input goes

    merged: list[str] = []
    s3.meta.events.register("before-parameter-build.s3.GetObject", compaction_meanwhile)
    with caplog.at_level(logging.INFO, logger="batch.lake"):
        root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, s3=s3, progress=False)
    assert merged and "1 lake file(s) went or changed while they were copied" in caplog.text
    assert sorted(p.relative_to(tmp_path).as_posix() for p in root.rglob("*.parquet")) == sorted([merged_key, *keys[1:]])
    assert sorted(orjson.loads((tmp_path / lake.MANIFEST).read_bytes())) == sorted([merged_key, *keys[1:]])


def test_a_file_whose_copy_is_cut_off_mid_read_is_fetched_again(aws_settings, s3, tmp_path):
    """download_file retried a body cut off mid-read (a connection reset); one GET did not, and one
    reset failed the whole training run."""
    from botocore.exceptions import ResponseStreamingError

    sink = lake.S3Sink(s3, aws_settings.bucket)
    write_enriched(sink, "shardId-000000000000", event_records([make_event(i) for i in range(3)], start=1), "enriched")
    cut = []

    def cut_the_first_body(http_response, parsed, **_):
        if not cut:
            cut.append(1)
            body = parsed["Body"]
            parsed["Body"] = type("Cut", (), {
                "__enter__": lambda self: self, "__exit__": lambda self, *a: body.close(),
                "iter_chunks": lambda self, size: (_ for _ in ()).throw(ResponseStreamingError(error="reset by peer"))})()

    s3.meta.events.register("after-call.s3.GetObject", cut_the_first_body)
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, s3=s3, progress=False)
    [copy] = root.rglob("*.parquet")
    assert cut and lake.parquet_table(copy.read_bytes()).num_rows == 3


def test_lifting_from_extra_moves_values_only_into_the_columns_asked_for():
    """Asked for extra but not the promoted column, the value left extra for a column then dropped."""
    import pyarrow as pa

    table = pa.table({"event_id": ["a"], "extra": ['{"mkt_clickid":"c1","x":1}']})
    assert lake.lift_from_extra(table, ["event_id", "extra"]).to_pylist() == table.to_pylist()
    lifted = lake.lift_from_extra(table, ["mkt_clickid", "extra"])
    assert lifted.column("mkt_clickid").to_pylist() == ["c1"] and lifted.column("extra").to_pylist() == ['{"x":1}']


def test_a_file_rewritten_while_the_sync_copies_is_copied_as_it_is_now(aws_settings, s3, tmp_path):
    """An erase rewrites a file between the listing and its copy: the copy must be the version its
    manifest entry names, or the next sync keeps a copy of rows the erase took out."""
    sink = lake.S3Sink(s3, aws_settings.bucket)
    write_enriched(sink, "shardId-000000000000", event_records([make_event(i) for i in range(3)], start=1), "enriched")
    [key] = [obj["Key"] for obj in lake.objects_between(s3, aws_settings.bucket, "enriched", "2026-11-29")]
    kept = lake.parquet_table(s3.get_object(Bucket=aws_settings.bucket, Key=key)["Body"].read()).slice(0, 1)
    erased: list[str] = []

    def erase_meanwhile(params, **_):
        if not erased:
            erased.append(key)
            s3.put_object(Bucket=aws_settings.bucket, Key=key, Body=lake.parquet_bytes(kept))

    s3.meta.events.register("before-parameter-build.s3.GetObject", erase_meanwhile)
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, s3=s3, progress=False)
    [copy] = root.rglob("*.parquet")
    assert erased and lake.parquet_table(copy.read_bytes()).num_rows == 1
    etag = s3.head_object(Bucket=aws_settings.bucket, Key=key)["ETag"]
    assert orjson.loads((tmp_path / lake.MANIFEST).read_bytes())[key]["etag"] == etag


def test_sync_keeps_only_the_range_asked_for(aws_settings, s3, tmp_path):
    sink = lake.S3Sink(s3, aws_settings.bucket)
    for day in range(3):
        events = [make_event(i, at=BASE + dt.timedelta(days=day, minutes=i)) for i in range(2)]
        write_enriched(sink, "shardId-000000000000", event_records(events, start=10 * day + 1), "enriched")
    lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-30", tmp_path, progress=False)
    root = tmp_path / "enriched"
    (root / "date=2026-11-29/hour=09/.crashed-download.parquet.part").write_bytes(b"PAR1 half a file")

    # The window moves on a day: the date it left goes from the cache although the lake still has it,
    # with a crashed download's leftover, its folders and its manifest entries.
    lake.sync_partitions(aws_settings.bucket, "2026-11-30", "2026-12-01", tmp_path, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["date=2026-11-30", "date=2026-12-01"]
    manifest = orjson.loads((tmp_path / lake.MANIFEST).read_bytes())
    assert sorted(lake.key_partition(key)[0] for key in manifest) == ["2026-11-30", "2026-12-01"]

    # A later window drops every earlier date, including one the lake itself has since deleted.
    for obj in lake.objects_between(s3, aws_settings.bucket, "enriched", "2026-11-30"):
        s3.delete_object(Bucket=aws_settings.bucket, Key=obj["Key"])        # expired or erased
    lake.sync_partitions(aws_settings.bucket, "2026-12-05", "2026-12-06", tmp_path, progress=False)
    assert not list(root.rglob("*")) and orjson.loads((tmp_path / lake.MANIFEST).read_bytes()) == {}


def test_sync_writes_nothing_outside_the_cache_whatever_the_keys(aws_settings, s3, tmp_path, caplog):
    """S3 takes any key, and sync makes each a local path: a key with ``..`` was written outside the cache."""
    events = [make_event(i, at=BASE + dt.timedelta(minutes=i)) for i in range(3)]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events, start=1),
                   "enriched")
    body = lake.parquet_bytes(lake.convert([orjson.dumps(event) for event in events]).table)
    strays = ["enriched/date=2026-11-29/../../../escaped.parquet", "enriched/date=2026-11-29/hour=09/deeper/x.parquet",
              "enriched/date=2026-11-29/hour=09/.hidden.parquet"]
    for key in strays:
        s3.put_object(Bucket=aws_settings.bucket, Key=key, Body=body)
    cache = tmp_path / "a" / "b" / "cache"
    with caplog.at_level(logging.WARNING, logger="batch.lake"):
        root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", cache, progress=False)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")) == \
        [f"a/b/cache/enriched/date=2026-11-29/hour={hour}/shardId-000000000000-1-3.parquet" for hour in ("09", "10")]
    assert root == cache / "enriched"
    assert "sync skipped 3 object(s) not laid out as" in caplog.text
    assert all(key in caplog.text for key in strays)


def test_sync_lists_and_downloads_in_the_region_it_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    used = []
    monkeypatch.setattr(lake, "objects_between", lambda s3, *args: used.append(s3.meta.region_name) or [])
    lake.sync_partitions("lake-in-af-south-1", "2026-01-01", "2026-01-01", tmp_path, region="af-south-1",
                         progress=False)
    assert used == ["af-south-1"]


@pytest.mark.spark
def test_spark_reads_the_synced_lake(aws_settings, s3, tmp_path, spark):
    events = [make_event(i, at=BASE + dt.timedelta(minutes=i), session=f"s{i % 3}") for i in range(6)]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path / "cache", progress=False)
    frame = spark.read.parquet(str(root))
    types = dict(frame.dtypes)
    assert (types["collector_tstamp"], types["contexts_schemas"], types["domain_sessionidx"]) == (
        "timestamp", "array<string>", "bigint")
    rows = frame.select("event_id", "hour", "domain_sessionid").collect()
    assert sorted(r.event_id for r in rows) == sorted(e["event_id"] for e in events)
    assert {r.hour for r in rows} == {9, 10}


# ------------------------------------------------------------------------------ CLI


def _cli(settings, *args):
    result = CliRunner().invoke(lake_cli, ["--bucket", settings.bucket, *args],
                                env={"CLICKSTREAM_RAW_STREAM": settings.raw_stream}, catch_exceptions=False)
    return result


def test_ls_and_stats_report_partitions_sessions_and_bad_rate(aws_settings, s3):
    sink = lake.S3Sink(s3, aws_settings.bucket)
    events = [make_event(i, at=BASE + dt.timedelta(minutes=i), session=f"s{i % 2}") for i in range(4)]
    write_enriched(sink, "shardId-000000000000", event_records(events), "enriched")
    write_enriched(sink, "shardId-000000000000", event_records(events[:1]), "enriched")  # a duplicate
    write_bad(sink, "shardId-000000000000", stream_records([orjson.dumps(make_bad_row(make_raw(0)))]), "bad")

    listing = _cli(aws_settings, "ls")
    assert listing.exit_code == 0, listing.output
    assert "enriched/date=2026-11-29/hour=09      2 files" in listing.output
    assert "enriched/date=2026-11-29/hour=10      1 files" in listing.output
    assert "bad/date=2026-11-30/hour=09      1 files" in listing.output
    assert "total: 4 files" in listing.output
    files = _cli(aws_settings, "ls", "--area", "bad", "--files")
    assert "bad/date=2026-11-30/hour=09/shardId-000000000000-1-1.jsonl.gz" in files.output

    stats = _cli(aws_settings, "stats", "--no-progress")
    assert stats.exit_code == 0, stats.output
    assert "2026-11-29   09         3         2       0    0.00%" in stats.output
    assert "total: 5 events, 4 distinct event ids (1 duplicates), 2 sessions, 1 bad rows, bad rate 16.67%" \
        in stats.output


def test_end_alone_reaches_back_and_a_reversed_or_junk_date_is_refused(aws_settings, s3):
    events = [make_event(i, at=BASE + dt.timedelta(days=i)) for i in range(3)]       # 11-29, 11-30, 12-01
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    up_to = _cli(aws_settings, "ls", "--area", "enriched", "--end", "2026-11-30")
    assert "date=2026-11-29" in up_to.output and "date=2026-11-30" in up_to.output
    assert "date=2026-12-01" not in up_to.output
    backwards = _cli(aws_settings, "stats", "--end", "2026-11-30", "--start", "2026-12-01")
    assert backwards.exit_code == 2 and "--start 2026-12-01 is after --end 2026-11-30" in backwards.output
    junk = _cli(aws_settings, "ls", "--start", "yesterday")
    assert junk.exit_code == 2 and "expected a date YYYY-MM-DD" in junk.output


def fix_useragent(raw, row):
    """A --fix hook for the test: drop rows without a raw record, repair the others."""
    if raw is None:
        return None
    return {**raw, "useragent": "fixed"}


def test_replay_bad_puts_fixed_raw_records_into_the_raw_stream(aws_settings, s3):
    raws = [make_raw(i) for i in range(3)]
    # Keyed as the collector keyed them: by the tracker's session id, from the query or the body; an
    # SP-Anonymous record's nil user id would have been one hot shard.
    raws[0]["querystring"] += "&sid=session-0"
    raws[1].update(path="/com.snowplowanalytics.snowplow/tp2", method="POST", querystring=None,
                   network_userid="00000000-0000-0000-0000-000000000000",
                   body='{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",'
                        '"data":[{"e":"pv","sid":"session-1"}]}')
    rows = [make_bad_row(raws[0]), make_bad_row(raws[1], "tracker_protocol_violations", "1-0-0"),
            make_bad_row(raws[2], "enrichment_failures"),
            {"schema": "iglu:com.snowplowanalytics.snowplow.badrows/size_violation/jsonschema/1-0-0",
             "data": {"payload": "truncated…", "failure": {}, "processor": {}}}]
    # A record-level failure carries the raw record itself as the payload.
    rows[1]["data"]["payload"] = raws[1]
    write_bad(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", stream_records([orjson.dumps(r) for r in rows]),
              "bad")

    dry = _cli(aws_settings, "replay-bad", "--dry-run")
    assert "would replay 3 raw records" in dry.output and "1 not replayable" in dry.output
    assert "bad rows by type: enrichment_failures (1), schema_violations (1), size_violation (1), " \
           "tracker_protocol_violations (1)" in dry.output
    typo = _cli(aws_settings, "replay-bad", "--dry-run", "--type", "schema_violation")
    assert "would replay 0" in typo.output and "no bad row of type 'schema_violation'; types found:" in typo.output
    for spec in ("nosuchmodule:fix", "tests.batch.test_lake:nosuchfix"):
        wrong = _cli(aws_settings, "replay-bad", "--fix", spec)
        assert wrong.exit_code == 2 and f"cannot load {spec}" in wrong.output
    result = _cli(aws_settings, "replay-bad", "--type", "schema_violations", "--type", "tracker_protocol_violations",
                  "--fix", "tests.batch.test_lake:fix_useragent")
    assert result.exit_code == 0, result.output
    assert f"replayed 2 raw records into {aws_settings.raw_stream}" in result.output

    stream = KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)
    records = [r for shard in stream.list_shards() for r in stream.reader(shard.shard_id, None).read(100).records]
    got = sorted((orjson.loads(r.data) for r in records), key=lambda r: r["collector_tstamp"])
    assert got == [{**raws[0], "useragent": "fixed"}, {**raws[1], "useragent": "fixed"}]
    assert sorted(r.partition_key for r in records) == ["session-0", "session-1"]


def test_replay_bad_reads_an_edited_file(aws_settings, tmp_path):
    raw = make_raw(5)
    path = tmp_path / "fixed.jsonl.gz"
    path.write_bytes(gzip.compress(orjson.dumps(make_bad_row(raw)) + b"\n"))
    result = _cli(aws_settings, "replay-bad", "--from-file", str(path))
    assert result.exit_code == 0 and "replayed 1 raw records" in result.output
    stream = KinesisStream(aws.client("kinesis"), aws_settings.raw_stream)
    got = [orjson.loads(r.data) for shard in stream.list_shards() for r in stream.reader(shard.shard_id, None).read(10).records]
    assert got == [raw]


def test_replay_bad_counts_rows_that_are_not_bad_rows_and_names_a_broken_line(aws_settings, tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(b'[1, 2]\n{"schema": "x", "data": "text"}\n' + orjson.dumps(make_bad_row(make_raw(6))) + b"\n")
    result = _cli(aws_settings, "replay-bad", "--from-file", str(odd), "--dry-run")
    assert result.exit_code == 0 and "would replay 1" in result.output and "2 not replayable" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(orjson.dumps(make_bad_row(make_raw(7))) + b"\n{oops\n")
    result = CliRunner().invoke(lake_cli, ["--bucket", aws_settings.bucket, "replay-bad", "--from-file", str(broken)])
    assert result.exit_code == 1 and "broken.jsonl, line 2: not JSON" in result.output


def test_replay_bad_names_a_cut_gzip_file_and_the_line_it_got_to(aws_settings, tmp_path):
    """A cut .gz file (a copy stopped by a full disk) ended in click's bare "Aborted!"."""
    rows = b"".join(orjson.dumps(make_bad_row(make_raw(i))) + b"\n" for i in range(50))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(rows)[:-30])
    result = CliRunner().invoke(lake_cli, ["--bucket", aws_settings.bucket, "replay-bad", "--from-file", str(cut),
                                           "--dry-run"])
    assert result.exit_code == 1 and f"{cut}: unreadable after line " in result.output, result.output


HOUR = "date=2026-11-30/hour=09"
ROWS = b"".join(orjson.dumps(make_bad_row(make_raw(i))) + b"\n" for i in range(50))
DAMAGED_BAD_FILES = {            # a lake object's body -> what the error says about it
    "cut": (gzip.compress(ROWS)[:-30], ": unreadable after line "),
    "not-gzip": (b"garbage, not gzip", ": unreadable after line 0 (Not a gzipped file"),
    "not-json": (gzip.compress(ROWS.split(b"\n")[0] + b"\n{oops\n"), ", line 2: not JSON"),
}


def test_stats_names_the_files_that_do_not_read_and_counts_the_rest(aws_settings, s3):
    """A corrupt Parquet object was a pyarrow traceback; a cut bad-row file click's bare "Aborted!"."""
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000",
                   event_records([make_event(i) for i in range(3)]), "enriched")
    _bad_files(s3, aws_settings, 1, 2)
    corrupt = "enriched/date=2026-11-29/hour=09/shardId-000000000001-1-5.parquet"
    s3.put_object(Bucket=aws_settings.bucket, Key=corrupt, Body=b"not parquet")
    for name, (body, _) in DAMAGED_BAD_FILES.items():
        s3.put_object(Bucket=aws_settings.bucket, Key=f"bad/{HOUR}/{name}.jsonl.gz", Body=body)

    stats = _cli(aws_settings, "stats", "--no-progress")
    assert stats.exit_code == 1 and "Traceback" not in stats.output and "Aborted" not in stats.output
    assert "total: 3 events, 3 distinct event ids (0 duplicates), 3 sessions, 2 bad rows" in stats.output
    assert f"{corrupt}: does not read as Parquet (Parquet magic bytes not found" in stats.output
    for name, (_, said) in DAMAGED_BAD_FILES.items():
        assert f"bad/{HOUR}/{name}.jsonl.gz{said}" in stats.output, name
    assert "the counts above leave out these 4 file(s)" in stats.output


@pytest.mark.parametrize("damage", sorted(DAMAGED_BAD_FILES))
def test_replay_bad_names_a_damaged_lake_file_and_sends_nothing(aws_settings, s3, damage):
    """A cut gzip object ended in a bare "Aborted!", a non-gzip one or a broken line in a traceback."""
    _bad_files(s3, aws_settings, 1, 3)          # read first: its rows must not go out either
    body, said = DAMAGED_BAD_FILES[damage]
    key = f"bad/{HOUR}/shardId-000000000001-1-3.jsonl.gz"
    s3.put_object(Bucket=aws_settings.bucket, Key=key, Body=body)
    result = _cli(aws_settings, "replay-bad")
    assert result.exit_code == 1 and "Traceback" not in result.output and "Aborted" not in result.output
    assert f"Error: {key}{said}" in result.output, result.output
    assert result.output.rstrip().endswith("; nothing was sent") and _raw_in_stream(aws_settings) == []


def test_unsent_rows_that_cannot_be_written_leave_the_file_they_were_read_from_whole(tmp_path, monkeypatch):
    from batch import cli

    rows = tmp_path / "unsent.jsonl.gz"
    rows.write_bytes(b"the only copy of the rows")

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli.os, "replace", disk_full)
    with pytest.raises(click.ClickException, match="could not write the 1 unsent rows to .*No space left"):
        cli._write_unsent(rows, [("bad/x.jsonl.gz", "iglu:s/b/jsonschema/1-0-0", b'{"a": 1}', "throttled")])
    assert rows.read_bytes() == b"the only copy of the rows" and sorted(p.name for p in tmp_path.iterdir()) == [
        "unsent.jsonl.gz"]


def _raw_in_stream(settings) -> list[dict]:
    stream = KinesisStream(aws.client("kinesis"), settings.raw_stream)
    return [orjson.loads(r.data) for shard in stream.list_shards()
            for r in stream.reader(shard.shard_id, None).read(1000).records]


def _bad_files(s3, settings, files: int, rows: int) -> list[list[dict]]:
    """``files`` bad-row files of ``rows`` rows each in the lake; their raw records, file by file."""
    raws = [[make_raw(100 * f + i) for i in range(rows)] for f in range(files)]
    for f, file_raws in enumerate(raws):
        write_bad(lake.S3Sink(s3, settings.bucket), f"shardId-00000000000{f}",
                  stream_records([orjson.dumps(make_bad_row(raw)) for raw in file_raws]), "bad")
    return raws


def _replay(settings, proxy, *args):
    env = {"CLICKSTREAM_RAW_STREAM": settings.raw_stream, "AWS_ENDPOINT_URL_KINESIS": proxy.endpoint}
    return CliRunner().invoke(lake_cli, ["--bucket", settings.bucket, "replay-bad", *args], env=env,
                              catch_exceptions=False)


def test_replay_bad_retries_throttled_rows_until_they_go_through(aws_settings, s3):
    [raws] = _bad_files(s3, aws_settings, 1, 6)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.fail_calls = [[0, 1, 2, 3, 4, 5]] * 6 + [[1, 4]]      # a stream at its limit for a while
        result = _replay(aws_settings, proxy)
    assert result.exit_code == 0, result.output
    assert "replayed 6 raw records" in result.output and "sent 6 of 6 rows from bad/" in result.output
    assert sorted(_raw_in_stream(aws_settings), key=lambda r: r["collector_tstamp"]) == raws


def test_replay_bad_stops_at_once_when_the_credentials_are_expired(aws_settings, s3, tmp_path):
    """An expired token was retried until --give-up-after (300 s by default), as if the stream throttled."""
    _bad_files(s3, aws_settings, 1, 3)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        proxy.refuse_next["Kinesis_20131202.PutRecords"] = ["ExpiredTokenException"] * 50
        result = _replay(aws_settings, proxy, "--give-up-after", "60", "--unsent-to", str(tmp_path / "unsent.jsonl.gz"))
    assert result.exit_code == 1 and "ExpiredTokenException" in result.output, result.output
    assert proxy.calls["Kinesis_20131202.PutRecords"] == 1              # not one every 2 s for a minute


def test_replay_bad_checks_where_unsent_rows_would_go_before_sending_anything(aws_settings, s3, tmp_path):
    """In a read-only working folder (a container's) the rows not sent had nowhere to go: a traceback
    from cleaning up, and the rows were lost."""
    _bad_files(s3, aws_settings, 1, 3)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        result = _replay(aws_settings, proxy, "--unsent-to", str(tmp_path / "no-such-folder" / "unsent.jsonl.gz"))
        calls = proxy.put_calls
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot write to the folder" in result.output and "Nothing was sent" in result.output, result.output
    assert calls == 0 and _raw_in_stream(aws_settings) == []


def test_replay_bad_paces_itself(aws_settings, s3):
    _bad_files(s3, aws_settings, 1, 12)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        started = time.monotonic()
        result = _replay(aws_settings, proxy, "--rate", "10")
        took = time.monotonic() - started
        calls = proxy.put_calls
    assert result.exit_code == 0, result.output
    assert calls == 3 and took >= 1.0          # 5 rows a call, a call every half second: 12 rows at 10 a second


def test_replay_bad_that_gives_up_names_what_was_sent_and_writes_exactly_the_rest(aws_settings, s3, tmp_path):
    raws = _bad_files(s3, aws_settings, 3, 3)
    unsent = tmp_path / "unsent.jsonl.gz"
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        # The first file goes out, the second only its first row, then the stream takes nothing more.
        proxy.fail_calls = [[], [1, 2]] + [[0, 1, 2]] * 1000
        result = _replay(aws_settings, proxy, "--give-up-after", "1", "--unsent-to", str(unsent))
    assert result.exit_code == 1
    assert "sent 3 of 3 rows from bad/date=2026-11-30/hour=09/shardId-000000000000-1-3.jsonl.gz" in result.output
    assert "stopped at bad/date=2026-11-30/hour=09/shardId-000000000001-1-3.jsonl.gz: 1 of its 3 rows sent" \
        in result.output and "1 later file(s) not started" in result.output
    assert f"5 rows were not sent (the 4 others were); they are in {unsent}" in result.output
    assert f"replay-bad --from-file {unsent}" in result.output
    assert "replayed 4 raw records" in result.output
    assert unsent.stat().st_mode & 0o777 == 0o600            # raw records: IPs and cookie ids in clear
    sent = raws[0] + raws[1][:1]
    assert sorted(_raw_in_stream(aws_settings), key=lambda r: r["collector_tstamp"]) == sent

    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        again = _replay(aws_settings, proxy, "--from-file", str(unsent))
    assert again.exit_code == 0 and "replayed 5 raw records" in again.output, again.output
    everything = sorted(_raw_in_stream(aws_settings), key=lambda r: r["collector_tstamp"])
    assert everything == sorted((raw for file_raws in raws for raw in file_raws), key=lambda r: r["collector_tstamp"])


def test_replay_bad_into_a_missing_stream_stops_at_once(aws_settings, s3, tmp_path):
    _bad_files(s3, aws_settings, 1, 2)
    missing = dataclasses.replace(aws_settings, raw_stream=aws_settings.raw_stream + "-missing")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        started = time.monotonic()
        result = _replay(missing, proxy, "--unsent-to", str(tmp_path / "unsent.jsonl"))
    assert result.exit_code == 1 and time.monotonic() - started < 30
    assert "ResourceNotFoundException" in result.output and "2 rows were not sent" in result.output
    assert len((tmp_path / "unsent.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_raw_record_of_accepts_the_enricher_payload_shapes():
    raw = make_raw(1)
    assert raw_record_of(raw) == raw
    assert raw_record_of({"record": raw, "parameters": {"e": "pv"}}) == raw
    assert raw_record_of(orjson.dumps(raw).decode()) == raw
    assert raw_record_of("truncated body") is None
    assert raw_record_of({"enriched": {}}) is None


def test_the_module_entry_point_runs_stats_and_exits_zero(aws_settings, s3):
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records([make_event(1)]),
                   "enriched")
    env = {**os.environ, "CLICKSTREAM_BUCKET": aws_settings.bucket}
    result = subprocess.run([sys.executable, "-m", "batch.lake", "stats", "--no-progress"], check=False, env=env,
                            capture_output=True, encoding="utf-8", timeout=60, cwd=ROOT_DIR)
    assert result.returncode == 0, result.stderr
    assert "total: 1 events, 1 distinct event ids (0 duplicates), 1 sessions, 0 bad rows" in result.stdout
