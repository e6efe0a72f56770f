"""Evaluation: ``finetune_eval`` finetunes on the selected subset, on uniform subsets of its size and on
the full pool (``evaluation.evaluate_selection``) and logs the results to MLflow."""

import dagster as dg

from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.defs.ingest import by_shard
from skmm_pipeline.defs.metadata import embedded_image, linked_image, table
from skmm_pipeline.defs.resources import MlflowTracking, SkmmSettings, Workspace
from skmm_pipeline.evaluation import (
    comparable,
    evaluate_selection,
    ft2_history,
    history_plot,
    history_points,
    subset_grid,
    versus_previous,
    versus_uniform,
)
from skmm_pipeline.tracking.mlflow_store import artifact_url, dagster_note, run_tags, run_url

HISTORY_VERSIONS = 50  # versions drawn in finetune_eval's history plot


@dg.asset(
    group_name="evaluate",
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
    shards = by_shard(context, "raw_shard", raw_shard)
    result = evaluate_selection(
        shards, pretrained_model["path"], workspace.evaluation, skmm_selection, device=settings.device,
        finetune_mode=settings.finetune_mode, seed=settings.seed, uniform_repeats=settings.uniform_repeats,
        label_mode=settings.label_mode, backbone=settings.backbone)
    task, rows, metrics, plot = result.task, result.rows, result.metrics, result.plot
    summary = {"n": result.n, "finetune": settings.finetune_mode, "eval_source": result.eval_source, "task": task,
               "method": result.method, "pool_size": result.pool_size}
    history = evaluation_history(context)
    previous = history[-1] if history else {}
    quality = {
        "vs_uniform": versus_uniform(metrics, task),
        "vs_previous": versus_previous(metrics, previous["metrics"], task) if comparable(summary, previous) else [],
        "previous_tag": previous.get("dvc_tag"),
    }
    params = {
        "method": result.method, "budget": result.n, "seed": settings.seed, "pool_size": result.pool_size,
        "sketch_kind": settings.sketch_kind, "sketch_dim": settings.sketch_dim, "label_mode": settings.label_mode,
        "sketch_layers": settings.sketch_layers,
        "finetune": settings.finetune_mode, "model_id": pretrained_model["model_id"], "backbone": settings.backbone,
        "eval_splits": result.eval_source,
    }
    if task == "regression":
        params["task"] = task
    tracker = mlflow.tracker()
    tags = run_tags(context.run_id, "finetune_eval", version=subset_version,
                    **{"mlflow.note.content": dagster_note(context.run_id, mlflow.dagster_url, "finetune_eval")})
    plot_name = "mae.png" if task == "regression" else "accuracy.png"
    grid = subset_grid(skmm_selection["sample_ids"], {name: rec["path"] for name, rec in shards.items()},
                       title=f"{subset_version['tag']}: {result.method}, n={result.n} of {result.pool_size}")
    versions = history_points([*history, {**summary, "metrics": metrics, "dvc_tag": subset_version["tag"]}], task)
    timeline = history_plot(versions, *(("FT-1 MAE", 1.0) if task == "regression" else ("test accuracy (%)", 100.0)))
    with tracker.run(f"{subset_version['tag']}-{result.method}-n{result.n}", tags=tags) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        kill_point("finetune_eval")
        run.log_eval_metrics(result.eval_rows)
        run.log_curves(ft2_history(result.scores, result.method))
        run.log_artifact_bytes(plot_name, plot, "plots")
        run.log_artifact_bytes("subset_grid.png", grid, "plots")
        run.log_artifact_bytes("versions.png", timeline, "plots")
        run.log_json("results.json", {"rows": rows, "scores": result.scores})
        run.log_json("selection.json", skmm_selection)
    record = {
        "rows": rows,
        "metrics": metrics,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
        "mlflow_run_url": run_url(mlflow.ui_url, run.experiment_id, run.run_id),
        "dvc_tag": subset_version["tag"],
        "summary": summary,
        "quality": quality,
    }
    if task == "regression":
        record["task"] = task
    return dg.Output(
        record,
        metadata={
            "results": table(rows),
            # Inline while the MLflow UI serves the run's artifacts; the embedded copies need no server.
            "plot": linked_image(plot_name, artifact_url(mlflow.ui_url, run.run_id, f"plots/{plot_name}")),
            "subset_grid": linked_image("subset grid", artifact_url(mlflow.ui_url, run.run_id, "plots/subset_grid.png")),
            "plot_embedded": embedded_image(plot_name, plot),
            "subset_grid_embedded": embedded_image("subset grid", grid),
            "versions": linked_image("versions", artifact_url(mlflow.ui_url, run.run_id, "plots/versions.png")),
            "versions_embedded": embedded_image("versions", timeline),
            "mlflow_run": dg.MetadataValue.url(record["mlflow_run_url"]),
            **{k: float(v) for k, v in metrics.items()},
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
            "dvc_tag": subset_version["tag"],
            "summary": dg.MetadataValue.json(summary),
            "vs_uniform": rows_or_note(quality["vs_uniform"], "no uniform baseline"),
            "vs_previous": rows_or_note(quality["vs_previous"], "no previous evaluation of the same budget, mode and splits"),
            **({"task": task} if task == "regression" else {}),
        },
    )


def rows_or_note(rows: list[dict], note: str) -> dg.MetadataValue:
    return table(rows) if rows else dg.MetadataValue.text(note)


def evaluation_history(context: dg.AssetExecutionContext, limit: int = HISTORY_VERSIONS) -> list[dict]:
    """The ``finetune_eval`` materializations before this one, oldest first: ``{"metrics", "dvc_tag",
    **summary}`` each (those from before summaries were recorded are left out)."""
    found = context.instance.fetch_materializations(context.asset_key, limit=limit).records
    history = []
    for record in reversed(found):
        meta = record.asset_materialization.metadata if record.asset_materialization else {}
        if "summary" not in meta:
            continue
        metrics = {k: v.value for k, v in meta.items() if isinstance(v, dg.FloatMetadataValue)}
        tag = meta["dvc_tag"].value if "dvc_tag" in meta else None
        history.append({**meta["summary"].value, "metrics": metrics, "dvc_tag": tag})
    return history


@dg.asset_check(
    asset=finetune_eval,
    description="The subset is not behind the uniform subsets of its size: warns when its score is worse than "
    "their mean by more than one s.e.m. (each finetuning mode).",
)
def not_behind_uniform(finetune_eval: dict) -> dg.AssetCheckResult:
    rows = finetune_eval.get("quality", {}).get("vs_uniform", [])
    return dg.AssetCheckResult(
        passed=not any(r["behind"] for r in rows), severity=dg.AssetCheckSeverity.WARN,
        metadata={"vs_uniform": rows_or_note(rows, "no uniform baseline")},
    )


@dg.asset_check(
    asset=finetune_eval,
    description="The subset is not behind the previous version (same budget, mode and splits): warns when accuracy "
    "fell by more than 2 points (MAE rose by more than 2%).",
)
def not_behind_previous_version(finetune_eval: dict) -> dg.AssetCheckResult:
    quality = finetune_eval.get("quality", {})
    rows = quality.get("vs_previous", [])
    return dg.AssetCheckResult(
        passed=not any(r["behind"] for r in rows), severity=dg.AssetCheckSeverity.WARN,
        metadata={"previous_version": str(quality.get("previous_tag")),
                  "vs_previous": rows_or_note(rows, "nothing comparable before")},
    )
