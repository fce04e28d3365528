"""Evaluation of predicted probabilities: ranking, calibration, lift, and the decision threshold."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, precision_recall_curve, roc_auc_score, roc_curve


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict]:
    """Reliability bins of equal width: mean predicted probability vs observed rate, per bin."""
    edges = np.arange(bins + 1) / bins      # k / bins rounds to the float of k/10: linspace's 0.30000000000000004 put p = 0.3 a bin low
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                        "mean_p": float(p[mask].mean()), "rate": float(y[mask].mean())})
    return out


def lift_top_decile(y: np.ndarray, p: np.ndarray) -> float:
    """Buy rate among the 10% highest-scored rows, over the overall buy rate. Rows tied at the
    cut-off score count in proportion (trees tie many rows), so the row order cannot matter."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    top = max(1, -(-len(p) // 10))      # whole rows: the ceiling of 30 * 0.1, a hair over 3, took 4
    cutoff = np.sort(p)[::-1][top - 1]
    above, tied = p > cutoff, p == cutoff
    hits = y[above].sum() + (top - above.sum()) * y[tied].mean()
    base = y.mean()
    return float(hits / top / base) if base > 0 else 0.0


def evaluate(y, p) -> dict:
    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError(f"evaluation needs both classes, got only label {int(y[0]) if len(y) else 'none'}")
    return {
        "rows": len(y), "positives": int(y.sum()), "base_rate": float(y.mean()),
        "roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "brier": float(np.mean((p - y) ** 2)), "lift_top_decile": lift_top_decile(y, p),
        "calibration": calibration(y, p),
    }


def choose_threshold(y, p, objective: str = "f1", target_precision: float = 0.5, weights=None) -> dict:
    """The decision threshold: max F1, or the lowest threshold reaching ``target_precision``
    (so recall is as high as that precision allows); when none does, the most precise one, with
    ``target_reached`` false. ``weights``: how much each row counts (make bench's treated suite)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    precision, recall, thresholds = precision_recall_curve(y, p, sample_weight=weights)
    precision, recall = precision[:-1], recall[:-1]     # the last point has no threshold
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    if objective == "f1":
        best = int(np.argmax(f1))
    elif objective == "precision":
        reaching = np.flatnonzero(precision >= target_precision)
        best = int(reaching[0]) if len(reaching) else int(np.argmax(precision))
        reached = bool(len(reaching))
    else:
        raise ValueError(f"threshold objective must be f1 or precision, got {objective!r}")
    # Halfway down to the next lower score: the same rows pass, and a row tied at the chosen score
    # still passes when serving computes it a float32 step lower (the scorer's fused trees can).
    lower = p[p < thresholds[best]]
    threshold = (thresholds[best] + (lower.max() if len(lower) else 0.0)) / 2
    return {"objective": objective, "threshold": float(threshold), "precision": float(precision[best]),
            "recall": float(recall[best]), "f1": float(f1[best]),
            **({"target_precision": target_precision, "target_reached": reached} if objective == "precision" else {})}


def score_reference(p, threshold: float, bins: int = 10, weights=None) -> dict:
    """The scores the model was chosen on, for the scorer to compare the scores it serves with
    (``scorer_score_psi``): the evaluation rows' P(buy), as served (ONNX's), cut at their deciles, the
    share of rows in each bin, and the share at or above the threshold. A bin holds the scores from
    its lower edge up to below its upper one. Trees tie many rows at one score: repeated cut points
    are merged, and each share is counted, not assumed to be a tenth. With ``weights`` a row counts
    that much (a held-out session's stands for the offered ones left out: batch.train_treated)."""
    p = np.asarray(p, dtype=np.float64)
    return {**_binned(p, np.unique(_deciles(p, bins, weights)), weights),
            "buy_rate": float(np.average(p >= threshold, weights=weights)), "rows": len(p)}


def _deciles(values: np.ndarray, bins: int, weights=None) -> np.ndarray:
    """The cut points of ``bins`` equal shares of ``values``, each value counting its weight."""
    shares = np.arange(1, bins) / bins
    if weights is None:
        return np.quantile(values, shares)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    at = np.searchsorted(cumulative, shares * cumulative[-1], side="left")
    return values[order][np.minimum(at, len(values) - 1)]


def _binned(values: np.ndarray, edges: np.ndarray, weights=None) -> dict:
    """``edges`` and the share of ``values`` (each counting its weight) in each bin they make (from
    a lower edge up to below the next); no values at all make one bin holding everything."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), weights=weights, minlength=len(edges) + 1)
    shares = counts / counts.sum() if len(values) else np.ones(1)
    return {"edges": edges.astype(np.float64).tolist(), "shares": shares.tolist()}


def feature_reference(matrix, names: list[str], bins: int = 10, weights=None) -> dict:
    """The inputs the model was chosen on, for the scorer to tell which one moved when its scores
    drift (``scorer_feature_psi``): per feature, the evaluation rows' values cut at their deciles
    and the share of rows in each bin, as ``score_reference``. A feature with few distinct values
    (a flag, a small count, a class code) gets a bin per value instead, and one below and one above
    them all for values training never saw: deciles of a flag that is mostly 0 are all 0, one bin
    holding every row, and no change could show. ``weights`` as for ``score_reference``."""
    matrix = np.asarray(matrix, dtype=np.float32)
    reference = {}
    for column, name in enumerate(names):
        finite = np.isfinite(matrix[:, column])
        values, kept = matrix[finite, column], None if weights is None else np.asarray(weights)[finite]
        distinct = np.unique(values)
        if len(distinct) <= bins:
            edges = np.append(distinct, np.nextafter(distinct[-1:], np.float32(np.inf)))
        else:
            edges = np.unique(_deciles(values, bins, kept).astype(np.float32))
        reference[name] = _binned(values, edges, kept)
    return {"features": reference, "rows": len(matrix)}


def threshold_text(meta: dict) -> str:
    """The threshold and how it was chosen, saying so when the target precision was out of reach."""
    selection = meta["threshold_selection"]
    text = f"{meta['threshold']:.4f} ({selection['objective']})"
    if selection.get("target_reached") is False:
        text += (f", target precision {selection['target_precision']:g} not reached at any threshold: "
                 f"the most precise gives {selection['precision']:.4f}")
    return text


def curves(y, p) -> dict:
    """ROC and PR curves for the report."""
    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}
