"""Publishing a trained model: the gates, champion/challenger, and the registry writes."""
from __future__ import annotations

import json
import logging

import numpy as np

from batch import export, report_html
from batch.train_config import TrainSettings
from batch.train_metrics import evaluate
from batch.train_model import TrainResult
from common import registry

log = logging.getLogger(__name__)


class ParityError(export.ExportError):
    """The export does not score like Spark: the model is not published."""


def champion(s3, settings: TrainSettings, result: TrainResult) -> dict | None:
    """The CURRENT model scored on the challenger's evaluation rows (same rows, same metric)."""
    try:
        bundle = registry.load(s3, settings.bucket, settings.model_name)
    except LookupError:
        return None
    names = [f["name"] for f in result.meta["features"]]
    info = {"version": bundle.version, "roc_auc": None}
    if bundle.meta.get("feature_version") != result.meta["feature_version"] or \
            [f["name"] for f in bundle.meta.get("features", [])] != names:
        info["note"] = (f"not comparable: feature version {bundle.meta.get('feature_version')!r} "
                        f"vs {result.meta['feature_version']!r}")
        return info
    rows = result.eval_rows
    p = export.onnx_probabilities(bundle.onnx, rows[names].to_numpy(dtype=np.float64))
    info["roc_auc"] = evaluate(rows["label"], p)["roc_auc"]
    return info


def decide(result: TrainResult, current: dict | None, settings: TrainSettings) -> tuple[bool, list[str]]:
    """Whether the new version may become CURRENT, and every reason it may not."""
    auc = result.meta["metrics"]["roc_auc"]
    reasons = []
    if not result.parity.passed:
        reasons.append(result.parity.message())
    if auc < settings.auc_floor:
        reasons.append(f"ROC AUC {auc:.4f} is below the floor {settings.auc_floor}")
    if current and current.get("note"):
        # Other features (a table model, or a new feature version): the scorers serving CURRENT would
        # refuse it, so moving CURRENT is a deliberate step, taken once scorers compute these features.
        reasons.append(f"its features differ from CURRENT {current['version']}'s ({current['note']}); "
                       f"promote it by hand (python -m batch.registry promote VERSION) once the scorers "
                       f"compute these features")
    elif current and current.get("roc_auc") is not None and auc < current["roc_auc"] - settings.champion_margin:
        reasons.append(f"ROC AUC {auc:.4f} is worse than CURRENT {current['version']} "
                       f"({current['roc_auc']:.4f} on the same rows) by more than {settings.champion_margin}")
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
    version = _free_version(s3, settings)
    meta = dict(result.meta, version=version,
                promotion={"promoted": promote, "reasons": reasons, "champion": current,
                           "auc_floor": settings.auc_floor, "champion_margin": settings.champion_margin})
    report = report_html.render(meta, result.eval_rows["label"], result.eval_rows["p_spark"])
    files = {"model.onnx": result.onnx_bytes, "report.html": report,
             "model.json": json.dumps(meta, indent=2, default=str).encode()}
    registry.publish(s3, settings.bucket, settings.model_name, version, files)
    if promote:
        registry.set_current(s3, settings.bucket, settings.model_name, version,
                             reason=f"train: roc_auc {meta['metrics']['roc_auc']:.4f}")
    else:
        log.warning("published %s but CURRENT stays at %s: %s", version,
                    current and current["version"], "; ".join(reasons))
    result.meta = meta
    return {"version": version, "promoted": promote, "reasons": reasons, "champion": current}


def write_bundle(folder, result: TrainResult) -> None:
    """The bundle's files in a local folder (feature-table mode, or to inspect a run)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(result.onnx_bytes)
    (folder / "model.json").write_text(json.dumps(result.meta, indent=2, default=str))
    (folder / "report.html").write_bytes(report_html.render(result.meta, result.eval_rows["label"],
                                                            result.eval_rows["p_spark"]))
