"""Settings of the discount engine: CLICKSTREAM_* variables or the [discount] section of the config file."""
from __future__ import annotations

import dataclasses

from common.config import (
    AwsSettings,
    ConfigError,
    require_batch_limit,
    require_non_negative,
    require_positive,
    require_renewed_in_time,
)

# How long the predictions stream keeps records (Kinesis' default; infra/provision.py and the template keep it).
PREDICTIONS_RETENTION_HOURS = 24


@dataclasses.dataclass(frozen=True)
class DiscountSettings(AwsSettings):
    # Offer to sessions with real interest (p_buy at or above the threshold) that the model does not
    # already see buying (at or below the ceiling): a discount for a sure buyer only gives margin away.
    offer_threshold: float = 0.3
    offer_ceiling: float = 1.0
    min_events: int = 3                  # the first clicks of a session say too little
    # A prediction for a click older than this gets no offer: read after an outage or from a fresh
    # start (which reads the stream from its start), its visitor has gone, and the offer would spend
    # the hour's budget on nobody. The scorer's session timeout: by then the session is over.
    max_prediction_age_s: float = 1800.0
    budget_per_hour: int = 100           # offers per UTC hour, shared by every engine process
    # No offer to a session the scorer has marked as bought in predictions_table since the prediction
    # (needs dynamodb:ConditionCheckItem and GetItem on it); off where the engine may not read it.
    check_purchases: bool = True
    # The control group: this share of the sessions (by a hash of the session id) gets no offer when it
    # qualifies, only a holdout row; without one, what the offers change cannot be told (discount.uplift).
    holdout_percent: float = 0.0
    discount_percent: int = 10
    offer_ttl_hours: int = 24
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9104
    batch_limit: int = 500
    read_interval_s: float = 0.25        # per shard; Kinesis allows 5 GetRecords/s per shard
    lease_ms: int = 10_000               # a peer takes over a dead engine's shards after this long
    log_level: str = "INFO"

    def validate(self) -> None:
        if self.discount_percent > 100:
            raise ConfigError(f"CLICKSTREAM_DISCOUNT_PERCENT: expected at most 100, got {self.discount_percent}")
        require_positive(self, "budget_per_hour", "discount_percent", "offer_ttl_hours", "read_interval_s",
                         "max_prediction_age_s", "lease_ms")
        require_renewed_in_time(self, "lease_ms", "read_interval_s")
        require_batch_limit(self, "batch_limit")
        require_non_negative(self, "min_events")
        if self.offer_ttl_hours < PREDICTIONS_RETENTION_HOURS:
            # The offer row is what refuses a second offer: it must outlive the predictions a replay re-reads.
            raise ConfigError(f"CLICKSTREAM_OFFER_TTL_HOURS: expected at least {PREDICTIONS_RETENTION_HOURS} "
                              f"(the predictions stream's retention), got {self.offer_ttl_hours}")
        if not 0.0 <= self.holdout_percent <= 100.0:
            raise ConfigError(f"CLICKSTREAM_HOLDOUT_PERCENT: expected a percentage within 0..100, got {self.holdout_percent}")
        for name in ("offer_threshold", "offer_ceiling"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"CLICKSTREAM_{name.upper()}: expected a probability within 0..1, "
                                  f"got {getattr(self, name)}")
        if self.offer_threshold > self.offer_ceiling:
            raise ConfigError("CLICKSTREAM_OFFER_THRESHOLD: must not be above CLICKSTREAM_OFFER_CEILING "
                              f"({self.offer_threshold} > {self.offer_ceiling})")
