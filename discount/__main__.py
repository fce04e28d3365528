"""`python -m discount`: run the discount engine until SIGTERM; settings from CLICKSTREAM_* variables."""
from __future__ import annotations

import logging
import signal
import sys
import threading

from common import logs
from common.config import ConfigError
from discount.engine import Engine
from discount.metrics import Metrics
from discount.settings import load_settings

log = logging.getLogger("discount")


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    metrics = Metrics()
    server, port = metrics.serve(settings.metrics_host, settings.metrics_port)
    engine = Engine.from_settings(settings, metrics, stop=stopping.is_set)
    log.info("discount engine reading %s; offers to %s; /metrics on %s:%d",
             settings.predictions_stream, settings.offers_table, settings.metrics_host, port)
    try:
        engine.run()
    finally:
        engine.close()
        server.shutdown()
        log.info("discount engine stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
