"""The reference discount engine: how a shop plugs into the predictions stream (docs/discount-engine.md)."""
