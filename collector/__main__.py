"""`python -m collector`: serve the tracker endpoints with granian; settings from the environment."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import click

from common import logs
from common.config import ConfigError


@click.command()
@click.option("--host", default=None, help="listen address (CLICKSTREAM_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="listen port (CLICKSTREAM_PORT, default 8080)")
@click.option("--workers", type=int, default=None, help="granian worker processes (CLICKSTREAM_WORKERS, default 1)")
def main(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the Snowplow tracker endpoints (/i, /com.snowplowanalytics.snowplow/tp2, /r/tp2, the Iglu
    webhook /com.snowplowanalytics.iglu/v1): every hit is written to a disk spool before it is
    answered, then sent on to the raw stream.

    Other settings come from CLICKSTREAM_* variables and the [collector] section of the TOML file
    named by CLICKSTREAM_CONFIG (docs/collector.md). Stops cleanly on SIGTERM or Ctrl-C.
    """
    from granian import Granian

    from collector.config import settings as load_settings

    logs.setup()
    try:
        settings = load_settings(host=host, port=port, workers=workers)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    # Workers read their settings from the environment: pass the command-line overrides on, in the
    # section form too, which would otherwise win over them in the workers.
    for key, value in (("HOST", settings.host), ("PORT", str(settings.port)), ("WORKERS", str(settings.workers))):
        os.environ[f"CLICKSTREAM_{key}"] = os.environ[f"CLICKSTREAM_COLLECTOR_{key}"] = value
    metrics_dir = None
    if settings.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="collector-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        Granian("collector.app:create_app", factory=True, interface="asgi", address=settings.host,
                port=settings.port, workers=settings.workers, log_access=False, backlog=2048,
                backpressure=settings.max_concurrent_requests).serve()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
