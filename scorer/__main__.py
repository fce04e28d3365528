"""``python -m scorer``: the streaming worker and the HTTP API in one process (docs/scorer.md)."""
from __future__ import annotations

import sys

import click

from common import logs
from common.cli import CLI_CONTEXT
from common.config import ConfigError, load
from scorer.config import ScorerSettings


@click.command(context_settings=CLI_CONTEXT)
@click.option("--host", default=None, help="API address (CLICKSTREAM_SCORER_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="API port (CLICKSTREAM_SCORER_PORT, default 8081)")
@click.option("--worker/--no-worker", "run_worker", default=None,
              help="consume the enriched stream (CLICKSTREAM_RUN_WORKER, default on)")
@click.option("--api/--no-api", "run_api", default=None,
              help="serve the HTTP API (CLICKSTREAM_RUN_API, default on; without it only /ping and /metrics)")
def main(host: str | None, port: int | None, run_worker: bool | None, run_api: bool | None) -> None:
    """Score sessions from the enriched stream and serve the model over HTTP.

    Settings come from CLICKSTREAM_* variables and the [scorer] section of the TOML file named by
    CLICKSTREAM_CONFIG (docs/scorer.md); the options below override them. Stops on SIGTERM or Ctrl-C.
    """
    try:
        settings = load(ScorerSettings, section="scorer", host=host, port=port, run_worker=run_worker,
                        run_api=run_api)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)
    logs.setup(settings.log_level)
    from scorer.server import serve
    serve(settings)


if __name__ == "__main__":
    main()
