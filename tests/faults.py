"""Faults for the tests: a fault-injecting HTTP proxy between a client and the emulator, and an
in-memory stream that stays throttled for a while.

The proxy forwards every request unchanged, except that it can
- fail chosen entries of a Kinesis PutRecords call for real: the entries are removed from the
  request before it reaches the emulator and answered with ``ProvisionedThroughputExceededException``
  in their slots, exactly as Kinesis reports a partial failure;
- be "down": answer every request with 503, or drop the connection, like an unreachable stream;
- delay every request, or the calls of chosen APIs (a slow stream: the call is forwarded, and its
  records land, after the delay, whether or not the client still waits);
- throttle chosen API calls (by their X-Amz-Target), or answer their next calls with given error
  codes, as Kinesis or DynamoDB would;
- hang the next call of a chosen API (to a chosen stream), or S3 request (method and path), before or after forwarding it, and never
  answer: the moment to kill its client, with the write not done or done but not acknowledged.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from common.streams import MemoryStream

PUT_RECORDS = "Kinesis_20131202.PutRecords"
GET_RECORDS = "Kinesis_20131202.GetRecords"


def _matches(call: tuple[str, ...], target: str, body: bytes) -> bool:
    """Whether a request is the ``(target, when[, stream])`` call: that API, and that stream if given."""
    if call[0] != target:
        return False
    if len(call) < 3:
        return True
    request = json.loads(body or b"{}")
    return call[2] in (request.get("StreamName"), (request.get("StreamARN") or "").rpartition("/")[2])


def error_body(code: str) -> bytes:
    """A JSON-protocol service's error answer (Kinesis, DynamoDB), as botocore parses it."""
    return json.dumps({"__type": code, "message": f"{code} (injected by FaultProxy)"}).encode()


class FaultProxy:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.fail_entries: list[int] = []      # positions to fail in the next PutRecords calls, one list per call
        self.fail_calls: list[list[int]] = []
        self.down = False
        self.delay_s = 0.0                      # every request waits this long first (a throttled call's retries)
        # X-Amz-Target: seconds each such call waits before it is forwarded (a slow API, whose writes
        # land although a client that stopped waiting sees a timeout)
        self.delays: dict[str, float] = {}
        self.put_calls = 0
        self.failed_entries = 0
        self.throttle: set[str] = set()        # X-Amz-Target values to answer with a throttling error
        self.refuse_next: dict[str, list[str]] = {}   # X-Amz-Target: error codes for its next calls, one each
        self.calls: dict[str, int] = {}        # requests seen, by X-Amz-Target
        # (X-Amz-Target or "PUT /bucket/key", "before" or "after" forwarding it[, the stream name the call must name])
        self.hang_next: tuple[str, ...] | None = None
        self.hanging = threading.Event()       # set once a call hangs
        self._hang_lock = threading.Lock()
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                # A JSON-protocol call is named by its X-Amz-Target, an S3 call by method and path.
                target = self.headers.get("X-Amz-Target") or f"{self.command} {unquote(urlsplit(self.path).path)}"
                if delay := proxy.delay_s + proxy.delays.get(target, 0.0):
                    time.sleep(delay)
                if proxy.down:
                    self._answer(503, b"")
                    return
                proxy.calls[target] = proxy.calls.get(target, 0) + 1
                queued = proxy.refuse_next.get(target)
                if queued or target in proxy.throttle:
                    self._answer(400, error_body(queued.pop(0) if queued else "ProvisionedThroughputExceededException"))
                    return
                fail, hang = [], None
                if target == PUT_RECORDS:
                    proxy.put_calls += 1
                    fail = proxy.fail_calls.pop(0) if proxy.fail_calls else []
                with proxy._hang_lock:
                    if proxy.hang_next and _matches(proxy.hang_next, target, body):
                        hang, proxy.hang_next = proxy.hang_next[1], None
                if hang == "before":
                    proxy.hang()
                    return
                status, headers, payload = proxy.forward(self.command, self.path, self.headers, body, fail)
                if hang == "after":
                    proxy.hang()
                    return
                self._answer(status, payload, headers)

            def _answer(self, status, payload, headers=()):
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def hang(self) -> None:
        self.hanging.set()
        self._released.wait(300)

    def release(self) -> None:
        """End every hang: each hung call's client sees its connection closed unanswered."""
        self._released.set()

    def forward(self, method, path, headers, body, fail: list[int]):
        records = None
        if fail:
            request = json.loads(body)
            records = request["Records"]
            request["Records"] = [r for i, r in enumerate(records) if i not in fail]
            body = json.dumps(request).encode()
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        forwarded = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "host")}
        forwarded["Content-Length"] = str(len(body))
        connection.request(method, path, body=body, headers=forwarded)
        response = connection.getresponse()
        payload = response.read()
        status, out_headers = response.status, response.getheaders()
        connection.close()
        if fail and status == 200:
            payload = self._splice_failures(payload, len(records), fail)
        return status, out_headers, payload

    def _splice_failures(self, payload: bytes, total: int, fail: list[int]) -> bytes:
        answer = json.loads(payload)
        delivered = iter(answer["Records"])
        merged = []
        for i in range(total):
            if i in fail:
                merged.append({"ErrorCode": "ProvisionedThroughputExceededException",
                               "ErrorMessage": "Rate exceeded for shard (injected by FaultProxy)"})
            else:
                merged.append(next(delivered))
        self.failed_entries += len(fail)
        answer["Records"] = merged
        answer["FailedRecordCount"] = answer.get("FailedRecordCount", 0) + len(fail)
        return json.dumps(answer).encode()


class RefusesCalls(MemoryStream):
    """Refuses the first ``entries`` entries (all of them by default) of each of its first ``calls``
    PutRecords calls (throttling), then accepts."""

    def __init__(self, name: str, calls: int, entries: int | None = None):
        super().__init__(name)
        self.calls_left, self.entries = calls, entries

    def put_records(self, entries):
        if self.calls_left > 0:
            self.calls_left -= 1
            self.fail_next = len(entries) if self.entries is None else self.entries
        return super().put_records(entries)


class ThrottledFor(MemoryStream):
    """Refuses every entry, as a throttled shard does, for ``seconds``; ``during`` runs on every call
    (what other workers do meanwhile)."""

    def __init__(self, name: str, seconds: float, during=lambda: None):
        super().__init__(name)
        self.until = time.monotonic() + seconds
        self.during = during

    def put_records(self, entries):
        self.during()
        if time.monotonic() < self.until:
            self.fail_next = len(entries)
        return super().put_records(entries)


class AnswersSlowly(MemoryStream):
    """Takes every entry of every PutRecords call, ``seconds`` after it was made (a stream answering
    slowly, not refusing); ``during`` runs meanwhile (what other workers do)."""

    def __init__(self, name: str, seconds: float, during=lambda: None):
        super().__init__(name)
        self.seconds, self.during = seconds, during

    def put_records(self, entries):
        until = time.monotonic() + self.seconds
        while time.monotonic() < until:
            self.during()
            time.sleep(0.02)
        return super().put_records(entries)
