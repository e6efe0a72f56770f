"""Dagster definitions by domain: ingest, sketch, selection, versioning, evaluation (and the benchmark),
automation (sensors and schedules), and the resources. Thin: the work happens in core/data/models/evaluation."""

import warnings

import dagster as dg

# Content-hash data versions on outputs are how unchanged shards are recognised; the API is marked beta.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
