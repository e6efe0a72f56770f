"""``method_benchmark``: every registered selection method on the pipeline's pool, budgets x seeds.

Reads the same inputs as ``skmm_selection``/``finetune_eval`` (the registered shards, the pretrained
model and the shard sketches), runs ``evaluation.compare`` and reports mean ± s.e.m. per method
and budget, split into the label-free and the label-using group, with the paired difference to the
group's uniform baseline. The stored sketch (made with ``settings.seed``) serves the first seed; the
other seeds are sketched in-process by the sketch engine with the stored sketch's settings (checked
against the stored rows first). Hyper-parameters are chosen on the validation split only.
Classification only: a pool or evaluation splits with regression targets are refused before any work.

It is not part of ``reselect`` (the default grid takes about a minute on 2 CPU cores, not seconds): it
runs as its own job, ``benchmark``, which ``skmm demo`` / ``make demo`` run after ``reselect`` unless
``--no-benchmark``.
"""

import json
import time

import dagster as dg
import numpy as np

from skmm_pipeline import evaluation as cmp
from skmm_pipeline.core import defaults
from skmm_pipeline.core.errors import SketchMismatchError
from skmm_pipeline.core.selection import SELECTORS
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.pool import load_sketches
from skmm_pipeline.defs.ingest import by_shard
from skmm_pipeline.defs.resources import MlflowTracking, SkmmSettings, Workspace
from skmm_pipeline.models.backbones import finetune_split
from skmm_pipeline.models.features import standardized_features
from skmm_pipeline.tracking.mlflow_store import run_tags


class BenchmarkConfig(dg.Config):
    """What the benchmark compares (run config of ``method_benchmark``)."""

    budgets: list[int] = list(defaults.BENCHMARK_BUDGETS)
    # Seeds settings.seed, settings.seed + 1, ...; each fixes the sketch, the selection and the training.
    seeds: int = defaults.BENCHMARK_SEEDS
    # Registered selection methods; empty: all of them but the research code's skmm-v1-reference.
    methods: list[str] = []
    # "ft1" (logistic head on frozen features, C chosen on validation), "ft2" (last block + head) or "both".
    finetune: str = "ft1"
    # The label-using group: class-balanced variants of the label-free methods (<method>-cb) and the
    # model-based baselines that need labels. Off: label-free methods only (unless named in methods).
    class_balanced_group: bool = True
    # Also train on the whole pool once (the ceiling line of the plot).
    full_pool: bool = True
    # CPU threads (torch and BLAS) while the grid runs; 0 leaves them as they are. The grid is many
    # small problems, which run faster on one thread than on several.
    cpu_threads: int = 1


CLASSIFICATION_ONLY = ("method_benchmark is classification-only (accuracy, class-balanced methods); evaluate a "
                       "regression pool with finetune_eval (MAE)")


def check_config(config: BenchmarkConfig) -> None:
    """Refuse a configuration the grid cannot run (before any work)."""
    if config.finetune not in cmp.FINETUNE_MODES:
        raise InputError(f"finetune must be one of {sorted(cmp.FINETUNE_MODES)}, got {config.finetune!r}")
    if config.seeds < 1:
        raise InputError(f"seeds must be at least 1, got {config.seeds}")
    if not config.budgets or any(b <= 0 for b in config.budgets):
        raise InputError(f"budgets must be positive integers, got {config.budgets}")
    unknown = [m for m in config.methods if m not in SELECTORS]
    if unknown:
        raise InputError(f"unknown selection method(s) {unknown}; available: {sorted(SELECTORS)}")
    if config.cpu_threads < 0:
        raise InputError(f"cpu_threads must be >= 0, got {config.cpu_threads}")


def _eval_rows(summary, f1) -> list[dict]:
    """MLflow rows ``{"method", "n", metrics...}``; FT-2 methods prefixed ``ft2_`` as in finetune_eval."""
    f1_mean = {(r.finetune, r.method, r.n): r.mean for r in f1.itertuples()}
    rows = []
    for r in summary.itertuples():
        if not r.seeds:
            continue
        row = {"method": ("" if r.finetune == "FT-1" else "ft2_") + r.method, "n": int(r.n),
               "test_accuracy": r.mean, "test_accuracy_sem": r.sem, "macro_f1": f1_mean.get((r.finetune, r.method, r.n))}
        if np.isfinite(r.z):
            row["z_vs_uniform"] = r.z
            row["diff_vs_uniform"] = r.diff
        rows.append({k: v for k, v in row.items() if v is not None and (isinstance(v, str) or np.isfinite(v))})
    return rows


@dg.asset(
    group_name="benchmark",
    code_version="1",
    pool="gpu",
    kinds={"pytorch", "mlflow"},
    description="Every selection method x budget x seed on the pool, finetuned (FT-1 and/or FT-2, hyper-parameters "
    "chosen on validation) and scored on test: mean ± s.e.m. per group (label-free / label-using), paired "
    "difference to uniform, a plot; logged to MLflow.",
)
def method_benchmark(
    context: dg.AssetExecutionContext,
    config: BenchmarkConfig,
    raw_shard: dict,
    pretrained_model: dict,
    gradient_sketch: dict,
    settings: SkmmSettings,
    workspace: Workspace,
    mlflow: MlflowTracking,
) -> dg.Output[dict]:
    check_config(config)
    raw_shard = by_shard(context, "raw_shard", raw_shard)
    gradient_sketch = by_shard(context, "gradient_sketch", gradient_sketch)
    t0 = time.perf_counter()
    ev = cmp.EvalData(workspace.evaluation)
    if ev.task != "classification":
        raise InputError(f"{CLASSIFICATION_ONLY}: {ev.describe()}")
    data = cmp.load_labelled_pool(
        raw_shard, pretrained_model["path"], settings.device,
        "method_benchmark needs labelled shards to train and to score the subsets", regression_error=CLASSIFICATION_ONLY)
    device, model, ids, labels, images = data.device, data.model, data.ids, data.y, data.images
    G, sketch_ids, identity = load_sketches(gradient_sketch)
    if list(sketch_ids) != ids:
        raise SketchMismatchError(f"the shard sketches cover {len(sketch_ids)} samples, the registered shards {len(ids)} (or in "
                         "another order): re-materialize gradient_sketch for every shard")
    if identity.get("model_id") != pretrained_model["model_id"]:
        raise SketchMismatchError(f"the sketches were made with model {identity.get('model_id')}, the pretrained model is "
                         f"{pretrained_model['model_id']}: re-materialize gradient_sketch")
    pool_f, (val_f, test_f) = standardized_features(model, images, [ev.val.images, ev.test.images], device=device)
    pool = cmp.Split.of("pool", pool_f, labels, images, ids=ids)
    val = cmp.Split.of("val", val_f, ev.val.labels, ev.val.images, ids=ev.ids("val"))
    test = cmp.Split.of("test", test_f, ev.test.labels, ev.test.images, ids=ev.ids("test"))
    sketches = cmp.SeededSketches.from_identity(model, images, identity, G, labels=labels, sample_ids=ids, device=device)
    specs = cmp.default_specs(list(config.methods) or None, class_balanced=config.class_balanced_group)
    # The pipeline's default matches the validation split's moment: compared next to skmm on the pool's.
    val_sketches = cmp.SeededSketches(model, ev.val.images, labels=ev.val.labels, **sketches.kwargs)
    if settings.reference == "validation" and any(s.label == "skmm" for s in specs):
        at = next(i for i, s in enumerate(specs) if s.label == "skmm") + 1
        specs.insert(at, cmp.MethodSpec("skmm", options={"reference": "validation"}, label="skmm-val"))
    seeds = [settings.seed + k for k in range(config.seeds)]
    ft2 = None
    if config.finetune != "ft1":
        prefix, tail = finetune_split(model, "ft2")
        ft2 = cmp.FT2Setup(prefix, tail, device=device)
    context.log.info(f"method_benchmark: {len(specs)} methods x {len(config.budgets)} budgets x {len(seeds)} seeds "
                     f"({config.finetune}) on a pool of {len(ids)}")
    df = cmp.compare(pool, val, test, specs, config.budgets, seeds, sketch=sketches, finetune=config.finetune, ft2=ft2,
                     full_pool=config.full_pool, progress=context.log.info, threads=config.cpu_threads or None,
                     validation_sketch=val_sketches)
    summary = cmp.summarize(df)
    f1 = cmp.summarize(df, metric="macro_f1")
    plot = cmp.plot_comparison(summary)
    table = cmp.summary_markdown(summary)
    failed = df[df.status != "ok"]
    seconds = time.perf_counter() - t0

    params = {
        "budgets": list(config.budgets), "seeds": seeds, "methods": [s.label for s in specs],
        "finetune": config.finetune, "class_balanced_group": config.class_balanced_group, "pool_size": len(ids),
        "sketch_identity": json.dumps(identity, sort_keys=True), "stored_sketch_seed": identity.get("seed"),
        "sketched_in_process": sketches.sketched, "model_id": pretrained_model["model_id"],
        "backbone": settings.backbone, "eval_splits": ev.source,
    }
    tracker = mlflow.tracker()
    with tracker.run("method_benchmark", tags=run_tags(context.run_id, "method_benchmark")) as run:
        run.log_params(params)
        run.log_eval_metrics(_eval_rows(summary, f1))
        run.log_metrics({"failed_runs": len(failed), "runs": len(df), "seconds": seconds})
        run.log_artifact_bytes("results.csv", df.to_csv(index=False).encode(), "benchmark")
        run.log_artifact_bytes("summary.csv", summary.to_csv(index=False).encode(), "benchmark")
        run.log_artifact_bytes("summary.md", table.encode(), "benchmark")
        run.log_artifact_bytes("method_benchmark.png", plot, "plots")
    record = {
        "summary": cmp.to_json_records(summary),
        "budgets": list(config.budgets),
        "seeds": seeds,
        "methods": [s.label for s in specs],
        "finetune": config.finetune,
        "runs": len(df),
        "failed_runs": len(failed),
        "seconds": seconds,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
    }
    failures = {f"{r.method} n={r.n}": r.reason for r in failed.drop_duplicates(["method", "n"]).itertuples()}
    return dg.Output(
        record,
        metadata={
            "results": dg.MetadataValue.md(table),
            "plot": dg.MetadataValue.md(cmp.image_markdown("selection benchmark", plot)),
            "methods": dg.MetadataValue.json([s.label for s in specs]),
            "seeds": dg.MetadataValue.json(seeds),
            "budgets": dg.MetadataValue.json(list(config.budgets)),
            "sketched_in_process": dg.MetadataValue.json(sketches.sketched),
            "runs": len(df),
            "failed_runs": len(failed),
            "failures": dg.MetadataValue.json(failures),
            "seconds": seconds,
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
        },
    )

