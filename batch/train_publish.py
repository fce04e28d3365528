"""Publishing a trained model: the gates, champion/challenger, and the registry writes."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError

from batch import export, report_html
from batch.train_config import TrainSettings
from batch.train_metrics import evaluate
from batch.train_model import TrainResult, utc_text
from common import aws, registry
from common.features import FEATURE_VERSION

log = logging.getLogger(__name__)
# Fewer evaluation rows CURRENT has not trained on than this: the AUCs are too noisy to compare.
MIN_COMPARABLE_ROWS = 100


class ParityError(export.ExportError):
    """The export does not score like Spark: the model is not published."""


def champion(s3, settings: TrainSettings, result: TrainResult) -> dict | None:
    """CURRENT scored on the challenger's evaluation rows it did not train on (same rows, same metric).
    None without a CURRENT; a CURRENT whose bundle is gone or unreadable has nothing to compare, so a
    challenger that passes the other gates replaces it (scorers that restart could serve nothing)."""
    version = registry.current_version(s3, settings.bucket, settings.model_name)
    if version is None:
        return None
    try:
        bundle = registry.load(s3, settings.bucket, settings.model_name, version)
    except (LookupError, ValueError) as exc:
        log.warning("CURRENT %s cannot be loaded (%s); a challenger that passes the gates replaces it", version, exc)
        return {"version": version, "roc_auc": None, "note": f"CURRENT cannot be loaded: {exc}"}
    info = {"version": bundle.version, "roc_auc": None}
    if bundle.meta.get("feature_version") != result.meta["feature_version"] or \
            registry.feature_names(bundle.meta) != registry.feature_names(result.meta):
        return info | {"features_differ": True, "note": (
            f"not comparable: feature version {bundle.meta.get('feature_version')!r} "
            f"vs {result.meta['feature_version']!r}")}
    rows, note = unseen_rows(result.eval_rows, bundle.meta)
    if note and (len(rows) < MIN_COMPARABLE_ROWS or rows["label"].nunique() < 2):
        return info | {"rows": len(rows), "note": (
            f"not comparable: {note}, too few (or of one label) to compare AUCs; "
            "the challenger is gated on the floor and parity alone")}
    p = export.onnx_probabilities(bundle.onnx, rows[registry.feature_names(result.meta)].to_numpy(dtype=np.float64))
    # Both on these rows: the challenger's AUC on every evaluation row is not comparable with CURRENT's
    # on a subset (a challenger worse on the subset was promoted on its figure over all rows).
    info.update(roc_auc=evaluate(rows["label"], p)["roc_auc"], rows=len(rows),
                challenger_roc_auc=evaluate(rows["label"], rows["p_spark"])["roc_auc"])
    return info | ({"note": note} if note else {})


def unseen_rows(rows: pd.DataFrame, champion_meta: dict) -> tuple[pd.DataFrame, str | None]:
    """The evaluation rows from sessions that started at or after CURRENT's own time split: a wider or
    earlier window reaches back into the sessions CURRENT trained on, where its AUC is in-sample.
    Every row, and no note, when none was dropped or CURRENT records no split (table mode)."""
    split_at = (champion_meta.get("training_window") or {}).get("split_at_ms")
    if split_at is None or "session_start_ms" not in rows:
        return rows, None
    kept = rows[rows["session_start_ms"] >= split_at]
    if len(kept) == len(rows):
        return rows, None
    return kept, (f"{len(kept)} of {len(rows)} evaluation rows are from sessions starting at or after "
                  f"CURRENT's training split ({utc_text(split_at)})")


def not_the_scorers_features(result: TrainResult, settings: TrainSettings) -> str | None:
    """Why a model may not become CURRENT of the name the scorers serve: they compute only
    ``common.features``, and would refuse it (a table model under the default name, say)."""
    if settings.model_name != registry.DEFAULT_MODEL:
        return None
    if registry.has_fold_features(result.meta):
        return None
    return (f"its features (feature_version {result.meta.get('feature_version')!r}) are not the scorers' ({FEATURE_VERSION!r}, "
            f"common.features): {registry.DEFAULT_MODEL!r} is the name the scorers serve, so it is never made "
            f"CURRENT automatically; publish it under its own --model-name")


def decide(result: TrainResult, current: dict | None, settings: TrainSettings) -> tuple[bool, list[str]]:
    """Whether the new version may become CURRENT, and every reason it may not."""
    auc = result.meta["metrics"]["roc_auc"]
    reasons = []
    if not result.parity.passed:
        reasons.append(result.parity.message())
    if auc < settings.auc_floor:
        reasons.append(f"ROC AUC {auc:.4f} is below the floor {settings.auc_floor}")
    foreign = not_the_scorers_features(result, settings)
    if foreign:
        reasons.append(foreign)
    elif current and current.get("features_differ"):
        # Other features (a new feature version): the scorers serving CURRENT would refuse it, so
        # moving CURRENT is a deliberate step, taken once scorers compute these features.
        reasons.append(f"its features differ from CURRENT {current['version']}'s ({current['note']}); "
                       f"promote it by hand (python -m batch.registry promote VERSION) once the scorers "
                       f"compute these features")
    elif current and current.get("roc_auc") is not None and \
            current["challenger_roc_auc"] < current["roc_auc"] - settings.champion_margin:
        reasons.append(f"ROC AUC {current['challenger_roc_auc']:.4f} is worse than CURRENT {current['version']}'s "
                       f"{current['roc_auc']:.4f} on the same {current['rows']} rows by more than "
                       f"{settings.champion_margin}")
    return not reasons, reasons


def _free_version(s3, settings: TrainSettings) -> str:
    version, taken, n = registry.new_version(), set(registry.versions(s3, settings.bucket, settings.model_name)), 1
    base = version
    while version in taken:         # two runs within one second: keep both, still sortable
        n += 1
        version = f"{base}-{n}"
    return version


def publish(s3, settings: TrainSettings, result: TrainResult) -> dict:
    """Publish the bundle (refused without parity) and move CURRENT when every gate passes."""
    if not result.parity.passed:
        raise ParityError(result.parity.message())
    current = champion(s3, settings, result)
    promote, reasons = decide(result, current, settings)
    version, meta = _publish_bundle(s3, settings, result, {
        "promoted": promote, "reasons": reasons, "champion": current,
        "auc_floor": settings.auc_floor, "champion_margin": settings.champion_margin})
    if promote:
        try:
            registry.set_current(s3, settings.bucket, settings.model_name, version,
                                 reason=f"train: roc_auc {meta['metrics']['roc_auc']:.4f}",
                                 expected=current and current["version"])
        except registry.Conflict as exc:
            # Another run moved CURRENT after this one compared against it: the two were never compared.
            promote, reasons = False, [f"{exc}; compare the two and promote one by hand"]
            meta["promotion"].update(promoted=False, reasons=reasons)
            files = _bundle_files(result, meta)         # report.html said "promoted" too
            for file in ("report.html", "model.json"):
                registry.replace_file(s3, settings.bucket, settings.model_name, version, file, files[file])
    if not promote:
        log.warning("published %s but CURRENT stays at %s: %s", version,
                    current["version"] if current else "none (no CURRENT yet)", "; ".join(reasons))
    result.meta = meta
    return {"version": version, "promoted": promote, "reasons": reasons, "champion": current,
            "pruned": prune(s3, settings, version)}


def prune(s3, settings: TrainSettings, published: str | None = None) -> int:
    """Delete the bundles ``keep_versions`` leaves out, never the one just ``published``; how many
    versions went. The model is published by then: a failure here is a warning, and the next run
    tries again."""
    if not settings.keep_versions:
        return 0
    deleted = 0
    try:
        doomed, _ = registry.old_versions(s3, settings.bucket, settings.model_name, settings.keep_versions, published)
        for version in doomed:
            if registry.delete_unless_current(s3, settings.bucket, settings.model_name, version) is not None:
                deleted += 1
    except (BotoCoreError, ClientError, OSError) as exc:
        log.warning("pruning old versions of %s stopped after %d (keep_versions %d): %s", settings.model_name,
                    deleted, settings.keep_versions, aws.explain(exc))
    return deleted


def _publish_bundle(s3, settings: TrainSettings, result: TrainResult, promotion: dict) -> tuple[str, dict]:
    """Upload the bundle under a free version; a version another run claims first is skipped."""
    for _ in range(5):
        version = _free_version(s3, settings)
        meta = dict(result.meta, version=version, promotion=promotion)
        try:
            registry.publish(s3, settings.bucket, settings.model_name, version, _bundle_files(result, meta))
            return version, meta
        except registry.Conflict:
            log.info("version %s was taken by another run; trying the next", version)
    raise registry.Conflict(f"no free version for {settings.model_name!r} after 5 tries")


def _meta_json(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, default=str).encode()


def _bundle_files(result: TrainResult, meta: dict) -> dict[str, bytes]:
    """model.onnx, model.json and report.html of a trained model described by ``meta``."""
    report = report_html.render(meta, result.eval_rows["label"], result.eval_rows["p_spark"])
    return {"model.onnx": result.onnx_bytes, "report.html": report, "model.json": _meta_json(meta)}


def write_bundle(folder, result: TrainResult) -> None:
    """The bundle's files in a local folder (feature-table mode, or to inspect a run)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file, body in _bundle_files(result, result.meta).items():
        part = folder / f".{file}.part"       # a full disk leaves no torn file under the real name
        try:
            part.write_bytes(body)
            part.replace(folder / file)
        finally:
            part.unlink(missing_ok=True)
