"""The one Dagster entry point: ``dagster dev -m skmm_pipeline.definitions``."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from skmm_pipeline.defs.assets import ALL_ASSETS, shard_partitions
from skmm_pipeline.defs.benchmark_assets import BENCHMARK_ASSETS
from skmm_pipeline.defs.checks import ALL_CHECKS
from skmm_pipeline.defs.ingest import import_data
from skmm_pipeline.defs.resources import SkmmSettings, default_resources
from skmm_pipeline.defs.sensors import reselect_schedule, shard_sensor

# The units of work a user runs: import a dataset (once per delivery, by run config), pretrain
# (rarely), sketch one shard (per delivery), re-select over everything (after new shards, or on a
# schedule), and compare every selection method (benchmark: minutes, so kept out of reselect).
JOBS = [
    import_data,
    dg.define_asset_job("pretrain", selection=["pretrained_model"]),
    dg.define_asset_job("sketch_shard", selection=["raw_shard", "gradient_sketch"], partitions_def=shard_partitions),
    dg.define_asset_job("reselect", selection=["skmm_selection", "subset_version", "finetune_eval"]),
    dg.define_asset_job("benchmark", selection=["selection_benchmark"]),
]


def executor_from_env() -> dg.ExecutorDefinition | None:
    """``SKMM_EXECUTOR=celery`` runs steps on Celery workers; anything else keeps Dagster's default
    (one process per step on this machine).

    The broker and result backend come from ``SKMM_CELERY_BROKER`` / ``SKMM_CELERY_BACKEND``
    (default ``redis://127.0.0.1:6379/0`` and ``/1``). Workers are started separately, with the same
    broker, e.g. ``dagster-celery worker start -A dagster_celery.app -y celery.yaml``.
    """
    choice = os.environ.get("SKMM_EXECUTOR", "").strip().lower()
    if choice in ("", "multiprocess", "default"):
        return None
    if choice != "celery":
        raise ValueError(f"SKMM_EXECUTOR must be 'multiprocess' or 'celery', got {choice!r}")
    from dagster_celery import celery_executor

    return celery_executor.configured(
        {
            "broker": {"env": "SKMM_CELERY_BROKER"} if os.environ.get("SKMM_CELERY_BROKER") else "redis://127.0.0.1:6379/0",
            "backend": {"env": "SKMM_CELERY_BACKEND"} if os.environ.get("SKMM_CELERY_BACKEND") else "redis://127.0.0.1:6379/1",
        }
    )


def build_definitions(
    root: Path | None = None, remote_url: str = "", settings: SkmmSettings | None = None
) -> dg.Definitions:
    """Definitions whose workspace, DVC repo and MLflow store live under ``root`` (default: the project)."""
    resources = default_resources(root, remote_url)
    if settings is not None:
        resources["settings"] = settings
    return dg.Definitions(
        assets=ALL_ASSETS + BENCHMARK_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=JOBS,
        sensors=[shard_sensor],
        schedules=[reselect_schedule],
        resources=resources,
        executor=executor_from_env(),
    )


defs = build_definitions()
