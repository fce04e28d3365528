"""Process plumbing shared by every component (common.service)."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from common.service import gc_paused

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


def test_the_collector_stays_off_until_the_last_of_two_threads_batches_ends():
    """The loader converts its two streams' batches in two threads: the first to end turned the
    collector back on under the other one."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with gc_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with gc_paused():
            second_in.set()
            first_out.wait(5)
            seen["during"] = gc.isenabled()
        seen["after"] = gc.isenabled()

    assert gc.isenabled()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"during": False, "after": True}


def test_a_batch_leaves_the_collector_off_when_it_was_off_before():
    gc.disable()
    try:
        with gc_paused():
            with gc_paused():
                pass
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
