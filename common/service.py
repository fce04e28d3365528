"""What every long-running component does: settings or a clear exit, a stop flag, batches without GC pauses."""
from __future__ import annotations

import gc
import signal
import socket
import sys
import threading
from contextlib import contextmanager

from common.config import ConfigError, load

# The time to act (a click's age when scored, when its prediction reaches the discount engine), 100 ms
# to a minute: beyond it a lag alert has more to say. One set, as the dashboard plots both together.
TIME_TO_ACT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)


def settings_or_exit(cls, section: str, **overrides):
    """Load settings; a bad value prints the message naming the key and exits with status 2."""
    try:
        return load(cls, section=section, **overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def listening(keys: str, host: str, port: int):
    """A server that cannot listen (port taken, unknown host) exits with one line naming the
    settings to change, status 2, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        print(f"cannot listen on {host}:{port} ({keys}): {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (a name resolves to its IPv4 address when it has one:
    clients of `localhost` mostly use 127.0.0.1). Raises OSError (an unknown host, a port in use)
    for ``listening`` to tell in one line."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = next((item for item in found if item[0] == socket.AF_INET), found[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as servers bind: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a worker finishes its batch and shuts down cleanly.

    The handler runs on the main thread between two bytecodes, maybe inside this event's own wait(),
    which holds the event's lock: setting it right there would wait for that lock for ever. So a
    short-lived thread sets it.
    """
    stopping = threading.Event()

    def handle(*_) -> None:
        threading.Thread(target=stopping.set, name="stop-signal", daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    return stopping


class _GcPause:
    """How many batches hold the collector off, across threads, and whether it ran before the first.

    A batch that ended turned it back on while another thread's batch still ran, and that batch paid
    the collections it was paused to avoid."""
    lock = threading.Lock()
    holders = 0
    was_enabled = False


@contextmanager
def gc_paused():
    """Hold the cyclic garbage collector off for one batch whose objects die when it ends.

    Reference counting frees them then. A collection in the middle would only find them alive and
    promote them, and the full collections that follow walk the whole heap (every live session):
    measured, ~40% of both the loader's conversion and the scorer worker's CPU. Process-wide, so
    another thread's allocations wait for the last batch's end too; keep network calls outside.
    """
    with _GcPause.lock:
        if _GcPause.holders == 0:
            _GcPause.was_enabled = gc.isenabled()
            gc.disable()
        _GcPause.holders += 1
    try:
        yield
    finally:
        with _GcPause.lock:
            _GcPause.holders -= 1
            if _GcPause.holders == 0 and _GcPause.was_enabled:
                gc.enable()
