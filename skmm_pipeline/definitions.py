"""The one Dagster entry point: ``dagster dev -m skmm_pipeline.definitions``."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from skmm_pipeline.defs.assets import ALL_ASSETS, shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, default_resources


# The three units of work a user runs: pretrain (rarely), sketch one shard (per delivery),
# re-select over everything (after new shards, or on a schedule).
JOBS = [
    dg.define_asset_job("pretrain", selection=["pretrained_model"]),
    dg.define_asset_job("sketch_shard", selection=["raw_shard", "gradient_sketch"], partitions_def=shard_partitions),
    dg.define_asset_job("reselect", selection=["skmm_selection", "subset_version", "finetune_eval"]),
]


def build_definitions(
    root: Path | None = None, remote_url: str = "", settings: SkmmSettings | None = None
) -> dg.Definitions:
    """Definitions whose workspace, DVC repo and MLflow store live under ``root`` (default: the project)."""
    resources = default_resources(root, remote_url)
    if settings is not None:
        resources["settings"] = settings
    return dg.Definitions(
        assets=ALL_ASSETS,
        resources=resources,
        jobs=JOBS,
    )


defs = build_definitions()
