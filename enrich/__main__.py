"""``python -m enrich``: the enricher worker, configured from CLICKSTREAM_* variables; stops on SIGTERM."""
from __future__ import annotations

import logging

from common import logs
from common.cli import run_command
from common.consumer import consumer_for
from common.producer import output_producer
from common.service import listening, settings_or_exit, stop_on_signals
from enrich.config import EnrichSettings
from enrich.pipeline import Enricher
from enrich.worker import Worker

log = logging.getLogger("enrich")


def main() -> int:
    """Run the enricher: read the raw stream, validate each event against the schema registries,
    pseudonymise personal data, and write good events to the enriched stream and failures to the
    bad stream as typed bad rows.

    Settings come from CLICKSTREAM_* variables and the [enrich] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/enrich.md); a bad value exits with status 2, naming the key. Stops
    cleanly on SIGTERM or Ctrl-C.
    """
    settings = settings_or_exit(EnrichSettings, "enrich")
    logs.setup(settings.log_level)
    stop = stop_on_signals()
    if settings.metrics_port:
        from prometheus_client import start_http_server
        with listening("metrics_host, metrics_port", settings.metrics_host, settings.metrics_port):
            start_http_server(settings.metrics_port, addr=settings.metrics_host)
    consumer = consumer_for(settings, settings.raw_stream, "enrich", batch_limit=settings.batch_limit,
                            lease_ms=settings.lease_ms, read_interval_s=settings.read_interval_s)
    worker = Worker(Enricher(settings), consumer,
                    output_producer(settings.region, settings.enriched_stream, settings.output_timeout_s),
                    output_producer(settings.region, settings.bad_stream, settings.output_timeout_s), stop)
    log.info("enriching %s -> %s (bad: %s), registries %s, pseudonymisation %s",
             settings.raw_stream, settings.enriched_stream, settings.bad_stream, ",".join(settings.registries),
             "on" if settings.pseudonymisation else "OFF")
    try:
        worker.run()
    finally:
        consumer.close()   # release leases at once so a peer takes over without waiting for expiry
    return 0


if __name__ == "__main__":
    run_command(main)
