"""Feature-table mode: the same fit / evaluate / export / parity path from a CSV or Parquet table.

Categorical columns (strings, booleans, and numeric ones named with ``--categorical``) are one-hot
encoded to plain 0/1 columns *before* Spark, so trees only ever split on numeric thresholds (the
ONNX converter reads Spark's categorical splits wrongly). Missing values are dropped or imputed,
and the count is reported; nothing is dropped silently. Each value of a categorical column becomes a
published feature name, so a column of identifiers (nearly one value per row, or email addresses) is
refused rather than encoded.
"""
from __future__ import annotations

import decimal
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pandas as pd
from tqdm import tqdm

from batch.train_config import TrainSettings, spark_session
from batch.train_lake import TrainError
from batch.train_metrics import evaluate
from batch.train_model import PIPELINE_COLUMNS, Steps, TrainResult, fit_and_export, importance_by_column
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
# One-hot columns per categorical column at most: Spark's dense vectors of thousands of columns run
# the driver out of memory (4,600 levels at 2g), and so many levels are rarely categories.
MAX_LEVELS = 1000
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Table:
    frame: pd.DataFrame                 # row_id, label, then the numeric feature columns
    feature_names: list[str]
    source: str
    label_column: str
    notes: list[str] = field(default_factory=list)
    one_hot: dict[str, list[str]] = field(default_factory=dict)     # categorical column -> its 0/1 columns

    @property
    def feature_version(self) -> str:
        return "table-" + hashlib.sha1(",".join(self.feature_names).encode()).hexdigest()[:12]


def read_table(path: Path) -> pd.DataFrame:
    """A CSV file (compressed too, comma- or semicolon-separated), a Parquet file, or a folder of
    Parquet files as Spark writes them."""
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    parquet = path.is_dir() or suffixes[-1:] in ([".parquet"], [".pq"])
    if not parquet and not any(s in (".csv", ".txt") for s in suffixes):
        raise TrainError(f"{path}: expected a .csv (or .csv.gz) file, a .parquet file or a folder of Parquet files")
    try:
        if parquet:
            return pd.read_parquet(path)
        frame = pd.read_csv(path)
        if len(frame.columns) == 1 and ";" in str(frame.columns[0]):
            frame = _semicolon_csv(path)
        return frame
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TrainError(f"{path}: cannot be read as a table: {exc}") from None


def _semicolon_csv(path: Path) -> pd.DataFrame:
    """A spreadsheet's export in the many locales that separate fields with semicolons: they write
    decimal commas (1,5), though some files keep points; columns of either kind become numbers."""
    frame = pd.read_csv(path, sep=";", decimal=",")
    for column in frame.columns:
        if pd.api.types.is_string_dtype(frame[column]):
            numbers = pd.to_numeric(frame[column], errors="coerce")
            if numbers.notna().sum() == frame[column].notna().sum():
                frame[column] = numbers
    return frame


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
    features = _as_numbers(frame.drop(columns=[label, *drop]))
    kinds = [c for c in features.columns if c in categorical or not _is_number(features[c])]
    numeric = [c for c in features.columns if c not in kinds]
    _refuse_non_categories(features, [c for c in kinds if c not in categorical], source)
    _refuse_identifiers(features, kinds, source)
    _refuse_non_finite(features, numeric, source)
    features, numeric = _drop_empty(features, numeric, notes)
    features, y = _fill_missing(features, y, numeric, missing, notes)
    x, origins, one_hot = _one_hot(features, numeric, kinds, notes)
    _refuse_reserved(x.columns, source)
    _refuse_collisions(list(x.columns), origins, source)
    # Same reason as the event features: ONNX sees float32, so Spark must see the same values.
    x = x.astype(np.float32).astype(np.float64)
    out = pd.concat([pd.DataFrame({"row_id": np.arange(len(x)).astype(str), "label": y.astype(np.int32).to_numpy()},
                                  index=x.index), x], axis=1).reset_index(drop=True)
    if out["label"].nunique() < 2:
        raise TrainError(f"{source}: the label {label!r} has a single value; nothing to learn")
    for note in notes:
        log.info("%s: %s", source, note)
    return Table(out, list(x.columns), source, label, notes, one_hot)


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _as_numbers(features: pd.DataFrame) -> pd.DataFrame:
    """Decimal columns (Parquet's decimal type reads as Python Decimals) as the numbers they are."""
    for column in features.columns:
        values = features[column].dropna()
        if features[column].dtype == object and len(values) and all(isinstance(v, decimal.Decimal) for v in values):
            features[column] = pd.to_numeric(features[column].astype("string"), errors="coerce").astype(np.float64)
    return features


def _refuse_non_categories(features: pd.DataFrame, kinds: list[str], source: str) -> None:
    """Columns that only look categorical: times, and numbers read as text because of a few stray values."""
    for column in kinds:
        values = features[column]
        if pd.api.types.is_datetime64_any_dtype(values):
            raise TrainError(f"{source}: column {column!r} holds times: derive numbers from it (hour, weekday, "
                             f"age) or leave it out with --drop {column}")
        text = values.dropna().astype("string")
        numbers = pd.to_numeric(text, errors="coerce")
        if len(text) and numbers.notna().mean() >= 0.9 and numbers.isna().any():
            stray = sorted(set(text[numbers.isna()]))
            raise TrainError(f"{source}: column {column!r} holds numbers and {len(stray)} other value(s), e.g. "
                             f"{stray[:5]}: make those cells empty (missing), or name it with --categorical")


def _refuse_non_finite(features: pd.DataFrame, numeric: list[str], source: str) -> None:
    """Infinite values, and values beyond float32 (which the model sees), stop Spark with an error that
    names no column."""
    found = {}
    for column in numeric:
        values = features[column].astype(np.float64)
        if (count := int((np.isinf(values) | (values.abs() > FLOAT32_MAX)).sum())):
            found[column] = count
    if found:
        raise TrainError(f"{source}: infinite or out-of-range (beyond ±3.4e38, float32) values in {found} "
                         "(column: rows): make them empty (missing) or --drop the column")


def _refuse_reserved(columns, source: str) -> None:
    reserved = {name.lower(): name for name in (*ID_COLUMNS, *PIPELINE_COLUMNS)}
    taken = sorted(column for column in columns if column.lower() in reserved)
    if taken:
        raise TrainError(f"{source}: column(s) {taken} have names training gives columns of its own "
                         f"({', '.join(reserved.values())}): rename them")


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
    if distinct > MAX_LEVELS:
        return f"{distinct} distinct values, more than the {MAX_LEVELS} one-hot columns a column may become"
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


def _one_hot(features: pd.DataFrame, numeric: list[str], kinds: list[str],
             notes: list[str]) -> tuple[pd.DataFrame, list[str], dict[str, list[str]]]:
    """Numeric columns as they are, one 0/1 column per value of each categorical one; what each
    encoded column came from (``column`` or ``column=value``), in order; and each categorical
    column's encoded columns."""
    encoded = [features[numeric].astype(np.float64).rename(columns=_name)]
    origins = [str(column) for column in numeric]
    one_hot = {}
    for column in kinds:
        values = features[column].astype("string")
        if values.isna().any():
            notes.append(f"{column}: {int(values.isna().sum())} missing values encoded as all-zero")
        dummies = pd.get_dummies(values, prefix=_name(column), prefix_sep="_", dtype=np.float64)
        origins += [f"{column}={value}" for value in dummies.columns.str.removeprefix(f"{_name(column)}_")]
        encoded.append(dummies.rename(columns=_name))
        one_hot[str(column)] = list(encoded[-1].columns)
    notes.append(f"one-hot encoded {kinds}" if kinds else "no categorical columns")
    return pd.concat(encoded, axis=1), origins, one_hot


def _refuse_collisions(names: list[str], origins: list[str], source: str) -> None:
    """Spark resolves column names without regard to case, and encoding turns symbols into _: two
    columns that end with one name would be one column to Spark."""
    by_name: dict[str, list[str]] = {}
    for name, origin in zip(names, origins, strict=True):
        by_name.setdefault(name.lower(), []).append(origin)
    clashes = {name: found for name, found in by_name.items() if len(found) > 1}
    if clashes:
        said = "; ".join(f"{name} from {' and '.join(found)}" for name, found in sorted(clashes.items()))
        raise TrainError(f"{source}: columns collide after encoding (Spark ignores case, and symbols become _): "
                         f"{said}. Rename or merge those values, or --drop the column")


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
    labels = table.frame["label"].to_numpy()
    fewest = min(int((labels == 1).sum()), int((labels == 0).sum()))
    if fewest < k:
        raise TrainError(f"{table.source}: {k}-fold cross-validation needs at least {k} rows of each class, one per "
                         f"fold; the smaller class has {fewest}: use fewer folds (--cv) or more rows")
    assignment = folds(labels, k, settings.seed)
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
        size = max(1, round(len(rows) * settings.eval_fraction))
        if size >= len(rows):       # the one (or few) rows would all be held out: none left to learn from
            raise TrainError(f"{table.source}: {len(rows)} row(s) with the label {'true' if value else 'false'}: too "
                             "few to hold some out for evaluation and train on the rest")
        test_mask[rng.choice(rows, size=size, replace=False)] = True
    result = _fit(spark, table, test_mask, settings, steps)
    result.meta.update(feature_version=table.feature_version, label=f"{table.label_column} is true",
                       training_window={"table": table.source, "rows": len(table.frame), "notes": table.notes},
                       importance_by_column=importance_by_column(result.meta["feature_importances"], table.one_hot))
    return result


def run(settings: TrainSettings, path: Path, label: str, *, drop=(), categorical=(), missing="drop", cv=0,
        publish_model=False) -> tuple[TrainResult, dict | None]:
    """The CLI's feature-table mode."""
    from batch.train_publish import publish
    from common import aws

    table = prepare(read_table(path), label, drop=drop, categorical=categorical, missing=missing, source=str(path))
    for note in table.notes:
        click.echo(f"{path.name}: {note}")
    spark = spark_session(settings)
    summary = None
    if cv:
        results = cross_validate(spark, table, settings, cv)
        for r in results:
            click.echo(f"fold {r['fold']}: ROC AUC {r['roc_auc']:.4f}, parity {'ok' if r['parity_passed'] else 'FAILED'} "
                       f"(max diff {r['max_abs_diff']:.2e} on {r['rows']} rows)")
        aucs = [r["roc_auc"] for r in results]
        summary = {"folds": results, "roc_auc_mean": float(np.mean(aucs)), "roc_auc_std": float(np.std(aucs)),
                   "seed": settings.seed}
        click.echo(f"{cv}-fold ROC AUC {summary['roc_auc_mean']:.4f} ± {summary['roc_auc_std']:.4f}")
    result = train_from_table(spark, table, settings)
    if summary:
        result.meta["cross_validation"] = summary         # in model.json and the report
    outcome = publish(aws.client("s3", settings.region), settings, result) if publish_model else None
    return result, outcome
