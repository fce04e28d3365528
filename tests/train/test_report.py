"""report.html: the words match the run it describes (no Spark: the page is made from model.json's
meta and the evaluation rows)."""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import numpy as np

from batch import report_html, train_model
from batch.train_metrics import choose_threshold, evaluate


def rows(seed: int = 3, n: int = 2000):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(int)
    p = np.clip(0.15 + 0.5 * y * rng.random(n) + 0.2 * rng.standard_normal(n), 0, 1)
    return y, p


def meta_for(y, p, **extra) -> dict:
    selection = choose_threshold(y, p)
    meta = {"name": "buy-propensity", "version": None, "algorithm": "gbt", "metrics": evaluate(y, p),
            "threshold": selection["threshold"], "threshold_selection": selection, "rows": {"train": 6000, "eval": len(y)},
            "parity": {"passed": True, "max_abs_diff": 1e-7, "rows": len(y), "tolerance": 1e-5},
            "feature_importances": {f"f{i}": (30 - i) / 435 for i in range(30)}, "hyper_parameters": {"seed": 42},
            "created_at": "2026-12-05T03:46:11Z", "code_version": "b194170c29df", "spark_version": "4.0.0",
            "label": "Revenue is true"}
    return {**meta, **extra}


def text_of(page: bytes) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", re.sub(r'src="data:[^"]+"', "", page.decode())))


def test_a_table_run_says_it_was_a_random_split_and_unpublished_with_its_cross_validation():
    # It said "evaluated on 3079 later rows" of a random split, and "version None".
    y, p = rows()
    cv = {"folds": [{"fold": k, "roc_auc": 0.93 + k / 1000, "pr_auc": 0.7, "parity_passed": True} for k in range(5)],
          "roc_auc_mean": 0.932, "roc_auc_std": 0.0014, "seed": 42}
    meta = meta_for(y, p, training_window={"table": "shoppers.csv", "rows": 8000, "notes": ["dropped 14 rows"]},
                    cross_validation=cv)
    page = report_html.render(meta, y, p)
    text = text_of(page)
    assert "later" not in text and "None" not in text.split("model.json")[0]
    assert "version unpublished (a local run)" in text and "stratified random 25%" in text
    assert "dropped 14 rows" in text and "5-fold ROC AUC 0.9320 ± 0.0014" in text
    assert b'name="viewport"' in page and page.count(b"data:image/png;base64,") == 4
    assert f'alt="ROC curve, AUC {meta["metrics"]["roc_auc"]:.3f},'.encode() in page


def test_decisions_at_the_threshold_are_counted_as_the_scorer_decides():
    y, p = rows(seed=5)
    meta = meta_for(y, p, training_window={"table": "t.csv", "rows": 2000, "notes": []})
    counts = report_html.at_threshold(y, p, meta["threshold"])
    flagged = p >= meta["threshold"]
    assert counts["true_positives"] == int((flagged & (y == 1)).sum()) and counts["flagged"] == int(flagged.sum())
    assert sum(counts[k] for k in ("true_positives", "false_positives", "false_negatives", "true_negatives")) == len(y)
    # the precision in words is the one the threshold was chosen with
    assert counts["true_positives"] / counts["flagged"] == meta["threshold_selection"]["precision"]
    text = text_of(report_html.render(meta, y, p))
    assert f"{counts['flagged']} of {len(y)} rows" in text
    assert f"{meta['threshold_selection']['precision']:.1%} of them buy" in text


def test_a_lake_run_names_its_window_split_and_why_it_was_not_promoted():
    y, p = rows(seed=7)
    meta = meta_for(y, p, version="20261205T034611Z",
                    training_window={"start": "2026-11-20", "end": "2026-11-21", "split_at_ms": 1_763_683_200_000,
                                     "sessions": 900, "buying_sessions": 120, "examples": 8000},
                    promotion={"promoted": False, "reasons": ["ROC AUC 0.61 is worse than CURRENT v1's 0.70"],
                               "champion": {"version": "v1", "rows": 2000, "roc_auc": 0.70, "challenger_roc_auc": 0.61},
                               "auc_floor": 0.6, "champion_margin": 0.01})
    text = text_of(report_html.render(meta, y, p))
    assert "version 20261205T034611Z" in text
    assert "sessions of 2026-11-20 to 2026-11-21" in text and "started at or after 2025-11-21 00:00 UTC" in text
    assert "Published but not promoted: ROC AUC 0.61 is worse than CURRENT v1's 0.70" in text
    assert "0.6100 here, 0.7000 for the champion" in text
    assert "offered a discount" not in text                 # a model from before the uplift records' lists
    treated = {"offered_left_out": 12, "held_out_weighed": 3, "recorded_hours": 70, "missing_hours": 26}
    meta["training_window"]["treated_sessions"] = treated
    text = text_of(report_html.render(meta, y, p))
    assert ("Left out: 12 sessions offered a discount (it may have made them buy); the control group's 3 weighed by "
            "100 / holdout_percent. 26 hours had no uplift record: their offered sessions, if any, are in.") in text
    meta["training_window"]["treated_sessions"] = None
    assert "trained on as any other (treated_sessions=keep)" in text_of(report_html.render(meta, y, p))


def test_a_one_hot_encoded_column_is_charted_whole():
    """Month's ten 0/1 columns each looked minor beside one numeric column; together they lead."""
    y, p = rows(seed=7)
    importances = {"PageValues": 0.30, "ExitRates": 0.10, **{f"Month_{m}": 0.06 for m in range(10)}}
    meta = meta_for(y, p, training_window={"table": "t.csv", "rows": 2000, "notes": []},
                    feature_importances=importances,
                    importance_by_column=train_model.importance_by_column(
                        importances, {"Month": [f"Month_{m}" for m in range(10)]}))
    assert list(meta["importance_by_column"]) == ["Month", "PageValues", "ExitRates"]
    assert meta["importance_by_column"]["Month"] == sum(importances[f"Month_{m}"] for m in range(10))
    page = report_html.render(meta, y, p)
    assert b'alt="Bar chart of the 3 most important columns, led by Month"' in page
    assert "sums the values of each one-hot encoded column" in text_of(page) and "All 12 features" in text_of(page)
    plain = report_html.render(meta_for(y, p, training_window={"table": "t.csv", "rows": 2000, "notes": []}), y, p)
    assert b'alt="Bar chart of the 15 most important features, led by f0"' in plain


class Page(HTMLParser):
    """What a screen reader goes by: each element with its attributes and the elements it is inside, and
    the table cells, row by row, as (tag, scope, text)."""

    VOID = frozenset({"meta", "img", "br"})

    def __init__(self, page: bytes):
        super().__init__()
        self.open: list[str] = []
        self.elements: list[tuple[str, dict, tuple]] = []
        self.rows: list[list[list]] = []
        self.feed(page.decode())

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.open)))
        if tag == "tr":
            self.rows.append([])
        if tag in ("th", "td"):
            self.rows[-1].append([tag, dict(attrs).get("scope"), ""])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        while self.open and self.open.pop() != tag:
            pass

    def handle_data(self, data):
        if self.open and self.open[-1] in ("th", "td"):
            self.rows[-1][-1][2] += data

    def find(self, tag: str) -> list[tuple[dict, tuple]]:
        return [(attrs, inside) for name, attrs, inside in self.elements if name == tag]


def test_the_page_reads_with_a_screen_reader():
    """Row labels were plain cells, alt texts left out the threshold and the calibration, and there was
    no <main> landmark; the model.json excerpt scrolled but could not be reached from the keyboard."""
    y, p = rows(seed=5)
    meta = meta_for(y, p, training_window={"table": "t.csv", "rows": 2000, "notes": []})
    page = report_html.render(meta, y, p)
    decisions = re.search(rb"<h2>Decisions at the threshold</h2>(<table>.*?</table>)", page).group(1)
    flagged, buys = p >= meta["threshold"], y == 1
    assert Page(decisions).rows == [
        [["th", "col", "session"], ["th", "col", "decided buy"], ["th", "col", "decided defer"]],
        [["th", "row", "buys"], ["td", None, str((flagged & buys).sum())], ["td", None, str((~flagged & buys).sum())]],
        [["th", "row", "does not buy"], ["td", None, str((flagged & ~buys).sum())],
         ["td", None, str((~flagged & ~buys).sum())]],
    ]
    parsed = Page(page)
    assert all(cell[0] == "td" or cell[1] in ("row", "col") for row in parsed.rows for cell in row)
    assert [inside for _, inside in parsed.find("main")] == [("html", "body")]
    for tag in ("h1", "table", "img", "pre"):
        assert all("main" in inside for _, inside in parsed.find(tag)), tag
    [(pre, _)] = parsed.find("pre")
    assert pre["tabindex"] == "0" and pre["role"] == "region" and pre["aria-label"] == "model.json excerpt"

    fpr, recall = (flagged & ~buys).sum() / (~buys).sum(), (flagged & buys).sum() / buys.sum()
    alts = [attrs["alt"] for attrs, _ in parsed.find("img")]
    roc = next(alt for alt in alts if alt.startswith("ROC curve"))
    assert f"true positive rate of {recall:.1%} and a false positive rate of {fpr:.1%}" in roc and "chance" in roc
    bins = meta["metrics"]["calibration"]
    worst = max(bins, key=lambda b: abs(b["rate"] - b["mean_p"]))
    gap = np.average([abs(b["rate"] - b["mean_p"]) for b in bins], weights=[b["count"] for b in bins])
    calibration = next(alt for alt in alts if alt.startswith("Calibration plot"))
    assert f"the points are {gap:.3f} from the diagonal on average" in calibration
    assert f"furthest in the bin {worst['low']:.1f}-{worst['high']:.1f}: predicted {worst['mean_p']:.3f}" in calibration
    assert f"{fpr:.1%} of the non-buyers are decided buy too (false positive rate)" in text_of(page)


def test_the_calibration_plot_shows_how_many_rows_each_bin_holds():
    """Marker sizes alone hid that most rows sat in the first bins: a histogram of rows is under the curve."""
    import matplotlib.pyplot as plt

    y, p = rows()
    bins = evaluate(y, p)["calibration"]
    figure = report_html.calibration_figure(bins)
    try:
        curve, histogram = figure.axes
        assert [bar.get_height() for bar in histogram.patches] == [b["count"] for b in bins]
        assert [round(bar.get_x() + bar.get_width() / 2, 6) for bar in histogram.patches] == [
            round((b["low"] + b["high"]) / 2, 6) for b in bins]
        assert histogram.get_ylabel() == "rows" and curve.get_ylabel() == "observed buy rate"
    finally:
        plt.close(figure)


def test_code_from_uncommitted_changes_is_marked_dirty(tmp_path, monkeypatch):
    # code_version named the commit alone: a model trained on edited code looked rebuildable from it.
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "fold.py").write_text("A = 1\n")
    git("add", "fold.py")
    git("commit", "-qm", "fold")
    monkeypatch.setattr(train_model, "ROOT", tmp_path)
    head = git("rev-parse", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked: not training code\n")
    assert train_model.code_version() == head
    (tmp_path / "fold.py").write_text("A = 2\n")
    assert train_model.code_version() == f"{head}-dirty"
    y, p = rows()
    text = text_of(report_html.render(meta_for(y, p, code_version=f"{head}-dirty"), y, p))
    assert f"from code {head[:12]}-dirty, Spark" in text
