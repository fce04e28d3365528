"""The ASGI app: tracker endpoints, identity at the edge, and the spool write before every answer.

No framework in the hot path: a pixel hit is a dict lookup for the route, one pass over the
headers, one orjson.dumps and one write() to the spool.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
import uuid
import zlib
from collections.abc import Awaitable
from email.utils import formatdate
from urllib.parse import parse_qs, quote, quote_from_bytes, urlsplit

import orjson

from collector import metrics
from collector.config import IGLU_WEBHOOK, TP2, CollectorSettings
from collector.records import Hit, build
from collector.spool import BAD, RAW, SpoolDirUnusable, SpoolFull, encode
from common import logs
from common.rawkey import NIL_UUID, SAFE_ID, keyed

log = logging.getLogger("collector")

# The 43-byte transparent 1x1 GIF every tracker expects.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = [(b"cache-control", b"no-cache, no-store, must-revalidate"), (b"pragma", b"no-cache"),
            (b"expires", b"0")]
GIF_HEADERS = [(b"content-type", b"image/gif"), *NO_CACHE]
TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
CORS_ANY = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-credentials", b"true")]   # never mutated
# Never recorded: credentials. With SP-Anonymous only headers that cannot carry the client's IP or
# whereabouts: proxies and CDNs each add their own (x-client-ip, fastly-client-ip,
# cloudfront-viewer-address, cloudfront-viewer-postal-code, ...), so a list of those would always lag.
SECRET_HEADERS = frozenset({"cookie", "authorization", "proxy-authorization"})
ANONYMOUS_HEADERS = frozenset({"host", "user-agent", "referer", "origin", "content-type", "content-length",
                               "content-encoding", "accept", "accept-encoding", "accept-language", "sp-anonymous"})
URL_SAFE = ":/?#[]@!$&'()*+,;=%~"
MAX_GZIP_MEMBERS = 16
ROUTES = {"/i": "pixel", "/ice.png": "pixel", TP2: "tp2", "/r/tp2": "redirect", IGLU_WEBHOOK: "webhook",
          "/health": "health", "/sink-health": "sink-health", "/metrics": "metrics", "/robots.txt": "robots"}
# A crawler following an email's tracked link (/r/tp2) or a pixel URL records hits no one made.
ROBOTS = b"User-agent: *\nDisallow: /\n"


class BodyTimeout(Exception):
    """The body did not arrive within body_timeout_s."""


class ClientGone(Exception):
    """The client closed the connection before its body was whole: there is no hit, and no one to answer."""


class TooLarge(Exception):
    """The body is over the limit; ``unread`` says whether part of it is still on the wire."""

    def __init__(self, unread: bool = False):
        super().__init__("payload too large")
        self.unread = unread


def _query(raw: bytes) -> str | None:
    if not raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        # Percent-encode only the invalid bytes' octets: decoding the result gives the exact bytes back.
        return quote_from_bytes(raw, safe=bytes(range(0x21, 0x7F)).decode())


def _split_headers(scope) -> tuple[dict[str, str], list[str], str]:
    """Headers by name, the ``name: value`` lines to record (no credentials), and the Cookie header."""
    headers, kept, cookie = {}, [], ""
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1")                               # ASGI names are lower-case
        # Header octets are ISO-8859-1 by HTTP's rules when they are not UTF-8: either way, lossless.
        # (Inline: a function call per header was a tenth of this loop.)
        try:
            value = raw_value.decode()
        except UnicodeDecodeError:
            value = raw_value.decode("latin-1")
        if name == "cookie":
            cookie = f"{cookie}; {value}" if cookie else value
        elif name not in SECRET_HEADERS:
            kept.append(f"{name}: {value}")
            if name == "x-forwarded-for" and name in headers:
                # Several lines are one list (RFC 9110 5.3); a proxy may append its entry as a line of its own.
                value = f"{headers[name]}, {value}"
            headers[name] = value
    return headers, kept, cookie


def _cookies(header: str) -> dict[str, str]:
    jar = {}
    for part in header.split(";"):
        name, _, value = part.partition("=")
        jar.setdefault(name.strip(), value.strip())
    return jar


def gunzip(body: bytes, limit: int) -> bytes | None:
    """The decompressed body, every member of it (RFC 1952 allows several; trackers send one); None
    when it is not valid, complete gzip or has more than MAX_GZIP_MEMBERS members (then it is kept
    as received). Each member copies the input left after it: 100,000 tiny members in 2 MiB cost
    seconds of the event loop, so their number is capped."""
    out, rest = bytearray(), body
    for _ in range(MAX_GZIP_MEMBERS):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += decoder.decompress(rest, limit + 1 - len(out))
        except zlib.error:
            return None
        if len(out) > limit:
            raise TooLarge
        if not decoder.eof:
            return None
        rest = decoder.unused_data
        if not rest:
            return bytes(out)
    return None


class Collector:
    def __init__(self, settings: CollectorSettings, sink_factory=None):
        self.settings = settings
        self.routes = dict(ROUTES)
        self.canonical = {path: path for path in ROUTES}
        for source, target in settings.path_map().items():
            self.routes[source] = ROUTES[target]
            self.canonical[source] = target
        self.domains = [d.lstrip(".").lower() for d in settings.cookie_domains]
        self.redirect_domains = [d.lstrip(".").lower() for d in settings.redirect_domains]
        self.sink_factory = sink_factory
        self.sink = None
        self.spool = None
        self._expires: tuple[int, dict] = (0, {})
        # A failing spool disk, or a full spool, fails every hit: one ERROR line per 10 s each, with
        # how many hits it stands for.
        self.write_errors = logs.Tally(every_s=10.0)
        self._fsync: asyncio.Future | None = None        # the fsync=always round in flight
        self.full_refusals = logs.Tally(every_s=10.0)
        # Requests reading a body, and when they must be done: a client that stops halfway would
        # hold one of max_concurrent_requests slots for good, and that many shut out every hit.
        self._reading: dict[asyncio.Task, float] = {}
        self._reaped: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None

    # ------------------------------------------------------------------ ASGI entry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                except SpoolDirUnusable as exc:     # the setting to fix, not a stack trace
                    log.error("collector failed to start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:  # reported to granian, which exits: no half-started worker
                    log.exception("collector failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, self.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        from collector.sink import open_sink

        factory = self.sink_factory or open_sink
        self.sink, self._lock_fd = factory(self.settings)
        self.spool = self.sink.spool
        self._forget_previous_worker()
        self.sink.start()
        log.info("collector worker %d ready; spool %s", os.getpid(), self.spool.dir)

    def stop(self) -> None:
        if self.sink is not None:
            self.sink.stop(self.settings.shutdown_timeout_s)
            log.info("collector worker %d stopped; %d records left in the spool", os.getpid(), self.spool.records)
            self.sink = None
            metrics.forget_worker(os.getpid())

    def _forget_previous_worker(self) -> None:
        """The slot's last worker, if it died without stopping (kill -9): its gauges go, unless its
        pid is alive again as another process."""
        metrics.forget_dead_worker(self.spool.dir)
        (self.spool.dir / "pid").write_text(str(os.getpid()))

    # ------------------------------------------------------------------ HTTP

    async def http(self, scope, receive, send) -> None:
        path = request_path(scope)
        route = self.routes.get(path, "other")
        try:
            status = await self.dispatch(route, path, scope, receive, send)
        except Exception:  # a bug must cost one request, not the worker
            log.exception("request to %s failed", scope["path"])
            status = 500
            await respond(send, 500, TEXT, b"internal error")
        metrics.count(route, status)

    def dispatch(self, route: str, path: str, scope, receive, send) -> Awaitable[int]:
        # A plain function returning the awaitable to answer with: a coroutine frame of its own per
        # request only passed the result through.
        method = scope["method"]
        if route in ("pixel", "tp2", "redirect", "webhook"):
            if method == "OPTIONS":
                return self.preflight(scope, send)
            if method == "GET" or (method == "POST" and route in ("tp2", "webhook")):
                return self.track(route, self.canonical[path], scope, receive, send)
            return respond(send, 405, TEXT, b"method not allowed")
        if route == "health":
            return respond(send, 200, TEXT, b"ok")
        if route == "robots":
            return respond(send, 200, TEXT, ROBOTS)
        if route == "sink-health":
            problem = self.sink.problem() if self.sink is not None else "not started"
            return respond(send, 503 if problem else 200, TEXT, (problem or "ok").encode())
        if route == "metrics":
            body, kind = metrics.render(self.sink)
            return respond(send, 200, [(b"content-type", kind.encode())], body)
        return respond(send, 404, TEXT, b"not found")

    async def in_time(self, reading):
        """Await ``reading`` (of the request body) for at most body_timeout_s; BodyTimeout after."""
        task = asyncio.current_task()
        self._reading[task] = time.monotonic() + self.settings.body_timeout_s
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_slow_readers())
        try:
            return await reading
        except asyncio.CancelledError:
            if task not in self._reaped or task.uncancel() > 0:
                raise                   # (also) cancelled for another reason: shutdown
            raise BodyTimeout from None
        finally:
            del self._reading[task]
            self._reaped.discard(task)

    async def _reap_slow_readers(self) -> None:
        # One timer for all requests: an asyncio.timeout per request costs ~4 us, a sixth of a hit.
        while True:
            await asyncio.sleep(min(1.0, self.settings.body_timeout_s / 2))
            now = time.monotonic()
            for task, deadline in list(self._reading.items()):
                if deadline < now and task not in self._reaped:
                    self._reaped.add(task)
                    task.cancel()

    async def preflight(self, scope, send) -> int:
        origin = _header(scope, b"origin")
        headers = [(b"access-control-allow-origin", origin or b"*"),
                   (b"access-control-allow-credentials", b"true"),
                   (b"access-control-allow-headers", b"Content-Type, SP-Anonymous"),
                   (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
                   (b"access-control-max-age", str(self.settings.cors_max_age_s).encode()),
                   (b"vary", b"Origin")]
        return await respond(send, 200, headers, b"")

    async def track(self, route: str, canonical_path: str, scope, receive, send) -> int:
        settings = self.settings
        headers, kept, cookie = _split_headers(scope)
        origin = headers.get("origin")
        # On every answer, errors included, so a browser page can read why its hit failed.
        cors = [(b"access-control-allow-origin", origin.encode("latin-1", "replace")),
                (b"access-control-allow-credentials", b"true")] if origin else CORS_ANY
        try:
            body = await self.in_time(read_body(receive, headers, settings.max_request_bytes)) \
                if scope["method"] == "POST" else None
        except TooLarge as exc:
            if exc.unread:
                with contextlib.suppress(BodyTimeout):
                    await self.in_time(drain(receive, 4 * settings.max_request_bytes))
            return await respond(send, 413, TEXT + cors, b"payload too large")
        except BodyTimeout:
            return await respond(send, 408, TEXT + cors, b"request body not received in time")
        except ClientGone:
            # Gone, or still there: granian also reports a malformed chunked body as a disconnect,
            # and without an answer it sent that client a 500, which trackers retry. Counted as 499
            # (nginx's code for a client gone), as a gone client's is.
            with contextlib.suppress(Exception):
                await respond(send, 400, TEXT + cors, b"request body cut off or malformed")
            return 499

        query = _query(scope["query_string"])
        location = None
        if route == "redirect":
            location = self.redirect_target(query)
            if location is None:
                return await respond(send, 400, TEXT + cors, b"redirect target missing or not allowed")

        jar = _cookies(cookie) if cookie else {}
        if settings.dnt_cookie_name and jar.get(settings.dnt_cookie_name) == settings.dnt_cookie_value:
            return await self.answer(scope, send, cors, location)    # opted out: answered, not recorded

        ip, nuid, new_user, kept, set_cookie = self.identify(scope, headers, kept, jar, query)
        hit = Hit(int(time.time() * 1000), ip, headers.get("user-agent"), headers.get("referer"),
                  canonical_path, query, scope["method"], headers.get("content-type"),
                  body, kept, nuid, headers.get("host", ""))
        try:
            end = self.spool_hit(hit, new_user)
            if self.spool.fsync_always:
                await self.durable(end)
        except (SpoolFull, OSError) as exc:
            # Not durably written (backlog limit, or the disk failed): not acknowledged either.
            self.note_refusal(exc)
            retry = [(b"retry-after", str(settings.retry_after_s).encode())]
            return await respond(send, 503, TEXT + retry + cors, b"spool full, retry later")
        return await self.answer(scope, send, cors + set_cookie, location)

    def note_refusal(self, exc: SpoolFull | OSError) -> None:
        """Count a hit the spool could not take, and log it: one ERROR line per 10 s for each cause."""
        if isinstance(exc, OSError):
            metrics.WRITE_ERRORS.inc()
            if refused := self.write_errors.add():
                log.error("spool %s: write failed, %d hits refused (503) since the last such line: %s",
                          self.spool.dir, refused, exc)
        else:
            metrics.REJECTED.inc()
            if refused := self.full_refusals.add():
                log.error("spool %s full: %d undelivered bytes, spool_max_bytes %d; %d hits refused (503) "
                          "since the last such line", self.spool.dir, self.spool.depth_bytes,
                          self.spool.max_bytes, refused)

    def identify(self, scope, headers: dict, kept: list, jar: dict, query: str | None):
        """The client's IP, network user id, whether that id was made up for this request (no cookie
        or ``nuid`` came with it), recorded headers and Set-Cookie: no IP, the nil id, only
        ANONYMOUS_HEADERS and an expired cookie under SP-Anonymous."""
        if "sp-anonymous" in headers:
            kept = [h for h in kept if h.split(":", 1)[0] in ANONYMOUS_HEADERS]
            expire = [(b"set-cookie", self.cookie("", headers, expire=True))] \
                if self.settings.cookie_name in jar else []
            return None, NIL_UUID, False, kept, expire
        ip = _client_ip(scope, headers, self.settings.trusted_proxy_hops)
        nuid = _nuid_param(query) or jar.get(self.settings.cookie_name) or ""
        new_user = not SAFE_ID.match(nuid)
        if new_user:
            # Only ids that are safe to echo in Set-Cookie; anything else gets a fresh one.
            nuid = str(uuid.uuid4())
        return ip, nuid, new_user, kept, [(b"set-cookie", self.cookie(nuid, headers))]

    def spool_hit(self, hit: Hit, new_user: bool) -> int:
        """Write the hit's frames to the spool; the spool's end offset after them (for ``durable``)."""
        settings = self.settings
        records, bad_rows = build(hit, settings.max_payload_bytes, settings.bad_payload_keep_bytes)
        key, keyed_by = keyed(hit.querystring, hit.body, hit.network_userid)
        # An id made up for this hit alone keys it no better than a random one.
        metrics.keyed("random" if new_user and keyed_by == "network_userid" else keyed_by)
        if len(records) == 1 and not bad_rows:          # the usual hit: one record
            frames, count = encode(RAW, key, records[0]), 1
        else:
            parts = [encode(RAW, key, data) for data in records]
            parts += [encode(BAD, str(uuid.uuid4()), orjson.dumps(row)) for row in bad_rows]
            frames, count = b"".join(parts), len(parts)
        sink = self.sink            # stop() may clear it meanwhile: a hit spooled by then is answered
        end = self.spool.append(frames, count)
        metrics.spooled(count)
        if sink is not None:
            sink.notify()
        return end

    async def durable(self, end: int) -> None:
        """Wait until the spool is fsynced up to ``end``. Group commit: one fsync in a thread at a time,
        for every hit spooled before it began; the hits that arrive meanwhile wait for the next one.
        A thread hop per hit instead (each taking the GIL back) cost more than the fsyncs."""
        spool = self.spool
        while not spool.is_synced(end):
            # A finished round counts as none: awaiting it again would not yield, and loop for ever.
            if self._fsync is None or self._fsync.done():
                self._fsync = asyncio.get_running_loop().run_in_executor(None, spool.sync_to, spool.end)
            await asyncio.shield(self._fsync)

    def answer(self, scope, send, extra: list, location: str | None = None) -> Awaitable[int]:
        if location is not None:
            return respond(send, 302, [(b"location", quote(location, safe=URL_SAFE).encode()), *NO_CACHE,
                                       *extra], b"")
        if scope["method"] == "POST":
            return respond(send, 200, TEXT + extra, b"ok")
        return respond(send, 200, GIF_HEADERS + extra, PIXEL)

    def redirect_target(self, query: str | None) -> str | None:
        if not self.redirect_domains or not query:
            return None
        target = parse_qs(query).get("u", [None])[0]
        try:
            parts = urlsplit(target) if target else None
        except ValueError:
            return None
        if parts is None or parts.scheme.lower() not in ("http", "https"):   # no javascript:, data: or app handlers
            return None
        host = (parts.hostname or "").lower()
        if host and any(host == d or host.endswith("." + d) for d in self.redirect_domains):
            return target
        return None

    def cookie(self, value: str, headers: dict, expire: bool = False) -> bytes:
        domain = self.cookie_domain(headers)
        if expire:
            tail = self._tail(domain, "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
        else:
            # The attributes change once a second (Expires): build them once per second and domain.
            now = int(time.time())
            if self._expires[0] != now:
                self._expires = (now, {})
            tail = self._expires[1].get(domain)
            if tail is None:
                expiry = formatdate(now + self.settings.cookie_days * 86400, usegmt=True)
                tail = self._expires[1][domain] = self._tail(
                    domain, f"Max-Age={self.settings.cookie_days * 86400}; Expires={expiry}")
        return f"{self.settings.cookie_name}={value}; {tail}".encode("latin-1", "replace")

    def _tail(self, domain: str | None, lifetime: str) -> str:
        parts = ["Path=/", lifetime]
        if domain:
            parts.append(f"Domain={domain}")
        # SameSite=None lets the shop's pages send the cookie to a collector on another site, but
        # browsers drop such a cookie unless it is Secure: a plain-HTTP collector gets Lax, which
        # they keep (sent on same-site hits only).
        parts.append("Secure; SameSite=None" if self.settings.cookie_secure else "SameSite=Lax")
        return "; ".join([*parts, "HttpOnly"])

    def cookie_domain(self, headers: dict) -> str | None:
        """The first configured domain the Origin's host (else the Host) is in; else the fallback."""
        if not self.domains:
            return self.settings.cookie_fallback_domain or None
        candidates = []
        if headers.get("origin"):
            try:
                candidates.append(urlsplit(headers["origin"]).hostname or "")
            except ValueError:            # a malformed Origin ("http://[") names no domain
                pass
        if headers.get("host"):
            candidates.append(headers["host"].rsplit(":", 1)[0].lower())
        for host in candidates:
            for domain in self.domains:
                if host == domain or host.endswith("." + domain):
                    return domain
        return self.settings.cookie_fallback_domain or None


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


def _client_ip(scope, headers: dict, hops: int) -> str | None:
    """The entry ``hops`` from the right of X-Forwarded-For (the leftmost if there are fewer), else the
    socket peer. The client writes whatever it likes on the left; each proxy appends the peer it saw,
    so only the entries our own proxies appended can be trusted."""
    forwarded = headers.get("x-forwarded-for") if hops else None
    if forwarded:
        entries = forwarded.split(",")
        return entries[max(len(entries) - hops, 0)].strip()
    return (scope.get("client") or (None,))[0]


def _nuid_param(query: str | None) -> str | None:
    if not query or "nuid=" not in query:
        return None
    return parse_qs(query).get("nuid", [None])[0]


def request_path(scope) -> str:
    """The path as sent: routes match it undecoded, so /%6Detrics is not /metrics (a proxy rule that
    keeps /metrics from the internet would let it through)."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if raw else scope["path"]


async def read_body(receive, headers: dict, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone        # what came is a cut-off body, not a hit
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(unread=message.get("more_body", False))
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if headers.get("content-encoding", "").strip().lower() == "gzip":
        decoded = gunzip(body, limit)
        if decoded is not None:
            return decoded
    return body


async def drain(receive, budget: int) -> None:
    """Read and drop the rest of a refused body (up to ``budget``), so the client sees our 413
    instead of a broken pipe mid-upload."""
    while budget > 0:
        message = await receive()
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def respond(send, status: int, headers: list, body: bytes) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    return status


def create_app() -> Collector:
    """Granian's factory target: each worker builds its app (and its own spool) from the environment."""
    from collector.config import settings

    logs.setup()
    return Collector(settings())
