"""The OpenAPI 3.1 document served at /openapi.json (hand-written: there is no framework to derive it)."""
from __future__ import annotations

from common.features import FEATURE_COUNT, FEATURE_NAMES

_ERROR = {"description": "The problem, named", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = "application/json"


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict:
    row = {"type": "array", "items": {"type": "number"}, "minItems": FEATURE_COUNT, "maxItems": FEATURE_COUNT,
           "description": f"features in this order: {', '.join(FEATURE_NAMES)}"}
    record = {"type": "object", "required": list(FEATURE_NAMES), "additionalProperties": False,
              "properties": {name: {"type": "number"} for name in FEATURE_NAMES}}
    tensor = {"type": "object", "required": ["name", "data"], "properties": {
        "name": {"type": "string", "description": f"'features' ([n, {FEATURE_COUNT}]) or one feature name"},
        "shape": {"type": "array", "items": {"type": "integer"}}, "datatype": {"type": "string"},
        "data": {"type": "array"}}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Row": row,
        "Record": record,
        "Invocation": {"type": "object", "description": "exactly one of the four keys (MLflow / SageMaker)",
                       "properties": {
                           "dataframe_split": {"type": "object", "properties": {
                               "columns": {"type": "array", "items": {"type": "string", "enum": list(FEATURE_NAMES)}},
                               "data": {"type": "array", "items": {"type": "array"}}}},
                           "dataframe_records": {"type": "array", "items": _ref("Record")},
                           "instances": {"description": "rows, records, or {feature: [values]}"},
                           "inputs": {"description": "rows, records, or {feature: [values]}"}}},
        "Predictions": {"type": "object", "properties": {
            "predictions": {"type": "array", "items": {"type": "number"}, "description": "p_buy per row"},
            "decisions": {"type": "array", "items": {"type": "string", "enum": ["buy", "defer"]}},
            "model_name": {"type": "string"}, "model_version": {"type": "string"}}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "inputs": {"type": "array", "items": tensor}}},
        "InferResponse": {"type": "object", "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": tensor}}},
        "EnrichedEvent": {"type": "object", "required": ["event_id", "collector_tstamp"],
                          "description": "an enriched event as on clickstream-enriched (docs/contracts.md)"},
        "SessionScore": {"type": "object", "properties": {
            "session_id": {"type": "string"}, "events_in_session": {"type": "integer"},
            "purchased": {"type": "boolean"}, "features": record, "p_buy": {"type": "number"},
            "decision": {"type": "string"}, "threshold": {"type": "number"}, "model_name": {"type": "string"},
            "model_version": {"type": "string"}, "feature_version": {"type": "string"}}},
        "Prediction": {"type": "object", "description": "the prediction record of docs/contracts.md",
                       "properties": {key: {} for key in (
                           "schema", "session_id", "event_id", "collector_tstamp", "derived_tstamp", "scored_at", "model_name",
                           "model_version", "feature_version", "p_buy", "decision", "threshold", "latency_us",
                           "events_in_session", "expires_at", "bought_ms")}},
    }


def document() -> dict:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    session = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    errors = {"400": _ERROR, "404": _ERROR, "415": _ERROR, "503": _ERROR}
    paths = {
        "/ping": {"get": {"summary": "Healthy once a model is loaded or the worker runs",
                          "responses": {"200": _json({"type": "object"}), "503": _ERROR}}},
        "/invocations": {"post": {
            "summary": "Score rows (MLflow / SageMaker conventions)",
            "requestBody": {"required": True, "content": {
                _JSON: {"schema": _ref("Invocation")},
                "text/csv": {"schema": {"type": "string", "description": "optional header row of feature names"}}}},
            "responses": {"200": _json(_ref("Predictions")), **errors}}},
        "/v2": {"get": {"summary": "OIP v2 server metadata", "responses": {"200": _json({"type": "object"})}}},
        "/v2/health/live": {"get": {"summary": "OIP v2 liveness", "responses": {"200": _json({"type": "object"})}}},
        "/v2/health/ready": {"get": {"summary": "OIP v2 readiness (a model is loaded)",
                                     "responses": {"200": _json({"type": "object"}), "503": _json({"type": "object"})}}},
        "/v2/models/{name}": {"get": {"summary": "OIP v2 model metadata", "parameters": [name],
                                      "responses": {"200": _json({"type": "object"}), "404": _ERROR}}},
        "/v2/models/{name}/ready": {"get": {"summary": "OIP v2 model readiness", "parameters": [name],
                                            "responses": {"200": _json({"type": "object"}), "404": _ERROR}}},
        "/v2/models/{name}/infer": {"post": {
            "summary": "OIP v2 inference", "parameters": [name],
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("InferRequest")}}},
            "responses": {"200": _json(_ref("InferResponse")), **errors}}},
        "/score/session": {"post": {
            "summary": "Fold a list of enriched events (one session) and score the result",
            "requestBody": {"required": True, "content": {_JSON: {"schema": {
                "oneOf": [{"type": "array", "items": _ref("EnrichedEvent")},
                          {"type": "object", "properties": {"events": {"type": "array",
                                                                       "items": _ref("EnrichedEvent")}}}]}}}},
            "responses": {"200": _json(_ref("SessionScore")), **errors}}},
        "/sessions/{id}/prediction": {"get": {
            "summary": "Latest prediction of a session (DynamoDB)", "parameters": [session],
            "responses": {"200": _json(_ref("Prediction")), "404": _ERROR, "503": _ERROR}}},
        "/sessions/{id}/features": {"get": {
            "summary": "Live features of a session held by this worker", "parameters": [session],
            "responses": {"200": _json({"type": "object"}), "404": _ERROR}}},
        "/models/reload": {"post": {
            "summary": "Load CURRENT (or the given version) now", "security": [{"bearer": []}],
            "requestBody": {"required": False, "content": {_JSON: {"schema": {
                "type": "object", "properties": {"version": {"type": "string"}}}}}},
            "responses": {"200": _json({"type": "object"}), "400": _ERROR, "401": _ERROR, "403": _ERROR,
                          "404": _ERROR, "409": _ERROR}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format"}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}},
    }
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    for route in ("", "/ready", "/infer"):
        paths[f"/v2/models/{{name}}/versions/{{version}}{route}"] = {
            method: {**operation, "summary": f"{operation['summary']} (404 unless the version is the loaded one)",
                     "parameters": [name, version]}
            for method, operation in paths[f"/v2/models/{{name}}{route}"].items()}
    return {"openapi": "3.1.0",
            "info": {"title": "clickstream scorer", "version": "1.0.0",
                     "description": "Buy/defer propensity of browsing sessions, scored with onnxruntime."},
            "paths": paths,
            "components": {"schemas": _schemas(),
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
