"""``skmm demo``: the whole pipeline on the embedded digits scenario, then the results and the UIs to open."""

from __future__ import annotations

import sys
from pathlib import Path

from skmm_pipeline.demo import format_report, run_demo


def run(args) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress and wait reports show as they happen, piped too
    root = Path(args.root).resolve()
    record = run_demo(root, budget=args.budget, seed=args.seed, n_shards=args.shards, finetune_mode=args.finetune,
                      benchmark=args.benchmark, benchmark_config={"seeds": args.benchmark_seeds})
    print(format_report(record))
    db = record["mlflow_tracking_uri"]
    print(
        "\nOpen the UIs:\n"
        f"  Dagster: DAGSTER_HOME={root}/dagster_home .venv/bin/dagster dev -m skmm_pipeline.definitions\n"
        f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {db} --port 5000\n"
        f"           then this run, in the model-training view: {record['mlflow_run_url']}"
    )
    return 0
