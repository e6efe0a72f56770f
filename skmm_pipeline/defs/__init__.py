"""Dagster definitions: assets, resources and partitions. Thin: the work happens in core/data/models."""
