"""Experiment tracking (MLflow) with explicit run ids; runs always end FINISHED or FAILED."""
