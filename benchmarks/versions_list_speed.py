"""How long `skmm versions list` takes over a repository of many subset versions.

Builds a real git + DVC repository with N subset versions (each with a finetune_eval-like MLflow run
in a sqlite store, as the pipeline records them), then times `skmm versions list` (and `--plot`) as a
user runs it: a fresh process, best of a few repeats.

    .venv/bin/python benchmarks/versions_list_speed.py [--versions 20] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skmm_pipeline.tracking.mlflow_store import MlflowTracker, run_tags, sqlite_uri
from skmm_pipeline.versioning.dvc_store import SubsetStore
from skmm_pipeline.versioning.subsets import SubsetManifest, record_subset_version

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "versions_list_speed.json"


def build_repo(root: Path, versions: int) -> str:
    """A git repository at ``root`` with ``versions`` subset versions and their evaluation runs; returns
    the MLflow tracking URI (the project's default store, which `skmm versions list` finds itself)."""
    root.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "initial"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    store = SubsetStore(root, remote_url=str(root.parent / "remote"))
    state = root / ".skmm" / "mlflow"
    tracker = MlflowTracker(sqlite_uri(state / "mlflow.db"), state / "artifacts")
    for k in range(versions):
        n = 10 + k
        ids = [f"s{k % 3}/{i}" for i in range(n)]
        manifest = SubsetManifest(
            sample_ids=ids, weights=[1.0 / n] * n, method="skmm", seed=k, shards={"s0": "a", "s1": "b", "s2": "c"},
            sketch_identity={"kind": "gaussian", "seed": 0, "m": 8}, budget=n, pool_size=500 + 10 * k,
            metrics={"moment_ratio": 0.5}, dagster_run_id=f"run-{k}")
        recorded = record_subset_version(store, manifest, tracker)
        with tracker.run("finetune_eval", tags=run_tags("eval", "finetune_eval", version=recorded.version)) as run:
            run.log_metrics({"acc_skmm": 0.8 + 0.002 * k, "acc_uniform_mean": 0.78, "acc_uniform_sem": 0.01})
            run.log_eval_metrics([{"method": "skmm", "n": n, "test_accuracy": 0.8 + 0.002 * k},
                                  {"method": "uniform", "n": n, "test_accuracy": 0.78}])
    return tracker.tracking_uri


def time_command(args: list[str], cwd: Path, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "skmm_pipeline.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"skmm {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 versions, 1 repeat, nothing saved")
    args = p.parse_args(argv)
    versions, repeats = (3, 1) if args.quick else (args.versions, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(repo, versions)
        result = {
            "versions": versions,
            "list_seconds": round(time_command(["versions", "list"], repo, repeats), 2),
            "list_plot_seconds": round(time_command(["versions", "list", "--plot", str(Path(tmp) / "h.png")],
                                                    repo, repeats), 2),
            "help_seconds": round(time_command(["--help"], repo, repeats), 2),
        }
    print(json.dumps(result))
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
