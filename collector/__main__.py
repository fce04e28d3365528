"""`python -m collector`: serve the tracker endpoints with granian; settings from the environment."""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile

import click

from collector.config import CollectorSettings
from common import logs
from common.cli import CLI_CONTEXT
from common.service import bound_socket, listening, settings_or_exit


@click.command(context_settings=CLI_CONTEXT)
@click.option("--host", default=None,
              help="listen address: an IP address, or a host name such as localhost, resolved once at start "
                   "(CLICKSTREAM_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="listen port (CLICKSTREAM_PORT, default 8080)")
@click.option("--workers", type=int, default=None, help="granian worker processes (CLICKSTREAM_WORKERS, default 1)")
def main(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the Snowplow tracker endpoints (/i, /com.snowplowanalytics.snowplow/tp2, /r/tp2, the Iglu
    webhook /com.snowplowanalytics.iglu/v1): every hit is written to a disk spool before it is
    answered, then sent on to the raw stream.

    Other settings come from CLICKSTREAM_* variables and the [collector] section of the TOML file
    named by CLICKSTREAM_CONFIG (docs/collector.md); a bad value, or an address it cannot listen on,
    exits with status 2 naming the key. Stops cleanly on SIGTERM or Ctrl-C.
    """
    from granian import Granian

    logs.setup()
    settings = settings_or_exit(CollectorSettings, "collector", host=host, port=port, workers=workers)
    with listening("host, port", settings.host, settings.port):
        address = bindable_address(settings.host, settings.port)
    # Workers read their settings from the environment: pass the command-line overrides on, in the
    # section form too, which would otherwise win over them in the workers.
    for key, value in (("HOST", settings.host), ("PORT", str(settings.port)), ("WORKERS", str(settings.workers))):
        os.environ[f"CLICKSTREAM_{key}"] = os.environ[f"CLICKSTREAM_COLLECTOR_{key}"] = value
    if settings.workers == 1:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)     # one process: its own registry, no stale files
    metrics_dir = _metrics_dir() if settings.workers > 1 else None
    try:
        with listening("host, port", settings.host, settings.port):
            # A worker that dies (OOM, a crash) is replaced and takes its spool slot back, backlog
            # included; without it granian stopped every worker and exited with the first one gone.
            server = Granian("collector.app:create_app", factory=True, interface="asgi", address=address,
                             port=settings.port, workers=settings.workers, log_access=False, backlog=2048,
                             backpressure=settings.max_concurrent_requests, respawn_failed_workers=True)
            try:
                server.serve()
            except RuntimeError as exc:
                raise _as_os_error(exc) from None
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir() -> str:
    """A fresh folder for the workers' metric files, under PROMETHEUS_MULTIPROC_DIR when it is set (a
    read-only root filesystem has no /tmp: it was overwritten, and mkdtemp's traceback said nothing)."""
    parent = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    try:
        folder = tempfile.mkdtemp(prefix="collector-metrics-", dir=parent)
    except OSError as exc:
        sys.exit(f"collector: no writable folder for the workers' metrics ({exc.strerror or exc}): set "
                 "PROMETHEUS_MULTIPROC_DIR or TMPDIR to one, or mount a volume at /tmp")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def bindable_address(host: str, port: int) -> str:
    """The IP address granian should bind for ``host`` (it takes no host names), after checking that
    the port is free there: granian's own failure is a page of Python and Rust frames. Raises OSError
    (an unknown host, a port in use) for ``listening`` to tell in one line."""
    with bound_socket(host, port) as probe:
        return probe.getsockname()[0]


def _as_os_error(exc: RuntimeError) -> Exception:
    """Granian's bind failure ("Address already in use (os error 98)": another process took the
    port after the check) as the OSError it is; any other RuntimeError unchanged."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if not found:
        return exc
    number = int(found.group(1))
    return OSError(number, os.strerror(number) if number in errno.errorcode else str(exc))


if __name__ == "__main__":
    sys.exit(main())
