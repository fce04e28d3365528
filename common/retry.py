"""Capped exponential backoff, shared by the retry loops of every component."""
from __future__ import annotations


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """``base_s * 2**attempt`` seconds, at most ``cap_s``.

    The exponent stops at 30 (any base above a nanosecond reaches the cap by then): retrying through
    an hour-long outage passes attempt 1,024, where ``2.0 ** 1024`` overflows a float and raises."""
    return min(cap_s, base_s * 2 ** min(attempt, 30))
