"""Evaluation: ``finetune_eval`` finetunes on the selected subset, on uniform subsets of its size and on
the full pool (``evaluation.evaluate_selection``) and logs the results to MLflow."""

import dagster as dg

from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.defs.metadata import embedded_image, linked_image, table
from skmm_pipeline.defs.resources import MlflowTracking, SkmmSettings, Workspace
from skmm_pipeline.evaluation import evaluate_selection, subset_grid
from skmm_pipeline.tracking.mlflow_store import artifact_url, dagster_note, run_tags, run_url


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
    tracker = mlflow.tracker()
    tags = run_tags(context.run_id, "finetune_eval", version=subset_version,
                    **{"mlflow.note.content": dagster_note(context.run_id, mlflow.dagster_url, "finetune_eval")})
    plot_name = "mae.png" if task == "regression" else "accuracy.png"
    grid = subset_grid(skmm_selection["sample_ids"], {name: rec["path"] for name, rec in raw_shard.items()},
                       title=f"{subset_version['tag']}: {result.method}, n={result.n} of {result.pool_size}")
    with tracker.run(f"{subset_version['tag']}-{result.method}-n{result.n}", tags=tags) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        kill_point("finetune_eval")
        run.log_eval_metrics(result.eval_rows)
        run.log_artifact_bytes(plot_name, plot, "plots")
        run.log_artifact_bytes("subset_grid.png", grid, "plots")
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
            "results": table(rows),
            # Inline while the MLflow UI serves the run's artifacts; the embedded copies need no server.
            "plot": linked_image(plot_name, artifact_url(mlflow.ui_url, run.run_id, f"plots/{plot_name}")),
            "subset_grid": linked_image("subset grid", artifact_url(mlflow.ui_url, run.run_id, "plots/subset_grid.png")),
            "plot_embedded": embedded_image(plot_name, plot),
            "subset_grid_embedded": embedded_image("subset grid", grid),
            "mlflow_run": dg.MetadataValue.url(run_url(mlflow.ui_url, run.experiment_id, run.run_id)),
            **{k: float(v) for k, v in metrics.items()},
            "mlflow_run_id": run.run_id,
            "mlflow_tracking_uri": mlflow.tracking_uri,
            "dvc_tag": subset_version["tag"],
            **({"task": task} if task == "regression" else {}),
        },
    )
