"""The scorer's settings: ``[scorer]`` in CLICKSTREAM_CONFIG or CLICKSTREAM_<FIELD> variables."""
from __future__ import annotations

from dataclasses import dataclass

from common.config import AwsSettings, ConfigError, require_batch_limit, require_positive, require_renewed_in_time
from common.registry import DEFAULT_MODEL

EMIT_POLICIES = ("every", "change", "every_n")


@dataclass(frozen=True)
class ScorerSettings(AwsSettings):
    host: str = "127.0.0.1"
    port: int = 8081
    run_worker: bool = True             # consume the enriched stream in a background thread
    run_api: bool = True                # serve the HTTP API
    model_name: str = DEFAULT_MODEL
    model_poll_s: float = 10.0          # how often CURRENT is checked for a new version
    shadow_version: str = ""            # a challenger scored alongside the champion, logged only
    emit: str = "every"                 # every | change (decision flips) | every_n
    emit_every_n: int = 5
    flush_ms: int = 100                 # longest a prediction waits in the worker before it is written
    session_timeout_s: int = 1800       # inactivity (by event time) after which a session ends
    max_sessions: int = 200_000         # memory cap; least recently seen sessions are evicted
    replay_max_s: int = 7200            # a restart rebuilds sessions begun this long before the newest event
    dedupe_window: int = 256            # event ids remembered per session to drop redeliveries
    drift_window_s: int = 3600          # live scores compared with the model's score_reference (scorer_score_psi)
    prediction_ttl_hours: int = 24      # DynamoDB TTL (expires_at) of the latest prediction
    # The latest prediction per session in predictions_table, for GET /sessions/{id}/prediction: a
    # conditional write per session and flush, most of the pipeline's AWS bill at high rates.
    lookup_table: bool = True
    batch_limit: int = 1000             # records per GetRecords
    read_interval_s: float = 0.4        # per shard; Kinesis' 5 reads/s are shared with the lake loader
    lease_ms: int = 10_000
    # PutRecords connect/read timeout of the predictions stream; raised to 2 and 3 times this while the
    # stream answers slowly (common.producer.output_producer)
    output_timeout_s: float = 10.0
    write_threads: int = 8              # parallel conditional puts into the predictions table
    reload_token: str = ""              # bearer token for POST /models/reload; empty = disabled
    log_level: str = "INFO"

    @property
    def lookup_table_name(self) -> str | None:
        """The table the worker writes and the lookup reads; None with lookup_table off."""
        return self.predictions_table if self.lookup_table else None

    def validate(self) -> None:
        if not (self.run_worker or self.run_api):
            raise ConfigError("CLICKSTREAM_RUN_WORKER, CLICKSTREAM_RUN_API: both off leaves the scorer nothing to "
                              "do; keep at least one (--worker or --api)")
        if self.emit not in EMIT_POLICIES:
            raise ConfigError(f"CLICKSTREAM_EMIT: expected one of {', '.join(EMIT_POLICIES)}, got {self.emit!r}")
        require_positive(self, "port", "model_poll_s", "emit_every_n", "flush_ms", "session_timeout_s",
                         "replay_max_s", "max_sessions", "dedupe_window", "drift_window_s", "prediction_ttl_hours", "lease_ms",
                         "write_threads", "read_interval_s", "output_timeout_s")
        require_renewed_in_time(self, "lease_ms", "read_interval_s")
        require_batch_limit(self, "batch_limit")
