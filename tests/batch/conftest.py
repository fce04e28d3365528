"""Helpers for the lake tests: enriched events shaped like docs/contracts.md, stream and lake access."""
from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import uuid
from pathlib import Path

import orjson
import pytest

from batch import lake
from batch.loader import LoaderSettings
from common import aws
from common.config import AwsSettings
from common.producer import Producer
from common.streams import KinesisStream, Record

ROOT_DIR = Path(__file__).resolve().parents[2]
BASE = dt.datetime(2026, 11, 29, 9, 58, tzinfo=dt.UTC)


def iso(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def make_event(index: int, *, session: str | None = None, at: dt.datetime | None = None, **fields) -> dict:
    """One enriched event (a product view with a page_type context), as the enricher emits it."""
    at = at or BASE + dt.timedelta(seconds=index)
    event = {
        "app_id": "clickshop", "platform": "web", "event": "unstruct", "event_id": str(uuid.uuid4()),
        "event_fingerprint": uuid.uuid4().hex, "collector_tstamp": iso(at),
        "dvce_created_tstamp": iso(at - dt.timedelta(milliseconds=40)), "dvce_sent_tstamp": iso(at),
        "derived_tstamp": iso(at - dt.timedelta(milliseconds=40)), "etl_tstamp": iso(at + dt.timedelta(seconds=1)),
        "true_tstamp": None, "v_tracker": "js-4.1.0", "v_collector": "clickstream-collector/0.1.0",
        "v_etl": "clickstream-enrich/0.1.0", "name_tracker": "sp",
        "user_id": None, "domain_userid": "ab" * 32, "network_userid": "cd" * 32, "user_ipaddress": "ef" * 32,
        "domain_sessionid": session or str(uuid.uuid4()), "domain_sessionidx": 1 + index % 3,
        "page_url": f"https://shop.example/p/{index}", "page_urlscheme": "https", "page_urlhost": "shop.example",
        "page_urlport": 443, "page_urlpath": f"/p/{index}", "page_title": "Product", "refr_medium": None,
        "se_value": None, "tr_total": None, "ti_quantity": None, "pp_yoffset_max": None,
        "unstruct_event": {"schema": "iglu:com.clickshop/product_view/jsonschema/1-0-0",
                           "data": {"sku": f"SKU-{index % 7}", "category": "shoes", "price": 49.5, "currency": "EUR"}},
        "event_vendor": "com.clickshop", "event_name": "product_view", "event_format": "jsonschema",
        "event_version": "1-0-0",
        "contexts": [{"schema": "iglu:com.clickshop/page_type/jsonschema/1-0-0", "data": {"type": "product"}}],
        "derived_contexts": [],
        "useragent": "Mozilla/5.0", "br_family": "Chrome", "os_family": "Linux", "dvce_type": "Computer",
        "dvce_ismobile": False, "br_viewwidth": 1280, "br_viewheight": 800,
    }
    event.update(fields)
    return event


def make_bad_row(raw: dict, kind: str = "schema_violations", version: str = "2-0-0") -> dict:
    return {"schema": f"iglu:com.snowplowanalytics.snowplow.badrows/{kind}/jsonschema/{version}",
            "data": {"processor": {"artifact": "clickstream-enrich", "version": "0.1.0"},
                     "failure": {"messages": ["no schema"]},
                     "payload": {"record": raw, "parameters": {"e": "pv", "tv": "js-4.1.0", "p": "web"}}}}


def make_raw(index: int) -> dict:
    return {"schema": "iglu:com.clickstream/raw_record/jsonschema/1-0-0", "collector_tstamp": 1796032680000 + index,
            "ip": "10.0.0.1", "useragent": "Mozilla/5.0", "referer": None, "path": "/i", "method": "GET",
            "querystring": f"e=pv&tv=js-4.1.0&p=web&eid={uuid.uuid4()}", "content_type": None, "body": None,
            "body_base64": None, "headers": [], "network_userid": str(uuid.uuid4()),
            "collector": "clickstream-collector/0.1.0", "hostname": "shop.example"}


def loader_settings(settings: AwsSettings, **overrides) -> LoaderSettings:
    names = {f.name: getattr(settings, f.name) for f in dataclasses.fields(AwsSettings)}
    return LoaderSettings(**{**names, **overrides})


def put(stream_name: str, entries: list[tuple[str, bytes]]) -> None:
    producer = Producer(KinesisStream(aws.client("kinesis"), stream_name))
    assert producer.send(entries) == []


def put_events(stream_name: str, events: list[dict]) -> None:
    put(stream_name, [(event["domain_sessionid"], orjson.dumps(event)) for event in events])


def lake_event_ids(bucket: str) -> list[str]:
    return lake.read_enriched(aws.client("s3"), bucket, columns=["event_id"]).column("event_id").to_pylist()


def lake_bad_rows(bucket: str) -> list[tuple[str, dict]]:
    """(key, bad row) for every bad row of the lake."""
    s3 = aws.client("s3")
    return [(key, orjson.loads(line)) for key in lake_keys(bucket, "bad/") if key.endswith(".jsonl.gz")
            for line in gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).splitlines()]


def lake_keys(bucket: str, area: str = "") -> list[str]:
    return sorted(obj["Key"] for obj in lake.list_objects(aws.client("s3"), bucket, area))


def stream_records(payloads: list[bytes], shard: str = "shardId-000000000000", start: int = 1,
                   arrival_ms: int = 1_796_032_680_000) -> list[Record]:
    return [Record(data, "pk", str(start + i), shard, arrival_ms) for i, data in enumerate(payloads)]


def event_records(events: list[dict], **kwargs) -> list[Record]:
    return stream_records([orjson.dumps(e) for e in events], **kwargs)


@pytest.fixture
def s3(aws_endpoint):
    return aws.client("s3")
