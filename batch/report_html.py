"""report.html: one self-contained page per model version (plots embedded as PNG data URIs), saying
in words what the figures mean for the decision the model supports."""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json

import matplotlib
import numpy as np

matplotlib.use("Agg")       # no display on servers; must precede pyplot
import matplotlib.pyplot as plt

from batch.train_metrics import curves, threshold_text

TOP_IMPORTANCES = 15
STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;line-height:1.4}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th[scope=row]{font-weight:normal}
figure{display:inline-block;vertical-align:top;margin:0 1em 1em 0;max-width:100%}
img{width:420px;max-width:100%;height:auto}img.wide{width:600px}
figcaption{max-width:420px;font-size:.9em;color:#444}pre{background:#f6f6f6;padding:1em;overflow:auto}
.bad{color:#a0001c}.good{color:#0b6b2f}"""


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight")      # sharp on high-density screens
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def at_threshold(y, p, threshold: float) -> dict:
    """What deciding ``p >= threshold`` (as the scorer does) gives on the evaluation rows."""
    y, flagged = np.asarray(y, dtype=bool), np.asarray(p, dtype=np.float64) >= threshold
    counts = {"true_positives": int((flagged & y).sum()), "false_positives": int((flagged & ~y).sum()),
              "false_negatives": int((~flagged & y).sum()), "true_negatives": int((~flagged & ~y).sum())}
    counts["flagged"] = counts["true_positives"] + counts["false_positives"]
    tp, flagged = counts["true_positives"], counts["flagged"]
    counts["precision"] = tp / flagged if flagged else None        # none flagged: no precision to speak of
    counts["recall"] = tp / max(1, tp + counts["false_negatives"])
    counts["false_positive_rate"] = counts["false_positives"] / max(1, counts["false_positives"] + counts["true_negatives"])
    return counts


def _plots(y, p, meta: dict, counts: dict) -> list[tuple[str, str, str]]:
    """(alt text, caption, image) of the ROC, PR and calibration plots."""
    c, metrics, t = curves(y, p), meta["metrics"], meta["threshold"]
    recall, fpr = counts["recall"], counts["false_positive_rate"]
    precision = 1.0 if counts["precision"] is None else counts["precision"]     # where the PR curve starts
    roc, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(c["fpr"], c["tpr"], label=f"model, AUC {metrics['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance, AUC 0.5")
    ax.plot([fpr], [recall], "o", color="black", label=f"threshold {t:.3f}")
    ax.set(xlabel="false positive rate (non-buyers flagged)", ylabel="true positive rate (buyers flagged)", title="ROC")
    ax.legend(loc="lower right")
    pr, ax = plt.subplots(figsize=(4.5, 4))
    # Steps, not lines: average precision is the area under the steps, and a straight line across a
    # block of tied scores (trees tie many) would draw more area than the AP in the legend.
    ax.plot(c["recall"], c["precision"], drawstyle="steps-post", label=f"model, AP {metrics['pr_auc']:.3f}")
    ax.axhline(metrics["base_rate"], linestyle=":", color="grey", label=f"chance (base rate {metrics['base_rate']:.3f})")
    ax.plot([recall], [precision], "o", color="black", label=f"threshold {t:.3f}")
    ax.set(xlabel="recall (buyers flagged)", ylabel="precision (flagged who buy)", title="Precision-recall")
    ax.legend(loc="upper right")
    bins = metrics["calibration"]
    cal = calibration_figure(bins)
    # The alt texts give what a sighted reader takes from the figure: the threshold's rates, the gap to the diagonal.
    roc_alt = (f"ROC curve, AUC {metrics['roc_auc']:.3f}, against the dotted diagonal of chance (AUC 0.5); the "
               f"threshold {t:.3f} is the dot at a true positive rate of {recall:.1%} and a false positive rate of "
               f"{fpr:.1%}")
    worst, mean_gap = _calibration_gaps(bins)
    calibration_alt = (f"Calibration plot: predicted probability against observed buy rate in {len(bins)} bins; the "
                       f"points are {mean_gap:.3f} from the diagonal on average (weighted by rows), furthest in the "
                       f"bin {worst['low']:.1f}-{worst['high']:.1f}: predicted {worst['mean_p']:.3f}, observed "
                       f"{worst['rate']:.3f}")
    return [
        (roc_alt, ("How many buyers (up) the model flags for each share of "
         "non-buyers flagged (right); the dot is the chosen threshold. Higher and further left is better."), _png(roc)),
        (f"Precision-recall curve, average precision {metrics['pr_auc']:.3f}", ("Of the sessions flagged, how many buy "
         "(up), against the share of all buyers flagged (right). The dotted line is what random flagging gets."),
         _png(pr)),
        (calibration_alt, ("Points on the diagonal mean a "
         "predicted 0.3 buys 30 % of the time. Below, the rows in each bin: points over few rows are less sure."), _png(cal)),
    ]


def calibration_figure(bins: list[dict]):
    """Observed buy rate against mean predicted probability per bin, over a histogram of the bins'
    rows: a bin of 50 rows is not as sure as one of 2,000, and most rows are often in the first."""
    figure, (ax, rows) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    sizes = [20 + 200 * b["count"] / max(x["count"] for x in bins) for b in bins]     # marker area by rows too
    ax.plot([b["mean_p"] for b in bins], [b["rate"] for b in bins], "-", color="C0")
    ax.scatter([b["mean_p"] for b in bins], [b["rate"] for b in bins], s=sizes, color="C0", label="model (area: rows)")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.set(ylabel="observed buy rate", title="Calibration")
    ax.legend(loc="upper left")
    rows.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] for b in bins],
             width=[0.9 * (b["high"] - b["low"]) for b in bins], color="C0", alpha=0.6)
    rows.set(xlabel="mean predicted probability", ylabel="rows", xlim=(0, 1))
    return figure


def _calibration_gaps(bins: list[dict]) -> tuple[dict, float]:
    """The bin furthest from the diagonal, and the rows' mean distance |observed - predicted| to it."""
    worst = max(bins, key=lambda b: abs(b["rate"] - b["mean_p"]))
    mean = sum(b["count"] * abs(b["rate"] - b["mean_p"]) for b in bins) / max(1, sum(b["count"] for b in bins))
    return worst, mean


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if ms else "?"


def _about(meta: dict) -> str:
    """Which data, which split, which run."""
    window, rows = meta.get("training_window") or {}, meta["rows"]
    if "table" in window:
        share = rows["eval"] / max(1, rows["train"] + rows["eval"])
        data = (f"Trained on the table <code>{html.escape(str(window['table']))}</code> ({window['rows']} rows), "
                f"evaluated on a stratified random {share:.0%} of them ({rows['eval']} rows, seed "
                f"{meta.get('hyper_parameters', {}).get('seed')}), held out from training.")
        notes = window.get("notes") or []
        if notes:
            data += " Preparation: " + "; ".join(html.escape(str(n)) for n in notes) + "."
    else:
        data = (f"Trained on the lake's sessions of {window.get('start')} to {window.get('end')} (UTC dates): "
                f"{window.get('sessions')} sessions, {window.get('buying_sessions')} of them with a purchase. "
                f"Evaluated on the sessions that started at or after {_when(window.get('split_at_ms'))} "
                f"({rows['eval']} prefix rows; training had {rows['train']}), never seen in training."
                + (_treated_text(window["treated_sessions"]) if "treated_sessions" in window else ""))
    run = (f"{html.escape(str(meta['algorithm']))}, created {html.escape(str(meta.get('created_at')))} from code "
           f"{html.escape(_short_commit(str(meta.get('code_version'))))}, "
           f"Spark {html.escape(str(meta.get('spark_version')))}; label: {html.escape(str(meta.get('label')))}.")
    return f"<p>{data}</p><p>{run}</p>"


def _treated_text(treated: dict | None) -> str:
    """What became of the sessions the discount engine decided on (batch/train_treated.py)."""
    if treated is None:
        return " The sessions offered a discount were trained on as any other (treated_sessions=keep)."
    text = (f" Left out: {treated['offered_left_out']} sessions offered a discount (it may have made them buy); "
            f"the control group's {treated['held_out_weighed']} weighed by 100 / holdout_percent.")
    if treated["missing_hours"] and treated["recorded_hours"]:
        text += f" {treated['missing_hours']} hours had no uplift record: their offered sessions, if any, are in."
    return text


def _short_commit(version: str) -> str:
    """A commit as people quote it (12 digits), keeping the ``-dirty`` that says it is not the commit's code."""
    return version[:12] + ("-dirty" if version.endswith("-dirty") else "")


def _reading(meta: dict, counts: dict) -> str:
    """The figures in words, each against what chance would give."""
    m, base = meta["metrics"], meta["metrics"]["base_rate"]
    flagged, precision, recall = counts["flagged"], counts["precision"] or 0.0, counts["recall"]
    fpr = counts["false_positive_rate"]
    items = [
        (f"<b>ROC AUC {m['roc_auc']:.3f}</b>: the chance that a random buying session scores above a random "
        "non-buying one (0.5 is chance, 1 is perfect)."),
        (f"<b>Average precision {m['pr_auc']:.3f}</b>: {m['pr_auc'] / base:.1f}× the base rate {base:.3f} "
        f"({m['positives']} of {m['rows']} rows buy), which is what scoring at random gets."),
        (f"<b>Lift in the top 10 %: {m['lift_top_decile']:.2f}</b>: the tenth scored highest buys "
        f"{m['lift_top_decile']:.1f}× as often as average."),
        (f"<b>Brier score {m['brier']:.4f}</b> (lower is better): always predicting the base rate gives "
        f"{base * (1 - base):.4f}. Log loss {m['log_loss']:.4f}."),
        (f"<b>At the threshold {html.escape(threshold_text(meta))}</b>: {flagged} of {m['rows']} rows "
        f"({flagged / max(1, m['rows']):.1%}) are decided <i>buy</i>; {precision:.1%} of them buy (precision), and "
        f"they hold {recall:.1%} of the buyers (recall); {fpr:.1%} of the non-buyers are decided <i>buy</i> "
        "too (false positive rate)."),
    ]
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _decisions(counts: dict) -> str:
    return _table([("buys", counts["true_positives"], counts["false_negatives"]),
                   ("does not buy", counts["false_positives"], counts["true_negatives"])],
                  ("session", "decided buy", "decided defer"))


def _promotion(meta: dict) -> str:
    promotion = meta.get("promotion")
    if not promotion:
        return "<p>Not published to the registry (a local run): no champion comparison.</p>"
    champion = promotion.get("champion") or {}
    if promotion.get("promoted"):
        verdict = '<p class="good">Promoted: CURRENT points to this version.</p>'
    else:
        reasons = "; ".join(html.escape(str(r)) for r in promotion.get("reasons") or [])
        verdict = f'<p class="bad">Published but not promoted: {reasons}.</p>'
    if champion.get("roc_auc") is not None:
        verdict += (f"<p>Against the champion {html.escape(str(champion.get('version')))} on the same "
                    f"{champion.get('rows')} rows: ROC AUC {champion.get('challenger_roc_auc', 0):.4f} here, "
                    f"{champion['roc_auc']:.4f} for the champion (allowed margin {promotion.get('champion_margin')}; "
                    f"floor {promotion.get('auc_floor')}).</p>")
    return verdict


def _cross_validation(meta: dict) -> str:
    cv = meta.get("cross_validation")
    if not cv:
        return ""
    rows = [(f["fold"], f"{f['roc_auc']:.4f}", f"{f['pr_auc']:.4f}", "passed" if f["parity_passed"] else "FAILED")
            for f in cv["folds"]]
    return (f"<h2>Cross-validation</h2><p>{len(cv['folds'])}-fold ROC AUC {cv['roc_auc_mean']:.4f} ± "
            f"{cv['roc_auc_std']:.4f} (stratified folds, seed {cv.get('seed')}).</p>"
            + _table(rows, ("fold", "ROC AUC", "average precision", "parity")))


def _importances(meta: dict) -> str:
    ranked = list(meta["feature_importances"].items())
    by_column = list(meta.get("importance_by_column", {}).items())
    summed = 0 < len(by_column) < len(ranked)      # some column was one-hot encoded: chart it whole
    shown, unit = (by_column, "columns") if summed else (ranked, "features")
    top = shown[:TOP_IMPORTANCES][::-1]
    figure, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1))
    ax.barh([name for name, _ in top], [value for _, value in top], color="C0")
    ax.set(xlabel="importance (share of the total)", title=f"Top {len(top)} {unit}")
    kind = ("|coefficient|, normalised (logistic regression: inputs are not scaled, so only a rough guide)"
            if meta["algorithm"] == "lr" else "Spark's split-gain importance, normalised to sum to 1")
    grouping = (" The chart sums the values of each one-hot encoded column (its 0/1 features); the table "
                "lists every feature." if summed else "")
    full = _table([(name, f"{value:.4f}") for name, value in ranked], ("feature", "importance"))
    return (f"<p>{kind}.{grouping}</p>"
            f'<figure><img alt="Bar chart of the {len(top)} most important {unit}, led by '
            f'{html.escape(shown[0][0]) if shown else "none"}" class="wide" src="{_png(figure)}"></figure>'
            f"<details><summary>All {len(ranked)} features</summary>{full}</details>")


def _table(rows: list[tuple], head: tuple) -> str:
    """Head cells name columns, each row's first cell names its row: a screen reader reads both with a value."""
    cells = "".join(f'<tr><th scope="row">{html.escape(str(row[0]))}</th>'
                    + "".join(f"<td>{html.escape(str(v))}</td>" for v in row[1:]) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f'<th scope="col">{h}</th>' for h in head) + "</tr>" + cells + "</table>"


def render(meta: dict, y, p) -> bytes:
    metrics, counts = meta["metrics"], at_threshold(y, p, meta["threshold"])
    name = html.escape(str(meta["name"]))
    version = html.escape(str(meta["version"])) if meta.get("version") else "unpublished (a local run)"
    summary = [(key, f"{metrics[key]:.4f}" if isinstance(metrics[key], float) else metrics[key])
               for key in ("roc_auc", "pr_auc", "log_loss", "brier", "lift_top_decile", "rows", "positives", "base_rate")]
    summary += [("threshold", threshold_text(meta)),
                ("parity max |p_onnx - p_spark|", f"{meta['parity']['max_abs_diff']:.2e} on {meta['parity']['rows']} rows")]
    images = "".join(f'<figure><img alt="{html.escape(alt)}" src="{uri}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>" for alt, caption, uri in _plots(y, p, meta, counts))
    calibration = _table([(f"{b['low']:.1f}-{b['high']:.1f}", b["count"], f"{b['mean_p']:.3f}", f"{b['rate']:.3f}")
                          for b in metrics["calibration"]], ("bin", "rows", "mean p", "observed rate"))
    head = {k: v for k, v in meta.items() if k not in ("metrics", "feature_importances", "features")}
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} {version}</title><style>{STYLE}</style></head><body><main>
<h1>Model {name}, version {version}</h1>
{_about(meta)}
<h2>What the figures say</h2>{_reading(meta, counts)}
<h2>Decisions at the threshold</h2>{_decisions(counts)}
<h2>Promotion</h2>{_promotion(meta)}
<h2>Evaluation</h2>{_table(summary, ('metric', 'value'))}
{images}
<h2>Calibration bins</h2>{calibration}
{_cross_validation(meta)}
<h2>Feature importances</h2>{_importances(meta)}
<h2>model.json (excerpt)</h2>
<pre tabindex="0" role="region" aria-label="model.json excerpt">{html.escape(json.dumps(head, indent=2, default=str))}</pre>
</main></body></html>"""
    return page.encode()
