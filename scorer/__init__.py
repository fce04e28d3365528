"""The scorer: per-session streaming predictions and a model-serving HTTP API (see docs/scorer.md)."""
