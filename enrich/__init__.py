"""The enricher: raw tracker hits in, validated, enriched and pseudonymised events out (docs/enrich.md)."""
__version__ = "0.1.0"
