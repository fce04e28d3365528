"""Snowplow-compatible collector: tracker hits in, raw records out, through an on-disk spool."""

__version__ = "0.1.0"
COLLECTOR_NAME = f"clickstream-collector/{__version__}"
