"""A run that waits (for a pool slot, for the versioning lock) says what it waits for, and Ctrl-C (SIGINT)
stops it promptly. A real second process holds the slot or the lock; the report interval is shortened
through ``SKMM_WAIT_REPORT_S`` instead of waiting the default 30 s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from procs import stop, wait_for

ROOT = Path(__file__).resolve().parents[1]

# A live run that holds the one slot of the `gpu` pool until it is stopped, as a run sketching a large shard would.
HOLD_SLOT = """
import time
import dagster as dg
from skmm_pipeline.recovery import process_tags

@dg.op(pool="gpu")
def hold_gpu():
    print("holding", flush=True)
    time.sleep(600)

@dg.job
def holder():
    hold_gpu()

holder.execute_in_process(instance=dg.DagsterInstance.get(), tags=process_tags())
"""

# Another process writing a subset version: it holds the store's write lock until it is stopped.
HOLD_LOCK = """
import sys, time
from skmm_pipeline.versioning.dvc_store import SubsetStore

with SubsetStore(sys.argv[1])._locked():
    print("holding", flush=True)
    time.sleep(600)
"""


def spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    # SIGINT back to its default: a suite started in the background (``cmd &`` without job control) hands
    # its children an ignored SIGINT, and Python then installs no KeyboardInterrupt for Ctrl-C.
    return subprocess.Popen([sys.executable, *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt(proc: subprocess.Popen, log: Path, waiting: str, timeout: float) -> str:
    """Wait until ``proc`` reports ``waiting`` twice (the report repeats), Ctrl-C it; returns its output."""
    wait_for(lambda: log.read_text().count(waiting) >= 2 or proc.poll() is not None, timeout, f"{waiting!r} twice")
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # promptly: not after the holder lets go (600 s)
    return log.read_text()


def test_a_run_waiting_for_a_pool_slot_says_so_and_stops_on_ctrl_c(project, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home)  # pools of one slot
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT), "SKMM_WAIT_REPORT_S": "1"}
    env.pop("SKMM_KILL_AT", None)
    (tmp_path / "hold.py").write_text(textwrap.dedent(HOLD_SLOT))
    holder = spawn([str(tmp_path / "hold.py")], tmp_path / "holder.log", env)
    try:
        wait_for(lambda: "holding" in (tmp_path / "holder.log").read_text(), 120, "the holder to take the gpu slot")
        log = tmp_path / "demo.log"
        proc = spawn(["-m", "skmm_pipeline.cli", "demo", "--root", str(project), "--no-benchmark", "--budget", "10"],
                     log, env)
        try:
            out = interrupt(proc, log, "is waiting for a slot of pool 'gpu' for gradient_sketch", 600)
        finally:
            stop(proc)
        assert proc.returncode == 130, out[-3000:]
        assert "(holder))" in out  # it names who holds the slot
        assert "skmm: interrupted" in out and "Traceback" not in out

        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            stopped = instance.get_runs(filters=RunsFilter(job_name="sketch_shard"))
            assert [r.status for r in stopped] == [DagsterRunStatus.CANCELED]
            # The interrupted run gave back what it held or waited for; the holder keeps its slot.
            held = instance.event_log_storage.get_concurrency_run_ids()
            assert stopped[0].run_id not in held and len(held) == 1
            assert holder.poll() is None
    finally:
        stop(holder)


def test_a_writer_waiting_for_the_versioning_lock_says_so_and_stops_on_ctrl_c(project, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SKMM_WAIT_REPORT_S": "0.5"}
    (tmp_path / "hold.py").write_text(textwrap.dedent(HOLD_LOCK))
    holder = spawn([str(tmp_path / "hold.py"), str(project)], tmp_path / "holder.log", env)
    try:
        wait_for(lambda: "holding" in (tmp_path / "holder.log").read_text(), 120, "the holder to take the lock")
        log = tmp_path / "push.log"
        proc = spawn(["-m", "skmm_pipeline.cli", "versions", "push", "--repo", str(project)], log, env)
        try:
            out = interrupt(proc, log, "another process is writing a subset version", 120)
        finally:
            stop(proc)
        assert proc.returncode == 130, out
        assert "write.lock" in out and "skmm: interrupted" in out and "Traceback" not in out
        assert holder.poll() is None
    finally:
        stop(holder)
