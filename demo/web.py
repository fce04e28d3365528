"""`python -m demo.web`: serve the demo shop (demo/shop/) and the Snowplow tracker on 127.0.0.1:8083.

    python -m demo.web                               # http://127.0.0.1:8083/shop/
    open 'http://127.0.0.1:8083/shop/?collector=http://127.0.0.1:8080'

The layout is the live view's (it serves the same shop under /shop/ on 8082), so the page works
unchanged under either: /shop/… from demo/shop, /node_modules/@snowplow/… from node_modules (the
official @snowplow/browser-tracker, loaded locally, no CDN). The default port is 8083 because the
live view owns 8082. Settings: CLICKSTREAM_WEB_HOST, CLICKSTREAM_WEB_PORT.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mimetypes
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from common import logs
from common.cli import CLI_CONTEXT, ConfigFailed
from common.config import AwsSettings, ConfigError, load
from common.service import listening, stop_on_signals
from demo import catalogue as cat
from demo.liveview import safe_file

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("web")


@dataclasses.dataclass(frozen=True)
class WebSettings(AwsSettings):
    web_host: str = "127.0.0.1"
    web_port: int = 8083
    shop_dir: Path = ROOT / "demo" / "shop"
    tracker_dir: Path = ROOT / "node_modules" / "@snowplow"


def catalogue_json() -> str:
    """The shop page's catalogue, from the same data the traffic generator uses (demo/catalogue.py)."""
    products = [dataclasses.asdict(p) for p in cat.PRODUCTS]
    return json.dumps({"currency": cat.CURRENCY, "categories": list(cat.CATEGORIES), "products": products},
                      indent=1) + "\n"


class Handler(BaseHTTPRequestHandler):
    server: ShopServer
    # Seconds a connection may stay silent: each one holds a thread, so idle or half-sent requests are closed.
    timeout = 10

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        settings = self.server.settings
        if path in ("/", "/shop"):
            self.send_response(302)
            self.send_header("Location", "/shop/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/health":
            self._send(200, b"ok", "text/plain")
        elif path.startswith("/shop/"):
            self._file(settings.shop_dir, path.removeprefix("/shop/"))
        elif path.startswith("/node_modules/@snowplow/"):
            self._file(settings.tracker_dir, path.removeprefix("/node_modules/@snowplow/"))
        else:
            self._send(404, b"not found", "text/plain")

    def _file(self, base: Path, relative: str) -> None:
        target = safe_file(base, relative)
        if target is None:
            self._send(404, b"not found", "text/plain")
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), kind)

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text/") or "json" in kind
                                                 or "javascript" in kind else ""))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class ShopServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: WebSettings):
        super().__init__((settings.web_host, settings.web_port), Handler)
        self.settings = settings

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@click.command(context_settings=CLI_CONTEXT, help=(__doc__ or "").split("\n\n")[0] + "\n\nSettings come from CLICKSTREAM_* variables and the [web] "
               "section of the TOML file named by CLICKSTREAM_CONFIG (docs/traffic-generator.md lists the keys).")
@click.option("--port", type=int, default=None, help="listen port (CLICKSTREAM_WEB_PORT, default 8083)")
def main(port: int | None) -> None:
    logs.setup()
    try:
        settings = load(WebSettings, section="web", web_port=port)
    except ConfigError as exc:
        raise ConfigFailed(exc) from None
    with listening("web_host, web_port", settings.web_host, settings.web_port):
        server = ShopServer(settings)
    # serve_forever runs in a thread so SIGTERM can call shutdown() from the main thread.
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopping = stop_on_signals()
    log.info("demo shop on %s/shop/", server.url)
    stopping.wait()
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    sys.exit(main())
