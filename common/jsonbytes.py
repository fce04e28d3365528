"""JSON records to keep: ``orjson.dumps`` output cut to its size.

orjson (3.13, pinned) hands back bytes whose buffer is 4 KiB or more whatever their length: a 430-byte
prediction holds about 8 KiB, a 2 KiB enriched event 16 KiB. Kept by the thousand (a poll's outputs,
batch_limit records of each shard, until the stream has them), that is ten to twenty times the memory
their lengths say, and a fresh process faults in every page of it: the scorer's worker ran at a
third of its speed until its heap had grown (docs/scorer.md).
"""
from __future__ import annotations

import orjson


def dumps(value) -> bytes:
    """``orjson.dumps(value)`` in a buffer of its own length (one copy, a fraction of a microsecond)."""
    return bytes(memoryview(orjson.dumps(value)))


def writable(value) -> bool:
    """Whether orjson can write ``value``: it reads 1,024 levels of nesting but writes only 254, so a
    record read from a stream (not written by us) may not go back out as it came."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True
