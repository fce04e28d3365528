"""The HTTP API as a plain ASGI app: no framework on the request path, so a single-row
/invocations costs little more than the onnxruntime call itself.

Routes (see ``openapi.py`` for the full document): /ping, /invocations, the Open Inference
Protocol v2 (/v2/...), /score/session, /sessions/{id}/prediction, /sessions/{id}/features,
/models/reload, /metrics, /openapi.json.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from common import logs
from common.aws import ttl_expired
from common.features import (
    FEATURE_COUNT,
    FEATURE_NAMES,
    FEATURE_VERSION,
    SessionState,
    session_key,
    step,
)
from common.features import features as read_features
from scorer import inputs, metrics
from scorer.inputs import BadRequest
from scorer.model import Model, ModelRefused, Models
from scorer.openapi import document
from scorer.sink import from_item

log = logging.getLogger("scorer.api")
GONE = object()             # _body's answer when the client left mid-body

JSON = [(b"content-type", b"application/json")]
MAX_SESSION_ID_BYTES = 2048        # DynamoDB's limit for a partition key
# Bodies are read whole, so one huge request could take the memory the worker shares: 4 MiB holds
# some 10,000 rows of features as JSON.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Lookups read the table on threads of their own, at most this many waiting: on asyncio's default
# threads (6 on 2 cores) a table answering in 2 s queued every features request and reload behind
# them (20 s behind 60 lookups), and waiting lookups piled up without bound. Past the cap, a 503.
LOOKUP_THREADS = 8
LOOKUPS_WAITING_MAX = 256


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers=JSON):
        self.status, self.body, self.headers = status, body, headers


def ok(payload, status: int = 200) -> Response:
    return Response(status, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))


def error(status: int, message: str) -> Response:
    return Response(status, orjson.dumps({"error": message}))


class ScorerApp:
    def __init__(self, models: Models, *, dynamodb=None, table: str | None = None, reload_token: str = "",
                 worker=None, api: bool = True):
        self.models = models
        self.api = api
        self.dynamodb = dynamodb
        self.table = table
        self.reload_token = reload_token
        self.worker = worker
        self.openapi = orjson.dumps(document())
        self._timers: dict = {}
        self.table_failures = logs.Tally(every_s=30.0)     # per request while the table is down: once per 30 s
        self.lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="lookup")
        self.lookups_waiting = 0                            # only the event loop's thread counts them
        self.lookups_refused = logs.Tally(every_s=30.0)
        self.routes = {
            ("GET", "/ping"): self.ping,
            ("POST", "/invocations"): self.invocations,
            ("GET", "/v2/health/live"): self.live,
            ("GET", "/v2/health/ready"): self.ready,
            ("GET", "/v2"): self.server_metadata,
            ("POST", "/score/session"): self.score_session,
            ("POST", "/models/reload"): self.reload,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/openapi.json"): self.openapi_json,
        }
        if not api:
            # A worker-only process (--no-api) still needs its health check and metrics: nothing else
            # (no scoring, no table reads) competes with its batches.
            self.routes = {key: self.routes[key] for key in (("GET", "/ping"), ("GET", "/metrics"))}

    # ------------------------------------------------------------------ ASGI plumbing

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        body = await self._body(scope, receive)
        if body is GONE:
            return      # nothing to answer; a cut-off body must not act (a reload without its version loads CURRENT)
        method, path = scope["method"], scope["path"]
        route = self.routes.get((method, path))
        try:
            if body is None:
                raise BadRequest(413, f"request body over {MAX_BODY_BYTES:,} bytes")
            if route is not None:
                response = route(scope, body)
            else:
                response = self._dynamic(method, path, scope, body)
            if asyncio.iscoroutine(response):
                response = await response
        except BadRequest as exc:
            response = error(exc.status, exc.message)
        except Exception:
            log.exception("%s %s failed", method, path)
            response = error(500, "internal error; see the scorer log")
        await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
        await send({"type": "http.response.body", "body": response.body})
        self._timer(path if route is not None else "dynamic").observe(time.perf_counter() - started)

    def _timer(self, route: str):
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = metrics.REQUEST_SECONDS.labels(route)
        return timer

    @staticmethod
    async def _body(scope, receive) -> bytes | object | None:
        """The request body, None past MAX_BODY_BYTES (the rest is not read), GONE when the client
        left before it was whole."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _lifespan(receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _dynamic(self, method: str, path: str, scope, body: bytes):
        if not self.api:
            return error(404, f"no route {method} {path}: this scorer runs without its API (--no-api)")
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            name, rest, version = parts[2], parts[3:], None
            if rest and rest[0] == "versions" and len(rest) >= 2:     # /v2/models/{name}/versions/{v}/...
                version, rest = rest[1], rest[2:]
            if method == "GET" and not rest:
                return self.model_metadata(name, version)
            if method == "GET" and rest == ["ready"]:
                return self.model_ready(name, version)
            if method == "POST" and rest == ["infer"]:
                return self.infer(name, version, body)
        session_route = _session_route(scope)
        if session_route and method == "GET":
            session_id, view = session_route
            if not 0 < len(session_id.encode()) <= MAX_SESSION_ID_BYTES:    # DynamoDB would refuse the key
                return error(404, f"no session id of {len(session_id.encode())} bytes exists")
            if view == "prediction":
                return self.session_prediction(session_id)
            if view == "features":
                return asyncio.to_thread(self.session_features, session_id)      # waits for a batch's fold
        session_view = session_route and session_route[1] in ("prediction", "features")
        if path in {p for _, p in self.routes} or session_view or (len(parts) >= 3 and parts[:2] == ["v2", "models"]):
            return error(405, f"method {method} not allowed on {path}")
        return error(404, f"no route {method} {path}")

    def _champion(self) -> Model:
        model = self.models.champion
        if model is None:
            raise BadRequest(503, "no model loaded yet")
        return model

    # ------------------------------------------------------------------ health

    def ping(self, scope, body) -> Response:
        model = self.models.champion
        running = self.worker is not None and self.worker.running
        if self.worker is not None and not running:
            return error(503, "the worker is not running")       # its thread ended: restart the process
        if model is None and self.models.unfit:
            return error(503, f"CURRENT {self.models.unfit} and every earlier CURRENT do not fit this scorer's "
                              f"features ({FEATURE_VERSION}) or are not in the registry: nothing is scored")
        if self.worker is None and model is None:
            return error(503, "no model loaded")
        return ok({"status": "ok", "model_version": model.version if model else None, "worker": running})

    def live(self, scope, body) -> Response:
        return ok({"live": True})

    def ready(self, scope, body) -> Response:
        ready = self.models.champion is not None
        return ok({"ready": ready}, 200 if ready else 503)

    def server_metadata(self, scope, body) -> Response:
        return ok({"name": "clickstream-scorer", "version": "1", "extensions": []})

    # ------------------------------------------------------------------ scoring

    def invocations(self, scope, body: bytes) -> Response:
        model = self._champion()
        rows = inputs.within_float32(inputs.parse_invocation(body, _header(scope, b"content-type")))
        p_buy = model.predict(rows)          # timed by scorer_request_seconds{route="/invocations"}
        return ok({"predictions": p_buy.tolist(), "decisions": [model.decide(p) for p in p_buy.tolist()],
                   "model_name": model.name, "model_version": model.version})

    def _named(self, name: str, version: str | None) -> Model:
        """The champion if it is the model asked for: one scorer serves one version at a time."""
        model = self._champion()
        if name != model.name:
            raise BadRequest(404, f"unknown model {name!r}; this scorer serves {model.name!r}")
        if version is not None and version != model.version:
            raise BadRequest(404, f"model {name!r} version {version!r} is not loaded; "
                                  f"this scorer serves version {model.version!r}")
        return model

    def model_metadata(self, name: str, version: str | None) -> Response:
        model = self._named(name, version)
        return ok({"name": model.name, "versions": [model.version], "platform": "onnxruntime_onnx",
                   "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURE_COUNT]}],
                   "outputs": [{"name": "p_buy", "datatype": "FP64", "shape": [-1]},
                               {"name": "decision", "datatype": "BYTES", "shape": [-1]}],
                   "parameters": {"feature_names": list(FEATURE_NAMES), "feature_version": FEATURE_VERSION,
                                  "threshold": model.threshold}})

    def model_ready(self, name: str, version: str | None) -> Response:
        self._named(name, version)
        return ok({"name": name, "ready": True})

    def infer(self, name: str, version: str | None, body: bytes) -> Response:
        model = self._named(name, version)
        rows, request_id = inputs.from_v2(body)
        rows = inputs.within_float32(rows)
        p_buy = model.predict(rows).tolist()
        answer = {"model_name": model.name, "model_version": model.version,
                  "outputs": [{"name": "p_buy", "datatype": "FP64", "shape": [len(p_buy)], "data": p_buy},
                              {"name": "decision", "datatype": "BYTES", "shape": [len(p_buy)],
                               "data": [model.decide(p) for p in p_buy]}]}
        if request_id is not None:
            answer["id"] = request_id
        return ok(answer)

    def score_session(self, scope, body: bytes) -> Response:
        model = self._champion()
        events = _events(body)
        state, seen = SessionState(session_key(events[0])), set()
        for index, event in enumerate(events):
            if event["event_id"] in seen:
                continue
            seen.add(event["event_id"])
            try:
                step(state, event)
            except Exception as exc:  # noqa: BLE001 - any event the fold cannot take is the caller's error
                raise BadRequest(400, f"event {index}: cannot be folded: {exc!r}") from None
        row = read_features(state)
        p_buy = model.score_one(row)
        return ok({"session_id": state.session_id, "events_in_session": state.events, "purchased": state.purchased,
                   "features": dict(zip(FEATURE_NAMES, row)), "p_buy": p_buy, "decision": model.decide(p_buy),
                   "threshold": model.threshold, "model_name": model.name, "model_version": model.version,
                   "feature_version": FEATURE_VERSION})

    # ------------------------------------------------------------------ sessions

    async def session_prediction(self, session_id: str) -> Response:
        if self.dynamodb is None or not self.table:
            return error(404, "no lookups: this scorer does not write the predictions table (CLICKSTREAM_LOOKUP_TABLE "
                              "is false); read the predictions stream")
        if self.lookups_waiting >= LOOKUPS_WAITING_MAX:
            if refused := self.lookups_refused.add():
                log.warning("predictions table slow: %d lookups answered 503 since the last such line, %d waiting",
                            refused, self.lookups_waiting)
            return error(503, "predictions table slow: too many lookups waiting; retry later")
        read = functools.partial(self.dynamodb.get_item, TableName=self.table, Key={"session_id": {"S": session_id}},
                                 ConsistentRead=True)
        self.lookups_waiting += 1
        try:
            item = await asyncio.get_running_loop().run_in_executor(self.lookups, read)
        except (BotoCoreError, ClientError) as exc:
            if failures := self.table_failures.add():
                log.warning("predictions table reads failed %d times since the last such line: %s", failures, exc)
            return error(503, "predictions table unavailable; see the scorer log")    # AWS errors name the account
        finally:
            self.lookups_waiting -= 1
        if "Item" not in item or ttl_expired(item["Item"]):
            # DynamoDB deletes a row past its TTL only some time later (typically within two days).
            return error(404, f"no prediction for session {session_id!r}")
        prediction = from_item(item["Item"])
        prediction.pop("event_ms", None)
        return ok(prediction)

    def session_features(self, session_id: str) -> Response:
        """The live state this process holds for a session (operations and the restart test), read
        between two of the worker's batches so that it is never half-way through one."""
        if self.worker is None:
            return error(404, f"session {session_id!r} is not live in this worker")
        with self.worker.folding:
            session = self.worker.store.get(session_id)
            if session is None:
                return error(404, f"session {session_id!r} is not live in this worker")
            state = session.state
            return ok({"session_id": session_id, "shard_id": session.shard_id, "events_in_session": state.events,
                       "features": dict(zip(FEATURE_NAMES, read_features(state)))})

    # ------------------------------------------------------------------ operations

    async def reload(self, scope, body: bytes) -> Response:
        if not self.reload_token:
            return error(403, "reload is disabled: set CLICKSTREAM_RELOAD_TOKEN")
        given = _header(scope, b"authorization")
        if not given.startswith("Bearer "):
            return error(401, "missing 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given[7:].encode(), self.reload_token.encode()):
            return error(403, "wrong reload token")
        version = _reload_version(body)
        previous = self.models.champion.version if self.models.champion else None
        try:
            model = await asyncio.to_thread(self.models.load, version)
        except LookupError as exc:
            return error(404, str(exc))
        except ModelRefused as exc:
            return error(409, f"model refused: {exc}; still serving {previous}")
        return ok({"model_name": model.name, "model_version": model.version, "previous_version": previous})

    def metrics(self, scope, body) -> Response:
        payload, content_type = metrics.exposition()
        return Response(200, payload, [(b"content-type", content_type.encode())])

    def openapi_json(self, scope, body) -> Response:
        return Response(200, self.openapi)


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _reload_version(body: bytes) -> str | None:
    """The version a reload asks for; None (CURRENT) for an empty body. Anything else is refused
    rather than read as CURRENT: a typo must not roll the scorer onto another model."""
    if not body.strip():
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    version = payload.get("version") if isinstance(payload, dict) and set(payload) == {"version"} else None
    if not isinstance(version, str) or not version.strip() or "/" in version:
        raise BadRequest(400, 'body must be empty (CURRENT) or {"version": "<version>"}, a version folder name')
    return version


def _session_route(scope) -> tuple[str, str] | None:
    """(session id, view) of ``/sessions/{id}/{view}``, read from the raw path: a session id may
    hold a ``/``, which the decoded path cannot tell from a separator."""
    raw = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0].decode("latin-1")
    parts = raw.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "sessions":
        return unquote(parts[1]), parts[2]
    return None


def _events(body: bytes) -> list[dict]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    events = payload.get("events") if isinstance(payload, dict) else payload
    if not isinstance(events, list) or not events:
        raise BadRequest(400, 'expected a non-empty list of enriched events (or {"events": [...]})')
    for index, event in enumerate(events):
        try:
            inputs.event_time(event)
        except inputs.BadEvent as exc:
            raise BadRequest(400, f"event {index}: {exc}") from None
    if not isinstance(session_key(events[0]), str):
        raise BadRequest(400, "event 0: domain_sessionid, domain_userid, user_id and network_userid must be strings")
    return events
