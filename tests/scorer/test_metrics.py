"""The scorer's own metric types."""
from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from common.service import TIME_TO_ACT_BUCKETS
from scorer.metrics import BatchHistogram


def samples(registry: CollectorRegistry) -> dict:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in registry.collect() for sample in metric.samples if not sample.name.endswith("_created")}


def test_a_batch_counts_into_the_same_buckets_and_sum_as_observing_each_amount():
    """Edges exactly (an amount equal to a bound is in that bucket), between, beyond the last (+Inf),
    negative (a clock behind: the first bucket), in three batches, one of them empty."""
    amounts = np.concatenate([np.asarray(TIME_TO_ACT_BUCKETS), np.asarray(TIME_TO_ACT_BUCKETS) + 1e-9,
                              np.random.default_rng(7).exponential(3, 500), [-2.0, 0.0, 1e9]])
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    each = Histogram("age_seconds", "age", buckets=TIME_TO_ACT_BUCKETS, registry=one_by_one)
    together = BatchHistogram("age_seconds", "age", buckets=TIME_TO_ACT_BUCKETS, registry=batched)
    for amount in amounts:
        each.observe(float(amount))
    for batch in np.split(amounts, [100, 100]):
        together.observe_all(batch)

    expected, got = samples(one_by_one), samples(batched)
    assert got.keys() == expected.keys() and len(got) == len(TIME_TO_ACT_BUCKETS) + 3     # + Inf, count, sum
    assert {key: value for key, value in got.items() if key[0] != "age_seconds_sum"} == \
        {key: value for key, value in expected.items() if key[0] != "age_seconds_sum"}
    assert np.isclose(got[("age_seconds_sum", ())], expected[("age_seconds_sum", ())], rtol=1e-12)
    assert got[("age_seconds_count", ())] == len(amounts)
