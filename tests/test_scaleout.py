"""Steps on a real distributed engine: Celery workers with a Redis broker, all on loopback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from procs import free_port, port_open, start, stop, wait_for

from skmm_pipeline.data.digits import write_digits_shards

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (CI installs it)")

BIN = Path(sys.executable).parent


def test_sketch_step_runs_on_a_celery_worker(project, tmp_path):
    port = free_port()
    broker, backend = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # dagster-celery starts the `celery` program by name: the environment's bin must be on PATH.
    env = {**os.environ, "DAGSTER_HOME": str(home), "SKMM_PROJECT_ROOT": str(project),
           "SKMM_CELERY_BROKER": broker, "SKMM_CELERY_BACKEND": backend,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    worker_cfg = tmp_path / "celery.yaml"
    worker_cfg.write_text(f"execution:\n  config:\n    broker: {broker}\n    backend: {backend}\n")

    write_digits_shards(project / ".skmm" / "landing", 2)
    dg.DagsterInstance.from_config(str(home)).add_dynamic_partitions("shards", ["digits-000"])
    redis = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                  tmp_path / "redis.log")
    worker = None
    try:
        wait_for(lambda: port_open(port), 30, "redis")
        worker = start([str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(worker_cfg),
                        "-n", "skmm-test-worker"], tmp_path / "worker.log", env=env, cwd=project)
        config = json.dumps({"resources": {"settings": {"config": {"pretrain_epochs": 1}}}})

        def materialize(select, *extra, executor="multiprocess"):
            return subprocess.run(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "skmm_pipeline.definitions", "--select", select,
                 "--config-json", config, *extra],
                cwd=project, env={**env, "SKMM_EXECUTOR": executor}, capture_output=True, text=True, timeout=300,
            )

        model = materialize("pretrained_model")
        assert model.returncode == 0, model.stderr[-3000:]
        wait_for(lambda: "ready" in (tmp_path / "worker.log").read_text(), 120, "the celery worker")
        run = materialize("raw_shard,gradient_sketch", "--partition", "digits-000", executor="celery")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert 'Submitting celery task for step "gradient_sketch"' in run.stdout + run.stderr
        # The step really ran in the worker process, not in the launching one.
        assert "Executing steps gradient_sketch in celery worker" in (tmp_path / "worker.log").read_text()
        assert list((project / ".skmm" / "artifacts" / "sketches").rglob("digits-000.json"))
    finally:
        if worker is not None:
            stop(worker)
        stop(redis)
