"""Recovering from runs whose process died (``kill -9``, a crash, a machine that went down).

Runs that the ``skmm`` command line launches in its own process carry a tag naming that process
(:func:`process_tags`: host, pid and the pid's start time, so a recycled pid is not mistaken for it).
Before it launches anything, :func:`recover_dead_runs` finds this host's runs that are still marked
as running but whose process is gone, marks them failed with that reason, frees the concurrency-pool
slots they held (otherwise every later step of the ``gpu`` or ``dvc`` pool waits for them forever),
and fails the MLflow runs they left RUNNING. Runs launched by the Dagster daemon (the UI, sensors,
schedules) are watched by Dagster's run monitoring instead (``dagster_home/dagster.yaml``), which
also frees the slots of runs that ended without releasing them. :func:`remove_orphan_files` then
deletes the temporary files that writers killed before their rename left in the workspace.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

import dagster as dg
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter

from skmm_pipeline.core.atomic import remove_orphan_temps

PID_TAG = "skmm/process"
ACTIVE = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid``, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    """Tags naming the current process, for runs it executes itself (``execute_in_process``)."""
    pid = os.getpid()
    stat = _stat(pid)
    return {PID_TAG: f"{socket.gethostname()}:{pid}:{stat[1] if stat else ''}"}


def _dead(tag: str) -> bool:
    """Whether the process a :data:`PID_TAG` names is gone (never for another host's processes)."""
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if os.path.isdir("/proc/self"):
        stat = _stat(int(pid))  # gone, a zombie, or the pid now taken by another process
        return stat is None or stat[0] in "ZX" or (bool(started) and stat[1] != started)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_dead_runs(instance: dg.DagsterInstance, mark_mlflow: Callable[[str], int] | None = None,
                      log: Callable[[str], None] = print) -> list[str]:
    """Fail this host's runs whose process is gone, free their pool slots and (through ``mark_mlflow``)
    their MLflow runs; free the slots still held by runs that already ended. Returns the recovered ids."""
    recovered = []
    for run in instance.get_runs(filters=RunsFilter(statuses=ACTIVE)):
        tag = run.tags.get(PID_TAG)
        if not tag or not _dead(tag):
            continue
        pid = tag.split(":")[1]
        instance.report_run_failed(run, f"the process that ran it (pid {pid}) is gone: killed or crashed; marked failed "
                                        "by skmm before the next run")
        recovered.append(run.run_id)
        failed_mlflow = mark_mlflow(run.run_id) if mark_mlflow else 0
        log(f"[skmm] run {run.run_id[:8]} ({run.job_name}) died with its process (pid {pid}): marked failed, "
            f"its pool slots freed" + (f", {failed_mlflow} MLflow run(s) marked FAILED" if failed_mlflow else ""))
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.status in FINISHED_STATUSES:
                storage.free_concurrency_slots_for_run(run_id)
    return recovered


def fail_mlflow_runs(tracker) -> Callable[[str], int]:
    """A ``mark_mlflow`` for :func:`recover_dead_runs`: the RUNNING MLflow runs tagged with a Dagster run."""

    def mark(dagster_run_id: str) -> int:
        client = tracker.client
        runs = client.search_runs([tracker.experiment_id()], filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}' "
                                  "and attributes.status = 'RUNNING'")
        for r in runs:
            client.set_tag(r.info.run_id, "error", "the Dagster run's process died (killed or crashed)")
            client.set_terminated(r.info.run_id, status="FAILED")
        return len(runs)

    return mark


def remove_orphan_files(instance: dg.DagsterInstance, folders: Iterable[Path],
                        log: Callable[[str], None] = print) -> int:
    """Delete the temporary files (``core.atomic``) under ``folders`` older than every run still active
    and than this call, that no process has open: a live writer's are never older than its run.
    Returns how many were removed."""
    before = time.time()
    for record in instance.get_run_records(filters=RunsFilter(statuses=ACTIVE)):
        if record.start_time:
            before = min(before, record.start_time)
    removed = remove_orphan_temps(folders, before)
    if removed:
        log(f"[skmm] removed {len(removed)} temporary file(s) left by killed writers: "
            + ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))
    return len(removed)
