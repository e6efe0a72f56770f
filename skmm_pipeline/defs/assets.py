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

from skmm_pipeline.defs.resources import DvcVersioning, MlflowTracking, SkmmSettings, Workspace

# Content-hash data versions on outputs are how unchanged shards are recognised; the API is marked beta.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")

SKETCH_PARAMS = "head"  # the finetuned parameter set whose gradients are sketched (FT-1)


def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_of(sketch_versions: dict[str, str]) -> str:
    """Identifies the set of shard sketches a selection was made from (shard -> sketch data version)."""
    return _json_hash(sorted(sketch_versions.items()))


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


@dg.asset(
    partitions_def=shard_partitions,
    group_name="skmm",
    code_version="1",
    kinds={"numpy"},
    description="One delivered shard of the pool, validated; its content hash is the data version.",
)
def raw_shard(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.Output[dict]:
    from skmm_pipeline.data.shards import file_sha256, read_shard

    name = context.partition_key
    path = workspace.shard_path(name)
    shard = read_shard(path)
    sha = file_sha256(path)
    record = {"name": name, "path": str(path), "sha256": sha, "rows": int(len(shard.images))}
    meta = {
        "rows": record["rows"],
        "image_shape": str(tuple(shard.images.shape[1:])),
        "labelled": shard.labels is not None,
        "path": dg.MetadataValue.path(str(path)),
        "sha256": sha,
    }
    return dg.Output(record, data_version=dg.DataVersion(sha), metadata=meta)


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"pytorch"},
    description="The pretrained backbone (embedded scenario: a small CNN trained on digits 0-4) whose head is finetuned.",
)
def pretrained_model(context: dg.AssetExecutionContext, settings: SkmmSettings, workspace: Workspace) -> dg.Output[dict]:
    from skmm_pipeline.data.digits import load_digits_transfer
    from skmm_pipeline.data.shards import atomic_write_bytes
    from skmm_pipeline.models.small_cnn import accuracy, pretrain, save_model, select_device, state_dict_id

    device = select_device(settings.device)
    data = load_digits_transfer()
    t0 = time.perf_counter()
    model = pretrain(
        data.source_train.images, data.source_train.labels, data.num_classes,
        epochs=settings.pretrain_epochs, seed=settings.seed, device=device,
    )
    seconds = time.perf_counter() - t0
    model_id = state_dict_id(model)
    path = workspace.artifacts / "models" / f"small_cnn-{model_id}.pt"
    atomic_write_bytes(path, save_model(model))
    src_acc = accuracy(model, data.source_val.images, data.source_val.labels, device)
    record = {"path": str(path), "model_id": model_id, "feature_dim": model.feature_dim, "num_classes": model.num_classes}
    return dg.Output(
        record,
        data_version=dg.DataVersion(model_id),
        metadata={
            "model_id": model_id,
            "source_val_accuracy": src_acc,
            "train_seconds": seconds,
            "device": str(device),
            "path": dg.MetadataValue.path(str(path)),
        },
    )


@dg.asset(
    partitions_def=shard_partitions,
    group_name="skmm",
    code_version="1",
    pool="gpu",
    kinds={"pytorch"},
    description="Label-free per-sample head gradients of one shard, projected by the run's one seeded sketch.",
)
def gradient_sketch(
    context: dg.AssetExecutionContext, raw_shard: dict, pretrained_model: dict, settings: SkmmSettings, workspace: Workspace
) -> dg.Output[dict]:
    from skmm_pipeline.core.gradients import gradient_dim
    from skmm_pipeline.core.sketch import make_sketch
    from skmm_pipeline.data.shards import atomic_save_npz, read_shard
    from skmm_pipeline.models.small_cnn import load_model, select_device, sketch_head_gradients

    device = select_device(settings.device)
    model = load_model(Path(pretrained_model["path"]), device)
    shard = read_shard(Path(raw_shard["path"]))
    r = gradient_dim(model.feature_dim, model.num_classes, settings.label_mode)
    sketch = make_sketch(settings.sketch_kind, r, settings.sketch_dim, settings.seed, SKETCH_PARAMS)
    identity = {
        **sketch.identity.as_dict(),
        "label_mode": settings.label_mode,
        "model_id": pretrained_model["model_id"],
    }
    t0 = time.perf_counter()
    G = sketch_head_gradients(model, shard.images, sketch, settings.label_mode, shard.labels,
                              batch_size=settings.batch_size, device=device)
    seconds = time.perf_counter() - t0
    path = workspace.artifacts / "sketches" / _json_hash(identity) / f"{shard.name}.npz"
    atomic_save_npz(path, sketch=G, ids=np.array(shard.ids), identity=np.array(json.dumps(identity, sort_keys=True)))
    version = _json_hash([identity, raw_shard["sha256"]])
    record = {
        "path": str(path),
        "identity": identity,
        "rows": int(G.shape[0]),
        "shard_sha256": raw_shard["sha256"],
        "data_version": version,
    }
    return dg.Output(
        record,
        data_version=dg.DataVersion(version),
        metadata={
            "rows": G.shape[0],
            "sketch_dim": G.shape[1],
            "gradient_dim": r,
            "sketch_kind": sketch.identity.kind,
            "label_mode": settings.label_mode,
            "device": str(device),
            "seconds": seconds,
            "samples_per_second": G.shape[0] / max(seconds, 1e-9),
            "path": dg.MetadataValue.path(str(path)),
        },
    )


def load_sketches(records: dict[str, dict]) -> tuple[np.ndarray, list[str], dict]:
    """Join per-shard sketches in shard-name order; refuse sketches made with different identities."""
    if not records:
        raise ValueError("no shard sketches to select from: register and sketch at least one shard")
    blocks, ids, identity = [], [], None
    for name in sorted(records):
        with np.load(records[name]["path"], allow_pickle=False) as z:
            ident = json.loads(str(z["identity"]))
            if identity is None:
                identity = ident
            elif ident != identity:
                raise ValueError(
                    f"sketch of shard {name!r} was made with {ident}, others with {identity}: "
                    "re-materialize gradient_sketch for all shards with the current settings"
                )
            blocks.append(z["sketch"])
            ids.extend(z["ids"].tolist())
    return np.concatenate(blocks), ids, identity


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"numpy"},
    description="SkMM over all shards: the budget-n subset whose second moment best covers the pool's in the sketch.",
)
def skmm_selection(context: dg.AssetExecutionContext, gradient_sketch: dict, settings: SkmmSettings) -> dg.Output[dict]:
    from skmm_pipeline.core.selection import select

    G, ids, identity = load_sketches(gradient_sketch)
    result = select(settings.method, G, settings.budget, seed=settings.seed)
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
            "picked_per_shard": dg.MetadataValue.json(per_shard),
            "sketch_fingerprint": fingerprint,
            "first_ids": dg.MetadataValue.json(chosen[:20]),
        },
    )


@dg.asset(
    group_name="skmm",
    code_version="1",
    pool="dvc",
    kinds={"dvc"},
    description="The selected subset written under data/, added to DVC, tagged on the subset-history ref and pushed.",
)
def subset_version(context: dg.AssetExecutionContext, skmm_selection: dict, dvc: DvcVersioning) -> dg.Output[dict]:
    import pandas as pd

    sel = skmm_selection
    table = pd.DataFrame(
        {
            "sample_id": sel["sample_ids"],
            "shard": [s.split("/")[0] for s in sel["sample_ids"]],
            "row": [int(s.split("/")[1]) for s in sel["sample_ids"]],
            "weight": sel["weights"],
            "rank": range(len(sel["sample_ids"])),
        }
    )
    manifest = {k: v for k, v in sel.items() if k not in ("sample_ids", "weights")}
    manifest["dagster_run_id"] = context.run_id
    files = {
        "subset.csv": table.to_csv(index=False).encode(),
        "manifest.json": json.dumps(manifest, indent=2, sort_keys=True, default=float).encode(),
    }
    meta = {
        "method": sel["method"],
        "n": sel["budget"],
        "seed": sel["seed"],
        "pool_size": sel["pool_size"],
        "shards": sorted(sel["shards"]),
        "dagster_run_id": context.run_id,
    }
    version = dvc.store().write_version(files, meta)
    record = {"tag": version.tag, "commit": version.commit, "data_md5": version.data_md5, "pushed": version.pushed}
    return dg.Output(
        record,
        data_version=dg.DataVersion(version.data_md5),
        metadata={
            "tag": version.tag,
            "commit": version.commit,
            "data_md5": version.data_md5,
            "pushed": version.pushed,
            "repo": dg.MetadataValue.path(dvc.repo_root),
        },
    )


def _accuracy_plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
    labels = [r["method"] for r in rows]
    ax.bar(labels, [r["test_accuracy"] for r in rows], yerr=[r["sem"] for r in rows], color=["C0", "C1", "C2"][: len(rows)])
    ax.set_ylabel("FT-1 test accuracy")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dg.asset(
    group_name="skmm",
    code_version="1",
    kinds={"pytorch", "mlflow"},
    description="Finetunes the head (FT-1) on the SkMM subset and on uniform subsets of the same size; logs to MLflow.",
)
def finetune_eval(
    context: dg.AssetExecutionContext,
    raw_shard: dict,
    pretrained_model: dict,
    skmm_selection: dict,
    subset_version: dict,
    settings: SkmmSettings,
    mlflow: MlflowTracking,
) -> dg.Output[dict]:
    from skmm_pipeline.core.finetune import Standardizer, linear_probe
    from skmm_pipeline.core.selection import select
    from skmm_pipeline.core.sketch import derive_seed
    from skmm_pipeline.data.digits import load_digits_transfer
    from skmm_pipeline.data.shards import read_shard
    from skmm_pipeline.models.small_cnn import extract_features, load_model, select_device

    device = select_device(settings.device)
    model = load_model(Path(pretrained_model["path"]), device)
    shards = [read_shard(Path(raw_shard[name]["path"])) for name in sorted(raw_shard)]
    if any(s.labels is None for s in shards):
        raise ValueError("finetune_eval needs labelled shards to train the head on the selected subset")
    ids = [i for s in shards for i in s.ids]
    labels = np.concatenate([s.labels for s in shards])
    pool = extract_features(model, np.concatenate([s.images for s in shards]), device=device)
    std = Standardizer(pool)
    pool = std(pool)
    data = load_digits_transfer()
    val_X, test_X = (std(extract_features(model, s.images, device=device)) for s in (data.val, data.test))
    position = {sid: k for k, sid in enumerate(ids)}
    missing = [s for s in skmm_selection["sample_ids"] if s not in position]
    if missing:
        raise ValueError(f"{len(missing)} selected ids are not in the registered shards, e.g. {missing[:3]}")

    def probe(idx):
        return linear_probe(pool[idx], labels[idx], val_X, data.val.labels, test_X, data.test.labels, seed=settings.seed)

    n = len(skmm_selection["sample_ids"])
    skmm = probe(np.array([position[s] for s in skmm_selection["sample_ids"]]))
    uni = [
        probe(select("uniform", pool, n, seed=derive_seed(settings.seed, "uniform", r) % 2**32).indices).test_accuracy
        for r in range(settings.uniform_repeats)
    ]
    full = probe(np.arange(len(ids)))
    sem = float(np.std(uni, ddof=1) / np.sqrt(len(uni))) if len(uni) > 1 else 0.0
    rows = [
        {"method": skmm_selection["method"], "n": n, "test_accuracy": round(skmm.test_accuracy, 4), "sem": 0.0, "C": skmm.C},
        {"method": f"uniform (x{len(uni)})", "n": n, "test_accuracy": round(float(np.mean(uni)), 4), "sem": round(sem, 4), "C": ""},
        {"method": "full pool", "n": len(ids), "test_accuracy": round(full.test_accuracy, 4), "sem": 0.0, "C": full.C},
    ]
    plot = _accuracy_plot(rows)
    metrics = {
        "acc_skmm": skmm.test_accuracy,
        "acc_uniform_mean": float(np.mean(uni)),
        "acc_uniform_sem": sem,
        "acc_full_pool": full.test_accuracy,
        "val_acc_skmm": skmm.val_accuracy,
        "moment_ratio": float(skmm_selection["diagnostics"]["moment_ratio"]),
    }
    params = {
        "method": skmm_selection["method"], "budget": n, "seed": settings.seed, "pool_size": len(ids),
        "sketch_kind": settings.sketch_kind, "sketch_dim": settings.sketch_dim, "label_mode": settings.label_mode,
        "finetune": "FT-1 logistic head, C on validation", "model_id": pretrained_model["model_id"],
    }
    tracker = mlflow.tracker()
    tags = {
        "dagster.run_id": context.run_id,
        "dagster.asset": "finetune_eval",
        "dvc.tag": subset_version["tag"],
        "dvc.commit": subset_version["commit"],
    }
    with tracker.run(f"finetune_eval {subset_version['tag']}", tags=tags) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        run.log_artifact_bytes("accuracy.png", plot)
        run.log_json("results.json", {"rows": rows, "uniform_runs": uni})
        run.log_json("selection.json", skmm_selection)
    record = {
        "rows": rows,
        "metrics": metrics,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
        "dvc_tag": subset_version["tag"],
    }
    return dg.Output(
        record,
        metadata={
            "results": dg.MetadataValue.md(_md_table(rows)),
            "plot": dg.MetadataValue.md(f"![accuracy](data:image/png;base64,{base64.b64encode(plot).decode()})"),
            "acc_skmm": skmm.test_accuracy,
            "acc_uniform_mean": float(np.mean(uni)),
            "acc_full_pool": full.test_accuracy,
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
            "dvc_tag": subset_version["tag"],
        },
    )


ALL_ASSETS = [raw_shard, pretrained_model, gradient_sketch, skmm_selection, subset_version, finetune_eval]
