"""Composable selection as assets: each shard's moment (``shard_moment[p]``), the pool's (``pool_moment``),
each shard's candidates against it (``shard_candidates[p]``, on any worker like ``gradient_sketch``), and
the merge that ``skmm_selection`` runs in composable mode (:func:`composable_output`).

Everything is cached under ``.skmm/artifacts/composable/<sketch identity>/`` by each shard's sketch
version (:mod:`skmm_pipeline.data.composable`): after a new shard only its moment and candidates are
computed, the others' candidates are reused while the pool's moment stays within the tolerance.
"""

from pathlib import Path
from typing import Mapping

import dagster as dg

from skmm_pipeline.core.hashing import json_hash
from skmm_pipeline.core.sketch_io import identity_hash
from skmm_pipeline.data.composable import (
    cached_candidates,
    cached_moment,
    composable_selection,
    pool_moment_of,
    resolve_mode,
    selection_target,
)
from skmm_pipeline.data.pool import picked_per_shard, reference_rows, selection_record
from skmm_pipeline.defs.ingest import by_shard, shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, Workspace


def cache_dir(workspace: Workspace, record: Mapping) -> Path:
    return workspace.artifacts / "composable" / identity_hash(record["identity"])


def _sketch(record: Mapping) -> dict:
    return {k: record[k] for k in ("path", "data_version", "identity", "rows")}


@dg.asset(
    partitions_def=shard_partitions,
    group_name="select",
    code_version="1",
    kinds={"numpy"},
    description="One shard's sketched second moment (count, sum g g', sum g), streamed from its sketch file.",
)
def shard_moment(context: dg.AssetExecutionContext, gradient_sketch: dict, workspace: Workspace) -> dg.Output[dict]:
    moment, computed = cached_moment(cache_dir(workspace, gradient_sketch), context.partition_key, gradient_sketch)
    return dg.Output(_sketch(gradient_sketch), data_version=dg.DataVersion(gradient_sketch["data_version"]),
                     metadata={"rows": moment.count, "computed": computed})


@dg.asset(
    group_name="select",
    code_version="1",
    kinds={"numpy"},
    description="The pool's sketched second moment: the sum of every shard's, refused across sketch identities.",
)
def pool_moment(context: dg.AssetExecutionContext, shard_moment: dict, workspace: Workspace) -> dg.Output[dict]:
    shard_moment = by_shard(context, "shard_moment", shard_moment)
    first = shard_moment[min(shard_moment)]
    moment, _ = pool_moment_of(cache_dir(workspace, first), shard_moment)
    version = json_hash(sorted((name, rec["data_version"]) for name, rec in shard_moment.items()))
    record = {"shards": {name: dict(rec) for name, rec in sorted(shard_moment.items())}, "rows": moment.count}
    return dg.Output(record, data_version=dg.DataVersion(version),
                     metadata={"rows": moment.count, "shards": len(shard_moment), "trace": float(moment.sigma.trace())})


@dg.asset(
    partitions_def=shard_partitions,
    group_name="select",
    code_version="1",
    kinds={"numpy"},
    ins={"pool_moment": dg.AssetIn(), "gradient_sketch": dg.AssetIn(), "validation_sketch": dg.AssetIn()},
    description="One shard's ceil(c n) candidates chosen against the moment the selection matches (the validation "
    "split's or the pool's, settings.reference); reused while that moment stays within "
    "settings.composable_tolerance of the one they were chosen against (the validation split's does not move).",
)
def shard_candidates(context: dg.AssetExecutionContext, pool_moment: dict, gradient_sketch: dict,
                     validation_sketch: dict, settings: SkmmSettings, workspace: Workspace) -> dg.Output[dict]:
    cache = cache_dir(workspace, gradient_sketch)
    pool, _ = pool_moment_of(cache, pool_moment["shards"])  # from the cached shard moments
    target = selection_target(pool, reference_rows(validation_sketch, gradient_sketch["identity"], settings.method))
    cands, computed = cached_candidates(cache, context.partition_key, gradient_sketch, target, settings.budget,
                                        c=settings.composable_c, seed=settings.seed,
                                        tolerance=settings.composable_tolerance)
    record = {"key": cands.key, "candidates": int(cands.rows.size), "computed": computed}
    return dg.Output(record, data_version=dg.DataVersion(cands.key),
                     metadata={**record, "c": settings.composable_c, "shard_rows": gradient_sketch["rows"]})


def selection_mode(settings: SkmmSettings, gradient_sketch: Mapping[str, Mapping]) -> str:
    rows = sum(int(rec["rows"]) for rec in gradient_sketch.values())
    return resolve_mode(settings.selection_mode, rows, settings.sketch_dim, method=settings.method,
                        outlier_guard=settings.outlier_guard)


def composable_output(gradient_sketch: Mapping[str, Mapping], validation_sketch: Mapping, settings: SkmmSettings,
                      workspace: Workspace) -> dg.Output[dict]:
    """``skmm_selection`` in composable mode: the merge over every shard's (cached) candidates."""
    first = gradient_sketch[min(gradient_sketch)]
    reference = reference_rows(validation_sketch, first["identity"], settings.method)
    res = composable_selection(cache_dir(workspace, first), gradient_sketch, settings.budget, c=settings.composable_c,
                               seed=settings.seed, tolerance=settings.composable_tolerance, reference=reference)
    chosen = res["sample_ids"]
    record = selection_record(
        gradient_sketch, chosen, method=settings.method, budget=settings.budget, seed=settings.seed,
        pool_size=res["pool_size"], identity=res["identity"], diagnostics=res["diagnostics"],
        reference=res["reference"], mode="composable",
        composable={"c": settings.composable_c, "tolerance": settings.composable_tolerance,
                    "candidate_sets": res["candidate_sets"], "recomputed": res["recomputed"],
                    "moment_version": res["moment_version"]})
    shards, fingerprint = record["shards"], record["sketch_fingerprint"]
    d = res["diagnostics"]
    return dg.Output(record, data_version=dg.DataVersion(json_hash(chosen)), metadata={
        "n": len(chosen), "pool_size": res["pool_size"], "method": settings.method, "selection_mode": "composable",
        "reference": res["reference"],
        "moment_ratio": float(d["moment_ratio"]), "select_seconds": float(d["select_seconds"]),
        "candidates": int(d["candidates"]), "candidates_recomputed": dg.MetadataValue.json(res["recomputed"]),
        "picked_per_shard": dg.MetadataValue.json(picked_per_shard(chosen, shards)), "sketch_fingerprint": fingerprint,
        "first_ids": dg.MetadataValue.json(chosen[:20]),
    })
