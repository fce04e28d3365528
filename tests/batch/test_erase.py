"""`lake erase`: a person's rows leave the enriched lake, their sessions' predictions and offers go too,
everyone else's data stays byte-for-byte readable, and nothing changes on a dry run."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from batch import erase, lake
from batch.cli import lake_cli
from batch.loader import write_enriched
from common import aws
from common.features import NIL_USER
from tests.batch.conftest import BASE, ROOT_DIR, event_records, make_event
from tests.conftest import settings_env

CUSTOMER = "c1" * 32          # HMAC of the shop's customer id: user_id once they log in
COOKIE = "d1" * 32            # their browser's domain_userid, also on sessions before the login
NETWORK_COOKIE = "a0" * 32    # the collector's cookie id of their browser
SOMEONE_ELSE = "e2" * 32


def _person_and_neighbours() -> list[dict]:
    """09:58–09:59 mixed rows (anonymous visit, logged-in visit, someone else), 10:00 only the customer."""
    def at(minutes: float) -> dt.datetime:
        return BASE + dt.timedelta(minutes=minutes)

    anonymous = [make_event(i, session="s-anon", at=at(i * 0.1), domain_userid=COOKIE, network_userid=NETWORK_COOKIE)
                 for i in range(3)]
    logged_in = [make_event(10 + i, session="s-login", at=at(1 + i * 0.1), user_id=CUSTOMER, domain_userid=COOKIE,
                            network_userid=NETWORK_COOKIE) for i in range(2)]
    later = [make_event(20 + i, session="s-later", at=at(2.5 + i * 0.1), user_id=CUSTOMER, domain_userid=COOKIE,
                        network_userid=NETWORK_COOKIE) for i in range(2)]
    other = [make_event(30 + i, session="s-other", at=at(0.5 + i * 0.1), domain_userid=SOMEONE_ELSE,
                        network_userid="b0" * 32) for i in range(4)]
    return anonymous + logged_in + other + later


def _erase(settings, *args):
    return CliRunner().invoke(lake_cli, ["--bucket", settings.bucket, "erase", "--no-progress", *args],
                              env=settings_env(settings), catch_exceptions=False)


def _etags(s3, bucket: str) -> dict[str, str]:
    return {obj["Key"]: obj["ETag"] for obj in lake.list_objects(s3, bucket, "enriched/")}


def _versions_holding(s3, bucket: str, *values: str) -> list[tuple[str, str]]:
    """(key, version id) of every version of every enriched file, the current ones included, with one
    of these values in a column."""
    found = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="enriched/"):
        for version in page.get("Versions", []):
            body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            if any(value in str(lake.parquet_table(body).to_pylist()) for value in values):
                found.append((version["Key"], version["VersionId"]))
    return found


def _sessions(dynamodb, table: str) -> set[str]:
    return {item["session_id"]["S"] for item in dynamodb.scan(TableName=table)["Items"]}


@pytest.fixture
def lake_with_person(aws_settings, s3):
    events = _person_and_neighbours()
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events, start=5),
                   "enriched")
    dynamodb = aws.client("dynamodb")
    for table, sessions in ((aws_settings.predictions_table, ("s-anon", "s-login", "s-later", "s-other")),
                            (aws_settings.offers_table, ("s-login", "s-other"))):
        for session in sessions:
            dynamodb.put_item(TableName=table, Item={"session_id": {"S": session}, "p_buy": {"N": "0.5"}})
    return events, dynamodb


def test_erase_removes_the_customer_and_their_anonymous_visits_and_keeps_everyone_else(
        aws_settings, s3, lake_with_person):
    events, dynamodb = lake_with_person
    before = _etags(s3, aws_settings.bucket)
    assert sorted(before) == ["enriched/date=2026-11-29/hour=09/shardId-000000000000-5-15.parquet",
                              "enriched/date=2026-11-29/hour=10/shardId-000000000000-5-15.parquet"]

    dry = _erase(aws_settings, CUSTOMER, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not list(lake.list_objects(s3, aws_settings.bucket, erase.RECORDS))
    assert ("would remove 7 rows in 2 files (3 pseudonyms matched, 3 sessions), 0 earlier versions of lake files "
            "(kept to restore a deleted file), 3 predictions, 1 offers") in dry.output
    assert "hour=10/shardId-000000000000-5-15.parquet: would remove 2 rows (no rows left: file deleted)" in dry.output
    assert _etags(s3, aws_settings.bucket) == before
    assert len(_sessions(dynamodb, aws_settings.predictions_table)) == 4

    done = _erase(aws_settings, CUSTOMER)
    assert done.exit_code == 0, done.output
    # The versioned bucket kept what the rewrite replaced and what it deleted: both go as well.
    assert ("removed 7 rows in 2 files (3 pseudonyms matched, 3 sessions), 2 earlier versions of lake files "
            "(kept to restore a deleted file), 3 predictions, 1 offers") in done.output
    assert _versions_holding(s3, aws_settings.bucket, CUSTOMER, COOKIE) == []
    assert "run this again once the stream's retention has passed" in done.output
    assert f"tables {aws_settings.predictions_table} and {aws_settings.offers_table})" in done.output
    left = lake.read_enriched(s3, aws_settings.bucket)
    expected = [e["event_id"] for e in events if e["domain_sessionid"] == "s-other"]
    assert sorted(left.column("event_id").to_pylist()) == sorted(expected)
    assert set(left.column("domain_userid").to_pylist()) == {SOMEONE_ELSE}
    assert list(_etags(s3, aws_settings.bucket)) == ["enriched/date=2026-11-29/hour=09/shardId-000000000000-5-15.parquet"]
    # The rewritten file keeps what the loader recorded about it (its stream and sequence range).
    kept = lake.read_parquet_object(s3, aws_settings.bucket, next(iter(_etags(s3, aws_settings.bucket))))
    assert kept.schema.metadata[b"clickstream.first_seq"] == b"5"
    assert _sessions(dynamodb, aws_settings.predictions_table) == {"s-other"}
    assert _sessions(dynamodb, aws_settings.offers_table) == {"s-other"}

    again = _erase(aws_settings, CUSTOMER)
    assert "removed 0 rows in 0 files (3 pseudonyms matched, 0 sessions), 0 earlier versions" in again.output


def test_a_file_deleted_before_the_erasure_loses_its_earlier_version_only_if_it_held_the_person(
        aws_settings, s3, lake_with_person):
    """A compaction, a hand's delete: the bucket keeps the deleted file a week, to restore it. The
    erasure removes such a version with the person's rows and leaves one with only other people's."""
    other = make_event(90, session="s-other-day", at=BASE + dt.timedelta(days=1), domain_userid=SOMEONE_ELSE)
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records([other], start=40),
                   "enriched")
    for key in _etags(s3, aws_settings.bucket):
        s3.delete_object(Bucket=aws_settings.bucket, Key=key)
    assert len(_versions_holding(s3, aws_settings.bucket, CUSTOMER)) == 2

    done = _erase(aws_settings, CUSTOMER)
    assert done.exit_code == 0, done.output
    assert "removed 0 rows in 0 files (3 pseudonyms matched, 3 sessions), 2 earlier versions" in done.output
    assert "hour=09/shardId-000000000000-5-15.parquet?versionId=" in done.output
    assert _versions_holding(s3, aws_settings.bucket, CUSTOMER, COOKIE) == []
    assert [key for key, _ in _versions_holding(s3, aws_settings.bucket, SOMEONE_ELSE)] == \
        ["enriched/date=2026-11-30/hour=09/shardId-000000000000-40-40.parquet"]
    # Their sessions' predictions and offers go too: the versions were the only rows that named them.
    assert _sessions(lake_with_person[1], aws_settings.predictions_table) == {"s-other"}


def test_a_later_run_erases_cookie_rows_that_come_back_after_the_customer_rows_are_gone(aws_settings, s3,
                                                                                       lake_with_person):
    events, _ = lake_with_person
    assert _erase(aws_settings, CUSTOMER).exit_code == 0
    record = json.loads(s3.get_object(Bucket=aws_settings.bucket, Key=erase.record_key({CUSTOMER}))["Body"].read())
    assert record["pseudonyms"] == [CUSTOMER] and record["identities"] == sorted([CUSTOMER, COOKIE, NETWORK_COOKIE])
    assert [run["rows"] for run in record["runs"]] == [7]
    assert record["sessions"] == ["s-anon", "s-later", "s-login"]
    # Another shard's loader replays the anonymous visit after a crash: no row names the customer any more,
    # only the record remembers that this cookie is theirs.
    anonymous = [e for e in events if e["domain_sessionid"] == "s-anon"]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000001", event_records(anonymous, start=1),
                   "enriched")
    # And a prediction for a session whose rows are already gone (a late scorer write, or a run that
    # stopped before its deletes): the record's session list still finds it.
    dynamodb = aws.client("dynamodb")
    dynamodb.put_item(TableName=aws_settings.predictions_table, Item={"session_id": {"S": "s-login"}})
    again = _erase(aws_settings, CUSTOMER)
    assert ("removed 3 rows in 1 files (3 pseudonyms matched, 1 sessions), 1 earlier versions of lake files (kept "
            "to restore a deleted file), 1 predictions") in again.output
    assert _sessions(dynamodb, aws_settings.predictions_table) == {"s-other"}
    assert set(lake.read_enriched(s3, aws_settings.bucket).column("domain_sessionid").to_pylist()) == {"s-other"}
    record = json.loads(s3.get_object(Bucket=aws_settings.bucket, Key=erase.record_key({CUSTOMER}))["Body"].read())
    assert [run["rows"] for run in record["runs"]] == [7, 3]


def test_erase_finds_rows_by_the_collector_cookie_and_by_pseudonyms_inside_urls_and_contexts(aws_settings, s3):
    """A newsletter click through /r/tp2 carries only the collector's cookie; a guest checkout names the
    buyer only in the ecommerce user entity; an email address's pseudonym sits in a URL."""
    email = "f3" * 32
    user_entity = {"schema": "iglu:com.snowplowanalytics.snowplow.ecommerce/user/jsonschema/1-0-0",
                   "data": {"id": "guest", "email": email}}
    events = [make_event(1, session="s-login", user_id=CUSTOMER, domain_userid=COOKIE, network_userid=NETWORK_COOKIE),
              make_event(2, session=None, domain_userid=None, network_userid=NETWORK_COOKIE),      # the redirect
              make_event(3, session=None, domain_userid=None, network_userid=NIL_USER),      # anonymous: kept
              make_event(4, session="s-guest", contexts=[user_entity]),
              make_event(5, session="s-news", page_url=f"https://shop.example/welcome?email={email}"),
              make_event(6, session="s-other", domain_userid=SOMEONE_ELSE)]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    for pseudonym in (CUSTOMER, email):
        assert _erase(aws_settings, pseudonym).exit_code == 0
    left = lake.read_enriched(s3, aws_settings.bucket)
    assert sorted(left.column("event_id").to_pylist()) == sorted(e["event_id"] for e in (events[2], events[5]))


def test_erase_by_cookie_id_from_a_file_leaves_the_logged_in_rows_of_other_cookies(aws_settings, s3, lake_with_person,
                                                                                  tmp_path):
    events, _ = lake_with_person
    listing = tmp_path / "pseudonyms.txt"
    listing.write_text(f"{SOMEONE_ELSE}\n\n")
    done = _erase(aws_settings, "--from-file", str(listing))
    assert done.exit_code == 0, done.output
    assert "removed 4 rows in 1 files (1 pseudonyms matched, 1 sessions), 1 earlier versions" in done.output
    assert done.output.count("removed this earlier version") == 1 and "1 predictions, 1 offers" in done.output
    assert lake.read_enriched(s3, aws_settings.bucket).num_rows == len(events) - 4


@pytest.mark.parametrize("cookie", ["a1" * 32, None], ids=["cookie-id", "collector-id-only"])
def test_erase_deletes_predictions_filed_under_the_user_when_there_was_no_session_id(aws_settings, s3, cookie):
    """Without a session id the scorer files a session under the tracker's cookie id, else the
    user id: a server-side tracker sends no sid."""
    network = "f0" * 32
    events = [make_event(40 + i, user_id=CUSTOMER, domain_sessionid=None, domain_userid=cookie,
                         network_userid=network) for i in range(2)]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    dynamodb = aws.client("dynamodb")
    filed_under = cookie or CUSTOMER
    for table in (aws_settings.predictions_table, aws_settings.offers_table):
        dynamodb.put_item(TableName=table, Item={"session_id": {"S": filed_under}, "p_buy": {"N": "0.5"}})
    done = _erase(aws_settings, CUSTOMER)
    assert done.exit_code == 0 and "1 predictions, 1 offers" in done.output, done.output
    assert filed_under not in _sessions(dynamodb, aws_settings.predictions_table)
    assert filed_under not in _sessions(dynamodb, aws_settings.offers_table)


def test_two_erasures_of_one_file_at_once_both_hold(aws_settings, s3, monkeypatch):
    """Bob's erasure rewrites the file between Alice's read and her write: her write is refused
    (If-Match), so she reads it again rather than putting Bob's rows back."""
    alice, bob = "a1" * 32, "b1" * 32
    events = [make_event(i, domain_userid=person) for i, person in enumerate([alice, alice, bob, bob, SOMEONE_ELSE])]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    parse, bob_removed = lake.parquet_table, []

    def bob_erased_meanwhile(body, columns=None):
        table = parse(body, columns)
        if columns is None and not bob_removed:           # the read before the rewrite
            monkeypatch.setattr(lake, "parquet_table", parse)         # Bob's run reads as usual
            bob_removed.append(erase.erase_lake(aws.client("s3"), aws_settings.bucket, {bob}, progress=False).rows)
        return table

    monkeypatch.setattr(lake, "parquet_table", bob_erased_meanwhile)
    done = erase.erase_lake(s3, aws_settings.bucket, {alice}, progress=False)
    left = lake.read_enriched(s3, aws_settings.bucket, columns=["domain_userid"]).column("domain_userid").to_pylist()
    assert bob_removed == [2] and done.rows == 2
    assert left == [SOMEONE_ELSE]


def test_an_erase_whose_delete_was_answered_late_and_retried_by_botocore_completes(aws_settings, lake_with_person):
    """The retry of a conditional delete that went through found no key: NoSuchKey aborted the
    erase before the person's predictions and offers were deleted."""
    import os

    from botocore.config import Config

    from tests.faults import FaultProxy

    only_them = "enriched/date=2026-11-29/hour=10/shardId-000000000000-5-15.parquet"
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        s3 = aws.session().client("s3", endpoint_url=proxy.endpoint,
                                  config=Config(read_timeout=1, retries={"max_attempts": 2, "mode": "standard"}))
        proxy.hang_next = (f"DELETE /{aws_settings.bucket}/{only_them}", "after")    # done, then never answered
        done = erase.erase_lake(s3, aws_settings.bucket, {CUSTOMER}, progress=False)
        # Twice the conditional delete, then once the version it left (the bucket is versioned).
        assert proxy.hanging.is_set() and proxy.calls[f"DELETE /{aws_settings.bucket}/{only_them}"] == 3
    assert done.rows == 7 and done.emptied == [only_them]
    assert list(_etags(s3, aws_settings.bucket)) == ["enriched/date=2026-11-29/hour=09/shardId-000000000000-5-15.parquet"]


def test_a_file_deleted_between_the_read_and_the_rewrite_is_read_again_not_a_crash(aws_settings, s3, monkeypatch):
    """The lifecycle rule (or another erase) removed the file after it was read: the If-Match write
    found no key, and NoSuchKey aborted the erase."""
    person = "a1" * 32
    events = [make_event(i, domain_userid=who) for i, who in enumerate([person, SOMEONE_ELSE])]
    write_enriched(lake.S3Sink(s3, aws_settings.bucket), "shardId-000000000000", event_records(events), "enriched")
    [key] = _etags(s3, aws_settings.bucket)
    parse = lake.parquet_table

    def expired_meanwhile(body, columns=None):
        if columns is None:                               # the read before the rewrite
            s3.delete_object(Bucket=aws_settings.bucket, Key=key)
        return parse(body, columns)

    monkeypatch.setattr(lake, "parquet_table", expired_meanwhile)
    done = erase.erase_lake(s3, aws_settings.bucket, {person}, progress=False)
    assert not _etags(s3, aws_settings.bucket) and done.emptied == []


def test_a_record_from_an_earlier_version_without_sessions_does_not_stop_the_erasure(aws_settings, s3,
                                                                                    lake_with_person):
    """The first erasure records had no "sessions": erase failed on them with KeyError, every run."""
    s3.put_object(Bucket=aws_settings.bucket, Key=erase.record_key({CUSTOMER}),
                  Body=json.dumps({"pseudonyms": [CUSTOMER], "identities": [], "runs": []}).encode())
    done = _erase(aws_settings, CUSTOMER)
    assert done.exit_code == 0 and "removed 7 rows in 2 files" in done.output, done.output


def test_a_file_that_does_not_read_is_named_and_the_erasure_is_incomplete_until_it_is_gone(
        aws_settings, s3, lake_with_person):
    """A corrupt Parquet object stopped the erasure with a pyarrow traceback naming no file. It may hold
    the person's rows: every other file is erased, it is named, and the exit code says incomplete."""
    corrupt = "enriched/date=2026-11-29/hour=09/shardId-000000000001-1-5.parquet"
    s3.put_object(Bucket=aws_settings.bucket, Key=corrupt, Body=b"not parquet")
    dry = _erase(aws_settings, CUSTOMER, "--dry-run")
    assert dry.exit_code == 1 and "would remove 7 rows in 2 files" in dry.output, dry.output
    assert "erasure would be incomplete: 1 lake file(s)" in dry.output

    done = _erase(aws_settings, CUSTOMER)
    assert done.exit_code == 1 and "removed 7 rows in 2 files" in done.output, done.output
    assert f"{corrupt}: does not read as Parquet (Parquet magic bytes not found" in done.output
    assert "erasure incomplete: 1 lake file(s) above do not read, and may hold the person's rows" in done.output
    assert s3.get_object(Bucket=aws_settings.bucket, Key=corrupt)["Body"].read() == b"not parquet"   # left as it is
    readable = [key for key in _etags(s3, aws_settings.bucket) if key != corrupt]
    assert [lake.read_parquet_object(s3, aws_settings.bucket, key).column("domain_sessionid").unique().to_pylist()
            for key in readable] == [["s-other"]]
    assert _sessions(lake_with_person[1], aws_settings.predictions_table) == {"s-other"}
    record = json.loads(s3.get_object(Bucket=aws_settings.bucket, Key=erase.record_key({CUSTOMER}))["Body"].read())
    assert record["runs"][-1]["unreadable"] == [corrupt]

    # Deleted, it is still an earlier version: named by its version id until that goes too.
    s3.delete_object(Bucket=aws_settings.bucket, Key=corrupt)
    again = _erase(aws_settings, CUSTOMER)
    assert again.exit_code == 1 and f"{corrupt}?versionId=" in again.output, again.output
    for version in s3.list_object_versions(Bucket=aws_settings.bucket, Prefix=corrupt)["Versions"]:
        s3.delete_object(Bucket=aws_settings.bucket, Key=corrupt, VersionId=version["VersionId"])
    assert _erase(aws_settings, CUSTOMER).exit_code == 0


def test_erase_refuses_clear_identifiers_and_an_empty_request(aws_settings, s3, lake_with_person):
    clear = _erase(aws_settings, "alice@example.com")
    assert clear.exit_code == 2
    assert "not 64-hex-digit pseudonyms, e.g. 'alice@exampl'" in clear.output
    assert "compute them with the pseudonymisation key" in clear.output
    empty = _erase(aws_settings)
    assert empty.exit_code == 2 and "no pseudonyms" in empty.output
    assert lake.read_enriched(s3, aws_settings.bucket).num_rows == len(lake_with_person[0])


def test_erase_is_a_command_of_the_installed_entry_point():
    # CliRunner calls the group object; this runs `python -m batch.cli` as an operator would.
    out = subprocess.run([sys.executable, "-m", "batch.cli", "erase", "--help"], cwd=ROOT_DIR, capture_output=True,
                         encoding="utf-8", timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "--dry-run" in out.stdout and "pseudonyms" in out.stdout
