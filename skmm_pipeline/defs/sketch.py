"""Sketching: the pretrained model (``pretrained_model``) and each shard's gradient sketch
(``gradient_sketch[p]``), made by the run's one sketcher configured by the settings."""

import time
from pathlib import Path

import dagster as dg

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.core.gradients import resolve_layers
from skmm_pipeline.core.hashing import json_hash
from skmm_pipeline.core.sketch_engine import SketchConfig, calibrate_block_scales, resolve_device
from skmm_pipeline.core.sketch_io import SketchShardWriter, identity_hash
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.data.loader import sketch_shard
from skmm_pipeline.data.pool import read_unchanged_shard
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, Workspace
from skmm_pipeline.evaluation import EvalData, check_regression_model
from skmm_pipeline.models.backbones import build_backbone, load_backbone, model_id, save_backbone
from skmm_pipeline.models.small_cnn import accuracy, pretrain


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"pytorch"},
    description="The pretrained backbone whose head is finetuned: the embedded small CNN trained on digits 0-4, "
    "or a torchvision backbone with local weights (settings.backbone).",
)
def pretrained_model(context: dg.AssetExecutionContext, settings: SkmmSettings, workspace: Workspace) -> dg.Output[dict]:
    device = resolve_device(settings.device)
    meta: dict = {"device": str(device), "backbone": settings.backbone}
    t0 = time.perf_counter()
    if settings.backbone == "small_cnn":
        data = load_digits_transfer()
        model = pretrain(
            data.source_train.images, data.source_train.labels, data.num_classes,
            epochs=settings.pretrain_epochs, seed=settings.seed, device=device,
        )
        meta["source_val_accuracy"] = accuracy(model, data.source_val.images, data.source_val.labels, device)
        meta["train_seconds"] = time.perf_counter() - t0
    else:
        num_classes = settings.num_classes or EvalData(workspace.evaluation).num_classes
        weights = settings.backbone_weights or None
        model = build_backbone(settings.backbone, num_classes, weights=weights, seed=settings.seed,
                               image_size=settings.image_size)
        meta["weights"] = str(weights)
    mid = model_id(model)
    path = workspace.artifacts / "models" / f"{settings.backbone}-{mid}.pt"
    atomic_write_bytes(path, save_backbone(model), fault="pretrained_weights")
    record = {
        "path": str(path), "model_id": mid, "arch": settings.backbone,
        "feature_dim": model.feature_dim, "num_classes": model.num_classes,
    }
    meta.update({"model_id": mid, "num_classes": model.num_classes, "path": dg.MetadataValue.path(str(path))})
    return dg.Output(record, data_version=dg.DataVersion(mid), metadata=meta)


def block_scales_for(model, settings: SkmmSettings, workspace: Workspace, device) -> dict[str, float] | None:
    """FT-2 block scales (``core.sketch_engine.calibrate_block_scales``) on a fixed calibration set: the
    first ``settings.calibration_rows`` validation images, label-free. Every shard gets the same scales
    (same model, same rows), so they are part of one sketch identity. ``None`` for one-block sets."""
    if not settings.balance_blocks or len(resolve_layers(model, settings.sketch_layers)) < 2:
        return None
    rows = EvalData(workspace.evaluation).val.images[: max(1, settings.calibration_rows)]
    return calibrate_block_scales(model, rows, layers=settings.sketch_layers, label_mode="expected",
                                  seed=settings.seed, device=device)


def make_sketcher(model, settings: SkmmSettings, workspace: Workspace, model_id: str, device):
    """The run's one :class:`GradientSketcher`, configured by the settings."""
    config = SketchConfig(
        settings.sketch_dim, kind=settings.sketch_kind, layers=settings.sketch_layers, label_mode=settings.label_mode,
        draws=settings.label_draws, block_scales=block_scales_for(model, settings, workspace, device),
        model_id=model_id, precision=settings.precision, block_rows=settings.sketch_block_rows or None,
    )
    return config.sketcher(model, settings.seed, device)


@dg.asset(
    partitions_def=shard_partitions,
    group_name="skmm",
    code_version="3",
    pool="gpu",
    kinds={"pytorch"},
    description="Per-sample gradients of the finetuned parameters (settings.sketch_layers) of one shard, never "
    "materialised: the shard read ahead by reader threads into pinned memory, streamed through the run's one "
    "seeded sketch on the device into a memory-mapped shard file with its identity.",
)
def gradient_sketch(
    context: dg.AssetExecutionContext, raw_shard: dict, pretrained_model: dict, settings: SkmmSettings, workspace: Workspace
) -> dg.Output[dict]:
    device = resolve_device(settings.device)
    model = load_backbone(Path(pretrained_model["path"]), device)
    shard = read_unchanged_shard(raw_shard)
    if shard.task == "regression":
        check_regression_model(model, settings.backbone)
    sketcher = make_sketcher(model, settings, workspace, pretrained_model["model_id"], device).prepare(shard.images)
    identity = sketcher.identity
    t0 = time.perf_counter()
    stem = workspace.artifacts / "sketches" / identity_hash(identity) / shard.name
    kill_point("gradient_sketch")
    with SketchShardWriter(stem, identity, shard.ids, settings.sketch_dim) as writer:
        sketch_shard(sketcher, shard, writer.rows, batch_size=settings.batch_size, labels=settings.label_mode == "true",
                     workers=None if settings.loader_workers < 0 else settings.loader_workers)
        kill_point("sketch_rows")
    seconds = time.perf_counter() - t0
    version = json_hash([identity, raw_shard["sha256"]])
    rows = len(shard.ids)
    record = {
        "path": str(stem),
        "identity": identity,
        "rows": rows,
        "shard_sha256": raw_shard["sha256"],
        "data_version": version,
    }
    return dg.Output(
        record,
        data_version=dg.DataVersion(version),
        metadata={
            "rows": rows,
            "sketch_dim": settings.sketch_dim,
            "gradient_dim": identity["gradient_dim"],
            "sketch_kind": settings.sketch_kind,
            "blocks": dg.MetadataValue.json(identity["blocks"]),
            "layers": settings.sketch_layers,
            "label_mode": settings.label_mode,
            "device": str(device),
            "precision": settings.precision,
            "block_rows": sketcher.block_rows,
            "seconds": seconds,
            "samples_per_second": rows / max(seconds, 1e-9),
            "path": dg.MetadataValue.path(str(stem)),
        },
    )
