"""The asset graph: raw_shard[p] -> gradient_sketch[p] -> skmm_selection -> subset_version -> finetune_eval.

Each asset body validates its inputs, calls into core/data/models/versioning/tracking, and adds
metadata for the UI. Large arrays travel as files (shards, weights, sketches) referenced by path and
content hash; only small records pass through the IO manager.
"""


import base64
import hashlib
import io
import json
import time
import warnings
from pathlib import Path

import dagster as dg
import numpy as np

from skmm_pipeline.data.contract import CARRIES
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


def png_markdown(alt: str, png: bytes) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI's metadata (a Markdown image with a data URI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


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
        num_classes = settings.num_classes or eval_splits(workspace).num_classes
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
    rows = eval_splits(workspace).val.images[: max(1, settings.calibration_rows)]
    return calibrate_block_scales(model, rows, layers=settings.sketch_layers, label_mode="expected",
                                  seed=settings.seed, device=device)


def shard_contract(workspace: Workspace, settings: SkmmSettings):
    """What every pool shard must be for this run, from the evaluation splits and the settings."""
    from skmm_pipeline.data.contract import ShardContract

    # Shape, task and classes only: the splits' pixels are verified where they are used, not per shard.
    ev = eval_splits(workspace, verify=False)
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
        check_regression_model(model, settings)
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


class EvalData:
    """Validation and test splits: ``val.npz``/``test.npz`` in the workspace's eval folder, or the
    embedded digits splits when that folder has none.

    ``task`` is what both splits carry: ``"classification"`` (``labels``) or ``"regression"``
    (``targets``); a split with neither, or splits that disagree, are refused naming the files.
    ``num_classes`` is 1 for regression (the model's one output). ``verify=False`` opens the splits
    without a pass over their pixels (for their shape, task and classes alone)."""

    def __init__(self, workspace: Workspace, verify: bool = True):
        from skmm_pipeline.data.shards import read_shard

        folder = workspace.evaluation
        present = [name for name in ("val.npz", "test.npz") if (folder / name).is_file()]
        if len(present) == 1:
            missing = "test.npz" if present == ["val.npz"] else "val.npz"
            raise ValueError(f"{folder} holds {present[0]} but no {missing}: put both evaluation splits there (e.g. "
                             "the import_data job with role val / test), or neither to use the embedded digits splits")
        if present:
            self.files = {"val": folder / "val.npz", "test": folder / "test.npz"}
            val, test = read_shard(self.files["val"], verify), read_shard(self.files["test"], verify)
            for split, path in ((val, self.files["val"]), (test, self.files["test"])):
                if split.task is None:
                    raise ValueError(f"validation and test splits in {folder} need labels (classification) or targets "
                                     f"(regression); {path} has neither")
            if val.task != test.task:
                raise ValueError(f"the validation and test splits disagree on the task: {self.files['val']} carries "
                                 f"{CARRIES[val.task]}, {self.files['test']} {CARRIES[test.task]}; both need labels "
                                 "(classification) or both targets (regression)")
            self.val, self.test, self.source, self.task = val, test, str(folder), val.task
        else:
            from skmm_pipeline.data.digits import load_digits_transfer

            data = load_digits_transfer()
            self.val, self.test, self.source, self.task = data.val, data.test, "embedded digits", "classification"
            self.files = {}
        if self.task == "regression":
            self.num_classes = 1
        else:
            self.num_classes = int(max(self.val.labels.max(), self.test.labels.max())) + 1

    def ids(self, split: str) -> list[str]:
        n = len(getattr(self, split).images)
        return [f"{split}/{i}" for i in range(n)]

    def y(self, split: str) -> np.ndarray:
        """The split's labels (classification) or targets (regression)."""
        s = getattr(self, split)
        return s.targets if self.task == "regression" else s.labels

    def describe(self) -> str:
        files = ", ".join(str(p) for p in self.files.values()) or self.source
        return f"the evaluation splits ({files}) carry {CARRIES[self.task]}"


def eval_splits(workspace: Workspace, verify: bool = True) -> EvalData:
    return EvalData(workspace, verify)


def _read_pool(raw_shard: dict, unlabelled_error: str):
    """The registered shards in shard-name order and their task (what every shard carries); unlabelled
    shards raise ``ValueError(unlabelled_error)``, shards that disagree on the task are refused naming them."""
    from skmm_pipeline.data.shards import read_shard

    paths = [Path(raw_shard[name]["path"]) for name in sorted(raw_shard)]
    shards = [read_shard(p) for p in paths]
    if any(s.task is None for s in shards):
        raise ValueError(unlabelled_error)
    by_task: dict[str, list[str]] = {}
    for s, p in zip(shards, paths):
        by_task.setdefault(s.task, []).append(str(p))
    if len(by_task) > 1:
        raise ValueError("the pool shards disagree on the task: " + "; ".join(
            f"{CARRIES[t]} in {files[:5]}" for t, files in sorted(by_task.items()))
            + ". Every shard needs labels (classification) or every shard targets (regression)")
    task = shards[0].task
    return shards, task, [str(p) for p in paths]


def check_same_task(pool_task: str, pool_files: list[str], ev: EvalData) -> str:
    """The run's task: the pool and the evaluation splits must carry the same kind of targets."""
    if pool_task != ev.task:
        raise ValueError(f"the pool and the evaluation splits disagree on the task: the pool shards ({pool_files[:5]}) "
                         f"carry {CARRIES[pool_task]} but {ev.describe()}; use labels everywhere (classification) "
                         "or targets everywhere (regression)")
    return pool_task


def load_pool(raw_shard: dict, pretrained_model: dict, settings: SkmmSettings, unlabelled_error: str):
    """The run's device, the pretrained model on it, and the registered pool in shard-name order:
    ``(device, model, ids, y, images, task, files)``, ``y`` the labels (classification) or targets
    (regression) as the shards carry them; raises ``ValueError(unlabelled_error)`` for unlabelled shards."""
    from skmm_pipeline.models.backbones import load_backbone
    from skmm_pipeline.models.small_cnn import select_device

    device = select_device(settings.device)
    model = load_backbone(Path(pretrained_model["path"]), device)
    shards, task, files = _read_pool(raw_shard, unlabelled_error)
    ids = [i for s in shards for i in s.ids]
    y = np.concatenate([s.targets if task == "regression" else s.labels for s in shards])
    return device, model, ids, y, np.concatenate([s.images for s in shards]), task, files


def load_labelled_pool(raw_shard: dict, pretrained_model: dict, settings: SkmmSettings, unlabelled_error: str,
                       regression_error: str = "this step needs class labels (classification only)"):
    """The run's device, the pretrained model on it, and the registered pool in shard-name order:
    ``(device, model, ids, labels, images)``; raises ``ValueError(unlabelled_error)`` for unlabelled shards
    and ``ValueError`` with ``regression_error`` for shards with regression targets."""
    device, model, ids, y, images, task, files = load_pool(raw_shard, pretrained_model, settings, unlabelled_error)
    if task != "classification":
        raise ValueError(f"{regression_error}: the pool shards carry regression targets ({files[:5]})")
    return device, model, ids, y, images


def _ft1_evaluator(model, images, labels, ids, ev: EvalData, settings: SkmmSettings, device):
    """FT-1: logistic head on pool-standardised frozen features, C chosen on validation; for regression
    (``labels`` are then the pool's targets) a ridge head, alpha chosen on validation by MAE."""
    from skmm_pipeline.evaluation import EvalSplit, linear_probe, ridge_probe
    from skmm_pipeline.models.features import standardized_features

    pool, (val_X, test_X) = standardized_features(model, images, [ev.val.images, ev.test.images], device=device)

    if ev.task == "regression":
        val = EvalSplit(val_X, ev.y("val"), ev.ids("val"))
        test = EvalSplit(test_X, ev.y("test"), ev.ids("test"))
        ids = np.asarray(ids)

        def run_ridge(idx):
            r = ridge_probe(EvalSplit(pool[idx], labels[idx], ids[idx]), val, test, seed=settings.seed)
            return {"test_mae": r.test_mae, "val_mae": r.val_metrics["mae"], "test_rmse": r.test_metrics["rmse"],
                    "alpha": r.hyperparameters["alpha"]}

        return run_ridge

    def run(idx):
        r = linear_probe(pool[idx], labels[idx], val_X, ev.val.labels, test_X, ev.test.labels, seed=settings.seed)
        return {"test_accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy, "macro_f1": r.test_macro_f1, "C": r.C}

    return run


def _ft2_evaluator(model, images, labels, ids, ev: EvalData, settings: SkmmSettings, device):
    """FT-2: the last block and the head finetuned (lr, weight decay, epochs chosen on validation); for
    regression the one-output head on standardised targets, MSE loss, chosen by validation MAE."""
    from skmm_pipeline.evaluation import EvalSplit, finetune_tail
    from skmm_pipeline.models.backbones import finetune_split

    prefix, tail = finetune_split(model, "ft2")
    val = EvalSplit(ev.val.images, ev.y("val"), ev.ids("val"))
    test = EvalSplit(ev.test.images, ev.y("test"), ev.ids("test"))
    ids = np.asarray(ids)

    def run(idx):
        train = EvalSplit(images[idx], labels[idx], ids[idx])
        r = finetune_tail(prefix, tail, train, val, test, task=ev.task, seed=settings.seed, device=device)
        if ev.task == "regression":
            return {"test_mae": r.test_mae, "val_mae": r.val_metrics["mae"],
                    **{f"hp_{k}": v for k, v in r.hyperparameters.items()}}
        return {"test_accuracy": r.test_accuracy, "val_accuracy": r.val_metrics.get("accuracy", float("nan")),
                "macro_f1": r.test_macro_f1, **{f"hp_{k}": v for k, v in r.hyperparameters.items()}}

    return run


def _accuracy_plot(rows: list[dict], metric: str = "test_accuracy") -> bytes:
    """Bars per finetuning mode and subset (s.e.m. error bars): test accuracy in [0, 1], or test MAE
    (``metric="test_mae"``, lower is better) from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 1, 2.8), dpi=80)
    labels = [f"{r['finetune']}\n{r['method']}" for r in rows]
    colors = [f"C{i % 3}" for i in range(len(rows))]
    ax.bar(labels, [r[metric] for r in rows], yerr=[r["sem"] for r in rows], color=colors)
    ax.tick_params(axis="x", labelsize=6)
    if metric == "test_accuracy":
        ax.set_ylabel("FT-1 test accuracy")
        ax.set_ylim(0, 1)
    else:
        ax.set_ylabel("test MAE (lower is better)")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# Per task: (the test metric, the validation metric, its short name in metric keys, an extra test metric).
SUMMARY_METRICS = {"classification": ("test_accuracy", "val_accuracy", "acc", "macro_f1"),
                   "regression": ("test_mae", "val_mae", "mae", "test_rmse")}


def _summarize(scores: dict, method: str, uniform_keys: list[str], n: int, pool_size: int, task: str):
    """``(rows, metrics, eval_rows)`` of the run: per finetuning mode the SkMM subset, the mean ± s.e.m.
    of the uniform subsets and the full pool. Metric keys: ``acc_skmm``, ``acc_uniform_mean``,
    ``acc_uniform_sem``, ``acc_full_pool``, ``val_acc_skmm``, ``macro_f1_skmm`` (classification) or the
    same with ``mae`` plus ``rmse_skmm``/``rmse_uniform_mean``/``rmse_full_pool`` where FT-1 gives RMSE
    (regression); FT-2's are prefixed ``ft2_``."""
    main, val, short, extra = SUMMARY_METRICS[task]
    rows, metrics, eval_rows = [], {}, []
    for mode, by_subset in scores.items():
        prefix = "" if mode == "FT-1" else "ft2_"
        uni = [by_subset[k][main] for k in uniform_keys]
        sem = float(np.std(uni, ddof=1) / np.sqrt(len(uni))) if len(uni) > 1 else 0.0
        mean_uni = float(np.mean(uni)) if uni else float("nan")
        sk, full = by_subset[method], by_subset["full_pool"]
        mode_rows = [
            {"finetune": mode, "method": method, "n": n, main: round(sk[main], 4), "sem": 0.0},
            {"finetune": mode, "method": f"uniform (x{len(uni)})", "n": n, main: round(mean_uni, 4), "sem": round(sem, 4)},
            {"finetune": mode, "method": "full pool", "n": pool_size, main: round(full[main], 4), "sem": 0.0},
        ]
        metrics.update({
            f"{prefix}{short}_skmm": sk[main], f"{prefix}{short}_uniform_mean": mean_uni,
            f"{prefix}{short}_uniform_sem": sem, f"{prefix}{short}_full_pool": full[main],
            f"{prefix}val_{short}_skmm": sk[val],
        })
        if extra in sk:
            uni_extra = float(np.mean([by_subset[k][extra] for k in uniform_keys])) if uni else float("nan")
            if task == "classification":
                for row, value in zip(mode_rows, (sk[extra], uni_extra, full[extra])):
                    row[extra] = round(value, 4)
                metrics[f"{prefix}macro_f1_skmm"] = sk[extra]
            else:
                metrics.update({f"{prefix}rmse_skmm": sk[extra], f"{prefix}rmse_full_pool": full[extra],
                                **({f"{prefix}rmse_uniform_mean": uni_extra} if uni else {})})
        rows += mode_rows
        eval_rows += [
            {"method": f"{prefix}{method}", "n": n, main: sk[main], val: sk[val]},
            {"method": f"{prefix}uniform", "n": n, main: mean_uni, f"{main}_sem": sem},
            {"method": f"{prefix}full_pool", "n": pool_size, main: full[main]},
        ]
    return rows, metrics, eval_rows


def check_regression_model(model, settings: SkmmSettings) -> None:
    """A regression pool is sketched and finetuned through a one-output head; refuse any other model."""
    if model.num_classes != 1:
        hint = ("the embedded small CNN keeps the 5 outputs of its digits pretraining" if settings.backbone == "small_cnn"
                else "settings.num_classes must be 0 (one output when the evaluation splits carry targets) or 1")
        raise ValueError(f"a regression pool (targets) needs a model with one output; the pretrained model "
                         f"({settings.backbone}) has {model.num_classes} ({hint}): use a torchvision backbone, "
                         "e.g. backbone='resnet18', and re-materialize pretrained_model")


def _check_regression_setup(model, settings: SkmmSettings) -> None:
    """Refuse, before any training, what a regression run cannot do."""
    if settings.label_mode in ("random", "true"):
        raise ValueError(f"label_mode={settings.label_mode!r} takes gradients of a classification loss; a regression "
                         "pool (targets) needs label_mode='expected' (label-free): re-sketch with it")
    check_regression_model(model, settings)


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
    from skmm_pipeline.evaluation import FINETUNE_MODES
    from skmm_pipeline.core.sketch import derive_seed

    if settings.finetune_mode not in FINETUNE_MODES:
        raise ValueError(f"finetune_mode must be one of {sorted(FINETUNE_MODES)}, got {settings.finetune_mode!r}")
    device, model, ids, labels, images, pool_task, pool_files = load_pool(
        raw_shard, pretrained_model, settings, "finetune_eval needs labelled shards to train the head on the selected subset")
    ev = eval_splits(workspace)
    task = check_same_task(pool_task, pool_files, ev)
    if task == "regression":
        _check_regression_setup(model, settings)
    position = {sid: k for k, sid in enumerate(ids)}
    missing = [s for s in skmm_selection["sample_ids"] if s not in position]
    if missing:
        raise ValueError(f"{len(missing)} selected ids are not in the registered shards, e.g. {missing[:3]}")

    n = len(skmm_selection["sample_ids"])
    method = skmm_selection["method"]
    subsets = {method: np.array([position[s] for s in skmm_selection["sample_ids"]])}
    # Uniform baselines: seeded draws of the same size, as the `uniform` selector makes them.
    uniform_keys = [f"uniform#{r}" for r in range(settings.uniform_repeats)]
    for r, key in enumerate(uniform_keys):
        rng = np.random.default_rng(derive_seed(settings.seed, "uniform", r))
        subsets[key] = rng.choice(len(ids), size=n, replace=False)
    subsets["full_pool"] = np.arange(len(ids))

    scores: dict[str, dict[str, dict]] = {}  # mode -> subset -> {test_accuracy, macro_f1, ...} or {test_mae, ...}
    for mode in FINETUNE_MODES[settings.finetune_mode]:
        evaluate = _ft1_evaluator if mode == "FT-1" else _ft2_evaluator
        run_one = evaluate(model, images, labels, ids, ev, settings, device)
        scores[mode] = {key: run_one(idx) for key, idx in subsets.items()}

    rows, metrics, eval_rows = _summarize(scores, method, uniform_keys, n, len(ids), task)
    metrics = {"moment_ratio": float(skmm_selection["diagnostics"]["moment_ratio"]), **metrics}
    plot = _accuracy_plot(rows, SUMMARY_METRICS[task][0])
    params = {
        "method": method, "budget": n, "seed": settings.seed, "pool_size": len(ids),
        "sketch_kind": settings.sketch_kind, "sketch_dim": settings.sketch_dim, "label_mode": settings.label_mode,
        "sketch_layers": settings.sketch_layers,
        "finetune": settings.finetune_mode, "model_id": pretrained_model["model_id"], "backbone": settings.backbone,
        "eval_splits": ev.source,
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
        run.log_eval_metrics(eval_rows)
        run.log_artifact_bytes(plot_name, plot, "plots")
        run.log_json("results.json", {"rows": rows, "scores": scores})
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
            "results": dg.MetadataValue.md(_md_table(rows)),
            "plot": png_markdown("MAE" if task == "regression" else "accuracy", plot),
            **{k: float(v) for k, v in metrics.items()},
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
            "dvc_tag": subset_version["tag"],
            **({"task": task} if task == "regression" else {}),
        },
    )


ALL_ASSETS = [raw_shard, pretrained_model, gradient_sketch, skmm_selection, subset_version, finetune_eval]
