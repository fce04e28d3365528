"""One process, two jobs: the HTTP API in the main thread (uvicorn on this
process' event loop) and the streaming worker in a background thread. Both read the same
``Models`` holder, so a reload through the API is what the worker scores with next batch.

The worker's Python work and the API share the GIL; onnxruntime and socket I/O release it. For
API-heavy deployments run two processes instead: one with ``CLICKSTREAM_RUN_WORKER=false`` and
one with ``CLICKSTREAM_RUN_API=false``; the latter still serves ``/ping`` and ``/metrics``, so on one
host give it a port of its own.
"""
from __future__ import annotations

import logging
import socket
import threading

from common import aws
from common.consumer import consumer_for
from common.producer import output_producer
from common.service import bound_socket, listening, stop_on_signals
from scorer.api import ScorerApp
from scorer.config import ScorerSettings
from scorer.model import Models
from scorer.sink import PredictionWriter
from scorer.worker import Worker

log = logging.getLogger("scorer")


def build_worker(settings: ScorerSettings, models: Models) -> Worker:
    producer = output_producer(settings.region, settings.predictions_stream, settings.output_timeout_s)
    # A connection per writing thread: more threads than the pool's 32 connections discarded them.
    table = aws.client("dynamodb", settings.region, max_pool_connections=max(32, settings.write_threads))
    writer = PredictionWriter(producer, table, settings.lookup_table_name, settings.prediction_ttl_hours * 3600,
                              settings.write_threads)

    def make_consumer(**hooks):
        return consumer_for(settings, settings.enriched_stream, app="scorer", lease_ms=settings.lease_ms,
                            batch_limit=settings.batch_limit, read_interval_s=settings.read_interval_s, **hooks)
    return Worker(settings, models, writer, make_consumer)


def start_worker(worker: Worker, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            worker.run(stop.is_set)
        except Exception:
            log.exception("the streaming worker stopped on an error")
    thread = threading.Thread(target=run, name="scorer-worker", daemon=True)
    thread.start()
    return thread


def _serve_api(app: ScorerApp, settings: ScorerSettings, stop: threading.Event, sock: socket.socket) -> None:
    """uvicorn (httptools, uvloop): every request runs on this one thread.

    Not granian, which is faster for a bare endpoint: onnxruntime releases the GIL for each run,
    and granian's I/O threads take it meanwhile and make the request thread wait for it back
    (measured in docs/scorer.md, "Why uvicorn").
    """
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, http="httptools", loop="uvloop",
                            lifespan="on", log_config=None, access_log=False, backlog=1024)
    server = uvicorn.Server(config)

    def exit_on_stop() -> None:
        # A signal that came before uvicorn put in its own handlers set only our event.
        stop.wait()
        server.should_exit = True
    threading.Thread(target=exit_on_stop, name="api-stop", daemon=True).start()
    server.run(sockets=[sock])     # returns on SIGTERM/SIGINT, then re-raises it to our handler


def serve(settings: ScorerSettings) -> None:
    # The port first: taken, this process must stop before its worker takes shards from a running
    # scorer (which would replay them, and again at every restart of this one).
    with listening("host, port", settings.host, settings.port):
        sock = bound_socket(settings.host, settings.port)
    # Before the model load, which may take long: a stop asked for meanwhile must not be lost, nor
    # the process take shards it is about to give back.
    stop = stop_on_signals()
    models = Models(aws.client("s3", settings.region), settings.bucket, settings.model_name, settings.shadow_version)
    models.refresh()
    if stop.is_set():
        log.info("stopped while loading the model; no shard was taken")
        return
    if models.champion is None:
        log.warning("no usable CURRENT for model %s yet; checking every %ss", settings.model_name, settings.model_poll_s)
    models.watch(settings.model_poll_s)
    worker = build_worker(settings, models) if settings.run_worker else None
    if worker and not settings.lookup_table:
        log.info("lookup_table off: predictions go to %s only, not to table %s", settings.predictions_stream,
                 settings.predictions_table)
    thread = start_worker(worker, stop) if worker else None
    app = ScorerApp(models, dynamodb=aws.client("dynamodb", settings.region), table=settings.lookup_table_name,
                    reload_token=settings.reload_token, worker=worker, api=settings.run_api)
    try:
        log.info("scorer %s on http://%s:%d", "API" if settings.run_api else "/ping and /metrics", settings.host,
                 settings.port)
        _serve_api(app, settings, stop, sock)
    finally:
        stop.set()
        models.stop()
        if thread:
            thread.join(timeout=30)
