"""Sketching: the pretrained model (``pretrained_model``), each shard's gradient sketch
(``gradient_sketch[p]``) and the validation split's (``validation_sketch``, the moment the selection
matches), all made by the run's one sketcher configured by the settings."""

import time
from pathlib import Path

import dagster as dg

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import ConfigError, InputError
from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.core.gradients import resolve_layers
from skmm_pipeline.core.hashing import json_hash
from skmm_pipeline.core.sketch_engine import SketchConfig, calibrate_block_scales, resolve_device
from skmm_pipeline.core.sketch_io import SketchShardWriter, identity_hash, read_sketch_shard
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.data.loader import sketch_shard
from skmm_pipeline.data.pool import read_unchanged_shard
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings, Workspace
from skmm_pipeline.evaluation import EvalData, check_regression_model
from skmm_pipeline.models.backbones import build_backbone, load_backbone, model_id, save_backbone
from skmm_pipeline.models.small_cnn import accuracy, pretrain


@dg.asset(
    group_name="sketch",
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
                                  seed=settings.seed, device=device, class_probes=settings.class_probes or None)


def write_sketch(stem: Path, sketcher, shard, settings: SkmmSettings) -> None:
    """Stream ``shard``'s sketch rows into the sketch file at ``stem`` (committed with the sketcher's identity)."""
    with SketchShardWriter(stem, sketcher.identity, shard.ids, settings.sketch_dim) as writer:
        sketch_shard(sketcher, shard, writer.rows, batch_size=settings.batch_size, labels=settings.label_mode == "true",
                     workers=None if settings.loader_workers < 0 else settings.loader_workers)
        kill_point("sketch_rows")


def make_sketcher(model, settings: SkmmSettings, workspace: Workspace, model_id: str, device):
    """The run's one :class:`GradientSketcher`, configured by the settings."""
    if settings.class_probes < 0:
        raise ConfigError(f"settings.class_probes must be >= 0 (0: every class direction), got {settings.class_probes}")
    config = SketchConfig(
        settings.sketch_dim, kind=settings.sketch_kind, layers=settings.sketch_layers, label_mode=settings.label_mode,
        draws=settings.label_draws, block_scales=block_scales_for(model, settings, workspace, device),
        model_id=model_id, precision=settings.precision, block_rows=settings.sketch_block_rows or None,
        class_probes=settings.class_probes or None,
    )
    return config.sketcher(model, settings.seed, device)


@dg.asset(
    partitions_def=shard_partitions,
    group_name="sketch",
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
    write_sketch(stem, sketcher, shard, settings)
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


@dg.asset(
    group_name="sketch",
    code_version="1",
    kinds={"pytorch"},
    description="The validation split sketched like the pool (same model, map and seed): the second moment "
    "skmm_selection matches when settings.reference is 'validation' (the default), so the subset covers the "
    "data the model is evaluated on rather than whatever the pool holds. Cached per sketch identity and split content.",
)
def validation_sketch(
    context: dg.AssetExecutionContext, pretrained_model: dict, settings: SkmmSettings, workspace: Workspace
) -> dg.Output[dict]:
    if settings.reference not in ("validation", "pool"):
        raise ConfigError(f"settings.reference must be 'validation' or 'pool', got {settings.reference!r}")
    if settings.reference == "pool":
        return dg.Output({"reference": "pool"}, data_version=dg.DataVersion("pool"), metadata={"reference": "pool"})
    device = resolve_device(settings.device)
    model = load_backbone(Path(pretrained_model["path"]), device)
    evaluation = EvalData(workspace.evaluation)
    shard = evaluation.as_shard("val")
    sketcher = make_sketcher(model, settings, workspace, pretrained_model["model_id"], device).prepare(shard.images)
    content = evaluation.content_id("val")
    stem = workspace.artifacts / "reference_sketches" / identity_hash(sketcher.identity) / f"val-{content[:16]}"
    try:
        read_sketch_shard(stem, sketcher.identity)
        reused = True
    except InputError:  # none yet, or an incomplete one: (re)write it
        write_sketch(stem, sketcher, shard, settings)
        reused = False
    record = {"reference": "validation", "path": str(stem), "identity": sketcher.identity, "rows": len(shard.ids),
              "split": evaluation.source, "content_sha256": content}
    return dg.Output(
        record,
        data_version=dg.DataVersion(json_hash([sketcher.identity, content])),
        metadata={"reference": "validation", "rows": len(shard.ids), "source": evaluation.source, "reused": reused,
                  "path": dg.MetadataValue.path(str(stem))},
    )
