"""`python -m discount`: run the discount engine until SIGTERM; settings from CLICKSTREAM_* variables."""
from __future__ import annotations

import logging

from common import logs
from common.cli import run_command
from common.service import listening, settings_or_exit, stop_on_signals
from discount.engine import Engine
from discount.metrics import Metrics
from discount.settings import DiscountSettings

log = logging.getLogger("discount")


def main() -> int:
    """Run the reference discount engine: read the buy/defer predictions and write a discount offer
    to the offers table for sessions that show interest but look like they will not buy.

    Settings come from CLICKSTREAM_* variables and the [discount] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/discount-engine.md). Stops cleanly on SIGTERM or Ctrl-C.
    """
    settings = settings_or_exit(DiscountSettings, "discount")
    logs.setup(settings.log_level)
    stopping = stop_on_signals()
    metrics = Metrics()
    with listening("metrics_host, metrics_port", settings.metrics_host, settings.metrics_port):
        server, port = metrics.serve(settings.metrics_host, settings.metrics_port)
    engine = Engine.from_settings(settings, metrics, stop=stopping.is_set)
    log.info("discount engine reading %s; offers to %s%s%s; /metrics on %s:%d", settings.predictions_stream,
             settings.offers_table, f", no offer to sessions {settings.predictions_table} marks as bought"
             if settings.check_purchases else "", f", {settings.holdout_percent:g} % of sessions held out as the "
             "control group" if settings.holdout_percent else "", settings.metrics_host, port)
    try:
        engine.run()
    finally:
        engine.close()
        server.shutdown()
        log.info("discount engine stopped")
    return 0


if __name__ == "__main__":
    run_command(main)
