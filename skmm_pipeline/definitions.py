"""The one Dagster entry point: ``dagster dev -m skmm_pipeline.definitions``."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from skmm_pipeline.core.errors import ConfigError
from skmm_pipeline.defs import benchmark_assets, composable, evaluation, ingest, selection, sketch, versioning
from skmm_pipeline.defs.automation import reselect_schedule, shard_sensor
from skmm_pipeline.defs.ingest import import_data, shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, default_resources

# The pipeline's modules, in the order of the graph: raw_shard[p] -> gradient_sketch[p] -> skmm_selection
# -> subset_version -> finetune_eval; the benchmark's assets apart (a job of their own), and the composable
# selection's gradient_sketch[p] -> shard_moment[p] -> pool_moment -> shard_candidates[p], materialized
# ahead of skmm_selection (any worker) when a pool is selected composably (settings.selection_mode).
PIPELINE_MODULES = [ingest, sketch, selection, versioning, evaluation]
PIPELINE_ASSETS = dg.load_assets_from_modules(PIPELINE_MODULES)
COMPOSABLE_ASSETS = dg.load_assets_from_modules([composable])
BENCHMARK_ASSETS = dg.load_assets_from_modules([benchmark_assets])
ASSET_CHECKS = dg.load_asset_checks_from_modules(PIPELINE_MODULES + [benchmark_assets])

# The units of work a user runs: import a dataset (once per delivery, by run config), pretrain
# (rarely), sketch one shard (per delivery), re-select over everything (after new shards, or on a
# schedule), and compare every selection method (benchmark: minutes, so kept out of reselect).
JOBS = [
    import_data,
    dg.define_asset_job("pretrain", selection=["pretrained_model"]),
    dg.define_asset_job("sketch_shard", selection=["raw_shard", "gradient_sketch"], partitions_def=shard_partitions),
    dg.define_asset_job("reselect", selection=["validation_sketch", "skmm_selection", "subset_version", "finetune_eval"]),
    dg.define_asset_job("benchmark", selection=["method_benchmark"]),
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
        raise ConfigError(f"SKMM_EXECUTOR must be 'multiprocess' or 'celery', got {choice!r}")
    # An optional dependency, needed only when SKMM_EXECUTOR=celery: imported here, not at module top.
    from dagster_celery import celery_executor  # noqa: PLC0415

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
        assets=[*PIPELINE_ASSETS, *COMPOSABLE_ASSETS, *BENCHMARK_ASSETS],
        asset_checks=ASSET_CHECKS,
        jobs=JOBS,
        sensors=[shard_sensor],
        schedules=[reselect_schedule],
        resources=resources,
        executor=executor_from_env(),
    )


defs = build_definitions()
