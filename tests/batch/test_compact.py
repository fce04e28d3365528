"""`lake compact` against the emulator: every event once after merging, checkpointed ranges only, a
killed run completed by the next, late files merged without duplicates, erase and compaction in turn."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from batch import compact, erase, lake
from batch.cli import lake_cli
from batch.loader import build, write_enriched
from batch.train_lake import Window, spark_paths, window_files
from common import aws
from common.leases import DynamoLeaseTable
from common.streams import SHARD_END
from tests.batch.conftest import BASE, ROOT_DIR, event_records, lake_keys, loader_settings, make_event, put_events
from tests.conftest import settings_env, wait_for
from tests.faults import FaultProxy

SHARD0, SHARD1 = "shardId-000000000000", "shardId-000000000001"
HOUR9 = "enriched/date=2026-11-29/hour=09"


def _compact(settings, *args):
    return CliRunner().invoke(lake_cli, ["--bucket", settings.bucket, "compact", "--no-progress", *args],
                              env=settings_env(settings), catch_exceptions=False)


def _checkpoint(settings, shard: str, sequence: str) -> None:
    """The loader's lease row for ``shard`` as a flush leaves it: checkpointed at ``sequence``."""
    table = DynamoLeaseTable(aws.client("dynamodb"), settings.lease_table, f"lake-loader#{settings.enriched_stream}")
    table.ensure(shard)
    [row] = [lease for lease in table.leases()[0] if lease.shard_id == shard]
    table.take(row, "loader", 60_000)
    table.checkpoint(shard, "loader", sequence, {})
    table.release(shard, "loader")


def _write(s3, settings, events: list[dict], start: int, shard: str = SHARD0) -> None:
    """What the loader flushes for the range [start, start + len(events) - 1] of ``shard``."""
    write_enriched(lake.S3Sink(s3, settings.bucket), shard, event_records(events, shard=shard, start=start),
                   settings.enriched_stream)


def _ten_event_files(s3, settings, count: int, shard: str = SHARD0, first: int = 1) -> list[dict]:
    """``count`` loader files of 10 events each in hour 09, ranges [first, first+9], [first+10, …]."""
    events = [make_event(i, at=BASE + dt.timedelta(seconds=i)) for i in range(10 * count)]
    for n in range(count):
        _write(s3, settings, events[10 * n:10 * n + 10], first + 10 * n, shard)
    return events


def _ids(bucket: str) -> Counter:
    return Counter(lake.read_enriched(aws.client("s3"), bucket, columns=["event_id"]).column("event_id").to_pylist())


def _etags(s3, bucket: str) -> dict[str, str]:
    return {obj["Key"]: obj["ETag"] for obj in lake.list_objects(s3, bucket, "")}


def _names(bucket: str) -> list[str]:
    return [key.rsplit("/", 1)[1] for key in lake_keys(bucket, "enriched/")]


def _recorded(s3, bucket: str, key: str) -> dict:
    metadata = lake.read_parquet_object(s3, bucket, key).schema.metadata
    return json.loads(metadata[b"clickstream.compacted_from"])


# ------------------------------------------------------------------------------ merging


def test_loader_files_become_one_file_per_hour_with_every_event_once_and_rows_exact(aws_settings, s3):
    events = [make_event(i, session=f"s{i % 7}", at=BASE + dt.timedelta(seconds=5 * i)) for i in range(160)]
    put_events(aws_settings.enriched_stream, events)                     # 09:58 .. 10:11, two shards
    loader = build(loader_settings(aws_settings, lake_flush_records=15, lake_batch_limit=15, lake_flush_seconds=1,
                                   lake_lease_ms=3000))
    wait_for(lambda: [part.step() for part in loader.loaders] and loader.loaders[0].stats["events"] == 160,
             interval=0.05)
    for part in loader.loaders:
        part.close()                                                     # checkpointed and released
    before = {key: lake.read_parquet_object(s3, aws_settings.bucket, key) for key in lake_keys(aws_settings.bucket)}
    assert len(before) >= 10

    done = _compact(aws_settings)
    assert done.exit_code == 0, done.output
    assert f"merged 2 partitions: {len(before)} files -> 2 (" in done.output and "160 events" in done.output
    keys = lake_keys(aws_settings.bucket)
    assert [lake.key_partition(key) for key in keys] == [("2026-11-29", "09"), ("2026-11-29", "10")]
    assert all(compact.COMPACTED_NAME.fullmatch(key.rsplit("/", 1)[1]) for key in keys)
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events)
    for key in keys:
        # Exactly the inputs' rows and types, each input's rows in its own order, inputs in shard/sequence order.
        merged = lake.read_parquet_object(s3, aws_settings.bucket, key)
        names = [name for name, _, _ in _recorded(s3, aws_settings.bucket, key)]
        folder = key.rsplit("/", 1)[0]
        assert names == sorted(names, key=lambda name: compact.merge_order(compact.LakeFile(f"{folder}/{name}", 0, "")))
        expected = pa.concat_tables([before[f"{folder}/{name}"].replace_schema_metadata(None) for name in names])
        assert merged.replace_schema_metadata(None).equals(expected)
        assert merged.schema.metadata[b"clickstream.stream"] == aws_settings.enriched_stream.encode()

    etags = _etags(s3, aws_settings.bucket)
    again = _compact(aws_settings)
    assert again.exit_code == 0 and "merged 0 partitions: 0 files -> 0" in again.output, again.output
    assert _etags(s3, aws_settings.bucket) == etags                       # a second run changes nothing


def test_a_file_past_the_checkpoint_stays_until_the_loader_has_checkpointed_it(aws_settings, s3):
    events = _ten_event_files(s3, aws_settings, 3)                       # shard 0: 1-10, 11-20, 21-30
    others = _ten_event_files(s3, aws_settings, 2, shard=SHARD1)         # shard 1: no lease row at all
    _checkpoint(aws_settings, SHARD0, "20")                              # 21-30 written, not checkpointed
    done = _compact(aws_settings)
    assert done.exit_code == 0, done.output
    assert "merged 1 partitions: 2 files -> 1" in done.output
    assert "left 3 files the loader may still rewrite" in done.output
    assert f"{SHARD0}-21-30.parquet ({SHARD0} checkpointed at 20, before 30)" in done.output
    assert f"no lease row for {SHARD1} in lake-loader#{aws_settings.enriched_stream}" in done.output
    names = _names(aws_settings.bucket)
    assert sorted(name for name in names if not name.startswith("compacted-")) == [
        f"{SHARD0}-21-30.parquet", f"{SHARD1}-1-10.parquet", f"{SHARD1}-11-20.parquet"]

    _checkpoint(aws_settings, SHARD0, "30")
    _checkpoint(aws_settings, SHARD1, SHARD_END)                         # a closed parent shard: final
    assert _compact(aws_settings).exit_code == 0
    assert len(_names(aws_settings.bucket)) == 1
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events + others)


def test_late_files_are_merged_into_a_compacted_hour_without_duplicates(aws_settings, s3):
    events = _ten_event_files(s3, aws_settings, 2)
    _checkpoint(aws_settings, SHARD0, "20")
    assert _compact(aws_settings).exit_code == 0
    [first] = lake_keys(aws_settings.bucket)
    late = [make_event(100 + i, at=BASE + dt.timedelta(seconds=30 + i)) for i in range(3)]   # an offline queue
    _write(s3, aws_settings, late, 21)
    _checkpoint(aws_settings, SHARD0, "23")
    done = _compact(aws_settings)
    assert done.exit_code == 0 and "merged 1 partitions: 2 files -> 1" in done.output, done.output
    [second] = lake_keys(aws_settings.bucket)
    assert second != first
    assert [name for name, _, rows in _recorded(s3, aws_settings.bucket, second)] == [
        first.rsplit("/", 1)[1], f"{SHARD0}-21-23.parquet"]
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events + late)
    # The new file remembers the loader files inside the old one: a copy of one put back by a late writer
    # (a loader that lost its lease mid-put) is recognised and deleted, not merged a second time.
    metadata = lake.read_parquet_object(s3, aws_settings.bucket, second).schema.metadata
    assert sorted(json.loads(metadata[b"clickstream.loader_files"])) == [
        f"{SHARD0}-1-10.parquet", f"{SHARD0}-11-20.parquet", f"{SHARD0}-21-23.parquet"]
    _write(s3, aws_settings, events[:10], 1)
    back = _compact(aws_settings)
    assert f"deleted 1 files an interrupted run had merged already: {HOUR9}/{SHARD0}-1-10.parquet" in back.output
    assert lake_keys(aws_settings.bucket) == [second]
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events + late)


def test_files_of_older_and_newer_schemas_merge_with_nulls_for_the_missing_column(aws_settings, s3):
    old = lake.convert([json.dumps(make_event(i)).encode() for i in range(3)]).table
    old = old.drop_columns(["mkt_clickid", "br_features_pdf"])               # written before their promotion
    meta = {"stream": aws_settings.enriched_stream, "shard_id": SHARD0, "first_seq": "1", "last_seq": "3",
            "loader_version": lake.LOADER_VERSION}
    s3.put_object(Bucket=aws_settings.bucket, Key=f"{HOUR9}/{SHARD0}-1-3.parquet", Body=lake.parquet_bytes(old, meta))
    new = [make_event(10 + i, mkt_clickid=f"click-{i}", br_features_pdf=True) for i in range(2)]
    _write(s3, aws_settings, new, 4)
    _checkpoint(aws_settings, SHARD0, "5")
    assert _compact(aws_settings).exit_code == 0
    [key] = lake_keys(aws_settings.bucket)
    merged = lake.read_parquet_object(s3, aws_settings.bucket, key)
    assert merged.schema.remove_metadata().equals(lake.SCHEMA)           # the loader's types and column order
    assert merged.column("mkt_clickid").to_pylist() == [None, None, None, "click-0", "click-1"]
    assert merged.column("br_features_pdf").to_pylist() == [None, None, None, True, True]
    assert merged.column("event_id").to_pylist()[:3] == old.column("event_id").to_pylist()


def test_values_an_older_file_kept_in_extra_are_lifted_into_their_promoted_columns(aws_settings, s3):
    """Before their promotion the loader kept these fields in ``extra``: a merged file had them null,
    and a query on mkt_clickid missed those rows for good."""
    import pyarrow as pa

    old = lake.convert([json.dumps(make_event(i)).encode() for i in range(3)]).table
    old = old.drop_columns(["mkt_clickid", "br_features_pdf"])
    extras = [{"mkt_clickid": "click-old", "br_features_pdf": True, "x_custom": 1},
              {"br_features_pdf": "not a bool"}, None]
    old = old.set_column(old.column_names.index("extra"), "extra",
                         pa.array([json.dumps(e, sort_keys=True, separators=(",", ":")) if e else None for e in extras], pa.string()))
    meta = {"stream": aws_settings.enriched_stream, "shard_id": SHARD0, "first_seq": "1", "last_seq": "3",
            "loader_version": lake.LOADER_VERSION}
    s3.put_object(Bucket=aws_settings.bucket, Key=f"{HOUR9}/{SHARD0}-1-3.parquet", Body=lake.parquet_bytes(old, meta))
    _write(s3, aws_settings, [make_event(10, mkt_clickid="click-new")], 4)
    assert lake.read_enriched(s3, aws_settings.bucket).column("mkt_clickid").to_pylist() == [
        "click-old", None, None, "click-new"]                                  # a reader of the raw files too
    assert lake.read_enriched(s3, aws_settings.bucket, columns=["mkt_clickid"]).to_pylist()[0] == {"mkt_clickid": "click-old"}
    _checkpoint(aws_settings, SHARD0, "5")
    assert _compact(aws_settings).exit_code == 0
    [key] = lake_keys(aws_settings.bucket)
    merged = lake.read_parquet_object(s3, aws_settings.bucket, key)
    assert merged.schema.remove_metadata().equals(lake.SCHEMA)
    assert merged.column("mkt_clickid").to_pylist() == ["click-old", None, None, "click-new"]
    assert merged.column("br_features_pdf").to_pylist() == [True, None, None, None]
    assert merged.column("extra").to_pylist() == ['{"x_custom":1}', '{"br_features_pdf":"not a bool"}', None, None]


def test_a_cap_on_input_bytes_gives_several_files_for_a_busy_hour(aws_settings, s3):
    events = _ten_event_files(s3, aws_settings, 6)
    _checkpoint(aws_settings, SHARD0, "60")
    size = max(obj["Size"] for obj in lake.list_objects(s3, aws_settings.bucket, "enriched/"))
    done = _compact(aws_settings, "--max-bytes", str(2 * size))
    assert done.exit_code == 0 and "6 files -> 3" in done.output, done.output
    assert len(lake_keys(aws_settings.bucket)) == 3
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events)
    # Merged files are merged again only to take in new files: with nothing new, a larger cap changes nothing.
    etags = _etags(s3, aws_settings.bucket)
    assert "merged 0 partitions" in _compact(aws_settings, "--max-bytes", str(100 * size)).output
    assert _etags(s3, aws_settings.bucket) == etags
    late = [make_event(100, at=BASE + dt.timedelta(seconds=50))]
    _write(s3, aws_settings, late, 61)
    _checkpoint(aws_settings, SHARD0, "61")
    assert "4 files -> 1" in _compact(aws_settings, "--max-bytes", str(100 * size)).output
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events + late)


def test_a_file_loaded_from_another_stream_is_not_judged_by_this_streams_checkpoints(aws_settings, s3):
    events = [make_event(i) for i in range(4)]
    _write(s3, aws_settings, events[:2], 1)
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), SHARD0, event_records(events[2:], start=3), "old-stream")
    _checkpoint(aws_settings, SHARD0, "4")
    done = _compact(aws_settings)
    assert done.exit_code == 1
    assert f"not merged in {HOUR9}: {HOUR9}/{SHARD0}-3-4.parquet was loaded from stream 'old-stream'" in done.output
    assert len(_names(aws_settings.bucket)) == 2


def test_dry_run_says_what_it_would_do_and_changes_nothing(aws_settings, s3):
    _ten_event_files(s3, aws_settings, 3)
    _checkpoint(aws_settings, SHARD0, "30")
    before = _etags(s3, aws_settings.bucket)
    done = _compact(aws_settings, "--dry-run")
    assert done.exit_code == 0, done.output
    assert "would merge 1 partitions: 3 files -> 1" in done.output and "30 events" in done.output
    assert _etags(s3, aws_settings.bucket) == before                      # not even a lock object


def test_a_date_range_leaves_other_days_alone(aws_settings, s3):
    day1 = _ten_event_files(s3, aws_settings, 2)
    day2 = [make_event(50 + i, at=BASE + dt.timedelta(days=1, seconds=i)) for i in range(20)]
    _write(s3, aws_settings, day2[:10], 21)
    _write(s3, aws_settings, day2[10:], 31)
    _checkpoint(aws_settings, SHARD0, "40")
    assert _compact(aws_settings, "--start", "2026-11-30").exit_code == 0
    names = _names(aws_settings.bucket)
    assert len(names) == 3 and sum(name.startswith("compacted-") for name in names) == 1
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in day1 + day2)


def test_last_days_is_the_n_utc_days_up_to_today_for_a_schedule(aws_settings, s3, monkeypatch):
    # Scheduled runs (ECS, compose) have no shell for $(date …): the range is relative to the run's day.
    days = [BASE - dt.timedelta(days=1), BASE, BASE + dt.timedelta(days=1)]      # 11-28, 11-29, 11-30
    events = [make_event(10 * n + i, at=day + dt.timedelta(seconds=i)) for n, day in enumerate(days) for i in range(10)]
    for n in range(6):                                                   # two files a day, 1-5 … 26-30
        _write(s3, aws_settings, events[5 * n:5 * n + 5], 1 + 5 * n)
    _checkpoint(aws_settings, SHARD0, "30")
    monkeypatch.setattr("batch.cli._utc_today", lambda: dt.date(2026, 11, 30))
    done = _compact(aws_settings, "--last-days", "2")
    assert done.exit_code == 0 and "merged 2 partitions: 4 files -> 2" in done.output, done.output
    by_day = Counter((lake.key_partition(key)[0], key.rsplit("/", 1)[1].startswith("compacted-"))
                     for key in lake_keys(aws_settings.bucket))
    assert by_day == {("2026-11-28", False): 2, ("2026-11-29", True): 1, ("2026-11-30", True): 1}
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events)

    for both in (["--start", "2026-11-28"], ["--end", "2026-11-30"]):
        refused = _compact(aws_settings, "--last-days", "2", *both)
        assert refused.exit_code == 2 and "--last-days N is instead of --start/--end" in refused.output
    assert _compact(aws_settings, "--last-days", "0").exit_code == 2
    monkeypatch.setattr("batch.cli._utc_today", lambda: dt.date(2026, 11, 28))
    assert "merged 1 partitions: 2 files -> 1" in _compact(aws_settings, "--last-days", "1").output


# ------------------------------------------------------------------------------ a killed run


def test_kill_9_between_the_write_and_the_deletes_is_completed_by_the_next_run(aws_settings, s3, tmp_path):
    events = _ten_event_files(s3, aws_settings, 3)
    _checkpoint(aws_settings, SHARD0, "30")
    first_input = f"{HOUR9}/{SHARD0}-1-10.parquet"
    log = tmp_path / "compact.log"
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        # The first input's delete is done, then never answered: the process is stuck right after it.
        proxy.hang_next = (f"DELETE /{aws_settings.bucket}/{first_input}", "after")
        env = {**os.environ, **settings_env(aws_settings), "AWS_ENDPOINT_URL": proxy.endpoint}
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "batch.cli", "--bucket", aws_settings.bucket, "compact",
                                        "--no-progress", "--lock-ttl", "4"], env=env, stdout=out, stderr=out,
                                       cwd=ROOT_DIR)
        try:
            wait_for(proxy.hanging.is_set, timeout=90, what=f"the first delete; log: {log}")
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL
        finally:
            process.kill()
    names = _names(aws_settings.bucket)
    assert len(names) == 3 and names[0].startswith("compacted-")          # written, two inputs left over
    assert f"{SHARD0}-1-10.parquet" not in names
    assert max(_ids(aws_settings.bucket).values()) == 2                   # a reader sees those rows twice now

    again = _compact(aws_settings)                                        # breaks the dead run's lock first
    assert again.exit_code == 0, again.output
    assert "deleted 2 files an interrupted run had merged already" in again.output
    assert "merged 0 partitions" in again.output
    assert _names(aws_settings.bucket) == names[:1]
    assert _ids(aws_settings.bucket) == Counter(event["event_id"] for event in events)


# ------------------------------------------------------------------------------ erase and the lock

PERSON = "a1" * 32


def test_an_erase_started_during_a_compaction_waits_for_it_and_then_erases_the_merged_file(aws_settings, s3,
                                                                                         monkeypatch):
    """Without the lock the erase would list the loader files, find them deleted by the compaction
    and skip them, leaving the person's rows in the merged file."""
    events = [make_event(i, domain_userid=PERSON if i % 3 == 0 else "b2" * 32) for i in range(30)]
    for n in range(3):
        _write(s3, aws_settings, events[10 * n:10 * n + 10], 1 + 10 * n)
    _checkpoint(aws_settings, SHARD0, "30")
    erased, started = [], threading.Event()

    def run_erase():
        started.set()
        erased.append(CliRunner().invoke(lake_cli, ["--bucket", aws_settings.bucket, "erase", "--no-progress", PERSON],
                                         env=settings_env(aws_settings), catch_exceptions=False))

    eraser = threading.Thread(target=run_erase)
    parse, seen = lake.parquet_table, []

    def erase_starts_while_compacting(body, columns=None):
        if threading.current_thread() is not eraser and not seen:
            seen.append(True)
            eraser.start()
            started.wait(10)
            time.sleep(1.5)                                               # time enough to list and rewrite
            assert not list(lake.list_objects(s3, aws_settings.bucket, erase.RECORDS))   # it waits on the lock
        return parse(body, columns)

    monkeypatch.setattr(lake, "parquet_table", erase_starts_while_compacting)
    # In process rather than through CliRunner, which must not capture output in two threads at once.
    done = compact.compact_lake(s3, loader_settings(aws_settings), progress=False)
    assert done.files_in == 3 and done.files_out == 1 and not done.conflicts
    eraser.join(60)
    assert erased and erased[0].exit_code == 0, erased and erased[0].output
    assert "removed 10 rows in 1 files" in erased[0].output               # the merged file, read after the merge
    left = lake.read_enriched(s3, aws_settings.bucket, columns=["event_id", "domain_userid"])
    assert PERSON not in left.column("domain_userid").to_pylist()
    assert Counter(left.column("event_id").to_pylist()) == Counter(e["event_id"] for e in events
                                                                   if e["domain_userid"] != PERSON)
    assert len(lake_keys(aws_settings.bucket, "enriched/")) == 1
    assert not lake_keys(aws_settings.bucket, "locks/")                   # both released theirs
    # The erased merged file holds fewer rows than its inputs had, and they are gone: it is the only
    # copy of its rows, merged again with a late file, never taken for a run's unchecked leftover.
    late = [make_event(100 + i, at=BASE + dt.timedelta(seconds=i)) for i in range(5)]
    _write(s3, aws_settings, late, 31)
    _checkpoint(aws_settings, SHARD0, "35")
    assert compact.compact_lake(s3, loader_settings(aws_settings), progress=False).files_in == 2
    assert _ids(aws_settings.bucket) == Counter(e["event_id"] for e in events + late if e["domain_userid"] != PERSON)


def _erase(settings, *pseudonyms):
    done = CliRunner().invoke(lake_cli, ["--bucket", settings.bucket, "erase", "--no-progress", *pseudonyms],
                              env=settings_env(settings), catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done


def test_an_erase_after_a_killed_run_is_kept_and_the_rewritten_input_settled(aws_settings, s3):
    """A run killed before its deletes leaves the merged file and its inputs; an erase (holding the
    lock: the dead run's lock has expired) rewrites both. The next run cannot match the rewritten
    input's ETag, finds all its events in the merged file and none of the person's rows, and deletes it."""
    events = [make_event(i, domain_userid=PERSON if i == 12 else "b2" * 32) for i in range(20)]
    _write(s3, aws_settings, events[:10], 1)
    _write(s3, aws_settings, events[10:], 11)
    _checkpoint(aws_settings, SHARD0, "20")
    assert _compact(aws_settings).exit_code == 0
    _write(s3, aws_settings, events[:10], 1)                               # the killed run's state, rebuilt
    _write(s3, aws_settings, events[10:], 11)
    assert "removed 2 rows in 2 files" in _erase(aws_settings, PERSON).output   # the merged file and 11-20
    done = _compact(aws_settings)
    assert done.exit_code == 0, done.output
    assert f"deleted 1 files an interrupted run had merged already: {HOUR9}/{SHARD0}-1-10.parquet" in done.output
    assert "deleted 1 files changed after they were merged, whose events are all in the merged file" in done.output
    assert len(_names(aws_settings.bucket)) == 1
    assert _ids(aws_settings.bucket) == Counter(e["event_id"] for e in events if e["domain_userid"] != PERSON)


def test_a_file_rewritten_under_a_compaction_is_kept_until_the_erase_is_run_again(aws_settings, s3, monkeypatch):
    """Should an erase ever bypass the lock (an older CLI, a script), the conditional delete still
    refuses to delete the file it rewrote: the merged file holds the rows it removed. Runs report it
    (exit 1) and never merge it twice; once the erase is run again, the next run settles it."""
    events = [make_event(i, domain_userid=PERSON if i == 12 else "b2" * 32) for i in range(20)]
    _write(s3, aws_settings, events[:10], 1)
    _write(s3, aws_settings, events[10:], 11)
    _checkpoint(aws_settings, SHARD0, "20")
    parse, rewritten = lake.parquet_table, []

    def erased_after_the_read(body, columns=None):
        table = parse(body, columns)
        if not rewritten and PERSON in table.column("domain_userid").to_pylist():
            monkeypatch.setattr(lake, "parquet_table", parse)
            rewritten.append(erase.erase_lake(aws.client("s3"), aws_settings.bucket, {PERSON}, progress=False).rows)
        return table

    monkeypatch.setattr(lake, "parquet_table", erased_after_the_read)
    done = _compact(aws_settings)
    assert rewritten == [1] and done.exit_code == 1
    assert f"conflict: {HOUR9}/{SHARD0}-11-20.parquet changed between its read and its delete: kept" in done.output
    assert f"{SHARD0}-11-20.parquet" in _names(aws_settings.bucket)
    again = _compact(aws_settings)
    assert again.exit_code == 1 and "which holds rows of an erased person: run that erase again" in again.output
    assert len(_names(aws_settings.bucket)) == 2                           # not merged a second time
    assert "removed 1 rows in 1 files" in _erase(aws_settings, PERSON).output     # now the merged file
    settled = _compact(aws_settings)
    assert settled.exit_code == 0 and "deleted 1 files changed after they were merged" in settled.output
    assert _ids(aws_settings.bucket) == Counter(e["event_id"] for e in events if e["domain_userid"] != PERSON)


def test_the_lock_of_a_dead_run_is_broken_and_a_live_one_is_waited_for(aws_settings, s3):
    dead = compact.LakeLock(s3, aws_settings.bucket, "compact", ttl_s=1)
    dead.acquire()                                                        # then never renewed nor released
    began = time.monotonic()
    with compact.LakeLock(s3, aws_settings.bucket, "erase", poll_s=0.1) as taker:
        assert time.monotonic() - began >= 1
        assert json.loads(aws.get_object_bytes(s3, aws_settings.bucket, compact.LOCK_KEY))["token"] == taker.token
        busy = compact.LakeLock(s3, aws_settings.bucket, "compact", wait_s=1.5, poll_s=0.1)
        with pytest.raises(compact.LockBusy, match="held by erase"):
            busy.acquire()                                                # within its TTL: alive
        assert taker.intact
    assert aws.get_object_bytes(s3, aws_settings.bucket, compact.LOCK_KEY) is None


# ------------------------------------------------------------------------------ training reads it


def test_training_reads_a_compacted_lake_by_date_folder_and_each_event_once(aws_settings, s3, tmp_path):
    events = _ten_event_files(s3, aws_settings, 3)
    leftover = lake.read_parquet_object(s3, aws_settings.bucket, f"{HOUR9}/{SHARD0}-1-10.parquet")
    _checkpoint(aws_settings, SHARD0, "30")
    assert _compact(aws_settings).exit_code == 0

    def local_ids() -> tuple[list, Counter]:
        root = lake.sync_partitions(aws_settings.bucket, "2026-11-29", "2026-11-29", tmp_path, progress=False)
        files = window_files(root, Window.last_days(1, "2026-11-29"))
        paths = spark_paths(root, files)
        table = ds.dataset([str(p) for p in files], format="parquet").to_table(columns=["event_id"])
        return paths, root, Counter(table.column("event_id").to_pylist())

    paths, root, ids = local_ids()
    assert paths == [root / "date=2026-11-29"]                            # the folder, as for loader files
    assert ids == Counter(event["event_id"] for event in events)
    # A killed run's state (merged file and an input both there): those rows are read twice, the same
    # event ids, which training's dedupe by event_id drops; the next compaction deletes the input.
    _write(s3, aws_settings, events[:10], 1)
    _, _, ids = local_ids()
    assert ids - Counter(event["event_id"] for event in events) == Counter(leftover.column("event_id").to_pylist())
    assert _compact(aws_settings).exit_code == 0
    _, _, ids = local_ids()
    assert ids == Counter(event["event_id"] for event in events)


def test_a_run_waiting_for_the_lock_lists_the_lake_only_once_it_holds_it(aws_settings, s3):
    """B listed, then waited for A's lock; A merged L1+L2 and was killed before its deletes; B broke
    the lock and planned from its listing, which lacked A's file: it merged L1, L2 and L3 again into
    a second file, and both files' rows stayed in the lake (twice) for good."""
    events = _ten_event_files(s3, aws_settings, 3)
    _checkpoint(aws_settings, SHARD0, "30")
    settings = loader_settings(aws_settings)
    # A holds the lock for half its TTL after a renewal: 3 s for its merge on a loaded machine.
    held_by_a = compact.LakeLock(s3, aws_settings.bucket, "compact", ttl_s=6)
    held_by_a.acquire()                                  # no renewal thread: A dies holding it
    b = threading.Thread(target=lambda: done.append(compact.compact_lake(s3, settings, progress=False)))
    done: list = []
    b.start()
    time.sleep(0.5)                                      # B is waiting for the lock by now
    loader_files = compact.partitions(s3, aws_settings.bucket, None, None)[HOUR9]
    run_a = compact.Run(s3, aws_settings.bucket, settings.enriched_stream, compact.load_checkpoints(settings),
                        compact.DEFAULT_MAX_BYTES, False, held_by_a)
    killed = pytest.MonkeyPatch()
    killed.setattr(compact, "_delete", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("kill -9")))
    assert held_by_a._put(IfMatch=held_by_a.etag)                     # A's last renewal
    with pytest.raises(KeyboardInterrupt):
        compact.merge_group(run_a, HOUR9, loader_files[:2])            # written, nothing deleted
    killed.undo()
    b.join(timeout=30)
    assert not b.is_alive() and not done[0].conflicts and not done[0].failed
    assert len(done[0].recovered) == 2                                # A's inputs, found under the lock
    assert _ids(aws_settings.bucket) == Counter(e["event_id"] for e in events)
    assert len(_names(aws_settings.bucket)) == 1


def test_an_unreadable_file_fails_its_hour_and_the_run_goes_on(aws_settings, s3):
    """A corrupt object stopped the whole run with a traceback (and an empty one with InvalidRange),
    so no later hour was ever compacted."""
    _ten_event_files(s3, aws_settings, 2)
    s3.put_object(Bucket=aws_settings.bucket, Key=f"{HOUR9}/{SHARD0}-1-30.parquet", Body=b"not parquet at all")
    hour10 = "enriched/date=2026-11-29/hour=10"
    s3.put_object(Bucket=aws_settings.bucket, Key=f"{hour10}/compacted-{'0' * 32}.parquet", Body=b"")
    _write(s3, aws_settings, [make_event(i, at=BASE + dt.timedelta(hours=1, seconds=i)) for i in range(5)], 21)
    later = [make_event(i, at=BASE + dt.timedelta(hours=2, seconds=i)) for i in range(20)]
    _write(s3, aws_settings, later[:10], 31)
    _write(s3, aws_settings, later[10:], 41)
    _checkpoint(aws_settings, SHARD0, "50")
    result = CliRunner().invoke(lake_cli, ["--bucket", aws_settings.bucket, "compact", "--no-progress"],
                                env=settings_env(aws_settings))
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert f"not merged in {HOUR9}: {HOUR9}/{SHARD0}-1-30.parquet does not read as Parquet" in result.output
    assert f"not merged in {hour10}: a file does not read as Parquet: {hour10}/compacted-" in result.output
    hour11 = [key for key in lake_keys(aws_settings.bucket, "enriched/date=2026-11-29/hour=11/")]
    assert len(hour11) == 1 and "/compacted-" in hour11[0]          # the hour after them was merged


def test_a_merged_file_that_does_not_hold_its_inputs_rows_is_not_trusted(aws_settings, s3):
    """A run killed between its write and its read-back left a file nobody checked: the next run
    deleted the inputs it records on its word."""
    events = _ten_event_files(s3, aws_settings, 2)
    _checkpoint(aws_settings, SHARD0, "20")
    inputs = sorted(lake_keys(aws_settings.bucket, HOUR9 + "/"))
    etags = _etags(s3, aws_settings.bucket)
    short = lake.read_parquet_object(s3, aws_settings.bucket, inputs[0]).slice(0, 4)    # 4 rows, not 20
    recorded = [[key.rsplit("/", 1)[1], etags[key], 10] for key in inputs]
    body = lake.parquet_bytes(short.replace_schema_metadata(None), {compact.INPUTS: json.dumps(recorded)})
    s3.put_object(Bucket=aws_settings.bucket, Key=f"{HOUR9}/{compact.compacted_name([r[0] for r in recorded])}",
                  Body=body)
    done = _compact(aws_settings)
    assert done.exit_code == 0, done.output
    assert _ids(aws_settings.bucket) == Counter(e["event_id"] for e in events)       # each once, none lost
    assert len(_names(aws_settings.bucket)) == 1
