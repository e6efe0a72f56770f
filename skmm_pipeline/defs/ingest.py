"""Ingest: the pool's shards as ``shards`` partitions (``raw_shard``), and the ``import_data`` job that
brings a local dataset into the workspace by run configuration.

``import_data`` writes pool shards to the workspace's landing folder and registers them as ``shards``
partitions (the shard sensor would find them too); validation/test splits go to the evaluation folder.
Images are transformed for ``settings.backbone`` at ``settings.image_size``.
"""

from dataclasses import fields

import dagster as dg
import numpy as np
from pydantic import Field

from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.core.outliers import lacks_structure
from skmm_pipeline.data.contract import ShardContract, ShardHashes
from skmm_pipeline.data.ingest import ImportRequest, import_dataset
from skmm_pipeline.data.pool import structure_scores
from skmm_pipeline.data.shards import file_sha256, file_signature, read_shard
from skmm_pipeline.defs.metadata import embedded_image
from skmm_pipeline.defs.resources import SkmmSettings, Workspace
from skmm_pipeline.evaluation import EvalData, shard_grid
from skmm_pipeline.models.backbones import default_transform

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")


def by_shard(context, name: str, value) -> dict:
    """Input ``name``, a ``shards``-partitioned asset read by a non-partitioned one (or by a check), as
    ``{shard: value}``. Dagster's file IO managers hand over that mapping when the input spans several
    shards, but the bare value when it spans exactly one (and ``None`` for none): a pool of one shard
    must work like any other."""
    if value is None:
        return {}
    keys = list(context.op_execution_context.asset_partition_keys_for_input(name))
    if len(keys) == 1 and not (isinstance(value, dict) and list(value) == keys):
        return {keys[0]: value}
    return value


def shard_contract(workspace: Workspace, settings: SkmmSettings):
    """What every pool shard must be for this run, from the evaluation splits and the settings."""
    # Shape, task and classes only: the splits' pixels are verified where they are used, not per shard.
    ev = EvalData(workspace.evaluation, verify=False)
    return ShardContract(tuple(ev.val.images.shape[1:]), ev.task, settings.num_classes or ev.num_classes,
                         settings.max_abs_pixel)


@dg.asset(
    partitions_def=shard_partitions,
    group_name="ingest",
    code_version="3",
    kinds={"numpy"},
    description="One delivered shard of the pool, checked against the run's data contract (image shape, task, "
    "label range, pixel range, no copy of another shard); its content hash is the data version. Also scores "
    "each image's spatial structure (neighbouring-pixel correlation) for the outlier guard's input check.",
)
def raw_shard(context: dg.AssetExecutionContext, workspace: Workspace, settings: SkmmSettings) -> dg.Output[dict]:
    name = context.partition_key
    path = workspace.shard_path(name)
    signature = file_signature(path) if path.is_file() else None
    shard = read_shard(path)
    shard_contract(workspace, settings).check(shard)
    sha = file_sha256(path)
    ShardHashes(workspace.artifacts / "shard_hashes.json").admit(name, path, sha)
    kill_point("raw_shard_registered")
    scores = structure_scores(workspace.artifacts / "input_structure", path, name, sha, shard.images)
    record = {"name": name, "path": str(path), "sha256": sha, "rows": int(len(shard.images)), "signature": signature}
    meta = {
        "rows": record["rows"],
        "image_shape": str(tuple(shard.images.shape[1:])),
        "pixels": str(shard.pixels.dtype),  # uint8: 8-bit pixels decoded where the model runs
        "labelled": shard.labels is not None,
        "path": dg.MetadataValue.path(str(path)),
        "sha256": sha,
        "structure_median": float(np.median(scores)),
        "structure_min": float(scores.min()),
    }
    aside = None
    if settings.structure_threshold > 0:
        # Relative to this shard only; the selection applies the check relative to the whole pool.
        aside = lacks_structure(scores, settings.structure_threshold)
        meta["lacking_structure"] = int(aside.sum())
    meta["thumbnails"] = embedded_image(f"shard {name}", shard_grid(path, marked=aside))
    return dg.Output(record, data_version=dg.DataVersion(sha), metadata=meta)


# The defaults are ImportRequest's (data/ingest.py), stated once there.
_REQUEST = {f.name: f.default for f in fields(ImportRequest)}


class ImportConfig(dg.Config):
    source: str = Field(description="cifar10 | imagefolder | csv (image path + numeric target: regression)")
    path: str = Field(description="local path: the CIFAR-10 folder (or its parent), the ImageFolder root, or the CSV file")
    role: str = Field(default=_REQUEST["role"], description="pool: shards into the landing folder; val or test: one evaluation split")
    split: str = Field(default=_REQUEST["split"], description="cifar10 only: train or test")
    name: str = Field(default=_REQUEST["name"], description="shard name prefix (default: from the path)")
    shards: int = Field(default=_REQUEST["shards"], description="number of pool shards")
    val_fraction: float = Field(default=_REQUEST["val_fraction"], description="role pool: hold out this share as val.npz (stratified by class)")
    test_fraction: float = Field(default=_REQUEST["test_fraction"], description="role pool: hold out this share as test.npz (stratified by class)")
    seed: int = Field(default=_REQUEST["seed"], description="fixes the held-out split")
    on_corrupt: str = Field(default=_REQUEST["on_corrupt"], description="skip (count and log unreadable images) or raise")
    overwrite_eval: bool = Field(default=_REQUEST["overwrite_eval"], description="replace an existing val.npz / test.npz")
    replace: bool = Field(default=_REQUEST["replace"], description="replace existing pool shards of the same names "
                          "(recorded as replacing their old content)")
    path_column: str = Field(default=_REQUEST["path_column"], description="csv only")
    target_column: str = Field(default=_REQUEST["target_column"], description="csv only")
    pixels: str = Field(default=_REQUEST["pixels"], description="uint8: store 8-bit pixels and their decode (a quarter "
                        "of the bytes); float32: store the transformed inputs")


@dg.op(description="Write a local dataset into the workspace (pool shards, evaluation splits) and register the shards.")
def import_dataset_op(context: dg.OpExecutionContext, config: ImportConfig, settings: SkmmSettings,
                      workspace: Workspace) -> dict:
    req = ImportRequest(**config.model_dump())
    result = import_dataset(req, workspace.landing, workspace.evaluation,
                            default_transform(settings.backbone, settings.image_size),
                            ShardHashes(workspace.artifacts / "shard_hashes.json"))
    if result.shards:
        context.instance.add_dynamic_partitions(shard_partitions.name, result.shards)
    summary = {"task": result.task, "shards": result.shards, "rows": result.rows, "skipped_images": result.skipped,
               "eval_files": result.eval_files}
    context.log.info(f"imported {sum(result.rows.values())} images ({result.skipped} unreadable, skipped): {summary}")
    context.add_output_metadata({"task": result.task, "shards": dg.MetadataValue.json(result.shards),
                                 "rows": dg.MetadataValue.json(result.rows), "skipped_images": result.skipped,
                                 "eval_files": dg.MetadataValue.json(result.eval_files)})
    return summary


@dg.job(description="Import a local dataset (CIFAR-10, ImageFolder, CSV) as pool shards and/or evaluation splits.")
def import_data():
    import_dataset_op()
