"""Prometheus metrics of the worker, served on ``metrics_host:metrics_port`` when the port is set (0 = off)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

RECORDS = Counter("enrich_records_total", "Raw records read and handled")
GOOD = Counter("enrich_events_total", "Enriched events written to the enriched stream")
BAD = Counter("enrich_bad_rows_total", "Bad rows written to the bad stream, by type", ["type"])
DUPLICATES = Counter("enrich_duplicates_dropped_total", "Exact duplicates dropped within the dedupe window")
RETRIES = Counter("enrich_write_retries_total", "Output writes retried after a partial or total failure")
LAG = Gauge("enrich_lag_ms", "Milliseconds behind the newest raw record (max over owned shards)")
CHECKPOINT_AGE = Gauge("enrich_checkpoint_age_seconds", "How long the oldest records read have waited for a checkpoint")
SHARDS_OWNED = Gauge("enrich_shards_owned", "Shards of the raw stream this worker holds leases for")
# A failed fetch is otherwise only in each bad row's lookupHistory: without this an unreachable registry
# looks like a broken tracker (every event a schema_violations bad row). One label value per configured registry.
REGISTRY_ERRORS = Counter("enrich_registry_errors_total", "Schema fetches that failed (unreachable, 5xx, timeout, "
                          "unreadable answer), by registry", ["registry"])
