"""Pure computation: numpy and torch only. Nothing here knows about Dagster, DVC, MLflow or files."""
