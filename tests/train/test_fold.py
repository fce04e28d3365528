"""The pieces of training that need no Spark: the fold's table form, metrics, thresholds, encoding."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import struct
import tracemalloc
import zoneinfo
from importlib import resources

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch.export import floor32
from batch.train_features import examples_of, records, session_examples
from batch.train_lake import TrainError
from batch.train_metrics import calibration, choose_threshold, evaluate, lift_top_decile
from batch.train_table import folds, prepare
from common import features as features_module
from common.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MAX_TRACKED_PRODUCTS,
    NIL_USER,
    ONE_HOT_GROUPS,
    SessionState,
    is_purchase,
    parse_ms,
    session_features,
    session_key,
    step,
)
from tests.train import synth
from tests.train.conftest import fast_settings

TELL_TALE = 987654.25


def _as_lake_frame(events: list[dict]) -> pd.DataFrame:
    """What applyInArrow hands the fold, as a frame to edit: JSON columns as text, timestamps as epoch ms."""
    from common.features import parse_ms

    rows = []
    for event in events:
        row = dict(event)
        for key in ("unstruct_event", "contexts", "derived_contexts"):
            row[key] = None if row.get(key) is None else json.dumps(row[key])
        for key in ("collector_tstamp", "derived_tstamp", "dvce_created_tstamp", "etl_tstamp"):
            row[key] = parse_ms(row[key])
        row["session_id"] = event["domain_sessionid"]
        rows.append(row)
    return pd.DataFrame(rows)


def _arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _examples(frame: pd.DataFrame) -> pd.DataFrame:
    """session_examples as Spark calls it (an Arrow table in, one out), as a frame."""
    return session_examples(_arrow(frame)).to_pandas()


def test_long_session_keeps_bounded_state_and_memory():
    rng = random.Random(3)
    s = synth.Session(rng, 1_795_000_000_000)
    for i in range(10_000):
        s.shop("product_view", {"sku": f"SKU-{i}", "category": "shoes", "price": 10.0}, f"/p/{i}", "product")
    tracemalloc.start()
    state = SessionState()
    for event in s.events:
        step(state, event)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert state.product_views == 10_000
    assert len(state.products) == state.distinct_products == MAX_TRACKED_PRODUCTS
    assert peak < 2_000_000     # the state, not the events: bounded whatever the session length
    frame = _examples(_as_lake_frame(s.events))
    assert len(frame) == 10_000 and frame["distinct_products"].max() == MAX_TRACKED_PRODUCTS


def test_a_session_of_the_longest_product_ids_keeps_small_state():
    """Schemas allow 4,096-character ids: 512 of them kept whole made a session 2 MB of scorer memory."""
    rng = random.Random(5)
    s = synth.Session(rng, 1_795_000_000_000)
    for i in range(600):
        s.shop("product_view", {"sku": f"{i}-" + "x" * 4000, "category": "shoes", "price": 10.0}, f"/p/{i}", "product")
    s.shop("product_view", {"sku": "0-" + "x" * 4000, "category": "shoes", "price": 10.0}, "/p/0", "product")
    records = [orjson.dumps(event) for event in s.events]       # parsed one at a time, as the scorer reads them
    state = SessionState()
    tracemalloc.start()
    for record in records:
        step(state, orjson.loads(record))
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert state.product_views == 601 and state.distinct_products == MAX_TRACKED_PRODUCTS
    assert kept < 100_000, f"{kept:,} bytes kept by one session"


def test_unbounded_numbers_keep_every_feature_finite_in_float32():
    from common.features import features, session_key

    rng = random.Random(4)
    s = synth.Session(rng, 1_795_000_000_000)
    for quantity in (1.7e308, 1.7e308, "inf", "nan", 10**400):
        s.shop("add_to_cart", {"sku": "X", "category": "shoes", "price": 1e39, "quantity": quantity}, "/p/1", "product")
    s.shop("checkout_step", {"step": 1e300}, "/checkout", "checkout")
    state = SessionState()
    for event in s.events:
        step(state, {**event, "domain_sessionidx": 1e308})
    assert np.isfinite(np.asarray(features(state), dtype=np.float32)).all()
    anonymous = {"event_id": "e1", "domain_sessionid": None, "network_userid": "00000000-0000-0000-0000-000000000000"}
    assert session_key(anonymous) == "e1" and session_key({**anonymous, "network_userid": "u1"}) == "u1"


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=6)
# The schemas the fold reads, so that the values reach its every branch.
_SCHEMAS = sorted(f"iglu:{vendor}/{name}/jsonschema/1-0-0" for vendor, name in features_module.FOLD_SCHEMAS)
_FIELDS = ("type", "sku", "id", "price", "unitPrice", "quantity", "step")
_DATA = _JSON | st.fixed_dictionaries({}, optional={field: _JSON for field in _FIELDS})
_SELF_DESCRIBING = _JSON | st.fixed_dictionaries({"schema": st.sampled_from(_SCHEMAS) | _JSON, "data": _DATA})
_EVENT = st.fixed_dictionaries(
    {"event_id": st.just("e1"), "collector_tstamp": st.just("2026-11-29T10:00:00.000Z")},
    optional={"event": st.sampled_from(["page_view", "page_ping", "struct", "unstruct"]) | _JSON,
              "contexts": st.lists(_SELF_DESCRIBING, max_size=3) | _JSON, "unstruct_event": _SELF_DESCRIBING,
              **{name: _JSON for name in ("page_urlpath", "os_timezone", "dvce_type", "refr_medium", "domain_sessionidx",
                                          "doc_height", "pp_yoffset_max", "br_viewheight", "mkt_medium", "mkt_clickid",
                                          "mkt_network")}})


@given(st.lists(_EVENT, min_size=1, max_size=4))
def test_an_event_of_any_json_shape_folds_without_failing_and_keeps_the_features_finite(events):
    """The scoring API takes events from anyone: a field of another type (a page_type context whose
    type is a list, an entity that is a string) failed half-way through step(), leaving the session
    with part of an event the scorer said it skipped; it now reads as absent, live and in training."""
    state = SessionState()
    for event in events:
        step(state, event)
    assert np.isfinite(np.asarray(features_module.features(state), dtype=np.float32)).all()


def test_purchase_never_reaches_the_features():
    rng = random.Random(5)
    events = synth.session_events(rng, 1_795_000_000_000, buyer=True, purchase_total=TELL_TALE)
    assert any((e.get("unstruct_event") or {}).get("data", {}).get("total") == TELL_TALE for e in events)
    frame = _examples(_as_lake_frame(events))
    purchase_at = next(i for i, e in enumerate(events) if e["event_name"] == "purchase")
    assert len(frame) == purchase_at                   # one row per event before the purchase, none after
    assert (frame["label"] == 1).all()
    assert not np.isclose(frame[list(FEATURE_NAMES)].to_numpy(), TELL_TALE).any()
    assert frame["event_id"].tolist() == [e["event_id"] for e in events[:purchase_at]]


def test_the_order_confirmation_page_ends_the_examples_like_the_purchase_it_precedes():
    rng = random.Random(5)
    events = synth.session_events(rng, 1_795_000_000_000, buyer=True)
    purchase_at = next(i for i, e in enumerate(events) if e["event_name"] == "purchase")
    session = synth.Session(rng, 1_795_000_000_000)
    confirmation = session.page("/checkout/done", "confirmation")      # the shop's "thank you" page view
    just_before = synth.iso(parse_ms(events[purchase_at]["derived_tstamp"]) - 1)
    confirmation.update(domain_sessionid=events[0]["domain_sessionid"], derived_tstamp=just_before,
                        collector_tstamp=just_before, etl_tstamp=just_before)
    events.insert(purchase_at, confirmation)
    frame = _examples(_as_lake_frame(events))
    assert frame["event_id"].tolist() == [e["event_id"] for e in events[:purchase_at]]
    state = SessionState()
    for event in events[:purchase_at + 1]:
        step(state, event)
    assert state.purchased and state.events == purchase_at             # the scorer stops scoring there too


def test_a_session_without_tracker_session_id_is_keyed_by_its_cookie_id_as_training_does():
    event = {"event_id": "e1", "domain_sessionid": None, "domain_userid": "d" * 64, "network_userid": "n" * 64}
    assert session_key(event) == "d" * 64
    assert session_key({**event, "domain_userid": None}) == "n" * 64
    # A server-side tracker's batch shares one collector id among its users: the user id comes first.
    assert session_key({**event, "domain_userid": None, "user_id": "u" * 64}) == "u" * 64
    assert session_key({**event, "domain_userid": None, "network_userid": NIL_USER}) == "e1"


def test_records_drop_duplicates_and_turn_missing_into_none():
    rng = random.Random(8)
    events = synth.session_events(rng, 1_795_000_000_000, buyer=False)
    frame = _as_lake_frame(events + events[:3])        # an at-least-once replay of three events
    frame.loc[0, "domain_sessionidx"] = np.nan
    out = records(_arrow(frame.sample(frac=1, random_state=1)))
    assert [e["event_id"] for e in out] == [e["event_id"] for e in events]
    assert out[0]["domain_sessionidx"] is None
    assert isinstance(out[0]["contexts"], list)


def test_of_two_copies_of_an_event_the_first_enriched_is_folded_whatever_order_spark_hands_them_over():
    # An enricher re-reading its batch after a crash, a new version deployed meanwhile, wrote a second copy
    # of its events: same id and times, another device class. Which copy was folded followed Spark's row
    # order (the files' sizes, a compaction); the scorer folds the first to arrive, the first enriched.
    events = synth.session_events(random.Random(8), 1_795_000_000_000, buyer=False)
    copy = {**events[0], "dvce_type": "Tablet" if events[0]["dvce_type"] != "Tablet" else "Mobile",
            "etl_tstamp": synth.iso(parse_ms(events[0]["etl_tstamp"]) + 60_000)}
    frame = _as_lake_frame([*events, copy])
    expected = _examples(_as_lake_frame(events))
    pd.testing.assert_frame_equal(_examples(frame), expected)
    pd.testing.assert_frame_equal(_examples(frame.iloc[[len(events), *range(len(events))]]), expected)


def test_corrupt_json_names_the_event():
    events = synth.session_events(random.Random(9), 1_795_000_000_000, buyer=False)
    frame = _as_lake_frame(events)
    frame.loc[1, "contexts"] = "{not json"
    with pytest.raises(ValueError, match=f"event {events[1]['event_id']}: column contexts is not valid JSON"):
        session_examples(_arrow(frame))


def test_session_of_only_a_purchase_has_no_examples():
    events = synth.session_events(random.Random(2), 1_795_000_000_000, buyer=True)
    purchase = [e for e in events if e["event_name"] == "purchase"]
    assert examples_of("s", purchase).num_rows == 0


def test_metrics_on_known_scores():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 0, 1])
    p = np.array([.1, .2, .3, .35, .4, .5, .7, .8, .05, .9])
    m = evaluate(y, p)
    assert m["roc_auc"] == pytest.approx(23 / 24)
    assert m["positives"] == 4 and m["base_rate"] == pytest.approx(0.4)
    assert lift_top_decile(y, p) == pytest.approx(1 / 0.4)
    bins = calibration(y, p, bins=2)
    assert [b["count"] for b in bins] == [6, 4] and bins[1]["rate"] == pytest.approx(0.75)
    # A score on an edge belongs to the bin it opens: 0.3, 0.6 and 0.7 landed a bin low.
    edges = calibration(np.array([0, 1, 0, 1]), np.array([0.3, 0.6, 0.7, 1.0]))
    assert [(b["low"], b["high"]) for b in edges] == [(0.3, 0.4), (0.6, 0.7), (0.7, 0.8), (0.9, 1.0)]
    with pytest.raises(ValueError, match="both classes"):
        evaluate(np.zeros(3), np.ones(3) / 2)


def test_lift_does_not_depend_on_the_order_of_tied_scores():
    y = np.array([1] * 20 + [0] * 80)                                    # a file sorted by its label
    constant = np.full(len(y), 0.3)
    assert lift_top_decile(y, constant) == pytest.approx(1.0)
    assert lift_top_decile(y[::-1], constant) == pytest.approx(1.0)
    assert lift_top_decile(y, y * 0.9 + 0.05) == pytest.approx(5.0)      # the buyers ranked first: 2/0.2


def test_threshold_objectives():
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([.1, .2, .3, .4, .8, .9])
    assert choose_threshold(y, p, "f1")["f1"] == pytest.approx(6 / 7)
    strict = choose_threshold(y, p, "precision", target_precision=1.0)
    assert strict["precision"] == 1.0
    # Halfway between the lowest passing score (0.8) and the next (0.4): a 0.8 computed one float32
    # step lower when served is still a buy, and no row changes side.
    assert strict["threshold"] == pytest.approx(0.6)
    assert np.float32(0.8) - np.spacing(np.float32(0.8)) >= strict["threshold"]
    with pytest.raises(ValueError, match="f1 or precision"):
        choose_threshold(y, p, "recall")


def test_a_target_precision_out_of_reach_is_said_not_met_silently():
    from batch.train_metrics import threshold_text

    y, p = np.array([0, 1, 0, 1, 0, 0, 1, 0]), np.array([.9, .8, .7, .6, .5, .4, .3, .2])
    short = choose_threshold(y, p, "precision", target_precision=0.9)
    assert short["target_reached"] is False and short["precision"] == 0.5
    assert threshold_text({"threshold": short["threshold"], "threshold_selection": short}) == (
        "0.5500 (precision), target precision 0.9 not reached at any threshold: the most precise gives 0.5000")
    met = choose_threshold(y, p, "precision", target_precision=0.5)
    assert met["target_reached"] is True
    assert threshold_text({"threshold": met["threshold"], "threshold_selection": met}) == f"{met['threshold']:.4f} (precision)"


def test_a_weighted_threshold_is_that_of_the_rows_repeated_by_their_weights():
    """make bench's treated suite chooses leave_out's threshold with a held-out session's rows
    weighing 100 / holdout_percent, as the fit weighs them: as if they were there that often."""
    rng = np.random.default_rng(11)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(np.clip(0.25 * y + 0.75 * rng.random(300), 0, 1), 2)           # tied, as a tree's are
    w = rng.choice([1, 5], size=300, p=[0.8, 0.2])
    repeated = np.repeat(np.arange(300), w)
    for objective in ("f1", "precision"):
        chosen, repeated_choice = choose_threshold(y, p, objective, 0.6, w), choose_threshold(
            y[repeated], p[repeated], objective, 0.6)
        assert chosen["threshold"] == repeated_choice["threshold"]
        assert [chosen[k] for k in ("precision", "recall", "f1")] == pytest.approx(
            [repeated_choice[k] for k in ("precision", "recall", "f1")])
    assert choose_threshold(y, p, weights=w)["threshold"] != choose_threshold(y, p)["threshold"]


def test_a_tenth_of_the_rows_is_whole_rows():
    # 30 * 0.1 is a hair over 3: the top tenth of 30 rows took 4 of them.
    y, p = np.array([1, 1, 1, 0] + [0] * 26), np.arange(30, 0, -1) / 31
    assert lift_top_decile(y, p) == pytest.approx(1.0 / 0.1)


@given(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False))
def test_floor32_is_the_largest_float32_not_above(value):
    low = floor32(value)
    assert low <= value and float(np.float32(low)) == low
    assert float(np.nextafter(np.float32(low), np.float32(np.inf))) > value


def test_table_prepare_encodes_categoricals_and_reports_missing():
    frame = pd.DataFrame({
        "pages": [1, 2, np.nan, 4, 5, 6], "month": ["Feb", "Mar", "Feb", None, "Nov", "Nov"],
        "weekend": [True, False, True, False, False, True], "browser": [1, 2, 1, 3, 2, 1],
        "Revenue": ["TRUE", "FALSE", "TRUE", "FALSE", None, "TRUE"], "id": range(6)})
    table = prepare(frame, "Revenue", drop=["id"], categorical=["browser"])
    assert set(table.feature_names) == {"pages", "month_Feb", "month_Mar", "month_Nov", "weekend_False",
                                        "weekend_True", "browser_1", "browser_2", "browser_3"}
    assert len(table.frame) == 4           # one row without label, one without pages
    assert any("1 rows without a label" in n for n in table.notes)
    assert any("1 rows with missing numeric values" in n for n in table.notes)
    assert table.frame["label"].tolist() == [1, 0, 0, 1]
    assert table.frame.loc[table.frame["pages"] == 4, ["month_Feb", "month_Mar", "month_Nov"]].sum(axis=1).item() == 0
    imputed = prepare(frame, "Revenue", drop=["id"], missing="impute")
    assert len(imputed.frame) == 5 and any("training rows' medians" in n for n in imputed.notes)
    with pytest.raises(TrainError, match="no column"):
        prepare(frame, "Revenue", drop=["nope"])
    with pytest.raises(TrainError, match="not true/false"):
        prepare(frame.assign(Revenue="maybe"), "Revenue")


def test_imputed_medians_come_from_the_training_rows_alone():
    from batch.train_table import impute_medians

    frame = pd.DataFrame({"pages": [1.0, 2.0, np.nan, 4.0, 1000.0, np.nan], "ok": [1.0] * 6,
                          "label": [0, 1, 0, 1, 1, 0]})
    test_mask = np.array([False, False, False, False, True, True])      # 1000 is an evaluation row
    filled, medians = impute_medians(frame, ["pages", "ok"], test_mask)
    assert medians == {"pages": 2.0}
    assert filled["pages"].tolist() == [1.0, 2.0, 2.0, 4.0, 1000.0, 2.0]
    with pytest.raises(TrainError, match=r"\['pages'\] have no value in the training rows"):
        impute_medians(frame, ["pages"], np.array([True, True, False, True, True, True]))


def test_table_inputs_spark_would_choke_on_are_clear_errors_or_notes(tmp_path):
    from batch.train_table import read_table

    frame = pd.DataFrame({"pages": [1, 2, 3, 4], "color": ["Red", "red", "Red", "blue"],
                          "Revenue": [1, 0, 1, 0], "empty": [np.nan] * 4})
    with pytest.raises(TrainError, match="collide.*: color_red from color=Red and color=red"):
        prepare(frame, "Revenue", drop=["empty"])                  # color_Red and color_red: one name to Spark
    with pytest.raises(TrainError, match=r"grade_a from grade=A\+ and grade=A-\. Rename"):
        prepare(frame.drop(columns=["color"]).assign(grade=["A+", "A-", "B", "B"]), "Revenue", drop=["empty"])
    with pytest.raises(TrainError, match="names training gives columns of its own.*label"):
        prepare(frame.drop(columns=["color"]).assign(Label=1.0), "Revenue", drop=["empty"])
    table = prepare(frame.drop(columns=["color"]), "Revenue", missing="impute")
    assert "empty" not in table.feature_names and any("no values at all" in n for n in table.notes)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    for path in (broken, tmp_path / "empty.csv"):
        path.touch()
        with pytest.raises(TrainError, match="cannot be read as a table"):
            read_table(path)


@pytest.mark.parametrize("name", ["class_weight", "features", "Prediction", "probability", "rawPrediction", "p_spark",
                                  "p_onnx"])
def test_a_feature_named_like_a_column_training_adds_is_refused(name):
    """class_weight was overwritten by the weights (which encode the label: AUC 0.55, parity passed);
    the others stopped Spark or scikit-learn with a traceback."""
    frame = pd.DataFrame({"pages": [1.0, 2, 3, 4], name: [5.0, 6, 7, 8], "Revenue": [1, 0, 1, 0]})
    with pytest.raises(TrainError, match=f"column\\(s\\) \\['{name}'\\] have names training gives columns of its own"):
        prepare(frame, "Revenue")


def test_table_columns_that_are_no_categories_nor_finite_numbers_are_named():
    from decimal import Decimal

    base = pd.DataFrame({"pages": np.arange(40.0), "Revenue": [0, 1] * 20})
    stray = base.assign(seconds=[str(i) for i in range(39)] + ["?"])
    with pytest.raises(TrainError, match=r"column 'seconds' holds numbers and 1 other value\(s\), e.g. \['\?'\]"):
        prepare(stray, "Revenue")                  # was refused as an identifier, with advice to drop it
    with pytest.raises(TrainError, match="'seen' holds times"):
        prepare(base.assign(seen=pd.date_range("2026-01-01", periods=40, freq="h")), "Revenue")
    with pytest.raises(TrainError, match=r"out-of-range .* in \{'big': 1, 'inf': 2\}"):
        prepare(base.assign(big=[1e39] + [1.0] * 39, inf=[np.inf, -np.inf] + [1.0] * 38), "Revenue")
    cities = pd.DataFrame({"city": [f"c{i % 1001}" for i in range(5000)], "Revenue": [0, 1] * 2500})
    with pytest.raises(TrainError, match="1001 distinct values, more than the 1000 one-hot columns"):
        prepare(cities, "Revenue")
    table = prepare(base.assign(price=[Decimal("9.99")] * 40,
                                flag=pd.array([True, False, None, True] * 10, dtype="boolean")), "Revenue")
    assert "price" in table.feature_names and table.frame["price"].iloc[0] == pytest.approx(9.99)
    assert {"flag_True", "flag_False"} <= set(table.feature_names)      # like a plain bool column


def test_tables_are_read_from_semicolon_and_gzip_csv_and_parquet_folders(tmp_path):
    from batch.train_table import read_table

    frame = pd.DataFrame({"pages": [1.5, 2.0], "Revenue": [True, False]})
    (tmp_path / "semicolons.csv").write_text("pages;Revenue\n1.5;True\n2.0;False\n")
    (tmp_path / "decimal-commas.csv").write_text("pages;Revenue\n1,5;True\n2,0;False\n")
    frame.to_csv(tmp_path / "packed.csv.gz", index=False)
    (tmp_path / "spark-output").mkdir()
    frame.iloc[:1].to_parquet(tmp_path / "spark-output" / "part-0.parquet")
    frame.iloc[1:].to_parquet(tmp_path / "spark-output" / "part-1.parquet")
    for name in ("semicolons.csv", "decimal-commas.csv", "packed.csv.gz", "spark-output"):
        pd.testing.assert_frame_equal(read_table(tmp_path / name).reset_index(drop=True), frame, check_dtype=False)


def test_too_few_rows_of_a_class_for_the_split_or_the_folds_are_refused_before_spark():
    """A lone buyer went to evaluation: GBT and RF published a constant model (AUC 0.5), LR crashed."""
    from batch.train_table import cross_validate, train_from_table

    table = prepare(pd.DataFrame({"pages": np.arange(10.0), "Revenue": [1] + [0] * 9}), "Revenue")
    with pytest.raises(TrainError, match="1 row\\(s\\) with the label true: too few"):
        train_from_table(None, table, fast_settings())
    with pytest.raises(TrainError, match="5-fold cross-validation needs at least 5 rows of each class"):
        cross_validate(None, table, fast_settings(), 5)


@pytest.mark.parametrize(("key", "value"), [("max_depth", 31), ("step_size", 1.5), ("max_bins", 1), ("keep_versions", -1),
                                          ("max_session_events", -1), ("max_examples_per_session", -1)])
def test_hyper_parameters_spark_refuses_only_when_it_fits_are_config_errors(key, value):
    from batch.train_config import TrainSettings
    from common.config import ConfigError, load

    with pytest.raises(ConfigError, match=f"CLICKSTREAM_{key.upper()}: expected"):
        load(TrainSettings, section="train", env={f"CLICKSTREAM_{key.upper()}": str(value)})


@pytest.mark.spark
def test_model_json_records_the_iterations_lr_was_fitted_with(spark):
    from batch.train_model import estimator, hyper_parameters

    settings = fast_settings(algorithm="lr", max_iter=20)
    assert hyper_parameters(settings)["max_iter"] == estimator(settings).getMaxIter() == 100


def test_identifier_columns_are_refused_not_published_as_feature_names():
    rows = 200
    frame = pd.DataFrame({"pages": np.arange(rows) % 9, "Revenue": np.arange(rows) % 2,
                          "TrafficType": np.arange(rows) % 20,           # the widest UCI shoppers categorical
                          "city": [f"city-{i // 3}" for i in range(rows)],         # 67 values in 200 rows: a category
                          "customer_id": [f"c-{i}" for i in range(rows)]})
    with pytest.raises(TrainError) as refused:
        prepare(frame, "Revenue", categorical=["TrafficType"])
    assert "customer_id (200 distinct values in 200 rows)" in str(refused.value)
    assert "--drop customer_id" in str(refused.value) and "city" not in str(refused.value)
    kept = prepare(frame, "Revenue", drop=["customer_id"], categorical=["TrafficType"])
    assert {"TrafficType_19", "city_city_0"} <= set(kept.feature_names)

    # One email address would be a feature name as it is, however few rows the table has.
    emails = pd.DataFrame({"customer_email": [f"user{i}@example.com" for i in range(6)],
                           "pages": [3, 5, 1, 8, 2, 9], "bought": [0, 1, 0, 1, 0, 1]})
    with pytest.raises(TrainError, match=r"customer_email \(email addresses, 6 distinct values in 6 rows\).*"
                                         r"--drop customer_email"):
        prepare(emails, "bought")
    assert prepare(emails, "bought", drop=["customer_email"]).feature_names == ["pages"]

    # A number named with --categorical is checked too, and may simply stay numeric.
    with pytest.raises(TrainError, match=r"pages_seen \(200 distinct.*out of --categorical"):
        prepare(frame.assign(pages_seen=np.arange(rows)), "Revenue", drop=["customer_id"], categorical=["pages_seen"])


def test_a_malformed_window_end_is_a_config_error_naming_the_key():
    from batch.train_config import TrainSettings
    from common.config import ConfigError, load

    with pytest.raises(ConfigError, match="CLICKSTREAM_WINDOW_END"):
        load(TrainSettings, env={"CLICKSTREAM_WINDOW_END": "2026-11-31"})


def test_no_writable_temporary_folder_is_named_before_spark_starts(monkeypatch):
    """On a read-only root the JVM failed to start and the error blamed the Spark master and memory."""
    import tempfile

    from batch.train_config import TrainSettings, spark_session
    from common.config import ConfigError

    def no_folder(**_):
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp']")

    monkeypatch.setattr(tempfile, "mkdtemp", no_folder)
    with pytest.raises(ConfigError, match="no writable temporary folder for Spark .* set TMPDIR"):
        spark_session(TrainSettings())


def test_folds_are_stratified():
    labels = np.array([1] * 50 + [0] * 450)
    assignment = folds(labels, 5, seed=1)
    for fold in range(5):
        assert (labels[assignment == fold]).sum() == 10 and (assignment == fold).sum() == 100


@pytest.mark.parametrize("derived, collected, expected", [
    ("2026-11-17T10:00:00.000Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:00.000Z"),   # the enricher's shape
    ("2096-10-02T07:06:40.000Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),   # a ttm decades ahead
    (None, "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),
    ("2026-11-17T11:00:01+01:00", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:01.000Z"),  # shapes differ: parsed
    ("2026-11-17T10:00:09Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),
    (1_795_000_000_000, 1_795_000_005_000, 1_795_000_000_000),                              # the lake's millis
    ("2026-11-16T23:59:58.000Z", "2026-11-17T00:00:05.000Z", "2026-11-16T23:59:58.000Z"),   # the day before
    ("2026-10-18T10:00:06.000Z", "2026-11-17T10:00:05.000Z", "2026-10-18T10:00:06.000Z"),   # an offline queue's 30 days
    ("2026-10-18T10:00:04.000Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),   # a clock reset: older
    ("1970-01-21T10:06:50.956Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),   # dtm in s, stm in ms
    ("1969-12-31T23:59:55.000Z", "2026-11-17T10:00:05.000Z", "2026-11-17T10:00:05.000Z"),   # 1969: folded, not skipped
    (1_795_000_000, 1_795_000_005_000, 1_795_000_005_000),                                  # 1970 in the lake
])
def test_event_time_is_the_derived_time_if_within_30_days_before_the_collectors(derived, collected, expected):
    from common.features import event_time_ms

    assert event_time_ms({"derived_tstamp": derived, "collector_tstamp": collected}) == parse_ms(expected)


@pytest.mark.parametrize("derived, collected, expected", [
    ("2026-11-17 23:00:00.000Z", "2026-11-17T10:00:00.000Z", "2026-11-17T10:00:00.000Z"),   # ' ' sorts before 'T'
    ("2026-11-17T09:00:00.000Z", "2026-11-17 10:00:00.000Z", "2026-11-17T09:00:00.000Z"),
    ("2026-11-17T10:00:00,900Z", "2026-11-17T10:00:00.100Z", "2026-11-17T10:00:00.100Z"),   # ',' before '.'
    ("2026-11-17T100500.00000Z", "2026-11-17T10:00:00.000Z", "2026-11-17T10:00:00.000Z"),   # a basic time
])
def test_event_time_is_never_later_than_the_collectors_in_other_iso_shapes_of_equal_length(derived, collected,
                                                                                          expected):
    """parse_ms reads these too, but as strings they do not sort as times: the fast path must not compare them."""
    from common.features import event_time_ms

    assert event_time_ms({"derived_tstamp": derived, "collector_tstamp": collected}) == parse_ms(expected)



@given(st.integers(min_value=0, max_value=4_102_444_799_999))           # 1970 to 2099, to the millisecond
def test_parse_ms_reads_the_enrichers_timestamps_exactly(ms):
    """As Spark does: a float product (timestamp() * 1000) was 1 ms short for one string in 160."""
    from datetime import UTC, datetime, timedelta

    text = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert parse_ms(text) == ms
    assert parse_ms("2039-03-08T19:46:13.411Z") == 2_183_226_373_411         # one the float product missed

@pytest.mark.parametrize("gap_minutes, first_day", [(30, "2026-11-19"), (1440, "2026-11-19"), (1441, "2026-11-18")])
def test_the_lead_in_spans_one_session_gap_in_whole_days_before_the_window(gap_minutes, first_day):
    from batch.train import lead_in, window_start_ms
    from batch.train_lake import Window

    window = Window.last_days(2, "2026-11-21")
    assert lead_in(window, gap_minutes).as_dict() == {"start": first_day, "end": "2026-11-19"}
    assert window_start_ms(window) == parse_ms("2026-11-20T00:00:00Z")


def rich_session() -> list[dict]:
    """One session that gives every feature a value of its own: kinds of event and page the synthetic
    funnel never makes (struct events, search and content pages known by their path alone)."""
    s = synth.Session(random.Random(12), parse_ms("2026-11-20T09:00:00Z"), session_id="rich-session")
    s.index, s.device, s.referer, s.campaign, s.zone = 4, "Tablet", "social", True, "Asia/Tokyo"
    s.page("/", "home")
    s.page("/", "home")["contexts"] = []
    s.page("/search", "search")
    s.page("/search/results", "search")["contexts"] = []          # the path says what the page is
    s.page("/about-us", "content")["contexts"] = []
    s.events.append(s._base("struct", "/about-us", "content"))
    s.page("/c/shoes", "category", "shoes")
    for sku in ("SH-001", "SH-002", "SH-001"):
        s.page(f"/p/{sku}", "product", "shoes")
        s.shop("product_view", {"sku": sku, "category": "shoes", "price": 10.5}, f"/p/{sku}", "product")
    s.ping("/p/SH-001", "product", 1400)
    s.shop("add_to_cart", {"sku": "SH-001", "price": 10.5, "quantity": 3}, "/p/SH-001", "product")
    s.shop("remove_from_cart", {"sku": "SH-001", "price": 10.5, "quantity": 1}, "/cart", "cart")
    vendor_event(s, SNOWPLOW, "add_to_cart", {"sku": "SH-002", "unitPrice": 4.0, "quantity": 2})   # trackAddToCart
    vendor_event(s, "com.acme", "product_view", {"sku": "XX-9", "price": 99.0})                    # not the shop's
    s.page("/cart", "cart")
    s.page("/checkout/1", "checkout")
    s.shop("checkout_step", {"step": 2}, "/checkout/2", "checkout")
    return s.events


SNOWPLOW = "com.snowplowanalytics.snowplow"      # the official trackers' trackAddToCart / trackRemoveFromCart


def vendor_event(session: synth.Session, vendor: str, name: str, data: dict) -> dict:
    """A self-describing event of ``vendor`` named like one of the shop's, on the cart page."""
    event = session.shop(name, data, "/cart", "cart")
    event["event_vendor"] = vendor
    event["unstruct_event"]["schema"] = f"iglu:{vendor}/{name}/jsonschema/1-0-0"
    return event


def test_the_official_trackers_cart_events_count_with_their_unit_price_and_other_vendors_do_not():
    # The fold read the event's name only: trackAddToCart counted as an add worth nothing (its price is
    # unitPrice), and any vendor's "product_view" or "checkout_step" passed for the shop's.
    s = synth.Session(random.Random(3), parse_ms("2026-11-20T09:00:00Z"), session_id="vendors")
    s.page("/p/SH-001", "product")
    vendor_event(s, SNOWPLOW, "add_to_cart", {"sku": "SH-001", "unitPrice": 12.5, "quantity": 3})
    vendor_event(s, SNOWPLOW, "remove_from_cart", {"sku": "SH-001", "unitPrice": 12.5, "quantity": 1})
    for name, data in (("product_view", {"sku": "XX-1", "price": 5.0}), ("checkout_step", {"step": 4}),
                       ("add_to_cart", {"sku": "XX-1", "price": 5.0, "quantity": 1})):
        vendor_event(s, "com.acme", name, data)
    row = dict(zip(FEATURE_NAMES, session_features(s.events)[-1], strict=True))
    assert (row["cart_adds"], row["cart_removes"], row["cart_items"], row["cart_value"]) == (1, 1, 2, 25.0)
    assert (row["product_views"], row["distinct_products"], row["checkout_step_max"]) == (0, 0, 0)
    assert row["events"] == 6                      # still events of the session, just not shop actions


def test_a_new_major_version_of_a_shop_schema_counts_by_name_and_its_fields_are_not_misread():
    """2-0-0 may rename or retype fields: read as 1-0-0, a price in cents counted as euros, and a
    renamed page type still made a confirmation page the purchase, or not, by chance."""
    s = synth.Session(random.Random(4), parse_ms("2026-11-20T09:00:00Z"), session_id="majors")
    s.page("/p/SH-001", "product")
    for version in ("1-1-0", "2-0-0"):
        event = s.shop("add_to_cart", {"sku": f"SH-00{version[0]}", "price": 1999, "quantity": 1}, "/p/SH-001", "product")
        event["unstruct_event"]["schema"] = f"iglu:com.clickshop/add_to_cart/jsonschema/{version}"
    confirmation = s.page("/order/done", "confirmation")
    confirmation["contexts"][0]["schema"] = "iglu:com.clickshop/page_type/jsonschema/2-0-0"
    row = dict(zip(FEATURE_NAMES, session_features(s.events)[-1], strict=True))
    assert (row["cart_adds"], row["cart_items"], row["cart_value"]) == (2, 2, 1999.0)   # 1-1-0 read, 2-0-0 counted
    assert not is_purchase(confirmation) and row["events"] == 4


ECOMMERCE = "com.snowplowanalytics.snowplow.ecommerce"   # the snowplow-ecommerce tracker plugins


def ecommerce_action(session: synth.Session, action: str, *entities: tuple[str, dict]) -> dict:
    """The plugins' snowplow_ecommerce_action of type ``action``, with ``(name, data)`` entities."""
    event = vendor_event(session, ECOMMERCE, "snowplow_ecommerce_action", {"type": action})
    event["contexts"] += [{"schema": f"iglu:{ECOMMERCE}/{name}/jsonschema/1-0-0", "data": data}
                          for name, data in entities]
    return event


def product(sku: str, price: float, quantity: int | None = None) -> tuple[str, dict]:
    return "product", {"id": sku, "category": "shoes", "price": price, "currency": "EUR", "quantity": quantity}


def plugin_session() -> list[dict]:
    """A session tracked with the snowplow-ecommerce plugin's actions only."""
    s = synth.Session(random.Random(21), parse_ms("2026-11-21T15:00:00Z"), session_id="plugin-session")
    s.page("/p/SH-004", "product")
    ecommerce_action(s, "product_view", product("SH-004", 30.0))
    ecommerce_action(s, "list_view", product("SH-005", 9.0), product("SH-006", 8.0))     # seen, not viewed
    ecommerce_action(s, "add_to_cart", product("SH-004", 30.0, 2), product("SH-007", 5.5), ("cart", {
        "total_value": 65.5, "currency": "EUR"}))
    ecommerce_action(s, "remove_from_cart", product("SH-004", 30.0, 1))
    ecommerce_action(s, "checkout_step", ("checkout_step", {"step": 3, "delivery_method": "express"}))
    ecommerce_action(s, "transaction", ("transaction", {
        "transaction_id": "T-1", "revenue": TELL_TALE, "currency": "EUR", "payment_method": "card",
        "total_quantity": 2}))
    ecommerce_action(s, "add_to_cart", product("SH-009", 500.0))                             # after the purchase
    return s.events


def test_the_ecommerce_plugins_actions_count_as_the_shops_and_their_transaction_is_the_purchase():
    # Before feature version 4 the fold knew the shop's events and the classic cart events only: a shop
    # on the plugins had no product views, cart or checkout features, and no purchases to learn from.
    events = plugin_session()
    frame = _examples(_as_lake_frame(events))
    assert len(frame) == 6 and (frame["label"] == 1).all()          # the examples end at the transaction
    row = frame.iloc[-1]
    assert (row["product_views"], row["distinct_products"]) == (1, 1)
    assert (row["cart_adds"], row["cart_removes"], row["cart_items"], row["cart_value"]) == (1, 1, 2, 35.5)
    assert row["checkout_step_max"] == 3 and row["events"] == 6
    assert not np.isclose(frame[list(FEATURE_NAMES)].to_numpy(), TELL_TALE).any()


def landing_sessions() -> list[dict]:
    """Sessions of a paid click with a click id alone, a click from Facebook, and a crawler, on
    pages known only by a path with a language folder (FEATURE_VERSION 5), and a display ad's click
    (referer medium paid, FEATURE_VERSION 6)."""
    rng, events = random.Random(21), []
    for session_id, clickid, network, device, path in (
            ("paid-click", "EAIaIQobChMI", "Google", "Computer", "/de/p/SH-001"),
            ("facebook-share", "IwAR2xyz", "Facebook", "Mobile", "/en-gb/cart"),
            ("crawler", None, None, "Bot", "/cartier-watches"),
            ("display-ad", None, None, "Mobile", "/c/bags")):
        s = synth.Session(rng, parse_ms("2026-11-21T10:00:00Z"), session_id=session_id)
        s.device, s.campaign = device, False
        if session_id == "display-ad":
            s.referer = "paid"
        for page in (path, "/"):
            event = s.page(page, "content")
            event.update(contexts=[], mkt_clickid=clickid, mkt_network=network)
        events += s.events
    return events


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "home"), ("/de", "home"), ("/de/p/SH-001", "product"), ("/en-gb/cart", "cart"), ("/C/Shoes", "category"),
    ("/search/results", "search"), ("/cartier-watches", "content"), ("/checkout/shipping", "checkout"),
    ("/tv", "home"),            # two letters are a language folder: docs/contracts.md says so
    (None, "home"),
])
def test_a_page_without_a_page_type_context_is_typed_by_its_first_folder(path, kind):
    assert features_module.page_type({"page_urlpath": path}) == kind


def test_a_paid_click_id_alone_is_a_campaign_bots_are_a_device_and_paths_are_read_by_folder():
    rows = {}
    for event in landing_sessions():
        rows.setdefault(event["domain_sessionid"], []).append(event)
    first = {key: dict(zip(FEATURE_NAMES, session_features(events)[0], strict=True)) for key, events in rows.items()}
    assert first["paid-click"]["campaign"] == 1.0             # gclid and no utm_*: Google Ads' auto-tagging
    assert first["facebook-share"]["campaign"] == 0.0         # fbclid is on every link followed from Facebook
    assert (first["paid-click"]["pages_product"], first["facebook-share"]["pages_cart"]) == (1.0, 1.0)
    assert first["crawler"]["pages_content"] == 1.0 and first["crawler"]["pages_cart"] == 0.0
    assert first["display-ad"]["referer_paid"] == 1.0 and first["display-ad"]["pages_category"] == 1.0
    assert [first["crawler"][name] for name in FEATURE_NAMES if name.startswith("device_")] == [0, 0, 0, 1]


def pinned_sessions() -> dict[str, list[dict]]:
    """The fixed sessions whose features are pinned: the synthetic funnel across a DST change,
    rich_session(), plugin_session() and landing_sessions()."""
    events = synth.make_events(60, dt.datetime(2026, 3, 28, 22), hours=30, seed=11) + rich_session() \
        + plugin_session() + landing_sessions()
    sessions: dict[str, list[dict]] = {}
    for event in events:
        sessions.setdefault(session_key(event), []).append(event)
    return sessions


def test_the_cart_never_goes_below_empty_and_the_furthest_checkout_step_stays():
    """Definitions the pinned sessions do not reach: removing what was never added (a cart filled in
    an earlier session), and going back a checkout step."""
    s = synth.Session(random.Random(5), parse_ms("2026-11-20T09:00:00Z"), session_id="bounds")
    s.shop("add_to_cart", {"sku": "SH-001", "category": "shoes", "price": 10.0, "quantity": 1}, "/p/SH-001", "product")
    s.shop("remove_from_cart", {"sku": "SH-002", "price": 50.0, "quantity": 3}, "/cart", "cart")
    for step_reached in (3, 1):
        s.shop("checkout_step", {"step": step_reached}, "/checkout", "checkout")
    row = dict(zip(FEATURE_NAMES, session_features(s.events)[-1], strict=True))
    assert (row["cart_items"], row["cart_value"], row["checkout_step_max"]) == (0, 0.0, 3)


def test_each_feature_is_read_from_its_own_name():
    """By name, not position: a name added to FEATURE_NAMES in one place and its value in features()
    in another shifted the names of the values after it (model.json, importances, /features)."""
    row = dict(zip(FEATURE_NAMES, session_features(rich_session())[-1], strict=True))
    assert {name: value for name, value in row.items() if not name.startswith(("session_sec", "seconds", "mean"))} == {
        "events": 21, "page_views": 11, "page_pings": 1, "struct_events": 1, "product_views": 3,
        "distinct_products": 2, "cart_adds": 2, "cart_removes": 1, "cart_value": 29.0, "cart_items": 4,
        "checkout_step_max": 2, "pages_home": 2, "pages_category": 1, "pages_product": 3, "pages_search": 2,
        "pages_cart": 1, "pages_checkout": 1, "pages_content": 1, "max_scroll_depth": pytest.approx((1400 + 800) / 3000),
        "device_computer": 0, "device_mobile": 0, "device_tablet": 1, "device_bot": 0, "local_hour": 18,
        "local_weekday": 4,
        "referer_search": 0, "referer_social": 1, "referer_email": 0, "referer_paid": 0, "referer_internal": 0,
        "referer_unknown": 0,
        "referer_direct": 0, "campaign": 1, "returning": 1, "session_index": 4}
    assert row["mean_seconds_per_page"] == pytest.approx(row["session_seconds"] / 11)
    assert 0 < row["seconds_on_page"] < row["seconds_since_last_cart_action"] < row["session_seconds"]


@pytest.mark.parametrize(("medium", "column"), [
    ("paid", "referer_paid"), ("search", "referer_search"), ("unknown", "referer_unknown"), (None, "referer_direct"),
    ("video", None),              # a medium the fold has no column for: all zeros, not a guess
])
def test_the_referer_medium_sets_its_one_column(medium, column):
    event = {"event_id": "e", "event": "page_view", "collector_tstamp": "2026-11-20T09:00:00Z", "refr_medium": medium}
    row = dict(zip(FEATURE_NAMES, session_features([event])[0], strict=True))
    assert [name for name in ONE_HOT_GROUPS["referer"] if row[name]] == ([column] if column else [])


def test_every_feature_varies_over_the_pinned_sessions():
    """A feature constant over them is one whose meaning could change without the pin noticing: give
    rich_session() (or the funnel) what makes it vary."""
    rows = np.array([row for session in pinned_sessions().values() for row in session_features(session)])
    constant = [name for name, column in zip(FEATURE_NAMES, rows.T, strict=True) if len(set(column)) < 2]
    assert not constant


class _Recording(dict):
    """An event that notes which of its fields are read."""

    def __init__(self, event: dict, read: set[str]):
        super().__init__(event)
        self.read = read

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_the_fold_reads_no_event_field_that_training_leaves_out():
    """Training hands the fold EVENT_FIELDS only: a field read online but missing there is a feature
    the scorer computes and training sees as empty, on sessions no parity test happens to cover."""
    from common.features import EVENT_FIELDS

    read: set[str] = set()
    for session in pinned_sessions().values():
        session_features([_Recording(event, read) for event in session])
        session_key(_Recording(session[0], read))
    assert read and read <= set(EVENT_FIELDS), sorted(read - set(EVENT_FIELDS))


# What the fold computes for fixed sessions, under the FEATURE_VERSION that computes it. A model
# trained on other features is refused only when its feature_version differs: before this pin,
# the features changed four times under version "1" and scorers served models built on others.
FINGERPRINTS = {"2": "0bb644b6462c97d6", "3": "65d39d230033ad04", "4": "14e68e1d9f3555c1",
                "5": "6220d764cd1b2bd4", "6": "d71d942242fc3cf5"}


def test_the_features_of_fixed_sessions_are_pinned_to_the_feature_version():
    loose = [{"event_id": "e1", "domain_userid": "u1"}, {"event_id": "e2", "network_userid": "n2"},
             {"event_id": "e3", "network_userid": NIL_USER}]
    sessions = pinned_sessions()
    digest = hashlib.sha256(repr((FEATURE_NAMES, [session_key(e) for e in loose])).encode())
    for key, session in sorted(sessions.items()):
        digest.update(key.encode())
        for row in session_features(session):
            digest.update(struct.pack(f"<{len(row)}d", *row))
    assert digest.hexdigest()[:16] == FINGERPRINTS.get(FEATURE_VERSION), (
        f"the features of the pinned sessions changed ({digest.hexdigest()[:16]}): bump "
        "common.features.FEATURE_VERSION and pin the new fingerprint under it (unless tests/train/synth.py's "
        "sessions changed, not the fold)")


def _hour_and_weekday(zone: str | None, at: str) -> tuple[float, float]:
    event = {"event_id": "e", "event": "page_view", "collector_tstamp": at, "os_timezone": zone}
    row = dict(zip(FEATURE_NAMES, session_features([event])[0]))
    return row["local_hour"], row["local_weekday"]


@pytest.fixture
def host_in_kolkata(tmp_path, monkeypatch):
    """A host zone database whose "localtime" and "posixrules" are Kolkata's (this machine's are UTC,
    where reading them would go unnoticed)."""
    kolkata = resources.files("tzdata.zoneinfo").joinpath("Asia", "Kolkata").read_bytes()
    for name in ("localtime", "posixrules"):
        (tmp_path / name).write_bytes(kolkata)
    zoneinfo.reset_tzpath(to=[str(tmp_path)])
    zoneinfo.ZoneInfo.clear_cache()
    features_module._listed_zone.cache_clear()
    yield
    zoneinfo.reset_tzpath()
    zoneinfo.ZoneInfo.clear_cache()
    features_module._listed_zone.cache_clear()


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "Factory", "Europe/../Berlin", "Mars/Olympus", "", None])
def test_a_name_that_is_no_zone_reads_as_utc_whatever_the_hosts_zone(zone, host_in_kolkata):
    """"localtime" opened the host's own zone (hour 10 on a UTC host, 15 on one in Kolkata, 2 in Los
    Angeles), "posixrules" New York's: training and scoring on different hosts disagreed."""
    assert _hour_and_weekday(zone, "2026-11-20T10:00:00.000Z") == (10.0, 4.0)


@pytest.mark.parametrize("zone, at, expected", [
    ("Asia/Kolkata", "2026-11-20T10:00:00.000Z", (15.0, 4.0)),          # half-hour offset
    ("America/Los_Angeles", "2026-03-08T10:30:00.000Z", (3.0, 6.0)),    # just after the spring-forward gap
    ("Asia/Tokyo", "9999-12-31T20:00:00.000Z", (20.0, 4.0)),            # no local date east of UTC: UTC's
])
def test_local_hour_and_weekday_come_from_the_pinned_zone_rules(zone, at, expected):
    assert _hour_and_weekday(zone, at) == expected


def test_a_name_that_is_no_zone_is_not_kept_in_the_zone_cache():
    """Any os_timezone the tracker sent was a key of a 512-entry cache: 460 MB of 900 kB names pinned."""
    features_module._listed_zone.cache_clear()
    for i in range(20):
        assert _hour_and_weekday(f"Mars/{i}" + "x" * 10_000, "2026-11-20T10:00:00.000Z") == (10.0, 4.0)
    assert _hour_and_weekday("Asia/Kolkata", "2026-11-20T10:00:00.000Z") == (15.0, 4.0)
    assert features_module._listed_zone.cache_info().currsize == 1
