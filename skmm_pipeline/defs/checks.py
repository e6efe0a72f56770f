"""Asset checks on the selection and on the subset version.

The size/uniqueness and id checks block: a selection that fails them is never versioned.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np

from skmm_pipeline.defs.assets import shard_partitions, skmm_selection, subset_version
from skmm_pipeline.defs.resources import DvcVersioning, SkmmSettings, Workspace


@dg.asset_check(asset=skmm_selection, blocking=True, description="Exactly `budget` selected ids, all distinct.")
def budget_met_with_unique_ids(skmm_selection: dict) -> dg.AssetCheckResult:
    ids = skmm_selection["sample_ids"]
    unique = len(set(ids))
    return dg.AssetCheckResult(
        passed=len(ids) == skmm_selection["budget"] and unique == len(ids),
        metadata={"selected": len(ids), "unique": unique, "budget": skmm_selection["budget"]},
    )


@dg.asset_check(
    asset=skmm_selection, blocking=True, description="Every selected id is a row of a currently registered shard."
)
def ids_in_registered_shards(context: dg.AssetCheckExecutionContext, skmm_selection: dict) -> dg.AssetCheckResult:
    registered = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    rows = skmm_selection["shard_rows"]
    bad = []
    for sid in skmm_selection["sample_ids"]:
        shard, _, row = sid.partition("/")
        if shard not in registered or shard not in rows or not row.isdigit() or int(row) >= rows[shard]:
            bad.append(sid)
    return dg.AssetCheckResult(
        passed=not bad, metadata={"unknown_ids": len(bad), "examples": dg.MetadataValue.json(bad[:10])}
    )


@dg.asset_check(
    asset=skmm_selection,
    description="The subset's second moment along each principal direction of the pool's, relative to the pool's "
    "(min_j v_j' S_subset v_j / lambda_j), is above settings.min_moment_ratio.",
)
def moment_ratio_above_threshold(skmm_selection: dict, settings: SkmmSettings) -> dg.AssetCheckResult:
    ratio = float(skmm_selection["diagnostics"]["moment_ratio"])
    return dg.AssetCheckResult(
        passed=bool(ratio >= settings.min_moment_ratio),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"moment_ratio": ratio, "threshold": settings.min_moment_ratio},
    )


@dg.asset_check(
    asset=skmm_selection,
    additional_ins={"gradient_sketch": dg.AssetIn()},
    description="All shard sketches joined by the selection were made with one sketch identity.",
)
def single_sketch_identity(skmm_selection: dict, gradient_sketch: dict) -> dg.AssetCheckResult:
    from skmm_pipeline.core.sketch_io import canonical_identity, read_sketch_shard

    identities = {name: read_sketch_shard(rec["path"]).identity for name, rec in sorted(gradient_sketch.items())}
    distinct = {json.dumps(i, sort_keys=True) for i in identities.values()}
    passed = len(distinct) == 1 and identities[next(iter(identities))] == canonical_identity(skmm_selection["sketch_identity"])
    return dg.AssetCheckResult(
        passed=passed, metadata={"shards": len(identities), "distinct_identities": len(distinct)}
    )


@dg.asset_check(
    asset=skmm_selection,
    description="Per-class counts of the subset against the pool's; warns when a pool class is missing.",
)
def class_coverage(skmm_selection: dict, workspace: Workspace) -> dg.AssetCheckResult:
    from skmm_pipeline.data.shards import read_shard

    chosen: dict[str, list[int]] = {}
    for sid in skmm_selection["sample_ids"]:
        shard, _, row = sid.partition("/")
        chosen.setdefault(shard, []).append(int(row))
    pool_counts: dict[int, int] = {}
    subset_counts: dict[int, int] = {}
    for shard in skmm_selection["shards"]:
        data = read_shard(Path(workspace.shard_path(shard)))
        labels = data.labels
        if labels is None:
            note = ("regression pool (targets): no class report" if data.task == "regression"
                    else "unlabelled pool: no class report")
            return dg.AssetCheckResult(passed=True, metadata={"note": note})
        for c, k in zip(*np.unique(labels, return_counts=True)):
            pool_counts[int(c)] = pool_counts.get(int(c), 0) + int(k)
        for c in labels[chosen.get(shard, [])]:
            subset_counts[int(c)] = subset_counts.get(int(c), 0) + 1
    missing = sorted(set(pool_counts) - set(subset_counts))
    table = "| class | pool | subset |\n|---|---|---|\n" + "\n".join(
        f"| {c} | {pool_counts[c]} | {subset_counts.get(c, 0)} |" for c in sorted(pool_counts)
    )
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"classes_missing": dg.MetadataValue.json(missing), "coverage": dg.MetadataValue.md(table)},
    )


def _missing_in_remote(repo_root: str) -> list[str]:
    """Outputs of the work tree's ``data.dvc`` whose data the default DVC remote lacks."""
    from dvc.repo import Repo

    with Repo(repo_root) as repo:
        status = repo.status(targets=[str(Path(repo_root) / "data.dvc")], cloud=True)
    return sorted(f"{path}: {state}" for path, state in status.items())


@dg.asset_check(asset=subset_version, description="The version's data is present in the DVC remote.")
def dvc_remote_in_sync(subset_version: dict, dvc: DvcVersioning) -> dg.AssetCheckResult:
    missing = _missing_in_remote(dvc.repo_root)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"tag": subset_version["tag"], "missing_in_remote": dg.MetadataValue.json(missing[:20])},
    )


ALL_CHECKS = [
    budget_met_with_unique_ids,
    ids_in_registered_shards,
    moment_ratio_above_threshold,
    single_sketch_identity,
    class_coverage,
    dvc_remote_in_sync,
]
