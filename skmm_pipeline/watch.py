"""Running a job in this process, watched: a run that waits says what for, and Ctrl-C stops it at once.

Dagster's in-process execution captures SIGINT (and SIGTERM) and acts on it only inside a step's code, so
a run blocked on a pool slot (``Step still blocked by limit for pool gpu``) ignores Ctrl-C, and it
reports the wait only in its debug log. :func:`execute_watched` runs the job in a worker thread (Dagster
then leaves the signals alone) while the main thread reports the pool slots the run waits for, and who
holds them, as the wait begins and then every ``core.waiting.report_interval()`` seconds. On Ctrl-C or
SIGTERM it interrupts the worker (which unwinds through Dagster, giving back its slots), waits at most
``STOP_GRACE_S`` for it, marks the run canceled, frees any slot still held, fails its open MLflow runs
and raises :class:`KeyboardInterrupt`. Whatever the worker was writing is left as a kill would leave it,
which the next run recovers (``recovery``; the fault-injection suite).
"""

from __future__ import annotations

import ctypes
import signal
import threading
from typing import Callable, TypeVar

import dagster as dg

from skmm_pipeline.core.waiting import WaitReport, report_interval

T = TypeVar("T")
STOP_GRACE_S = 10.0  # how long an interrupted run may take to unwind (a step in a long C call) before it is left


def waiting_for(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What run ``run_id`` waits for: one phrase per pool in which it has a step waiting for a slot."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    phrases = []
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        steps = [s.step_key for s in info.pending_steps if s.run_id == run_id and s.assigned_timestamp is None]
        if not steps:
            continue
        holders = []
        for other in sorted(info.active_run_ids - {run_id}):
            run = instance.get_run_by_id(other)
            holders.append(f"run {other[:8]} ({run.job_name if run else 'deleted'})")
        phrases.append(f"a slot of pool {pool!r} for {', '.join(steps)} (limit {info.limit}, held by "
                       f"{', '.join(holders) or 'nobody: being freed'})")
    return phrases


def stop_run(instance: dg.DagsterInstance, run_id: str, why: str, mark_mlflow: Callable[[str], int] | None) -> None:
    """Mark run ``run_id`` canceled with ``why``, free its pool slots and fail its open MLflow runs."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceled(run, why)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    if mark_mlflow is not None:
        mark_mlflow(run_id)


def execute_watched(execute: Callable[[], T], instance: dg.DagsterInstance, run_id: str, job: str,
                    log: Callable[[str], None] = print, mark_mlflow: Callable[[str], int] | None = None) -> T:
    """``execute()`` (which runs ``job`` as run ``run_id``) in a worker thread; see the module."""
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = execute()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    worker = threading.Thread(target=work, name=f"skmm-{job}", daemon=True)
    main = threading.current_thread() is threading.main_thread()  # only there can signal handlers be set
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    interval = report_interval()
    report = None  # the current wait's: reported as it begins, then whenever due
    try:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=min(interval / 2, 5.0))
            waits = waiting_for(instance, run_id) if worker.is_alive() else []
            if not waits:
                report = None
            elif report is None or report.due():
                report = report or WaitReport(interval)
                log(f"[skmm] run {run_id[:8]} ({job}) is waiting for {'; '.join(waits)}, {report.waited:.0f} s so "
                    "far (Ctrl-C stops it)")
    except KeyboardInterrupt:
        # Interrupt the worker too: it unwinds through Dagster, which gives back the slots it claimed.
        if worker.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(KeyboardInterrupt))
            worker.join(timeout=STOP_GRACE_S)
        stop_run(instance, run_id, "interrupted (Ctrl-C or SIGTERM) while it ran", mark_mlflow)
        log(f"[skmm] interrupted: run {run_id[:8]} ({job}) marked canceled and its pool slots freed")
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
