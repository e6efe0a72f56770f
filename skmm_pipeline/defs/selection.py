"""Selection: ``skmm_selection`` over all shard sketches, and its checks.

The size/uniqueness and id checks block: a selection that fails them is never versioned.
"""

import dagster as dg
import numpy as np

from skmm_pipeline.core.hashing import json_hash
from skmm_pipeline.core.selection import duplicate_rows, select
from skmm_pipeline.data.pool import (
    class_counts,
    load_sketches,
    picked_per_shard,
    reference_rows,
    selection_record,
    single_identity,
    sketch_identities,
    unknown_ids,
    unstructured_rows,
)
from skmm_pipeline.defs.composable import composable_output, selection_mode
from skmm_pipeline.defs.ingest import by_shard, shard_partitions
from skmm_pipeline.defs.metadata import embedded_image, key_values, table
from skmm_pipeline.defs.resources import SkmmSettings, Workspace
from skmm_pipeline.evaluation import class_names, shard_shares, subset_grid


@dg.asset(
    group_name="select",
    code_version="3",
    kinds={"numpy"},
    description="SkMM over all shards: the budget-n subset whose second moment best covers, in the sketch, the "
    "validation split's (settings.reference 'validation', the default) or the pool's ('pool'); joined globally, or "
    "merged from the shards' candidates (settings.selection_mode).",
)
def skmm_selection(
    context: dg.AssetExecutionContext, gradient_sketch: dict, validation_sketch: dict, settings: SkmmSettings,
    workspace: Workspace,
) -> dg.Output[dict]:
    gradient_sketch = by_shard(context, "gradient_sketch", gradient_sketch)
    if selection_mode(settings, gradient_sketch) == "composable":
        return composable_output(gradient_sketch, validation_sketch, settings, workspace)
    G, ids, identity = load_sketches(gradient_sketch)
    reference = reference_rows(validation_sketch, identity, settings.method)
    guard = {}
    if settings.outlier_guard:
        guard["outlier_guard"] = True
        if settings.structure_threshold != 0:  # a negative one is refused by lacks_structure
            files = {name: (workspace.shard_path(name), rec["shard_sha256"]) for name, rec in gradient_sketch.items()}
            guard["exclude"] = unstructured_rows(workspace.artifacts / "input_structure", files, len(ids),
                                                 settings.structure_threshold)
    if reference is not None:
        guard["reference"] = reference
    result = select(settings.method, G, settings.budget, seed=settings.seed, **guard)
    result.diagnostics["selected_duplicates"] = duplicate_rows(G[np.sort(result.indices)])
    chosen = [ids[i] for i in result.indices]
    record = selection_record(gradient_sketch, chosen, method=settings.method, budget=settings.budget,
                              seed=settings.seed, pool_size=len(ids), identity=identity,
                              diagnostics=result.diagnostics, reference="pool" if reference is None else "validation",
                              mode="global")
    shards, fingerprint = record["shards"], record["sketch_fingerprint"]
    per_shard = picked_per_shard(chosen, shards)
    return dg.Output(
        record,
        data_version=dg.DataVersion(json_hash(chosen)),
        metadata={
            "n": len(chosen),
            "pool_size": len(ids),
            "method": settings.method,
            "reference": record["reference"],
            "duplicate_rows": int(result.diagnostics["duplicate_rows"]),
            "moment_ratio": round(float(result.diagnostics["moment_ratio"]), 4),
            "select_seconds": round(float(result.diagnostics["select_seconds"]), 3),
            "outliers_excluded": int(result.diagnostics.get("outliers_excluded", 0)),
            "unstructured_excluded": int(result.diagnostics.get("rows_excluded", 0)),
            "unstructured_examples": dg.MetadataValue.json(
                [ids[i] for i in np.flatnonzero(guard["exclude"])[:20]] if "exclude" in guard else []),
            "picked_per_shard": dg.MetadataValue.json(per_shard),
            "sketch_fingerprint": fingerprint,
            "first_ids": dg.MetadataValue.json(chosen[:20]),
            "diagnostics": key_values(result.diagnostics),
            "subset_grid": embedded_image("selected subset", subset_grid(
                chosen, {name: workspace.shard_path(name) for name in shards},
                title=f"{settings.method}: {len(chosen)} of {len(ids)} selected")),
        },
    )


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
    bad = unknown_ids(skmm_selection["sample_ids"], registered, skmm_selection["shard_rows"])
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
def single_sketch_identity(context: dg.AssetCheckExecutionContext, skmm_selection: dict,
                           gradient_sketch: dict) -> dg.AssetCheckResult:
    identities = sketch_identities(by_shard(context, "gradient_sketch", gradient_sketch))
    passed, distinct = single_identity(identities, skmm_selection["sketch_identity"])
    return dg.AssetCheckResult(passed=passed, metadata={"shards": len(identities), "distinct_identities": distinct})


@dg.asset_check(
    asset=skmm_selection,
    description="Per-class counts of the subset against the pool's; warns when a pool class is missing.",
)
def class_coverage(skmm_selection: dict, workspace: Workspace) -> dg.AssetCheckResult:
    shard_paths = {shard: workspace.shard_path(shard) for shard in skmm_selection["shards"]}
    pool_counts, subset_counts, note = class_counts(skmm_selection["sample_ids"], shard_paths)
    if note:
        return dg.AssetCheckResult(passed=True, metadata={"note": note})
    names = class_names(shard_paths)  # the task's own class names where the shards carry them
    name = lambda c: names.get(c, str(c))  # noqa: E731
    missing = [name(c) for c in sorted(set(pool_counts) - set(subset_counts))]
    rows = [{"class": name(c), "pool": pool_counts[c], "subset": subset_counts.get(c, 0)} for c in sorted(pool_counts)]
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"classes_missing": dg.MetadataValue.json(missing), "coverage": table(rows)},
    )


@dg.asset_check(
    asset=skmm_selection,
    description="No shard is picked far beyond its share of the pool: warns when a shard's picks exceed its share "
    "of rows by more than 3 binomial standard deviations (e.g. a shifted or duplicated delivery pulling the subset).",
)
def picks_follow_shard_sizes(skmm_selection: dict) -> dg.AssetCheckResult:
    rows = shard_shares(picked_per_shard(skmm_selection["sample_ids"], skmm_selection["shards"]),
                        skmm_selection["shard_rows"])
    over = [r["shard"] for r in rows if r["over_picked"]]
    return dg.AssetCheckResult(
        passed=not over, severity=dg.AssetCheckSeverity.WARN,
        metadata={"over_picked": dg.MetadataValue.json(over), "shares": table(rows)},
    )


@dg.asset_check(
    asset=skmm_selection,
    description="The pool's sketch has no exactly repeated rows (the same image delivered twice): warns with how "
    "many, and how many of the picks repeat one another.",
)
def no_duplicate_rows(skmm_selection: dict) -> dg.AssetCheckResult:
    diagnostics = skmm_selection["diagnostics"]
    pool, picked = int(diagnostics.get("duplicate_rows", 0)), int(diagnostics.get("selected_duplicates", 0))
    return dg.AssetCheckResult(
        passed=pool == 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"duplicate_rows": pool, "selected_duplicates": picked},
    )
