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
# Killed one after another in one workspace, in the order a run reaches them: each next run recovers the
# previous one, goes past the point where it died and dies further on; the last run completes. The versions
# each run leaves complete before it dies (queued, pushed, versioned) count towards the last one's.
CHAIN = [("pretrained_weights", "pretrain", False, 0), ("raw_shard_write", "sketch_shard", False, 0),
         ("raw_shard_registered", "sketch_shard", False, 0), ("version_queued", "reselect", True, 1),
         ("version_push", "reselect", True, 1), ("version_mlflow", "reselect", True, 1)]


def fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home)  # the project's instance: pools of one slot
    return home


def kill(project: Path, home: Path, point: str, job: str, holds_slot: bool, dead_before: str | None = None) -> str:
    """Run the demo until it kills itself at ``point`` in ``job``; returns the dead run's id. ``dead_before``:
    the run killed before, which this one must have recovered first."""
    killed = demo(project, home, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if dead_before:  # it recovered the run killed before it first
        assert f"run {dead_before[:8]} " in killed.stdout, killed.stdout
    with dg.DagsterInstance.get() as instance:
        dead = instance.get_runs(filters=RunsFilter(statuses=ACTIVE))
        assert [r.job_name for r in dead] == [job] and PID_TAG in dead[0].tags
        # A run killed in a pool step still holds its slot: without recovery every later one would wait forever.
        assert (dead[0].run_id in instance.event_log_storage.get_concurrency_run_ids()) == holds_slot
    return dead[0].run_id


def check_recovered(project: Path, home: Path, dead_id: str, job: str, versions: int, tmp_path: Path) -> str:
    """Run the demo to completion after ``dead_id`` died; check every invariant; returns its stdout."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout
    again = demo(project, home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {dead_id[:8]} ({job}) died with its process" in again.stdout
    assert f"subset version (DVC tag): subset-v{versions:04d}" in again.stdout
    # Every version is complete and on the remote, and the user's checkout shows nothing left behind.
    store = SubsetStore(str(project))
    tags = [v.tag for v in store.list_versions()]
    assert tags == [f"subset-v{i + 1:04d}" for i in range(versions)]
    assert all(v.pushed for v in store.list_versions()) and store.pending_pushes() == []
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=project, capture_output=True, text=True)
    assert not [line for line in status.stdout.splitlines() if ".data." in line], status.stdout
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout == head
    assert not [p for p in project.rglob(".*.tmp") if p.is_file()]  # no temporary file of a killed writer
    # Every version checks out, its data pulled from the remote, in a fresh clone (empty DVC cache).
    clone = tmp_path / f"clone-{dead_id[:8]}"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    other = SubsetStore(str(clone))
    for tag in tags:
        other.checkout(tag)
        assert (clone / "data" / "subset.csv").read_bytes() == store.read_file(tag, "subset.csv")
    shutil.rmtree(clone)

    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(dead_id).status == DagsterRunStatus.FAILURE
        assert not instance.get_runs(filters=RunsFilter(statuses=ACTIVE))
        assert not instance.event_log_storage.get_concurrency_run_ids()
    client = MlflowClient(tracking_uri=project_tracking_uri(project))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    # No half-written sketch is ever read: the killed shard was sketched again, complete, with its manifest.
    sketches = list((project / ".skmm" / "artifacts" / "sketches").rglob("*.json"))
    assert len(sketches) == 3
    return again.stdout


@pytest.mark.parametrize("kill_at", sorted(KILLS))
def test_a_killed_run_never_blocks_the_next_one(project, tmp_path, monkeypatch, kill_at):
    job, holds_slot, versions_before = KILLS[kill_at]
    home = fresh_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dead = kill(project, home, kill_at, job, holds_slot)
    out = check_recovered(project, home, dead, job, versions_before + 1, tmp_path)
    if kill_at == "finetune_eval":
        assert "1 MLflow run(s) marked FAILED" in out


def test_runs_killed_one_after_another_never_block_the_last_one(project, tmp_path, monkeypatch):
    home = fresh_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dead = None
    for point, job, holds_slot, _ in CHAIN:
        left = [p for p in project.rglob(".*.tmp") if p.is_file()]
        dead = kill(project, home, point, job, holds_slot, dead_before=dead)
        assert not [p for p in left if p.exists()]  # the temporary file a killed writer left was removed
        if point in ("pretrained_weights", "raw_shard_write"):  # killed between its temporary file and the rename
            assert [p for p in project.rglob(".*.tmp") if p.is_file()]
    out = check_recovered(project, home, dead, CHAIN[-1][1], sum(c[3] for c in CHAIN) + 1, tmp_path)
    assert "1 MLflow run(s) marked FAILED" in out  # subset_version's, open when version_mlflow killed it
