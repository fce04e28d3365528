"""The served scores against those the model was chosen on: scorer/drift.py and its reference."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from batch.train_metrics import score_reference
from scorer.drift import MIN_ROWS, SLOT_S, ScoreDrift, psi, reference_of


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name)


def model(version: str, training_scores: np.ndarray | None, threshold: float = 0.5) -> SimpleNamespace:
    meta = {} if training_scores is None else {"score_reference": score_reference(training_scores, threshold)}
    return SimpleNamespace(version=version, threshold=threshold, meta=meta)


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
    drift.observe(champion, rng.beta(2, 5, MIN_ROWS - 1))
    assert math.isnan(gauge("scorer_score_psi"))                       # too few scores to say
    assert gauge("scorer_score_window_rows") == MIN_ROWS - 1
    drift.observe(champion, rng.beta(2, 5, 4000))
    assert gauge("scorer_score_psi") < 0.02
    same = gauge("scorer_buy_rate")
    assert same == pytest.approx(gauge("scorer_expected_buy_rate"), abs=0.02)

    drift = ScoreDrift(3600, clock=Clock())                 # the traffic changed: scores twice as high
    drift.observe(champion, np.clip(2 * rng.beta(2, 5, 5000), 0, 1))
    assert gauge("scorer_score_psi") > 0.25
    assert gauge("scorer_buy_rate") > 2 * same


def test_the_window_forgets_scores_older_than_drift_window_s():
    rng, clock = np.random.default_rng(3), Clock()
    drift = ScoreDrift(10 * SLOT_S, clock=clock)
    champion = model("v1", rng.beta(2, 5, 20_000))
    drift.observe(champion, np.full(5000, 0.99))           # an hour of odd traffic
    assert gauge("scorer_score_psi") > 1
    clock.now += 10 * SLOT_S
    drift.observe(champion, rng.beta(2, 5, 5000))          # ten minutes on, only the usual traffic counts
    assert gauge("scorer_score_window_rows") == 5000 and gauge("scorer_score_psi") < 0.02


def test_a_scorer_without_traffic_shows_its_window_emptying_not_the_last_busy_hour():
    rng, clock = np.random.default_rng(4), Clock()
    drift = ScoreDrift(10 * SLOT_S, clock=clock)
    drift.observe(model("v1", rng.beta(2, 5, 20_000)), np.full(5000, 0.99))
    clock.now += 5 * SLOT_S                                # no scores since: half the window is still in it
    assert gauge("scorer_score_window_rows") == 5000 and gauge("scorer_score_psi") > 1
    clock.now += 5 * SLOT_S                                # and then none: no PSI and no buy rate, not the old ones
    assert gauge("scorer_score_window_rows") == 0
    assert math.isnan(gauge("scorer_score_psi")) and math.isnan(gauge("scorer_buy_rate"))


def test_a_new_model_starts_the_window_again_and_one_without_a_reference_is_not_measured(caplog):
    rng = np.random.default_rng(5)
    drift = ScoreDrift(3600, clock=Clock())
    drift.observe(model("v1", rng.beta(2, 5, 20_000)), rng.beta(2, 5, 3000))
    assert gauge("scorer_score_window_rows") == 3000
    with caplog.at_level(logging.WARNING, logger="scorer.drift"):
        drift.observe(model("v0", None), rng.beta(2, 5, 3000))
        drift.observe(model("v0", None), rng.beta(2, 5, 3000))
    assert gauge("scorer_score_window_rows") == 0
    assert math.isnan(gauge("scorer_score_psi")) and math.isnan(gauge("scorer_expected_buy_rate"))
    assert len(caplog.records) == 1 and "model v0 has no usable score_reference" in caplog.text
    drift.observe(model("v2", rng.beta(2, 5, 20_000)), np.array([np.nan, 0.5]))   # a NaN score is not counted
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
