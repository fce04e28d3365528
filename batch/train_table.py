"""Feature-table mode: the same fit / evaluate / export / parity path from a CSV or Parquet table.

Categorical columns (strings, booleans, and numeric ones named with ``--categorical``) are one-hot
encoded to plain 0/1 columns *before* Spark, so trees only ever split on numeric thresholds (the
ONNX converter reads Spark's categorical splits wrongly). Missing values are dropped or imputed,
and the count is reported; nothing is dropped silently. Each value of a categorical column becomes a
published feature name, so a column of identifiers (nearly one value per row, or email addresses) is
refused rather than encoded.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from batch.train_config import TrainSettings, spark_session
from batch.train_lake import TrainError
from batch.train_metrics import evaluate
from batch.train_model import Steps, TrainResult, fit_and_export
from common import emails

log = logging.getLogger(__name__)
TRUE = {"true", "1", "yes", "y", "t", "1.0"}
FALSE = {"false", "0", "no", "n", "f", "0.0"}
ID_COLUMNS = ["row_id", "label"]
# A categorical column with more distinct values than this share of its rows is an identifier (customer
# id, email, order number), not a category: one-hot encoding would publish each value as a feature name
# in model.json and report.html, which are kept indefinitely. The minimum keeps a small sample (a month
# column in 20 rows) from tripping the share; the UCI shoppers categoricals have at most 20 values.
IDENTIFIER_SHARE = 0.5
IDENTIFIER_MIN_VALUES = 50


@dataclass
class Table:
    frame: pd.DataFrame                 # row_id, label, then the numeric feature columns
    feature_names: list[str]
    source: str
    label_column: str
    notes: list[str] = field(default_factory=list)

    @property
    def feature_version(self) -> str:
        return "table-" + hashlib.sha1(",".join(self.feature_names).encode()).hexdigest()[:12]


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv", ".txt"):
        raise TrainError(f"{path}: expected a .csv or .parquet table")
    try:
        return pd.read_parquet(path) if suffix in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TrainError(f"{path}: cannot be read as a table: {exc}") from None


def _name(text: str) -> str:
    """A column name Spark takes without quoting (no dots, spaces or symbols)."""
    return re.sub(r"\W+", "_", str(text)).strip("_") or "col"


def _labels(column: pd.Series, name: str) -> pd.Series:
    """0/1 labels from booleans, numbers or yes/no words; anything else is an error."""
    text = column.astype("string").str.strip().str.lower()
    out = pd.Series(np.where(text.isin(TRUE), 1.0, np.where(text.isin(FALSE), 0.0, np.nan)), index=column.index)
    unknown = text.notna() & out.isna()
    if unknown.any():
        raise TrainError(f"label column {name!r} has values that are not true/false or 0/1, e.g. "
                         f"{sorted(set(column[unknown].astype(str)))[:5]}")
    return out


def prepare(frame: pd.DataFrame, label: str, *, drop=(), categorical=(), missing: str = "drop",
            source: str = "table") -> Table:
    """Numeric float32-exact features and a 0/1 label from a raw table; ``notes`` says what was done."""
    absent = [c for c in (label, *drop, *categorical) if c not in frame.columns]
    if absent:
        raise TrainError(f"{source}: no column(s) {absent}; columns are {list(frame.columns)}")
    notes = []
    y = _labels(frame[label], label)
    if y.isna().any():
        notes.append(f"dropped {int(y.isna().sum())} rows without a label")
    frame, y = frame[y.notna()], y[y.notna()]
    features = frame.drop(columns=[label, *drop])
    kinds = [c for c in features.columns if c in categorical or not _is_number(features[c])]
    numeric = [c for c in features.columns if c not in kinds]
    _refuse_identifiers(features, kinds, source)
    features, numeric = _drop_empty(features, numeric, notes)
    features, y = _fill_missing(features, y, numeric, missing, notes)
    x = _one_hot(features, numeric, kinds, notes)
    # Spark resolves column names without regard to case, and row_id and label are the table's own.
    names = pd.Index([*ID_COLUMNS, *x.columns]).str.lower()
    if names.duplicated().any():
        raise TrainError(f"{source}: column names collide after encoding (Spark ignores case; row_id and label "
                         f"are reserved): {sorted(set(names[names.duplicated()]))}")
    # Same reason as the event features: ONNX sees float32, so Spark must see the same values.
    x = x.astype(np.float32).astype(np.float64)
    out = pd.concat([pd.DataFrame({"row_id": np.arange(len(x)).astype(str), "label": y.astype(np.int32).to_numpy()},
                                  index=x.index), x], axis=1).reset_index(drop=True)
    if out["label"].nunique() < 2:
        raise TrainError(f"{source}: the label {label!r} has a single value; nothing to learn")
    for note in notes:
        log.info("%s: %s", source, note)
    return Table(out, list(x.columns), source, label, notes)


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and column.dtype != bool


def _refuse_identifiers(features: pd.DataFrame, kinds: list[str], source: str) -> None:
    """Refuse categorical columns that hold identifiers rather than categories, naming them and how
    to leave them out: their values would be published as feature names."""
    found = {column: why for column in kinds if (why := _identifier_reason(features[column]))}
    if found:
        named = "; ".join(f"{column} ({why})" for column, why in found.items())
        drops = " ".join(f"--drop {column}" for column in found)
        numbers = [column for column in found if _is_number(features[column])]
        keep = f" (or keep {numbers} numeric: leave them out of --categorical)" if numbers else ""
        raise TrainError(f"{source}: column(s) {named} look like identifiers, not categories: each value would "
                         f"become a feature name published in model.json and report.html. Leave them out with "
                         f"{drops}{keep}")


def _identifier_reason(column: pd.Series) -> str | None:
    """Why a categorical column looks like identifiers (email addresses, or nearly one value per row), else None."""
    values = column.dropna().astype("string")
    distinct = values.nunique()
    if values.map(emails.contains).any():          # one is enough: it would be a feature name as it is
        return f"email addresses, {distinct} distinct values in {len(values)} rows"
    if distinct > max(IDENTIFIER_MIN_VALUES, IDENTIFIER_SHARE * len(values)):
        return f"{distinct} distinct values in {len(values)} rows"
    return None


def _drop_empty(features: pd.DataFrame, numeric: list[str], notes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Numeric columns without a single value say nothing (and have no median to impute)."""
    empty = [c for c in numeric if features[c].isna().all()]
    if empty:
        notes.append(f"dropped column(s) {empty}: no values at all")
    return features.drop(columns=empty), [c for c in numeric if c not in empty]


def _fill_missing(features: pd.DataFrame, y: pd.Series, numeric: list[str], missing: str, notes: list[str]):
    """Rows with a missing numeric value dropped, or the column medians imputed (``missing``)."""
    incomplete = features[numeric].isna().any(axis=1)
    if not incomplete.any():
        return features, y
    if missing == "drop":
        notes.append(f"dropped {int(incomplete.sum())} rows with missing numeric values")
        return features[~incomplete], y[~incomplete]
    # Left missing here: each fit fills them with its own training rows' medians (impute_medians), so no
    # evaluation row shapes the value imputed, and model.json records the values a caller must use.
    notes.append(f"{int(incomplete.sum())} rows with missing numeric values get the training rows' medians")
    return features, y


def _one_hot(features: pd.DataFrame, numeric: list[str], kinds: list[str], notes: list[str]) -> pd.DataFrame:
    """Numeric columns as they are, one 0/1 column per value of each categorical one."""
    encoded = [features[numeric].astype(np.float64).rename(columns=_name)]
    for column in kinds:
        values = features[column].astype("string")
        if values.isna().any():
            notes.append(f"{column}: {int(values.isna().sum())} missing values encoded as all-zero")
        dummies = pd.get_dummies(values, prefix=_name(column), prefix_sep="_", dtype=np.float64)
        encoded.append(dummies.rename(columns=_name))
    notes.append(f"one-hot encoded {kinds}" if kinds else "no categorical columns")
    return pd.concat(encoded, axis=1)


def folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified fold number per row: each fold keeps the overall buy rate."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for value in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels == value))
        assignment[rows] = np.arange(len(rows)) % k
    return assignment


def impute_medians(frame: pd.DataFrame, feature_names: list[str], test_mask: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Missing values filled with the median of the training rows (``~test_mask``) of their column,
    rounded to float32 like every feature; returns the medians used, by column."""
    gaps = [name for name in feature_names if frame[name].isna().any()]
    medians = frame.loc[~test_mask, gaps].median()
    unknown = medians.index[medians.isna()].tolist()
    if unknown:
        raise TrainError(f"column(s) {unknown} have no value in the training rows: nothing to impute from")
    medians = {name: float(np.float32(value)) for name, value in medians.items()}
    return frame.fillna(medians), medians


def _fit(spark, table: Table, test_mask: np.ndarray, settings: TrainSettings, steps: Steps) -> TrainResult:
    frame, medians = impute_medians(table.frame, table.feature_names, test_mask)
    train = spark.createDataFrame(frame[~test_mask])
    evaluation = spark.createDataFrame(frame[test_mask])
    result = fit_and_export(spark, train, evaluation, table.feature_names, settings, steps,
                            id_columns=ID_COLUMNS, row_id="row_id")
    if medians:
        result.meta["imputed_medians"] = medians
    return result


def cross_validate(spark, table: Table, settings: TrainSettings, k: int = 5) -> list[dict]:
    """k-fold ROC AUC with the parity gate checked on every fold."""
    assignment = folds(table.frame["label"].to_numpy(), k, settings.seed)
    results = []
    for fold in tqdm(range(k), desc="cross-validation", unit="fold", disable=not settings.progress):
        steps = Steps(["fit", "evaluate", "export", "parity"], enabled=False)
        result = _fit(spark, table, assignment == fold, settings, steps)
        metrics = evaluate(result.eval_rows["label"], result.eval_rows["p_spark"])
        results.append({"fold": fold, "roc_auc": metrics["roc_auc"], "pr_auc": metrics["pr_auc"],
                        "parity_passed": result.parity.passed, "max_abs_diff": result.parity.max_abs_diff,
                        "rows": result.parity.rows, **{f"{k}_s": v for k, v in steps.timings.items()}})
    return results


def train_from_table(spark, table: Table, settings: TrainSettings, steps: Steps | None = None) -> TrainResult:
    """One model on a stratified random split (``eval_fraction`` held out), with the full meta."""
    steps = steps or Steps(["fit", "evaluate", "export", "parity"], enabled=settings.progress)
    rng = np.random.default_rng(settings.seed)
    labels = table.frame["label"].to_numpy()
    test_mask = np.zeros(len(labels), dtype=bool)
    for value in (0, 1):
        rows = np.flatnonzero(labels == value)
        test_mask[rng.choice(rows, size=max(1, round(len(rows) * settings.eval_fraction)), replace=False)] = True
    result = _fit(spark, table, test_mask, settings, steps)
    result.meta.update(feature_version=table.feature_version, label=f"{table.label_column} is true",
                       training_window={"table": table.source, "rows": len(table.frame), "notes": table.notes})
    return result


def run(settings: TrainSettings, path: Path, label: str, *, drop=(), categorical=(), missing="drop", cv=0,
        publish_model=False) -> tuple[TrainResult, dict | None]:
    """The CLI's feature-table mode."""
    from batch.train_publish import publish
    from common import aws

    table = prepare(read_table(path), label, drop=drop, categorical=categorical, missing=missing, source=str(path))
    for note in table.notes:
        print(f"{path.name}: {note}")
    spark = spark_session(settings)
    if cv:
        results = cross_validate(spark, table, settings, cv)
        for r in results:
            print(f"fold {r['fold']}: ROC AUC {r['roc_auc']:.4f}, parity {'ok' if r['parity_passed'] else 'FAILED'} "
                  f"(max diff {r['max_abs_diff']:.2e} on {r['rows']} rows)")
        print(f"{cv}-fold ROC AUC {np.mean([r['roc_auc'] for r in results]):.4f} "
              f"± {np.std([r['roc_auc'] for r in results]):.4f}")
    result = train_from_table(spark, table, settings)
    outcome = publish(aws.client("s3", settings.region), settings, result) if publish_model else None
    return result, outcome
