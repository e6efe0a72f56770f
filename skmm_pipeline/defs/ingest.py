"""The ``import_data`` job: bring a local dataset into the workspace by run configuration.

Pool shards land in the workspace's landing folder and are registered as ``shards`` partitions (the
shard sensor would find them too); validation/test splits go to the evaluation folder. Images are
transformed for ``settings.backbone`` at ``settings.image_size``.
"""

import dagster as dg
from pydantic import Field

from skmm_pipeline.defs.assets import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, Workspace


class ImportConfig(dg.Config):
    source: str = Field(description="cifar10 | imagefolder | csv (image path + numeric target: regression)")
    path: str = Field(description="local path: the CIFAR-10 folder (or its parent), the ImageFolder root, or the CSV file")
    role: str = Field(default="pool", description="pool: shards into the landing folder; val or test: one evaluation split")
    split: str = Field(default="train", description="cifar10 only: train or test")
    name: str = Field(default="", description="shard name prefix (default: from the path)")
    shards: int = Field(default=1, description="number of pool shards")
    val_fraction: float = Field(default=0.0, description="role pool: hold out this share as val.npz (stratified by class)")
    test_fraction: float = Field(default=0.0, description="role pool: hold out this share as test.npz (stratified by class)")
    seed: int = Field(default=0, description="fixes the held-out split")
    on_corrupt: str = Field(default="skip", description="skip (count and log unreadable images) or raise")
    overwrite_eval: bool = Field(default=False, description="replace an existing val.npz / test.npz")
    path_column: str = Field(default="path", description="csv only")
    target_column: str = Field(default="target", description="csv only")


@dg.op(description="Write a local dataset into the workspace (pool shards, evaluation splits) and register the shards.")
def import_dataset_op(context: dg.OpExecutionContext, config: ImportConfig, settings: SkmmSettings,
                      workspace: Workspace) -> dict:
    from skmm_pipeline.data.ingest import ImportRequest, import_dataset
    from skmm_pipeline.models.backbones import default_transform

    req = ImportRequest(**config.model_dump())
    result = import_dataset(req, workspace.landing, workspace.evaluation,
                            default_transform(settings.backbone, settings.image_size))
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
