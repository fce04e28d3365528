"""Collector settings: `[collector]` in the TOML file, or CLICKSTREAM_<FIELD> variables."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import AwsSettings, ConfigError, load, require_at_most, require_non_negative, require_positive

FSYNC_POLICIES = ("always", "interval", "never")
SINKS = ("kinesis", "memory")


@dataclasses.dataclass(frozen=True)
class CollectorSettings(AwsSettings):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_concurrent_requests: int = 512         # per worker; bounds memory (each may hold a 2 MiB body)
    sink: str = "kinesis"                      # kinesis | memory (benchmarks only: records are discarded)
    # Batching towards the stream: a batch leaves after linger_ms, or earlier when full.
    linger_ms: int = 200
    batch_records: int = 500
    batch_bytes: int = 4 * 1024 * 1024
    sink_timeout_s: float = 5.0                # boto3 connect/read timeout; our loop retries
    sink_timeout_max_s: float = 30.0           # the longest read timeout, raised while the stream answers slowly
    shutdown_timeout_s: float = 10.0           # how long SIGTERM waits for the stream before leaving it spooled
    # The spool (write-ahead log) every hit goes through.
    spool_dir: Path = Path(".run/collector-spool")
    spool_max_bytes: int = 1024 * 1024 * 1024  # undelivered bytes before answering 503
    spool_segment_bytes: int = 64 * 1024 * 1024
    spool_segment_max_age_s: float = 60.0      # a newer segment after this long: delivered hits leave the disk
    fsync: str = "interval"                    # always | interval | never
    fsync_interval_ms: int = 1000
    retry_after_s: int = 30
    # Request limits.
    max_payload_bytes: int = 1_000_000         # one record; bigger becomes a size_violation bad row
    max_request_bytes: int = 2 * 1024 * 1024   # body (compressed and decompressed); bigger is a 413
    body_timeout_s: float = 10.0               # a body not whole by then is a 408, and its slot is free again
    bad_payload_keep_bytes: int = 50_000       # how much of an oversized payload the bad row keeps
    # Identity.
    # Proxies in front that append the peer they saw to X-Forwarded-For (1: the ALB of
    # deploy/cloudformation.yaml); the client's IP is that many entries from the right, 0 ignores the header.
    trusted_proxy_hops: int = 1
    cookie_name: str = "sp"
    cookie_days: int = 365
    cookie_domains: tuple[str, ...] = ()
    cookie_fallback_domain: str = ""
    cookie_secure: bool = True
    dnt_cookie_name: str = ""                  # empty disables the opt-out cookie
    dnt_cookie_value: str = ""
    # Paths.
    custom_paths: tuple[str, ...] = ()         # "/from=/to" items; /to is one of the standard paths
    redirect_domains: tuple[str, ...] = ()     # empty disables /r/tp2
    cors_max_age_s: int = 3600

    def validate(self) -> None:
        if self.sink not in SINKS:
            raise ConfigError(f"CLICKSTREAM_SINK: expected one of {', '.join(SINKS)}, got {self.sink!r}")
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"CLICKSTREAM_FSYNC: expected one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}")
        require_positive(self, "port", "workers", "max_concurrent_requests", "linger_ms", "batch_records", "batch_bytes", "sink_timeout_s",
                         "sink_timeout_max_s", "spool_max_bytes", "spool_segment_bytes", "spool_segment_max_age_s", "fsync_interval_ms", "retry_after_s",
                         "max_payload_bytes", "body_timeout_s", "max_request_bytes", "bad_payload_keep_bytes", "cookie_days")
        require_non_negative(self, "trusted_proxy_hops", "shutdown_timeout_s", "cors_max_age_s")
        if self.sink_timeout_max_s < self.sink_timeout_s:
            raise ConfigError(f"CLICKSTREAM_SINK_TIMEOUT_MAX_S: expected at least sink_timeout_s ({self.sink_timeout_s}), "
                              f"got {self.sink_timeout_max_s!r}")
        require_at_most(self, "workers", 256, "one process per core")
        require_at_most(self, "max_concurrent_requests", 65_536, "per worker; each may hold a request body")
        require_at_most(self, "spool_segment_bytes", 1 << 30, "a segment is written out in full before use")
        if self.max_payload_bytes > 1_000_000:
            # Kinesis takes 1 MiB per record including the partition key; keep headroom for it.
            raise ConfigError("CLICKSTREAM_MAX_PAYLOAD_BYTES: expected at most 1000000 (Kinesis record limit)")
        if self.bad_payload_keep_bytes > 100_000:
            # Escaped once more inside its bad row, a longer payload could outgrow a Kinesis record.
            raise ConfigError("CLICKSTREAM_BAD_PAYLOAD_KEEP_BYTES: expected at most 100000")
        if self.batch_records > 500:
            raise ConfigError("CLICKSTREAM_BATCH_RECORDS: expected at most 500 (PutRecords limit)")
        for key in ("redirect_domains", "cookie_domains"):
            # An empty or dot-only entry would match every host ending in a dot: an open redirect.
            if any(not domain.strip(".") for domain in getattr(self, key)):
                raise ConfigError(f"CLICKSTREAM_{key.upper()}: expected domain names, got {getattr(self, key)!r}")
        self.path_map()

    def path_map(self) -> dict[str, str]:
        """Custom paths as {from: to}; raises ConfigError naming the bad item."""
        mapping = {}
        for item in self.custom_paths:
            source, sep, target = item.partition("=")
            if not sep or not source.startswith("/") or target not in STANDARD_PATHS:
                raise ConfigError(f"CLICKSTREAM_CUSTOM_PATHS: expected '/from=/to' with /to one of "
                                  f"{', '.join(STANDARD_PATHS)}, got {item!r}")
            mapping[source] = target
        return mapping


TP2 = "/com.snowplowanalytics.snowplow/tp2"
IGLU_WEBHOOK = "/com.snowplowanalytics.iglu/v1"
STANDARD_PATHS = ("/i", "/ice.png", TP2, "/r/tp2", IGLU_WEBHOOK)


def settings(**overrides) -> CollectorSettings:
    return load(CollectorSettings, section="collector", **overrides)
