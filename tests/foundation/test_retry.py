"""The shared backoff: doubles from its base, stops at its cap, and survives any attempt count."""
from __future__ import annotations

from common.retry import backoff_s


def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert [backoff_s(attempt, 0.1, 1.0) for attempt in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_stays_at_the_cap_far_past_the_attempt_where_a_float_power_overflows():
    # 2.0 ** 1024 raises OverflowError: a loop retrying through an hour-long outage gets there.
    assert backoff_s(1_024, 0.05, 2.0) == backoff_s(10**9, 0.05, 2.0) == 2.0
