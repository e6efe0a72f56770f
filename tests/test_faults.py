"""Fault injection: the demo is really killed (SIGKILL, at named kill points inside a run) and the next
``skmm demo`` must complete without hand repair, leaving no run marked running, no pool slot held, no
MLflow run RUNNING, no half-written version (every listed version complete and pushed) and no
leftovers in the user's checkout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from mlflow.tracking import MlflowClient

from skmm_pipeline.recovery import ACTIVE, PID_TAG
from skmm_pipeline.tracking.mlflow_store import project_tracking_uri
from skmm_pipeline.versioning.dvc_store import SubsetStore

ROOT = Path(__file__).resolve().parents[1]


def demo(project: Path, home: Path, kill_at: str | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    env.pop("SKMM_KILL_AT", None)
    if kill_at:
        env["SKMM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "skmm_pipeline.cli", "demo", "--root", str(project), "--no-benchmark",
                           "--budget", "10"], env=env, capture_output=True, text=True, timeout=timeout)


# kill point -> (the job it kills, whether it dies holding a pool slot, versions made before it died)
KILLS = {"gradient_sketch": ("sketch_shard", True, 0), "sketch_rows": ("sketch_shard", True, 0),
         "version_swap": ("reselect", True, 0), "version_dvc_add": ("reselect", True, 0),
         "version_tag": ("reselect", True, 1), "finetune_eval": ("reselect", False, 1)}


@pytest.mark.parametrize("kill_at", sorted(KILLS))
def test_a_killed_run_never_blocks_the_next_one(project, tmp_path, monkeypatch, kill_at):
    job, holds_slot, versions_before = KILLS[kill_at]
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home)  # the project's instance: pools of one slot
    killed = demo(project, home, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        dead = instance.get_runs(filters=RunsFilter(statuses=ACTIVE))
        assert [r.job_name for r in dead] == [job] and PID_TAG in dead[0].tags
        # A run killed in a gpu-pool step still holds its slot: without recovery every later one would wait forever.
        assert (dead[0].run_id in instance.event_log_storage.get_concurrency_run_ids()) == holds_slot

    again = demo(project, home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {dead[0].run_id[:8]} ({job}) died with its process" in again.stdout
    assert f"subset version (DVC tag): subset-v{versions_before + 1:04d}" in again.stdout
    if kill_at == "finetune_eval":
        assert "1 MLflow run(s) marked FAILED" in again.stdout
    # Every version is complete and on the remote, and the user's checkout shows nothing left behind.
    store = SubsetStore(str(project))
    versions = store.list_versions()
    assert [v.tag for v in versions] == [f"subset-v{i + 1:04d}" for i in range(versions_before + 1)]
    assert all(v.pushed for v in versions) and store.pending_pushes() == []
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=project, capture_output=True, text=True)
    assert not [line for line in status.stdout.splitlines() if ".data." in line], status.stdout

    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(dead[0].run_id).status == DagsterRunStatus.FAILURE
        assert not instance.get_runs(filters=RunsFilter(statuses=ACTIVE))
        assert not instance.event_log_storage.get_concurrency_run_ids()
    client = MlflowClient(tracking_uri=project_tracking_uri(project))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    # No half-written sketch is ever read: the killed shard was sketched again, complete, with its manifest.
    sketches = list((project / ".skmm" / "artifacts" / "sketches").rglob("*.json"))
    assert len(sketches) == 3
