"""Request bodies to feature matrices, with 4xx errors that name the problem.

Supported: MLflow/SageMaker JSON (``dataframe_split``, ``dataframe_records``, ``instances``,
``inputs``), CSV (with or without a header row), and Open Inference Protocol v2 ``inputs`` (one
``features`` tensor, or one tensor per feature). Rows given by position must have every feature in
FEATURE_NAMES order; rows given by name must name every feature and nothing else.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import orjson

from common.features import FEATURE_COUNT, FEATURE_NAMES, event_time_ms, in_calendar

_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_NUMBERS = frozenset((int, float))                 # not bool: True is no feature value
JSON_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
FLOAT32_MAX = float(np.finfo(np.float32).max)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message




class BadEvent(ValueError):
    """Not an enriched event the fold can take; the message names what is wrong."""


def event_time(event) -> int:
    """The time (ms) of an enriched event the fold can take, else BadEvent. One check for the
    worker's records (skipped) and the API's events (400)."""
    if not isinstance(event, dict):
        raise BadEvent(f"expected a JSON object, got {type(event).__name__}")
    if not event.get("event_id") or not isinstance(event["event_id"], str):
        raise BadEvent("event_id must be a non-empty string")
    # The fold reads a value of another type inside them as absent; these two wrong are no event at all.
    if not isinstance(event.get("unstruct_event") or {}, dict):
        raise BadEvent("unstruct_event must be a JSON object or null")
    if not isinstance(event.get("contexts") or [], list):
        raise BadEvent("contexts must be a JSON list or null")
    try:
        event_ms = event_time_ms(event)
    except KeyError:
        raise BadEvent("missing collector_tstamp") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise BadEvent(f"bad timestamp: {exc}") from None
    if not in_calendar(event_ms):      # nor may it move the scorer's watermark there
        raise BadEvent(f"event time {event_ms} ms is outside the calendar")
    return event_ms


def _number(value, row: int, name: str) -> float:
    if type(value) is float or type(value) is int:      # fast path; bool is deliberately not a number
        return value
    if value is None:
        raise BadRequest(400, f"row {row}: feature {name!r} is null")
    raise BadRequest(400, f"row {row}: feature {name!r} must be a number, got {type(value).__name__} {value!r}")


def from_positional(rows) -> np.ndarray:
    if not isinstance(rows, list) or not rows:
        raise BadRequest(400, "expected a non-empty list of rows")
    out = np.empty((len(rows), FEATURE_COUNT), dtype=np.float32)
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadRequest(400, f"row {r}: expected a list of {FEATURE_COUNT} numbers, got {type(row).__name__}")
        if len(row) != FEATURE_COUNT:
            raise BadRequest(400, f"row {r}: expected {FEATURE_COUNT} values in the order of {list(FEATURE_NAMES)}, "
                                  f"got {len(row)}")
        if _NUMBERS.issuperset(map(type, row)):       # fast path: checks every value's type in C
            out[r] = row
        else:
            out[r] = [_number(value, r, FEATURE_NAMES[i]) for i, value in enumerate(row)]
    return out


def _column_order(columns) -> list[int]:
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise BadRequest(400, "columns must be a list of feature names")
    unknown = [c for c in columns if c not in _INDEX]
    if unknown:
        raise BadRequest(400, f"unknown feature(s) {unknown}; expected {list(FEATURE_NAMES)}")
    missing = [name for name in FEATURE_NAMES if name not in columns]
    if missing:
        raise BadRequest(400, f"missing feature(s) {missing}")
    if len(set(columns)) != len(columns):
        raise BadRequest(400, "a feature is named twice in columns")
    return [_INDEX[c] for c in columns]


def from_split(columns, data) -> np.ndarray:
    if columns is None:
        return from_positional(data)
    order = _column_order(columns)
    if not isinstance(data, list) or not data:
        raise BadRequest(400, "dataframe_split.data must be a non-empty list of rows")
    out = np.empty((len(data), FEATURE_COUNT), dtype=np.float32)
    for r, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(order):
            raise BadRequest(400, f"row {r}: expected {len(order)} values matching columns")
        for value, i in zip(row, order):
            out[r, i] = _number(value, r, FEATURE_NAMES[i])
    return out


def from_records(records) -> np.ndarray:
    if not isinstance(records, list) or not records:
        raise BadRequest(400, "expected a non-empty list of records")
    out = np.empty((len(records), FEATURE_COUNT), dtype=np.float32)
    for r, record in enumerate(records):
        if not isinstance(record, dict):
            raise BadRequest(400, f"row {r}: expected an object of feature values, got {type(record).__name__}")
        if len(record) != FEATURE_COUNT or any(k not in _INDEX for k in record):
            _column_order(list(record))          # raises, naming missing or unknown features
        for name, value in record.items():
            out[r, _INDEX[name]] = _number(value, r, name)
    return out


def from_columns(columns: dict) -> np.ndarray:
    _column_order(list(columns))            # names a missing or unknown feature first
    lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
    if len(lengths) != 1 or -1 in lengths or 0 in lengths:
        raise BadRequest(400, "every feature must be a non-empty list of the same length")
    return from_split(list(columns), [list(row) for row in zip(*columns.values())])


def from_tensor_like(value) -> np.ndarray:
    """``instances`` / ``inputs``: rows by position, records, or a dict of columns."""
    if isinstance(value, dict):
        if "features" in value and len(value) == 1:
            return from_tensor_like(value["features"])
        return from_columns(value)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return from_records(value)
    if isinstance(value, list) and value and not isinstance(value[0], list):
        return from_positional([value])          # a single row
    return from_positional(value)


def from_json(body: bytes) -> np.ndarray:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"expected a JSON object with one of {list(JSON_KEYS)}")
    keys = [key for key in JSON_KEYS if key in payload]
    if len(keys) != 1:
        raise BadRequest(400, f"expected exactly one of {list(JSON_KEYS)}, got {sorted(payload)}")
    value = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(value, dict):
            raise BadRequest(400, "dataframe_split must be an object with columns and data")
        return from_split(value.get("columns"), value.get("data"))
    if keys[0] == "dataframe_records":
        return from_records(value)
    return from_tensor_like(value)


def from_csv(body: bytes) -> np.ndarray:
    try:
        lines = [row for row in csv.reader(io.StringIO(body.decode("utf-8"))) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadRequest(400, f"body is not valid CSV: {exc}") from None
    if not lines:
        raise BadRequest(400, "empty CSV body")
    columns = None
    if any(cell.strip() in _INDEX for cell in lines[0]):
        columns, lines = [cell.strip() for cell in lines[0]], lines[1:]
    rows = []
    for r, line in enumerate(lines):
        try:
            rows.append([float(cell) for cell in line])
        except ValueError:
            bad = next(cell for cell in line if not _is_float(cell))
            raise BadRequest(400, f"CSV row {r}: {bad!r} is not a number") from None
        if not all(map(math.isfinite, rows[-1])):
            raise BadRequest(400, f"CSV row {r}: values must be finite (nan and inf are no feature values)")
    if not rows:
        raise BadRequest(400, "CSV has a header but no rows")
    return from_split(columns, rows)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def within_float32(rows: np.ndarray) -> np.ndarray:
    """The rows, when no value overflowed: a number past float32's range (JSON's 1e39) is inf in the
    model's input, which scores without an error."""
    if not np.isfinite(rows).all():
        row, column = np.argwhere(~np.isfinite(rows))[0]
        raise BadRequest(400, f"row {row}: feature {FEATURE_NAMES[column]!r} is beyond the float32 range "
                              f"(±{FLOAT32_MAX:.4g})")
    return rows


def parse_invocation(body: bytes, content_type: str) -> np.ndarray:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in ("", "application/json"):
        return from_json(body)
    if kind == "text/csv":
        return from_csv(body)
    raise BadRequest(415, f"unsupported content type {content_type!r}; use application/json or text/csv")


def from_v2(body: bytes) -> tuple[np.ndarray, object]:
    """Open Inference Protocol v2 request -> (matrix, request id)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    tensors = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, dict) for t in tensors):
        raise BadRequest(400, "expected {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}, ...]}")
    names = [t.get("name") for t in tensors]
    if not all(isinstance(name, str) for name in names):
        raise BadRequest(400, f"every input needs a string name, got {names}")
    if names == ["features"]:
        tensor = tensors[0]
        data = tensor.get("data")
        shape = tensor.get("shape")
        if isinstance(data, list) and data and not isinstance(data[0], list):
            if not (isinstance(shape, list) and len(shape) == 2 and shape[1] == FEATURE_COUNT
                    and isinstance(shape[0], int) and shape[0] * FEATURE_COUNT == len(data)):
                raise BadRequest(400, f"input 'features': shape must be [n, {FEATURE_COUNT}] matching the data, "
                                      f"got {shape} for {len(data)} values")
            data = [data[i:i + FEATURE_COUNT] for i in range(0, len(data), FEATURE_COUNT)]
        return from_positional(data), payload.get("id")
    columns = {}
    for tensor in tensors:
        data = tensor.get("data")
        if isinstance(data, list) and data and isinstance(data[0], list):
            data = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in data]
        columns[tensor.get("name")] = data
    return from_columns(columns), payload.get("id")
