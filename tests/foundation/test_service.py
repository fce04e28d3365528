"""Process plumbing shared by every component (common.service)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The main thread waits on the stop event the way the workers' idle loops do, while SIGTERM lands
# at random moments: often inside wait(), which holds the event's lock.
SIGNALLED_WAITS = textwrap.dedent("""
    import os, random, signal, threading, time
    from common.service import stop_on_signals

    for trial in range(400):
        stop = stop_on_signals()
        threading.Timer(random.uniform(0, 0.003), os.kill, (os.getpid(), signal.SIGTERM)).start()
        while not stop.wait(0):
            pass
    print("stopped 400 times")
""")


def test_a_stop_signal_that_lands_inside_the_wait_on_the_stop_event_still_stops():
    try:
        done = subprocess.run([sys.executable, "-c", SIGNALLED_WAITS], cwd=ROOT, capture_output=True, encoding="utf-8", check=False,
                              timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("a SIGTERM delivered during Event.wait() left the process waiting for ever") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped 400 times"
