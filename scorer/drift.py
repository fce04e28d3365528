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

import numpy as np

from scorer import metrics

log = logging.getLogger(__name__)
MIN_ROWS = 1000      # a PSI over fewer scores is mostly noise: 1,000 rows in 10 bins still move it ~0.01
SLOT_S = 60          # the window moves by a minute at a time
FLOOR = 1e-4         # a share of 0 on either side would make the PSI infinite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two distributions over the same bins (shares summing to 1)."""
    expected, actual = np.maximum(expected, FLOOR), np.maximum(actual, FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def reference_of(meta: dict) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(edges, shares, buy rate) of a model.json's ``score_reference``; None when it has none (trained
    before it was written) or it does not hold together (a monitoring field never refuses a model)."""
    reference = meta.get("score_reference")
    if reference is None:
        return None
    try:
        edges = np.asarray(reference["edges"], dtype=np.float64)
        shares = np.asarray(reference["shares"], dtype=np.float64)
        buy_rate = float(reference["buy_rate"])
    except (KeyError, TypeError, ValueError):
        return None
    if (edges.ndim != 1 or shares.shape != (len(edges) + 1,) or np.any(np.diff(edges) <= 0)
            or not np.all(np.isfinite(edges)) or np.any(shares < 0) or not math.isclose(shares.sum(), 1, abs_tol=1e-6)
            or not 0 <= buy_rate <= 1):
        return None
    return edges, shares, buy_rate


class ScoreDrift:
    """The live scores of the last ``window_s`` by bin, per minute, against the model's reference. A
    batch only adds its counts (a few µs); the gauges sum the minutes still in the window when scraped,
    so a scorer that stops getting traffic shows an emptying window, not the last busy hour's PSI."""

    def __init__(self, window_s: float, clock=time.monotonic):
        self.slots_kept = max(1, math.ceil(window_s / SLOT_S))
        self.clock = clock
        self.version: str | None = None
        # (reference, ((minute, scores per bin, buy decisions), ...)), replaced whole: scrapes read it from
        # another thread, and a new model's reference must never meet the last one's counts.
        self.window: tuple[tuple[np.ndarray, np.ndarray, float] | None, tuple] = (None, ())
        for gauge, read in ((metrics.SCORE_PSI, self.psi), (metrics.SCORES_IN_WINDOW, self.rows),
                            (metrics.BUY_RATE, self.buy_rate), (metrics.EXPECTED_BUY_RATE, self.expected_buy_rate)):
            gauge.set_function(read)

    def observe(self, model, p_buy: np.ndarray) -> None:
        """Count a batch's live scores; the window starts again with each new model."""
        if model.version != self.version:
            self._start(model)
        reference, slots = self.window
        p_buy = p_buy[np.isfinite(p_buy)]
        if reference is None or not len(p_buy):
            return
        counts = np.bincount(np.searchsorted(reference[0], p_buy, side="right"), minlength=len(reference[1]))
        buys = int(np.count_nonzero(p_buy >= model.threshold))
        minute = self._minute()
        if slots and slots[-1][0] == minute:
            _, in_slot, bought_in_slot = slots[-1]
            slots, counts, buys = slots[:-1], counts + in_slot, buys + bought_in_slot
        self.window = (reference, self._current(slots, minute) + ((minute, counts, buys),))

    def _start(self, model) -> None:
        self.version = model.version
        reference = reference_of(model.meta)
        self.window = (reference, ())
        if reference is None:
            log.warning("model %s has no usable score_reference in model.json (trained before it was written?): "
                        "score drift is not measured until a model with one is served", model.version)

    def _minute(self) -> int:
        return int(self.clock() // SLOT_S)

    def _current(self, slots: tuple, minute: int) -> tuple:
        return tuple(slot for slot in slots if slot[0] > minute - self.slots_kept)

    def _totals(self) -> tuple[tuple | None, np.ndarray, int]:
        """(reference, scores per bin, buy decisions) of the minutes still in the window now."""
        reference, slots = self.window
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
