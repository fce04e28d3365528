import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from localstack import emulator


@pytest.mark.parametrize("kind", ["moto", "kinesis-mock"])
def test_emulator_answers_then_stops_without_leaving_a_process(kind):
    server = emulator.start(kind)
    try:
        with urllib.request.urlopen(server.endpoint + ("/moto-api/" if kind == "moto" else "/"), timeout=5):
            pass
    except urllib.error.HTTPError as exc:
        assert exc.code < 500
    server.stop()
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)          # the whole process group is gone


def test_concurrent_writers_to_one_shard_lose_no_record():
    """moto numbers a shard's records as "the last one's + 1", one request per thread: two PutRecords
    at once got the same number and the later replaced the earlier (1,707 of 64,000 records lost with
    16 writers). Most likely on a long shard, where reading the last number takes longest."""
    server = emulator.start("moto")
    try:
        def client():
            return boto3.client("kinesis", endpoint_url=server.endpoint, region_name="us-east-1",
                                aws_access_key_id="test", aws_secret_access_key="test")

        kinesis = client()
        kinesis.create_stream(StreamName="race", ShardCount=1)
        kinesis.get_waiter("stream_exists").wait(StreamName="race", WaiterConfig={"Delay": 0.2})

        def put(writer: int, calls: int, size: int) -> int:
            own = client()
            for call in range(calls):
                answer = own.put_records(StreamName="race", Records=[
                    {"Data": f"{writer}-{call}-{n}".encode(), "PartitionKey": str(writer)} for n in range(size)])
                assert answer["FailedRecordCount"] == 0
            return calls * size

        sent = put(-1, 60, 500)                                     # a long shard first, from one writer
        with ThreadPoolExecutor(16) as pool:
            sent += sum(pool.map(put, range(16), [20] * 16, [20] * 16))
        shard = kinesis.list_shards(StreamName="race")["Shards"][0]["ShardId"]
        iterator = kinesis.get_shard_iterator(StreamName="race", ShardId=shard,
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        read: set[bytes] = set()
        while True:
            page = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            if not page["Records"]:
                break
            read.update(record["Data"] for record in page["Records"])
            iterator = page["NextShardIterator"]
        assert len(read) == sent == 36_400
    finally:
        server.stop()


def test_two_emulators_run_side_by_side_on_free_ports():
    first, second = emulator.start("moto"), emulator.start("moto")
    try:
        assert first.port != second.port
    finally:
        first.stop()
        second.stop()


def test_a_port_in_use_is_reported_not_hung():
    first = emulator.start("moto")
    try:
        with pytest.raises(RuntimeError, match="in use"):
            emulator.start("moto", port=first.port, timeout=10)
    finally:
        first.stop()


def test_the_foreground_emulator_stops_with_its_group_even_started_with_sigint_ignored():
    """`make down` sends SIGINT to the group of `python -m localstack.emulator`. Started in the
    background by a shell, it inherited SIGINT ignored and never stopped; the SIGKILL that followed
    reached only its group, and the moto server, in a session of its own, lived on holding the port
    (the next `make up` used that stale emulator)."""
    port = emulator.free_port()
    # As a non-interactive shell starts a background job: SIGINT ignored, which exec keeps.
    command = f"trap '' INT; exec {sys.executable} -m localstack.emulator --port {port}"
    wrapper = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, start_new_session=True,
                               cwd=emulator.ROOT)
    try:
        assert wrapper.stdout.readline().decode().startswith("moto listening")
        started = time.monotonic()
        emulator.stop_group(wrapper.pid, timeout=15, first=signal.SIGINT, process=wrapper)
        assert time.monotonic() - started < 10                       # stopped on SIGINT, not killed
        assert emulator.probe(f"http://127.0.0.1:{port}/moto-api/") is None
    finally:
        if emulator.probe(f"http://127.0.0.1:{port}/moto-api/") is not None:
            subprocess.run(["pkill", "-f", f"moto_server -H 127.0.0.1 -p {port}"], check=False)
