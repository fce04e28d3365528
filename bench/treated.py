"""The discount's mark on `make train`: a model trained on offered traffic as it is (`keep`, the
baseline) against one without the offered sessions and with the control group weighed
(`leave_out`, batch/train_treated.py), and the ideal, trained on the same shop without offers.

A synthetic shop (tests/train/synth.py). Two training days: a discount engine qualifies each
session that adds to cart, holds a share out by the engine's own hash, and an offered session that
would not have bought buys anyway with probability ``convert`` (a checkout and a purchase follow
its last event). A third day without offers is the shop as it is: each model's ONNX export scores
it, and its probabilities are set against the actual buy rate, where the offers were made (rows
after an add to cart) and elsewhere. Each model's score drift (the scorer's ``scorer_score_psi``
against its ``score_reference``) is measured twice: over the two days as served while the engine
made its offers, and over the third day."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from batch.export import onnx_probabilities
from batch.train import run_events
from batch.train_config import TrainSettings, spark_session
from batch.train_features import build_examples, read_events
from batch.train_metrics import choose_threshold
from batch.train_treated import HOLDOUT_WEIGHT
from common.features import FEATURE_NAMES, parse_ms
from common.uplift_records import HOUR_MS, record_key
from discount.offers import held_out
from discount.uplift import session_lists
from scorer.drift import SLOT_S, ScoreDrift
from tests.train import synth

START = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
SETTINGS = TrainSettings(window_end="2026-11-21", window_days=2, progress=False, auc_floor=0.0)
LEAVE_OUT = "offered sessions left out, held out weighed: leave_out"
# What a converted session's added events take from its last one: the same visitor and visit.
VISIT_FIELDS = ("domain_userid", "network_userid", "user_ipaddress", "domain_sessionidx", "refr_medium",
                "mkt_medium", "mkt_source", "dvce_type", "dvce_ismobile", "os_timezone")


def converted(events: list[dict], rng: random.Random) -> list[dict]:
    """The session's events, then a checkout and a purchase: the discount made it buy."""
    last = events[-1]
    session = synth.Session(rng, parse_ms(last["derived_tstamp"]), session_id=last["domain_sessionid"],
                            user=last["domain_userid"])
    session.page("/cart", "cart")
    for step in range(1, 5):
        session.page(f"/checkout/{step}", "checkout")
        session.shop("checkout_step", {"step": step}, f"/checkout/{step}", "checkout")
    session.shop("purchase", {"order_id": f"o-{rng.getrandbits(40):x}", "total": 50.0, "items": 1, "currency": "EUR"},
                 "/checkout/done", "confirmation")
    for event in session.events:
        event.update({name: last[name] for name in VISIT_FIELDS})
    return events + session.events


@dataclasses.dataclass
class Shop:
    without_offers: list[dict]          # the two training days as they would be without the engine
    with_offers: list[dict]             # the same days with its offers
    test: list[dict]                    # the third day, no offers
    decisions: dict[str, tuple[str, int]]   # session -> ("offer" | "holdout", qualifying click ms)


def simulate(sessions: int, convert: float, holdout_percent: float, seed: int) -> Shop:
    rng = random.Random(seed)
    origin = int(START.timestamp() * 1000)
    shop = Shop([], [], [], {})
    training = sessions * 2 // 3
    for number in range(sessions):
        if number >= training:          # the third day, up to two hours before its end: finished sessions
            shop.test += synth.session_events(rng, origin + 48 * HOUR_MS + int(rng.uniform(0, 22 * HOUR_MS)))
            continue
        events = synth.session_events(rng, origin + int(rng.uniform(0, 46 * HOUR_MS)))
        shop.without_offers += events
        carts = [event for event in events if event["event_name"] == "add_to_cart"]
        if carts:
            session_id = events[0]["domain_sessionid"]
            kind = "holdout" if held_out(session_id, holdout_percent) else "offer"
            shop.decisions[session_id] = (kind, parse_ms(carts[0]["derived_tstamp"]))
            bought = any(event["event_name"] == "purchase" for event in events)
            if kind == "offer" and not bought and rng.random() < convert:
                events = converted(events, rng)
        shop.with_offers += events
    return shop


def write_records(root: Path, decisions: dict[str, tuple[str, int]], holdout_percent: float) -> None:
    """The session lists the hourly recorder would write (its own ``session_lists``, from offers-table
    rows): every hour of the training days and their neighbours."""
    origin = int(START.timestamp() * 1000)
    for hour in range(origin - 24 * HOUR_MS, origin + 72 * HOUR_MS, HOUR_MS):
        rows = [{"session_id": {"S": sid}, "kind": {"S": kind}, "holdout_percent": {"N": f"{holdout_percent:g}"}}
                for sid, (kind, clicked) in decisions.items() if clicked // HOUR_MS * HOUR_MS == hour]
        body = session_lists(rows)
        path = root / record_key(hour)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body))


def scenario(report, sessions: int, convert: float, holdout_percent: float, seed: int) -> None:
    shop = simulate(sessions, convert, holdout_percent, seed)
    offered = sum(kind == "offer" for kind, _ in shop.decisions.values())
    section = report.section(
        f"make train on offered traffic: {sessions * 2 // 3} sessions over two days, {len(shop.decisions)} qualified "
        f"(added to cart), {holdout_percent:g} % held out, an offered non-buyer buys with probability {convert:g}; "
        f"scored on a third day without offers",
        ["trained on", "ROC AUC", "mean p / buy rate after an add to cart", "mean p / buy rate elsewhere",
         "score PSI: offered days / third day"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, events in (("ideal", shop.without_offers), ("offered", shop.with_offers), ("test", shop.test)):
            synth.write_lake_dir(root / name, events)
        write_records(root / "offered", shop.decisions, holdout_percent)
        models = {}
        for label, lake, treated in (("the shop without offers (the ideal)", "ideal", "keep"),
                                     ("offered traffic as is: keep (baseline)", "offered", "keep"),
                                     (LEAVE_OUT, "offered", "leave_out")):
            settings = dataclasses.replace(SETTINGS, lake_path=str(root / lake / "enriched"), treated_sessions=treated)
            models[label] = run_events(settings, publish_model=False)[0]
        spark = spark_session(SETTINGS, app_name="bench-treated")
        test, served = (_examples(spark, root / lake / "enriched") for lake in ("test", "offered"))
    features, bought = test[list(FEATURE_NAMES)].to_numpy(np.float32), test["label"].to_numpy()
    after_cart = (test["cart_adds"] > 0).to_numpy()
    served_features = served[list(FEATURE_NAMES)].to_numpy(np.float32)
    third_day = {}
    for label, result in models.items():
        p = third_day[label] = onnx_probabilities(result.onnx_bytes, features)
        p_served = onnx_probabilities(result.onnx_bytes, served_features)
        report.row(section, label, f"{roc_auc_score(bought, p):.4f}",
                   f"{p[after_cart].mean():.3f} / {bought[after_cart].mean():.3f}",
                   f"{p[~after_cart].mean():.3f} / {bought[~after_cart].mean():.3f}",
                   f"{score_psi(result.meta, p_served, served_features):.3f} / "
                   f"{score_psi(result.meta, p, features):.3f}")
    report.note(section, weighing_note(models[LEAVE_OUT], third_day[LEAVE_OUT], bought))
    left_out = models[LEAVE_OUT].meta["training_window"]["treated_sessions"]
    report.note(section, f"{offered} sessions offered; leave_out left out {left_out['offered_left_out']} and weighed "
                         f"{left_out['held_out_weighed']} held-out ones by {100 / holdout_percent:g}; the third day: "
                         f"{len(test)} rows of {test['session_id'].nunique()} sessions; the offered days as served: "
                         f"{len(served)} rows; the drift alert fires above a PSI of 0.25")


def weighing_note(result, p: np.ndarray, bought: np.ndarray) -> str:
    """leave_out's evaluation rows counted once (model.json's metrics and threshold) and weighed as the
    fit weighs them, against the third day (its scores ``p``, its labels ``bought``): which one tells
    the model's ROC AUC on the shop as it is, and which threshold decides better there."""
    rows, objective = result.eval_rows, SETTINGS.threshold_objective
    weights = rows[HOLDOUT_WEIGHT]
    weighed_auc = roc_auc_score(rows["label"], rows["p_spark"], sample_weight=weights)
    weighed_threshold = choose_threshold(rows["label"], rows["p_onnx"], objective, weights=weights)["threshold"]
    auc, threshold = result.meta["metrics"]["roc_auc"], result.meta["threshold"]
    return ("leave_out's evaluation rows, counted once (model.json) / weighed: ROC AUC "
            f"{auc:.4f} / {weighed_auc:.4f} (the third day: {roc_auc_score(bought, p):.4f}); the {objective} "
            f"threshold {threshold:.3f} / {weighed_threshold:.3f} gives an F1 of "
            f"{f1_score(bought, p >= threshold):.3f} / {f1_score(bought, p >= weighed_threshold):.3f} on the third day")


def _examples(spark, lake: Path):
    examples = build_examples(read_events(spark, lake), SETTINGS.session_gap_minutes)
    rows = examples.toPandas()
    examples.unpersist()
    return rows


def score_psi(meta: dict, p: np.ndarray, features: np.ndarray) -> float:
    """What the scorer's ``scorer_score_psi`` says once its drift window holds the scores ``p`` (of
    the rows ``features``) of the model ``meta`` describes."""
    drift = ScoreDrift(SLOT_S, clock=lambda: 0.0)
    drift.observe(SimpleNamespace(version="bench", threshold=meta["threshold"], meta=meta), p, features)
    return drift.psi()


def run(report, quick: bool) -> None:
    runs = [(1500, 0.5, 20)] if quick else [(7000, 0.5, 20), (7000, 0.2, 20), (7000, 0.2, 50)]
    try:
        for sessions, convert, holdout_percent in runs:
            scenario(report, sessions, convert, holdout_percent, seed=6)
    finally:
        spark_session(SETTINGS).stop()      # the next suite builds its own session, with its own settings
