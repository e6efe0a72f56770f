"""The main job on the embedded default: land the digits shards, materialize every asset, report.

Runs through the real Dagster instance in ``DAGSTER_HOME``, so every run, materialization and its
metadata appear in the Dagster UI afterwards.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd

from skmm_pipeline import evaluation as cmp
from skmm_pipeline.core import defaults
from skmm_pipeline.core.errors import SetupError
from skmm_pipeline.core.progress import progress_to
from skmm_pipeline.core.validation import check_budget
from skmm_pipeline.data.digits import load_digits_transfer, write_digits_shards
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.automation import scan_landing
from skmm_pipeline.defs.benchmark_assets import BenchmarkConfig, check_config
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.recovery import fail_mlflow_runs, process_tags, recover_dead_runs, remove_orphan_files
from skmm_pipeline.watch import execute_watched


def dagster_home() -> Path:
    home = os.environ.get("DAGSTER_HOME", "")
    if not home:
        raise SetupError("DAGSTER_HOME is not set; run e.g. `export DAGSTER_HOME=$PWD/dagster_home`")
    path = Path(home)
    if not path.is_absolute():
        raise SetupError(f"DAGSTER_HOME must be an absolute path, got {home!r}")
    if not path.is_dir():
        raise SetupError(f"DAGSTER_HOME={home} does not exist or is not a directory")
    return path


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_demo(
    root: Path,
    budget: int = defaults.BUDGET,
    seed: int = defaults.SEED,
    n_shards: int = defaults.DEMO_SHARDS,
    pretrain_epochs: int = 40,
    finetune_mode: str = "ft1",
    log=print,
    benchmark: bool = False,
    benchmark_config: dict | None = None,
) -> dict:
    """Register the embedded shards and materialize the whole graph; returns finetune_eval's record.

    ``benchmark``: then also run the ``benchmark`` job (``method_benchmark``, run config
    ``benchmark_config``, e.g. ``{"seeds": 3}``); its record is returned under ``"benchmark"``.
    ``log`` receives what happens, including the long steps' progress lines (``core.progress``).
    """
    with progress_to(lambda line: log(f"[skmm]   {line}")):
        return _run_demo(root, budget, seed, n_shards, pretrain_epochs, finetune_mode, log, benchmark, benchmark_config)


def _run_demo(root, budget, seed, n_shards, pretrain_epochs, finetune_mode, log, benchmark, benchmark_config) -> dict:
    dagster_home()
    root = Path(root).resolve()
    # Fail before any work if the budget cannot be met by the pool.
    check_budget(budget, len(load_digits_transfer().pool.labels))
    if benchmark:
        check_config(BenchmarkConfig(**(benchmark_config or {})))
    settings = SkmmSettings(budget=budget, seed=seed, pretrain_epochs=pretrain_epochs, finetune_mode=finetune_mode)
    defs = build_definitions(root, settings=settings)
    # A dirty data/ would make the versioning step fail after all the work: refuse up front.
    defs.resources["dvc"].store().check_clean()
    workspace = defs.resources["workspace"]
    write_digits_shards(workspace.landing, n_shards)
    # Every shard in the landing folder takes part, including ones added with `skmm shards add`.
    names, refused = scan_landing(workspace.landing)
    names = sorted(names)
    if refused:
        log(f"[skmm] ignoring shard files with unsafe names: {refused}")

    instance = dg.DagsterInstance.get()
    # A run killed earlier would hold its pool slot forever and block every step of that pool.
    mark_mlflow = fail_mlflow_runs(defs.resources["mlflow"].tracker())
    recover_dead_runs(instance, mark_mlflow, log)
    remove_orphan_files(instance, [workspace.landing, workspace.evaluation, workspace.artifacts], log)
    known = set(instance.get_dynamic_partitions(shard_partitions.name))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions(shard_partitions.name, new)
    for gone in sorted(known - set(names)):
        log(f"[skmm] shard {gone!r} is no longer in {workspace.landing}; removing its partition")
        instance.delete_dynamic_partition(shard_partitions.name, gone)

    def run(job: str, what: str, **kw):
        log(f"[skmm] {what}")
        run_config = {**QUIET, **kw.pop("run_config", {})}
        run_id = str(uuid.uuid4())
        job_def = defs.resolve_job_def(job)
        # Watched: a wait for a pool slot is reported on the console, and Ctrl-C stops the run at once.
        result = execute_watched(lambda: job_def.execute_in_process(instance=instance, run_config=run_config,
                                                                    tags=process_tags(), run_id=run_id, **kw),
                                 instance, run_id, job, log, mark_mlflow)
        if not result.success:
            raise RuntimeError(f"job {job!r} failed (run {result.run_id}); see the Dagster UI for the error")
        return result

    log(f"[skmm] DAGSTER_HOME={dagster_home()}; shards {', '.join(names)} ({len(new)} new)")
    run("pretrain", "pretrained_model: training the small CNN on digits 0-4")
    for name in names:
        run("sketch_shard", f"raw_shard + gradient_sketch [{name}]", partition_key=name)
    result = run("reselect", f"skmm_selection (n={budget}) -> subset_version (DVC) -> finetune_eval (MLflow)")
    record = dict(result.output_for_node("finetune_eval"))
    if benchmark:
        config = dict(benchmark_config or {})
        what = ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
        bench = run("benchmark", f"method_benchmark ({what}): every method x budget x seed -> MLflow",
                    run_config={"ops": {"method_benchmark": {"config": config}}})
        record["benchmark"] = bench.output_for_node("method_benchmark")
    return record


def format_report(record: dict) -> str:
    table = pd.DataFrame(record["rows"])[["finetune", "method", "n", "test_accuracy", "sem"]]
    table["test accuracy (%)"] = [
        f"{100 * a:.1f}" + (f" ± {100 * s:.1f}" if s else "") for a, s in zip(table.test_accuracy, table["sem"])
    ]
    table = table[["finetune", "method", "n", "test accuracy (%)"]]
    lines = [
        "",
        "Test accuracy on the digits 5-9 test split:",
        table.to_string(index=False),
        "",
        *quality_lines(record.get("quality", {})),
        f"subset version (DVC tag): {record['dvc_tag']}   (git show {record['dvc_tag']}; skmm versions list)",
        f"MLflow run: {record['mlflow_run_id']} in {record['mlflow_tracking_uri']}",
    ]
    if "benchmark" in record:
        lines += ["", format_benchmark(record["benchmark"])]
    return "\n".join(lines)


def quality_lines(quality: dict) -> list[str]:
    """The subset against uniform and against the previous version, one line each per finetuning mode
    (accuracy in points, MAE in its unit; positive is better)."""
    def amount(r, key):
        return f"{100 * r[key]:+.1f} points" if r["metric"] == "acc" else f"{r[key]:+.3f} MAE"

    lines = [f"{r['finetune']} vs uniform: {amount(r, 'gain')} (uniform s.e.m. {amount(r, 'uniform_sem')[1:]})"
             + ("   WARNING: behind uniform by more than one s.e.m." if r["behind"] else "")
             for r in quality.get("vs_uniform", [])]
    lines += [f"{r['finetune']} vs previous version {quality['previous_tag']}: {amount(r, 'change')}"
              + ("   WARNING: behind the previous version" if r["behind"] else "")
              for r in quality.get("vs_previous", [])]
    return [*lines, ""] if lines else []


def format_benchmark(bench: dict) -> str:
    """The method_benchmark record as text: one mean ± s.e.m. table and one paired-z table per group."""
    summary = pd.DataFrame(bench["summary"])
    for col in ("mean", "sem", "diff", "diff_sem", "z"):
        summary[col] = pd.to_numeric(summary[col], errors="coerce")
    seeds = bench["seeds"]
    lines = [f"Selection benchmark: test accuracy (%), mean ± s.e.m. over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]})"]
    for ft in dict.fromkeys(summary.finetune):
        for group in (*cmp.GROUPS, cmp.REFERENCE):
            table = cmp.method_table(summary, ft, group)
            if table.empty:
                continue
            lines += ["", f"{ft}, {group}:", table.to_string()]
            if group != cmp.REFERENCE:
                z = cmp.z_table(summary, ft, group)
                if len(z):
                    lines += ["", f"{ft}, {group}: paired difference to {z.index.name[3:]} (points, z = mean / s.e.m.):",
                              z.to_string()]
    lines += ["", f"{bench['runs']} runs ({bench['failed_runs']} failed) in {bench['seconds']:.0f} s; "
              f"MLflow run: {bench['mlflow_run_id']}"]
    return "\n".join(lines)
