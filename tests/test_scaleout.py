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


def _latest_metadata(home, asset: str, partition: str | None = None) -> dict:
    instance = dg.DagsterInstance.from_config(str(home))
    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1).records
    assert records, f"{asset} was not materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_sketch_and_candidate_steps_run_on_a_celery_worker(project, tmp_path):
    """gradient_sketch and then (composable selection) shard_candidates run on the worker; the merge in
    skmm_selection reuses the candidates the worker made."""
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

    names = write_digits_shards(project / ".skmm" / "landing", 2)
    # Two shards: one sketched through the worker, the other at the same time in a local process.
    dg.DagsterInstance.from_config(str(home)).add_dynamic_partitions("shards", names)
    redis = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                  tmp_path / "redis.log")
    worker = None
    try:
        wait_for(lambda: port_open(port), 30, "redis")
        worker = start([str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(worker_cfg),
                        "-n", "skmm-test-worker"], tmp_path / "worker.log", env=env, cwd=project)
        config = json.dumps({"resources": {"settings": {"config": {
            "pretrain_epochs": 1, "selection_mode": "composable", "budget": 10, "composable_c": 2.0}}}})

        def materialize(*runs):
            """Each run (select, partition or None, executor) in its own process, all at once; their outputs."""
            procs = [subprocess.Popen(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "skmm_pipeline.definitions", "--select", select,
                 "--config-json", config, *(["--partition", partition] if partition else [])],
                cwd=project, env={**env, "SKMM_EXECUTOR": executor}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True) for select, partition, executor in runs]
            outs = [p.communicate(timeout=300)[0] for p in procs]
            for p, out in zip(procs, outs):
                assert p.returncode == 0, out[-6000:]
            return outs

        materialize(("pretrained_model,validation_sketch", None, "multiprocess"))
        wait_for(lambda: "ready" in (tmp_path / "worker.log").read_text(), 120, "the celery worker")
        sketch = "raw_shard,gradient_sketch,shard_moment"
        run, _ = materialize((sketch, names[0], "celery"), (sketch, names[1], "multiprocess"))
        assert 'Submitting celery task for step "gradient_sketch"' in run
        # The step really ran in the worker process, not in the launching one.
        assert "Executing steps gradient_sketch in celery worker" in (tmp_path / "worker.log").read_text()
        assert list((project / ".skmm" / "artifacts" / "sketches").rglob(f"{names[0]}.json"))

        # Composable selection: each shard's candidates on the worker, the merge reusing them.
        materialize(("pool_moment", None, "multiprocess"))
        materialize(*[("shard_candidates", name, "celery") for name in names])
        assert (tmp_path / "worker.log").read_text().count("Executing steps shard_candidates in celery worker") == 2
        assert all(_latest_metadata(home, "shard_candidates", name)["computed"] is True for name in names)
        materialize(("skmm_selection", None, "multiprocess"))
        selection = _latest_metadata(home, "skmm_selection")
        assert selection["selection_mode"] == "composable" and selection["n"] == 10
        assert selection["candidates_recomputed"] == []  # every candidate set came from the worker's steps
    finally:
        if worker is not None:
            stop(worker)
        stop(redis)
