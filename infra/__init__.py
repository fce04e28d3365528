"""Provisioning of the streams, bucket and tables (idempotent), plus IaC for real AWS."""
