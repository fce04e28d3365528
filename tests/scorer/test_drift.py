"""The served scores against those the model was chosen on: scorer/drift.py and its reference."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from batch.train_metrics import feature_reference, score_reference
from scorer.drift import (
    MIN_ROWS,
    SAMPLE_PER_SLOT,
    SLOT_S,
    MinuteSample,
    ScoreDrift,
    feature_reference_of,
    psi,
    reference_of,
)


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name)


NAMES = ["product_views", "cart_adds", "is_mobile"]


def model(version: str, training_scores: np.ndarray | None, threshold: float = 0.5,
          training_rows: np.ndarray | None = None) -> SimpleNamespace:
    meta = {"features": [{"name": name, "type": "float"} for name in NAMES]}
    if training_scores is not None:
        meta["score_reference"] = score_reference(training_scores, threshold)
    if training_rows is not None:
        meta["feature_reference"] = feature_reference(training_rows, NAMES)
    return SimpleNamespace(version=version, threshold=threshold, meta=meta)


def sessions(rng, n: int, mobile_share: float = 0.3) -> np.ndarray:
    """Feature rows: product views (a gamma), cart adds (a small count), a device flag."""
    return np.c_[rng.gamma(2, 3, n), rng.poisson(0.4, n), rng.random(n) < mobile_share].astype(np.float32)


def observe(drift: ScoreDrift, champion, p_buy: np.ndarray, rows: np.ndarray | None = None) -> None:
    drift.observe(champion, p_buy, np.zeros((len(p_buy), len(NAMES)), np.float32) if rows is None else rows)


def feature_gauges() -> dict[str, float]:
    return {sample.labels["feature"]: sample.value for family in REGISTRY.collect()
            if family.name == "scorer_feature_psi" for sample in family.samples}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_reference_cuts_the_evaluation_scores_at_their_deciles_and_counts_each_bin():
    p = np.random.default_rng(1).beta(2, 5, 10_000)
    reference = score_reference(p, threshold=0.4)
    edges, shares = np.array(reference["edges"]), np.array(reference["shares"])
    assert len(edges) == 9 and np.all(np.diff(edges) > 0)
    assert shares == pytest.approx([0.1] * 10, abs=1e-3) and sum(shares) == pytest.approx(1)
    assert reference["buy_rate"] == pytest.approx(np.mean(p >= 0.4)) and reference["rows"] == 10_000


def test_a_weighted_reference_counts_each_row_as_often_as_its_weight():
    """With treated_sessions=leave_out a held-out session's rows stand for the offered ones left out:
    they weigh 100 / holdout_percent in the references too, which are of all the scorer's traffic."""
    rng = np.random.default_rng(3)
    p = rng.beta(2, 5, 2_000)
    weights = np.where(p > 0.4, 5, 1)                      # the high scores held out, the rest as they are
    weighted = score_reference(p, threshold=0.4, weights=weights)
    repeated = score_reference(np.repeat(p, weights), threshold=0.4, weights=np.ones(weights.sum()))
    assert weighted["edges"] == repeated["edges"] and weighted["shares"] == pytest.approx(repeated["shares"])
    assert weighted["buy_rate"] == pytest.approx(np.mean(np.repeat(p, weights) >= 0.4))
    assert weighted["shares"] == pytest.approx([0.1] * 10, abs=2e-3)
    assert weighted["edges"][4] > score_reference(p, threshold=0.4)["edges"][4]      # the median moved up
    flags = np.column_stack([p > 0.4, p]).astype(np.float32)
    flag = feature_reference(flags, ["flag", "p"], weights=weights)["features"]["flag"]
    assert flag["shares"] == pytest.approx([0, 1 - np.average(p > 0.4, weights=weights), np.average(p > 0.4, weights=weights), 0])


def test_scores_a_tree_ties_merge_their_cut_points_and_keep_their_true_share():
    # A tree model gives few distinct scores: half the rows at 0.1 would make five equal cut points.
    p = np.array([0.1] * 500 + [0.2] * 300 + [0.7] * 200)
    reference = score_reference(p, threshold=0.5)
    assert reference["edges"] == sorted(set(reference["edges"]))
    bins = np.searchsorted(reference["edges"], p, side="right")
    assert reference["shares"] == pytest.approx(np.bincount(bins, minlength=len(reference["edges"]) + 1) / len(p))
    assert reference["buy_rate"] == 0.2
    assert reference_of({"score_reference": reference}) is not None


def test_psi_is_zero_for_the_same_distribution_and_grows_as_it_moves():
    expected = np.full(10, 0.1)
    assert psi(expected, expected) == 0
    moved = np.array([0.05] * 5 + [0.15] * 5)
    assert psi(expected, moved) == pytest.approx(sum((a - 0.1) * math.log(a / 0.1) for a in moved))
    assert math.isfinite(psi(expected, np.array([1.0] + [0.0] * 9)))     # empty bins do not make it infinite


def test_live_scores_like_the_training_ones_show_no_drift_and_shifted_ones_do():
    rng = np.random.default_rng(7)
    drift = ScoreDrift(3600, clock=Clock())
    champion = model("v1", rng.beta(2, 5, 20_000))
    observe(drift, champion, rng.beta(2, 5, MIN_ROWS - 1))
    assert math.isnan(gauge("scorer_score_psi"))                       # too few scores to say
    assert gauge("scorer_score_window_rows") == MIN_ROWS - 1
    observe(drift, champion, rng.beta(2, 5, 4000))
    assert gauge("scorer_score_psi") < 0.02
    same = gauge("scorer_buy_rate")
    assert same == pytest.approx(gauge("scorer_expected_buy_rate"), abs=0.02)

    drift = ScoreDrift(3600, clock=Clock())                 # the traffic changed: scores twice as high
    observe(drift, champion, np.clip(2 * rng.beta(2, 5, 5000), 0, 1))
    assert gauge("scorer_score_psi") > 0.25
    assert gauge("scorer_buy_rate") > 2 * same


def test_the_window_forgets_scores_older_than_drift_window_s():
    rng, clock = np.random.default_rng(3), Clock()
    drift = ScoreDrift(10 * SLOT_S, clock=clock)
    champion = model("v1", rng.beta(2, 5, 20_000))
    observe(drift, champion, np.full(5000, 0.99))           # an hour of odd traffic
    assert gauge("scorer_score_psi") > 1
    clock.now += 10 * SLOT_S
    observe(drift, champion, rng.beta(2, 5, 5000))          # ten minutes on, only the usual traffic counts
    assert gauge("scorer_score_window_rows") == 5000 and gauge("scorer_score_psi") < 0.02


def test_a_scorer_without_traffic_shows_its_window_emptying_not_the_last_busy_hour():
    rng, clock = np.random.default_rng(4), Clock()
    drift = ScoreDrift(10 * SLOT_S, clock=clock)
    observe(drift, model("v1", rng.beta(2, 5, 20_000)), np.full(5000, 0.99))
    clock.now += 5 * SLOT_S                                # no scores since: half the window is still in it
    assert gauge("scorer_score_window_rows") == 5000 and gauge("scorer_score_psi") > 1
    clock.now += 5 * SLOT_S                                # and then none: no PSI and no buy rate, not the old ones
    assert gauge("scorer_score_window_rows") == 0
    assert math.isnan(gauge("scorer_score_psi")) and math.isnan(gauge("scorer_buy_rate"))


def test_a_new_model_starts_the_window_again_and_one_without_a_reference_is_not_measured(caplog):
    rng = np.random.default_rng(5)
    drift = ScoreDrift(3600, clock=Clock())
    observe(drift, model("v1", rng.beta(2, 5, 20_000)), rng.beta(2, 5, 3000))
    assert gauge("scorer_score_window_rows") == 3000
    with caplog.at_level(logging.WARNING, logger="scorer.drift"):
        observe(drift, model("v0", None), rng.beta(2, 5, 3000))
        observe(drift, model("v0", None), rng.beta(2, 5, 3000))
    assert gauge("scorer_score_window_rows") == 0
    assert math.isnan(gauge("scorer_score_psi")) and math.isnan(gauge("scorer_expected_buy_rate"))
    said = [r.getMessage() for r in caplog.records if "model v0" in r.getMessage()]
    assert len(said) == 1 and "model v0 has no usable score_reference or feature_reference" in said[0]
    observe(drift, model("v2", rng.beta(2, 5, 20_000)), np.array([np.nan, 0.5]))   # a NaN score is not counted
    assert gauge("scorer_score_window_rows") == 1


@pytest.mark.parametrize("reference", [
    {"edges": [0.2, 0.1], "shares": [0.3, 0.3, 0.4], "buy_rate": 0.1},          # edges not increasing
    {"edges": [0.1, 0.2], "shares": [0.5, 0.5], "buy_rate": 0.1},               # a share short
    {"edges": [0.1, 0.2], "shares": [0.5, 0.5, 0.5], "buy_rate": 0.1},          # not summing to 1
    {"edges": [0.1, 0.2], "shares": [0.3, 0.3, 0.4], "buy_rate": 2},
    {"edges": "0.1", "shares": [1.0], "buy_rate": 0.1},
    {"shares": [1.0], "buy_rate": 0.1},
])
def test_a_reference_that_does_not_hold_together_is_not_used(reference):
    assert reference_of({"score_reference": reference}) is None


def test_the_feature_reference_bins_each_input_and_keeps_room_for_values_training_never_saw():
    rows = sessions(np.random.default_rng(11), 10_000)
    reference = feature_reference(rows, NAMES)["features"]
    views = reference["product_views"]                     # continuous: its deciles
    assert len(views["edges"]) == 9 and views["shares"] == pytest.approx([0.1] * 10, abs=1e-3)
    flag = reference["is_mobile"]                          # a flag: a bin per value, and below and above them
    assert flag["edges"][:2] == [0.0, 1.0] and flag["edges"][2] > 1.0
    assert flag["shares"] == pytest.approx([0, 0.7, 0.3, 0], abs=0.02)
    carts = reference["cart_adds"]                         # a small count: a bin per value seen
    assert carts["edges"][:-1] == sorted(set(rows[:, 1].tolist())) and carts["shares"][0] == 0
    built = feature_reference_of({"features": [{"name": n} for n in NAMES], "feature_reference": {"features": reference}})
    assert built.names == NAMES and built.edges.shape == (3, 9) and np.isinf(built.edges[1:, -1]).all()


def test_the_input_that_moved_is_the_one_whose_psi_rises():
    rng, clock = np.random.default_rng(12), Clock()
    champion = model("v1", rng.beta(2, 5, 20_000), training_rows=sessions(rng, 20_000))
    drift = ScoreDrift(3600, clock=clock)
    for _ in range(10):                                    # ten minutes of the usual traffic
        observe(drift, champion, rng.beta(2, 5, 300), sessions(rng, 300))
        clock.now += SLOT_S
    usual = feature_gauges()
    assert set(usual) == set(NAMES) and max(usual.values()) < 0.05

    drift = ScoreDrift(3600, clock=clock)                  # a tracker deploy: every visitor now counts as mobile
    for _ in range(10):
        observe(drift, champion, rng.beta(2, 5, 300), sessions(rng, 300, mobile_share=0.9))
        clock.now += SLOT_S
    moved = feature_gauges()
    assert moved["is_mobile"] > 0.25 and moved["product_views"] < 0.05 and moved["cart_adds"] < 0.05


def test_features_are_sampled_a_few_hundred_rows_a_minute_and_not_judged_on_fewer_than_min_rows():
    rng, clock = np.random.default_rng(13), Clock()
    champion = model("v1", rng.beta(2, 5, 20_000), training_rows=sessions(rng, 20_000))
    drift = ScoreDrift(3600, clock=clock)
    for _ in range(4):
        observe(drift, champion, rng.beta(2, 5, 5000), sessions(rng, 5000))   # 20,000 scores in a minute
    assert gauge("scorer_score_window_rows") == 20_000
    assert drift.window[2][-1][3].counts(drift.window[1])[0].sum() == SAMPLE_PER_SLOT
    assert all(math.isnan(value) for value in feature_gauges().values())     # 500 sampled rows: too few
    for _ in range(MIN_ROWS // SAMPLE_PER_SLOT):
        clock.now += SLOT_S
        observe(drift, champion, rng.beta(2, 5, 500), sessions(rng, 500))
    assert max(feature_gauges().values()) < 0.05


def test_every_row_of_a_minute_is_as_likely_to_be_sampled_whichever_batch_brought_it():
    """10 x SAMPLE_PER_SLOT rows whose value is their place in the minute, in batches of uneven sizes,
    sampled 300 times: each tenth of the minute holds a tenth of the sample, and no row is in it twice."""
    rows = np.arange(10 * SAMPLE_PER_SLOT, dtype=np.float32)[:, None]
    batches = np.split(np.arange(len(rows)), [3, 40, 41, 900, 2900, 2950])
    tenths = np.zeros(10)
    for seed in range(300):
        sample = MinuteSample(1, np.random.default_rng(seed))
        for picked in batches:
            sample.offer(rows, picked)
        kept = sample.rows[:, 0].astype(int)
        assert len(set(kept.tolist())) == SAMPLE_PER_SLOT
        tenths += np.bincount(kept // SAMPLE_PER_SLOT, minlength=10)
    assert np.allclose(tenths / tenths.sum(), 0.1, atol=0.01), tenths / tenths.sum()


def test_a_minute_whose_first_batch_differs_from_the_rest_is_judged_on_all_of_it():
    """When busy, the first rows of a minute are one batch of one shard. Here each minute's first
    batch is all mobile and the rest of the minute desktop: a fifth mobile, as in training."""
    rng, clock = np.random.default_rng(17), Clock()
    champion = model("v1", rng.beta(2, 5, 20_000), training_rows=sessions(rng, 20_000, mobile_share=0.2))
    drift = ScoreDrift(3600, clock=clock, rng=rng)
    for _ in range(3):
        for mobile_share in (1.0, 0.0, 0.0, 0.0, 0.0):
            observe(drift, champion, rng.beta(2, 5, 1000), sessions(rng, 1000, mobile_share=mobile_share))
        clock.now += SLOT_S
    assert feature_gauges()["is_mobile"] < 0.05


@pytest.mark.parametrize("meta", [
    {"features": [{"name": "a"}], "feature_reference": {"features": {"b": {"edges": [1.0], "shares": [0.5, 0.5]}}}},
    {"features": [{"name": "a"}], "feature_reference": {"features": {"a": {"edges": [1.0], "shares": [0.5]}}}},
    {"features": [{"name": "a"}], "feature_reference": {"features": []}},
    {"features": [{"name": "a"}]},
])
def test_a_feature_reference_for_other_features_or_not_holding_together_is_not_used(meta):
    assert feature_reference_of(meta) is None


def test_only_live_rows_are_counted_and_sampled():
    rng = np.random.default_rng(14)
    champion = model("v1", rng.beta(2, 5, 20_000), training_rows=sessions(rng, 20_000))
    drift = ScoreDrift(3600, clock=Clock())
    rows = sessions(rng, 100)
    rows[::2, 2] = -1.0                                    # the quiet replays' rows, marked below any device flag
    p_buy = rng.beta(2, 5, 100)
    p_buy[1] = np.nan                                      # and a score that is not counted either
    drift.observe(champion, p_buy, rows, live=np.arange(100) % 2 == 1)
    mobile = drift.window[2][-1][3].counts(drift.window[1])[2]     # is_mobile's sampled rows by bin
    assert gauge("scorer_score_window_rows") == 49 and mobile.sum() == 49 and mobile[0] == 0


def test_a_feature_with_no_value_in_training_gets_one_bin_and_the_others_are_still_measured():
    rows = sessions(np.random.default_rng(15), 2000)
    rows[:, 2] = np.nan                                    # a table column with nothing in it
    reference = feature_reference(rows, NAMES)
    assert reference["features"]["is_mobile"] == {"edges": [], "shares": [1.0]}
    built = feature_reference_of({"features": [{"name": n} for n in NAMES], "feature_reference": reference})
    assert built is not None and len(built.shares[2]) == 1


def test_the_clocks_features_are_not_judged_an_hour_is_never_spread_as_days_are():
    rng, clock = np.random.default_rng(16), Clock()
    names = ["product_views", "local_hour"]
    training = np.c_[rng.gamma(2, 3, 20_000), rng.integers(0, 24, 20_000)].astype(np.float32)
    champion = SimpleNamespace(version="v1", threshold=0.5, meta={
        "features": [{"name": n} for n in names], "feature_reference": feature_reference(training, names)})
    drift = ScoreDrift(3600, clock=clock)
    for _ in range(6):                                     # an hour of live traffic: all at 14:00
        drift.observe(champion, rng.beta(2, 5, 300), np.c_[rng.gamma(2, 3, 300), np.full(300, 14)].astype(np.float32))
        clock.now += SLOT_S
    assert list(feature_gauges()) == ["product_views"] and feature_gauges()["product_views"] < 0.05
