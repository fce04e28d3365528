"""report.html: one self-contained page per model version (plots embedded as PNG data URIs)."""
from __future__ import annotations

import base64
import html
import io
import json

import matplotlib

matplotlib.use("Agg")       # no display on servers; must precede pyplot
import matplotlib.pyplot as plt

from batch.train_metrics import curves, threshold_text


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(y, p, meta: dict) -> dict[str, str]:
    c = curves(y, p)
    metrics = meta["metrics"]
    roc, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(c["fpr"], c["tpr"], label=f"AUC {metrics['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    pr, ax = plt.subplots(figsize=(4.5, 4))
    # Steps, not lines: average precision is the area under the steps, and a straight line across a
    # block of tied scores (trees tie many) would draw more area than the AP in the legend.
    ax.plot(c["recall"], c["precision"], drawstyle="steps-post", label=f"AP {metrics['pr_auc']:.3f}")
    ax.axhline(metrics["base_rate"], linestyle=":", color="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.legend(loc="upper right")
    cal, ax = plt.subplots(figsize=(4.5, 4))
    bins = metrics["calibration"]
    ax.plot([b["mean_p"] for b in bins], [b["rate"] for b in bins], "o-", label="model")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    ax.set(xlabel="mean predicted probability", ylabel="observed buy rate", title="Calibration")
    ax.legend(loc="upper left")
    return {"ROC": _png(roc), "Precision-recall": _png(pr), "Calibration": _png(cal)}


def _table(rows: list[tuple], head: tuple) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + cells + "</table>"


def render(meta: dict, y, p) -> bytes:
    metrics = meta["metrics"]
    summary = [(key, f"{metrics[key]:.4f}" if isinstance(metrics[key], float) else metrics[key])
               for key in ("roc_auc", "pr_auc", "log_loss", "brier", "lift_top_decile", "rows", "positives", "base_rate")]
    summary += [("threshold", threshold_text(meta)),
                ("parity max |p_onnx - p_spark|", f"{meta['parity']['max_abs_diff']:.2e} on {meta['parity']['rows']} rows")]
    images = "".join(f'<figure><img alt="{name}" src="{uri}"><figcaption>{name}</figcaption></figure>'
                     for name, uri in _plots(y, p, meta).items())
    importances = _table([(name, f"{value:.4f}") for name, value in meta["feature_importances"].items()],
                         ("feature", "importance"))
    calibration = _table([(f"{b['low']:.1f}-{b['high']:.1f}", b["count"], f"{b['mean_p']:.3f}", f"{b['rate']:.3f}")
                          for b in metrics["calibration"]], ("bin", "rows", "mean p", "observed rate"))
    head = {k: v for k, v in meta.items() if k not in ("metrics", "feature_importances", "features")}
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(str(meta['name']))} {html.escape(str(meta.get('version')))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Model {html.escape(str(meta['name']))} version {html.escape(str(meta.get('version')))}</h1>
<p>{html.escape(meta['algorithm'])} on {meta['rows']['train']} training rows, evaluated on {meta['rows']['eval']}
later rows; label: {html.escape(str(meta.get('label')))}.</p>
<h2>Evaluation</h2>{_table(summary, ('metric', 'value'))}
{images}
<h2>Calibration bins</h2>{calibration}
<h2>Feature importances</h2>{importances}
<h2>model.json (excerpt)</h2><pre>{html.escape(json.dumps(head, indent=2, default=str))}</pre>
</body></html>"""
    return page.encode()
