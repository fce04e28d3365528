"""How far the scores served have moved from those the model was chosen on.

Training writes the evaluation rows' P(buy) cut at their deciles into model.json
(``score_reference``). The worker counts its live scores into the same bins over the last
``drift_window_s`` and publishes the population stability index (PSI) between the two, and the share
of buy decisions next to the share training expected. Inputs that change under a model (a tracker
or enricher upgrade, a new campaign mix, a shop redesign) move its scores long before a retrained
model's AUC says anything; a PSI above 0.25 is the usual sign that the model is no longer scoring
the traffic it was trained on.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from common.features import CLOCK_FEATURES
from scorer import metrics

log = logging.getLogger(__name__)
MIN_ROWS = 1000      # a PSI over fewer scores is mostly noise: 1,000 rows in 10 bins still move it ~0.01
SLOT_S = 60          # the window moves by a minute at a time
SAMPLE_PER_SLOT = 500  # live feature rows binned a minute for scorer_feature_psi: MIN_ROWS within 2 minutes
FLOOR = 1e-4         # a share of 0 on either side would make the PSI infinite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two distributions over the same bins (shares summing to 1)."""
    expected, actual = np.maximum(expected, FLOOR), np.maximum(actual, FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _bins(entry) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges, shares) of one binned reference; None when it does not hold together."""
    try:
        edges = np.asarray(entry["edges"], dtype=np.float64)
        shares = np.asarray(entry["shares"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if (edges.ndim != 1 or shares.shape != (len(edges) + 1,) or np.any(np.diff(edges) <= 0)
            or not np.all(np.isfinite(edges)) or np.any(shares < 0) or not math.isclose(shares.sum(), 1, abs_tol=1e-6)):
        return None
    return edges, shares


def reference_of(meta: dict) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(edges, shares, buy rate) of a model.json's ``score_reference``; None when it has none (trained
    before it was written) or it does not hold together (a monitoring field never refuses a model)."""
    reference = meta.get("score_reference")
    bins = _bins(reference) if isinstance(reference, dict) else None
    try:
        buy_rate = float(reference["buy_rate"]) if bins else math.nan
    except (KeyError, TypeError, ValueError):
        return None
    return (*bins, buy_rate) if bins and 0 <= buy_rate <= 1 else None


@dataclass(frozen=True)
class FeatureReference:
    names: list[str]
    edges: np.ndarray            # [features, most edges] float32, padded with +inf (a bin no value reaches)
    shares: list[np.ndarray]     # per feature, the share of the evaluation rows in each of its bins

    def count(self, rows: np.ndarray) -> np.ndarray:
        """[features, most edges + 1]: how many of ``rows`` fall in each bin of each feature."""
        bins = (rows[:, :, None] >= self.edges[None]).sum(axis=2)            # searchsorted, side="right"
        features, width = self.edges.shape[0], self.edges.shape[1] + 1
        return np.bincount((bins + np.arange(features) * width).ravel(),
                           minlength=features * width).reshape(features, width)


def feature_reference_of(meta: dict) -> FeatureReference | None:
    """A model.json's ``feature_reference``, for the model's features in their order; None when it has
    none or it does not hold together."""
    reference = meta.get("feature_reference")
    names = [feature.get("name") for feature in meta.get("features", []) if isinstance(feature, dict)]
    entries = reference.get("features") if isinstance(reference, dict) else None
    if not isinstance(entries, dict) or list(entries) != names or not names:
        return None
    binned = [_bins(entries[name]) for name in names]
    if any(bins is None for bins in binned):
        return None
    edges = np.full((len(names), max(len(bins[0]) for bins in binned)), np.inf, dtype=np.float32)
    for row, (feature_edges, _) in enumerate(binned):
        edges[row, :len(feature_edges)] = feature_edges
    return FeatureReference(names, edges, [shares for _, shares in binned])


class MinuteSample:
    """A uniform sample of up to ``SAMPLE_PER_SLOT`` of a minute's live feature rows (reservoir
    sampling): each row of the minute is equally likely to be in it, whichever batch brought it. The
    first rows of a minute alone would be a second or two of one shard's traffic when busy. Binned and
    its rows let go once the minute is over."""

    def __init__(self, width: int, rng: np.random.Generator):
        self.rows: np.ndarray | None = np.empty((SAMPLE_PER_SLOT, width), np.float32)
        self.seen = 0                       # rows offered this minute
        self.rng = rng
        self.binned: np.ndarray | None = None

    def offer(self, inputs: np.ndarray, picked: np.ndarray | None) -> None:
        """Offer the rows ``picked`` (indices; None: all) of ``inputs``."""
        offered = len(inputs) if picked is None else len(picked)
        order = np.arange(self.seen, self.seen + offered)
        # Algorithm R: the i-th row (from 0) takes place i while there is room, else a random place of
        # the first i + 1, where it replaces a row only if that place is in the sample.
        places = np.where(order < SAMPLE_PER_SLOT, order, self.rng.integers(0, order + 1))
        taking = np.flatnonzero(places < SAMPLE_PER_SLOT)[::-1]
        # Of two rows drawing one place the later one stays, as one row at a time would have it.
        places, last = np.unique(places[taking], return_index=True)
        taking = taking[last]
        self.rows[places] = inputs[taking if picked is None else picked[taking]]
        self.seen += offered

    def close(self, features: FeatureReference) -> None:
        self.binned = self.counts(features)
        self.rows = None

    def counts(self, features: FeatureReference) -> np.ndarray:
        """[features, most edges + 1]: the sampled rows by bin of each feature."""
        rows = self.rows                    # read once: a scrape may meet the worker's close()
        return self.binned if rows is None else features.count(rows[:min(self.seen, SAMPLE_PER_SLOT)])


class ScoreDrift:
    """The live scores of the last ``window_s`` by bin, per minute, against the model's reference, and a
    uniform sample of each minute's live feature rows (``MinuteSample``) against its feature reference.
    A batch only adds its counts and offers its rows (tens of µs); the gauges sum the minutes still in
    the window when scraped, so a scorer that stops getting traffic shows an emptying window, not the
    last busy hour's PSI."""

    def __init__(self, window_s: float, clock=time.monotonic, rng: np.random.Generator | None = None):
        self.slots_kept = max(1, math.ceil(window_s / SLOT_S))
        self.clock = clock
        self.rng = rng or np.random.default_rng()
        self.version: str | None = None
        # (score reference, feature reference, ((minute, scores per bin, buy decisions, MinuteSample
        # or None), ...)), replaced whole: scrapes read it from another thread, and a new model's
        # reference must never meet the last one's counts.
        self.window: tuple = (None, None, ())
        for gauge, read in ((metrics.SCORE_PSI, self.psi), (metrics.SCORES_IN_WINDOW, self.rows),
                            (metrics.BUY_RATE, self.buy_rate), (metrics.EXPECTED_BUY_RATE, self.expected_buy_rate)):
            gauge.set_function(read)
        metrics.FEATURE_PSI.read = self.feature_psi

    def observe(self, model, p_buy: np.ndarray, inputs: np.ndarray, live: np.ndarray | None = None) -> None:
        """Count a batch's scores, or those ``live`` marks (``inputs``: their feature rows); the window
        starts again with each new model. Rows are picked by index, and only the sampled ones copied."""
        if model.version != self.version:
            self._start(model)
        reference, features, slots = self.window
        counted = np.isfinite(p_buy) if live is None else live & np.isfinite(p_buy)
        picked = None if counted.all() else np.flatnonzero(counted)
        if picked is not None:
            p_buy = p_buy[picked]
        if (reference is None and features is None) or not len(p_buy):
            return
        counts = np.bincount(np.searchsorted(reference[0], p_buy, side="right"), minlength=len(reference[1])) \
            if reference else np.zeros(0, dtype=np.int64)
        buys = int(np.count_nonzero(p_buy >= model.threshold))
        minute = self._minute()
        if slots and slots[-1][0] == minute:
            _, in_slot, bought_in_slot, sample = slots[-1]
            slots, counts, buys = slots[:-1], counts + in_slot, buys + bought_in_slot
        else:
            if slots and slots[-1][3] is not None:
                slots[-1][3].close(features)            # its minute is over
            sample = MinuteSample(features.edges.shape[0], self.rng) if features is not None else None
        if sample is not None:
            sample.offer(inputs, picked)
        self.window = (reference, features, self._current(slots, minute) + ((minute, counts, buys, sample),))

    def _start(self, model) -> None:
        self.version = model.version
        reference, features = reference_of(model.meta), feature_reference_of(model.meta)
        self.window = (reference, features, ())
        missing = {name: gauge for name, gauge, found in (("score_reference", "scorer_score_psi", reference),
                                                          ("feature_reference", "scorer_feature_psi", features))
                   if found is None}
        if missing:
            log.warning("model %s has no usable %s in model.json (trained before it was written?): %s not measured "
                        "until a model with it is served", model.version, " or ".join(missing), ", ".join(missing.values()))

    def _minute(self) -> int:
        return int(self.clock() // SLOT_S)

    def _current(self, slots: tuple, minute: int) -> tuple:
        return tuple(slot for slot in slots if slot[0] > minute - self.slots_kept)

    def _totals(self) -> tuple[tuple | None, np.ndarray, int]:
        """(reference, scores per bin, buy decisions) of the minutes still in the window now."""
        reference, _, slots = self.window
        slots = self._current(slots, self._minute())
        total = sum((slot[1] for slot in slots), np.zeros(len(reference[1]) if reference else 0, dtype=np.int64))
        return reference, total, sum(slot[2] for slot in slots)

    def rows(self) -> int:
        return int(self._totals()[1].sum())

    def psi(self) -> float:
        reference, total, _ = self._totals()
        rows = total.sum()
        return psi(reference[1], total / rows) if reference is not None and rows >= MIN_ROWS else math.nan

    def buy_rate(self) -> float:
        _, total, bought = self._totals()
        rows = total.sum()
        return bought / rows if rows else math.nan

    def expected_buy_rate(self) -> float:
        reference = self.window[0]
        return reference[2] if reference is not None else math.nan

    def feature_psi(self) -> dict[str, float]:
        """Each feature's PSI over the window's sampled rows (NaN under ``MIN_ROWS``): which input moved.
        Not the clock's (local hour and weekday): an hour is never spread as days are."""
        _, features, slots = self.window
        if features is None:
            return {}
        counts = sum((slot[3].counts(features) for slot in self._current(slots, self._minute()) if slot[3] is not None),
                     np.zeros((len(features.names), features.edges.shape[1] + 1), dtype=np.int64))
        count = int(counts[0].sum())
        if count < MIN_ROWS:
            return {name: math.nan for name in features.names if name not in CLOCK_FEATURES}
        return {name: psi(shares, counts[column, :len(shares)] / count)
                for column, (name, shares) in enumerate(zip(features.names, features.shares))
                if name not in CLOCK_FEATURES}
