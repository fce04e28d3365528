"""Batch side of the pipeline: the lake loader (stream -> S3 Parquet), the lake tools, and training."""
