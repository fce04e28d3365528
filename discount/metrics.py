"""Prometheus metrics of the discount engine, on their own registry (several engines may share a process in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from common.service import TIME_TO_ACT_BUCKETS


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)    # process_start_time_seconds: a crash loop shows as its changes()
        self.predictions = Counter("discount_predictions_total", "Predictions read, by outcome "
                                   "(offered, held_out, already_offered, bought, budget_exhausted, too_early, "
                                   "below_threshold, above_ceiling, stale, invalid)", ["outcome"], registry=self.registry)
        # Every outcome's series exists from the start, at 0: rate() and increase() miss the first
        # increments of a series that appears with them (a restart's backlog of stale predictions).
        for outcome in ("offered", "held_out", "already_offered", "bought", "budget_exhausted", "too_early", "below_threshold",
                        "above_ceiling", "stale", "invalid"):
            self.predictions.labels(outcome)
        self.offers = Counter("discount_offers_total", "Offers written", registry=self.registry)
        self.write_errors = Counter("discount_write_errors_total", "Failed (retried) offer writes",
                                    registry=self.registry)
        self.budget_left = Gauge("discount_budget_remaining", "Offers left in this hour's budget",
                                 registry=self.registry)
        self.lag_ms = Gauge("discount_consumer_lag_ms", "Milliseconds behind the tip of the predictions stream",
                            registry=self.registry)
        self.checkpoint_age = Gauge("discount_checkpoint_age_seconds",
                                    "How long the oldest predictions read have waited for a checkpoint",
                                    registry=self.registry)
        self.shards = Gauge("discount_shards_owned", "Shards of the predictions stream this process reads",
                            registry=self.registry)
        self.decision_seconds = Histogram("discount_offer_seconds", "Time to decide and write one offer",
                                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                          registry=self.registry)
        # The pipeline's time to act: from the collector's receipt of the click to the engine reading its
        # prediction (every stage's read interval, the collector's linger, any lag). Clocks of two hosts.
        self.prediction_age = Histogram("discount_prediction_age_seconds",
                                        "Age of a prediction when read: the engine's clock minus its click's "
                                        "collector_tstamp", buckets=TIME_TO_ACT_BUCKETS, registry=self.registry)

    def serve(self, host: str, port: int):
        """Start /metrics in a daemon thread; returns the server (``.shutdown()``) and its port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]
