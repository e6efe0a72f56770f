"""The asset graph: raw_shard[p] -> gradient_sketch[p] -> skmm_selection -> subset_version -> finetune_eval.

Each asset body validates its inputs, calls into core/data/models/versioning/tracking, and adds
metadata for the UI. Large arrays travel as files (shards, weights, sketches) referenced by path and
content hash; only small records pass through the IO manager.
"""


import hashlib
import io
import json
import time
import warnings
from pathlib import Path

import dagster as dg
import numpy as np

from skmm_pipeline.evaluation import EvalData, check_regression_model, image_markdown
from skmm_pipeline.faults import kill_point
from skmm_pipeline.defs.resources import DvcVersioning, MlflowTracking, SkmmSettings, Workspace

# Content-hash data versions on outputs are how unchanged shards are recognised; the API is marked beta.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")

def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_of(sketch_versions: dict[str, str]) -> str:
    """Identifies the set of shard sketches a selection was made from (shard -> sketch data version)."""
    return _json_hash(sorted(sketch_versions.items()))


def structure_scores(workspace: Workspace, name: str, sha: str, images: np.ndarray | None = None) -> np.ndarray:
    """Per-image spatial-structure scores (core.outliers.spatial_structure) of shard ``name`` with content
    hash ``sha``, cached under the workspace by that hash; computed from ``images`` or the shard file."""
    from skmm_pipeline.core.outliers import spatial_structure
    from skmm_pipeline.core.atomic import atomic_write_bytes
    from skmm_pipeline.data.shards import file_sha256, read_shard

    path = workspace.artifacts / "input_structure" / f"{sha}.npy"
    if path.is_file():
        try:
            scores = np.load(path, allow_pickle=False)
            if scores.ndim == 1 and scores.dtype == np.float64:
                return scores
        except (OSError, ValueError, EOFError):
            pass  # an unreadable cache entry is recomputed
    if images is None:
        shard_path = workspace.shard_path(name)
        if not shard_path.is_file() or file_sha256(shard_path) != sha:
            raise ValueError(f"shard {name!r} has changed or is gone since it was sketched (content hash {sha[:12]}); "
                             "re-materialize raw_shard and gradient_sketch for it")
        images = read_shard(shard_path).images
    scores = spatial_structure(images)
    buf = io.BytesIO()
    np.save(buf, scores)
    atomic_write_bytes(path, buf.getvalue())
    return scores


@dg.asset(
    partitions_def=shard_partitions,
    group_name="skmm",
    code_version="3",
    kinds={"numpy"},
    description="One delivered shard of the pool, checked against the run's data contract (image shape, task, "
    "label range, pixel range, no copy of another shard); its content hash is the data version. Also scores "
    "each image's spatial structure (neighbouring-pixel correlation) for the outlier guard's input check.",
)
def raw_shard(context: dg.AssetExecutionContext, workspace: Workspace, settings: SkmmSettings) -> dg.Output[dict]:
    from skmm_pipeline.core.outliers import lacks_structure
    from skmm_pipeline.data.contract import ShardHashes
    from skmm_pipeline.data.shards import file_sha256, file_signature, read_shard

    name = context.partition_key
    path = workspace.shard_path(name)
    signature = file_signature(path) if path.is_file() else None
    shard = read_shard(path)
    shard_contract(workspace, settings).check(shard)
    sha = file_sha256(path)
    ShardHashes(workspace.artifacts / "shard_hashes.json").admit(name, path, sha)
    scores = structure_scores(workspace, name, sha, shard.images)
    record = {"name": name, "path": str(path), "sha256": sha, "rows": int(len(shard.images)), "signature": signature}
    meta = {
        "rows": record["rows"],
        "image_shape": str(tuple(shard.images.shape[1:])),
        "labelled": shard.labels is not None,
        "path": dg.MetadataValue.path(str(path)),
        "sha256": sha,
        "structure_median": float(np.median(scores)),
        "structure_min": float(scores.min()),
    }
    if settings.structure_threshold > 0:
        # Relative to this shard only; the selection applies the check relative to the whole pool.
        meta["lacking_structure"] = int(lacks_structure(scores, settings.structure_threshold).sum())
    return dg.Output(record, data_version=dg.DataVersion(sha), metadata=meta)


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"pytorch"},
    description="The pretrained backbone whose head is finetuned: the embedded small CNN trained on digits 0-4, "
    "or a torchvision backbone with local weights (settings.backbone).",
)
def pretrained_model(context: dg.AssetExecutionContext, settings: SkmmSettings, workspace: Workspace) -> dg.Output[dict]:
    from skmm_pipeline.core.atomic import atomic_write_bytes
    from skmm_pipeline.models.backbones import build_backbone, model_id, save_backbone
    from skmm_pipeline.models.small_cnn import select_device

    device = select_device(settings.device)
    meta: dict = {"device": str(device), "backbone": settings.backbone}
    t0 = time.perf_counter()
    if settings.backbone == "small_cnn":
        from skmm_pipeline.data.digits import load_digits_transfer
        from skmm_pipeline.models.small_cnn import accuracy, pretrain

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
    atomic_write_bytes(path, save_backbone(model))
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
    from skmm_pipeline.core.gradients import resolve_layers
    from skmm_pipeline.core.sketch_engine import calibrate_block_scales

    if not settings.balance_blocks or len(resolve_layers(model, settings.sketch_layers)) < 2:
        return None
    rows = EvalData(workspace.evaluation).val.images[: max(1, settings.calibration_rows)]
    return calibrate_block_scales(model, rows, layers=settings.sketch_layers, label_mode="expected",
                                  seed=settings.seed, device=device)


def shard_contract(workspace: Workspace, settings: SkmmSettings):
    """What every pool shard must be for this run, from the evaluation splits and the settings."""
    from skmm_pipeline.data.contract import ShardContract

    # Shape, task and classes only: the splits' pixels are verified where they are used, not per shard.
    ev = EvalData(workspace.evaluation, verify=False)
    return ShardContract(tuple(ev.val.images.shape[1:]), ev.task, settings.num_classes or ev.num_classes,
                         settings.max_abs_pixel)


def read_unchanged_shard(record: dict):
    """The shard ``raw_shard`` validated, without a second pass over its pixels when the file is unchanged
    since (same :func:`~skmm_pipeline.data.shards.file_signature`); a rewritten file is refused."""
    from skmm_pipeline.data.shards import ShardError, file_signature, read_shard

    path = Path(record["path"])
    if not path.is_file():
        raise ShardError(f"shard {record['name']!r} is gone from {path} since raw_shard validated it")
    if record.get("signature") is None:  # a record from before signatures: verify again
        return read_shard(path)
    if file_signature(path) != record["signature"]:
        raise ShardError(f"shard {record['name']!r} at {path} changed after raw_shard validated it: "
                         "materialize raw_shard for this partition again")
    return read_shard(path, verify=False)


def make_sketcher(model, settings: SkmmSettings, workspace: Workspace, model_id: str, device):
    """The run's one :class:`GradientSketcher`, configured by the settings."""
    from skmm_pipeline.core.sketch_engine import GradientSketcher

    return GradientSketcher(
        model, settings.sketch_dim, kind=settings.sketch_kind, seed=settings.seed, layers=settings.sketch_layers,
        label_mode=settings.label_mode, draws=settings.label_draws,
        block_scales=block_scales_for(model, settings, workspace, device), model_id=model_id, device=device,
        precision=settings.precision, block_rows=settings.sketch_block_rows or None,
    )


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
    from skmm_pipeline.core.sketch_engine import resolve_device
    from skmm_pipeline.core.sketch_io import SketchShardWriter, identity_hash
    from skmm_pipeline.data.loader import sketch_shard
    from skmm_pipeline.models.backbones import load_backbone

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
    version = _json_hash([identity, raw_shard["sha256"]])
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


def load_sketches(records: dict[str, dict]) -> tuple[np.ndarray, list[str], dict]:
    """Join per-shard sketches in shard-name order; refuse sketches made with different identities."""
    from skmm_pipeline.core.sketch_io import load_sketch_shards
    from skmm_pipeline.core.validation import InputError

    if not records:
        raise ValueError("no shard sketches to select from: register and sketch at least one shard")
    names = sorted(records)
    try:
        return load_sketch_shards([records[name]["path"] for name in names])
    except InputError as exc:
        raise ValueError(f"{exc} (shards: {names}); re-materialize gradient_sketch for all shards with the "
                         "current settings") from None


def unstructured_rows(workspace: Workspace, gradient_sketch: dict, rows: int, threshold: float) -> np.ndarray:
    """The input check of the outlier guard over the whole pool, in load_sketches' row order."""
    from skmm_pipeline.core.outliers import lacks_structure

    scores = np.concatenate([structure_scores(workspace, name, gradient_sketch[name]["shard_sha256"])
                             for name in sorted(gradient_sketch)])
    if scores.shape != (rows,):
        raise ValueError(f"structure scores cover {scores.size} images but the sketches have {rows} rows; "
                         "re-materialize raw_shard and gradient_sketch for all shards")
    return lacks_structure(scores, threshold)


@dg.asset(
    group_name="skmm",
    code_version="2",
    kinds={"numpy"},
    description="SkMM over all shards: the budget-n subset whose second moment best covers the pool's in the sketch.",
)
def skmm_selection(
    context: dg.AssetExecutionContext, gradient_sketch: dict, settings: SkmmSettings, workspace: Workspace
) -> dg.Output[dict]:
    from skmm_pipeline.core.selection import select

    G, ids, identity = load_sketches(gradient_sketch)
    guard = {}
    if settings.outlier_guard:
        guard["outlier_guard"] = True
        if settings.structure_threshold != 0:  # a negative one is refused by lacks_structure
            guard["exclude"] = unstructured_rows(workspace, gradient_sketch, len(ids), settings.structure_threshold)
    result = select(settings.method, G, settings.budget, seed=settings.seed, **guard)
    chosen = [ids[i] for i in result.indices]
    shards = {name: rec["shard_sha256"] for name, rec in sorted(gradient_sketch.items())}
    fingerprint = fingerprint_of({name: rec["data_version"] for name, rec in gradient_sketch.items()})
    record = {
        "method": settings.method,
        "budget": settings.budget,
        "seed": settings.seed,
        "pool_size": len(ids),
        "sample_ids": chosen,
        "weights": [1.0 / len(chosen)] * len(chosen),
        "sketch_identity": identity,
        "shards": shards,
        "shard_rows": {name: rec["rows"] for name, rec in sorted(gradient_sketch.items())},
        "sketch_fingerprint": fingerprint,
        "diagnostics": result.diagnostics,
    }
    per_shard = {s: sum(1 for c in chosen if c.split("/")[0] == s) for s in shards}
    return dg.Output(
        record,
        data_version=dg.DataVersion(_json_hash(chosen)),
        metadata={
            "n": len(chosen),
            "pool_size": len(ids),
            "method": settings.method,
            "moment_ratio": float(result.diagnostics["moment_ratio"]),
            "select_seconds": float(result.diagnostics["select_seconds"]),
            "outliers_excluded": int(result.diagnostics.get("outliers_excluded", 0)),
            "unstructured_excluded": int(result.diagnostics.get("rows_excluded", 0)),
            "unstructured_examples": dg.MetadataValue.json(
                [ids[i] for i in np.flatnonzero(guard["exclude"])[:20]] if "exclude" in guard else []),
            "picked_per_shard": dg.MetadataValue.json(per_shard),
            "sketch_fingerprint": fingerprint,
            "first_ids": dg.MetadataValue.json(chosen[:20]),
        },
    )


@dg.asset(
    group_name="skmm",
    code_version="1",
    pool="dvc",
    kinds={"dvc", "mlflow"},
    description="The selected subset written under data/, added to DVC, tagged on the subset-history ref and pushed.",
)
def subset_version(
    context: dg.AssetExecutionContext, skmm_selection: dict, dvc: DvcVersioning, mlflow: MlflowTracking
) -> dg.Output[dict]:
    from skmm_pipeline.versioning.subsets import SubsetManifest, record_subset_version

    manifest = SubsetManifest.from_selection(skmm_selection, dagster_run_id=context.run_id)
    recorded = record_subset_version(dvc.store(), manifest, mlflow.tracker(), asset="subset_version")
    version = recorded.version
    record = {
        "tag": version.tag,
        "commit": version.commit,
        "data_md5": version.data_md5,
        "pushed": version.pushed,
        "mlflow_run_id": recorded.mlflow_run_id,
    }
    meta = {
        "tag": version.tag,
        "commit": version.commit,
        "data_md5": version.data_md5,
        "pushed": version.pushed,
        "mlflow_run_id": recorded.mlflow_run_id or "",
        "repo": dg.MetadataValue.path(dvc.repo_root),
    }
    if version.push_error:
        meta["push_error"] = version.push_error
    return dg.Output(record, data_version=dg.DataVersion(version.data_md5), metadata=meta)


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"pytorch", "mlflow"},
    description="Finetunes (FT-1 head and/or FT-2 last block + head, settings.finetune_mode) on the SkMM subset, on "
    "uniform subsets of the same size and on the full pool; hyper-parameters chosen on validation; logs to MLflow. "
    "Classification (labels) reports accuracy and macro-F1, regression (targets) MAE.",
)
def finetune_eval(
    context: dg.AssetExecutionContext,
    raw_shard: dict,
    pretrained_model: dict,
    skmm_selection: dict,
    subset_version: dict,
    settings: SkmmSettings,
    workspace: Workspace,
    mlflow: MlflowTracking,
) -> dg.Output[dict]:
    from skmm_pipeline.evaluation import evaluate_selection, rows_markdown

    result = evaluate_selection(
        raw_shard, pretrained_model["path"], workspace.evaluation, skmm_selection, device=settings.device,
        finetune_mode=settings.finetune_mode, seed=settings.seed, uniform_repeats=settings.uniform_repeats,
        label_mode=settings.label_mode, backbone=settings.backbone)
    task, rows, metrics, plot = result.task, result.rows, result.metrics, result.plot
    params = {
        "method": result.method, "budget": result.n, "seed": settings.seed, "pool_size": result.pool_size,
        "sketch_kind": settings.sketch_kind, "sketch_dim": settings.sketch_dim, "label_mode": settings.label_mode,
        "sketch_layers": settings.sketch_layers,
        "finetune": settings.finetune_mode, "model_id": pretrained_model["model_id"], "backbone": settings.backbone,
        "eval_splits": result.eval_source,
    }
    if task == "regression":
        params["task"] = task
    from skmm_pipeline.tracking.mlflow_store import run_tags

    tracker = mlflow.tracker()
    tags = run_tags(context.run_id, "finetune_eval", version=subset_version)
    plot_name = "mae.png" if task == "regression" else "accuracy.png"
    with tracker.run(f"finetune_eval {subset_version['tag']}", tags=tags) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        kill_point("finetune_eval")
        run.log_eval_metrics(result.eval_rows)
        run.log_artifact_bytes(plot_name, plot, "plots")
        run.log_json("results.json", {"rows": rows, "scores": result.scores})
        run.log_json("selection.json", skmm_selection)
    record = {
        "rows": rows,
        "metrics": metrics,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
        "dvc_tag": subset_version["tag"],
    }
    if task == "regression":
        record["task"] = task
    return dg.Output(
        record,
        metadata={
            "results": dg.MetadataValue.md(rows_markdown(rows)),
            "plot": dg.MetadataValue.md(image_markdown("MAE" if task == "regression" else "accuracy", plot)),
            **{k: float(v) for k, v in metrics.items()},
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
            "dvc_tag": subset_version["tag"],
            **({"task": task} if task == "regression" else {}),
        },
    )


ALL_ASSETS = [raw_shard, pretrained_model, gradient_sketch, skmm_selection, subset_version, finetune_eval]
