"""End to end through the real Dagster webserver and daemon: `dagster dev` on a loopback port, driven
over GraphQL, with the shard sensor doing the registration and sketching."""

import os
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from procs import free_port, http_ok, start, stop, wait_for

from skmm_pipeline.data.digits import write_digits_shards, write_new_digits_shard
from skmm_pipeline.defs.sketch import gradient_sketch
from skmm_pipeline.versioning.dvc_store import SubsetStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def sketch_counts(instance):
    counts = {}
    for p in instance.get_dynamic_partitions("shards"):
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=gradient_sketch.key, asset_partitions=[p]), limit=100
        ).records
        counts[p] = len(recs)
    return counts


def run_job(client: DagsterGraphQLClient, job: str, config: dict | None = None, timeout: float = 240) -> str:
    run_id = client.submit_job_execution(job, run_config=config or {})
    status = wait_for(
        lambda: (s := client.get_run_status(run_id)) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                                         dg.DagsterRunStatus.CANCELED) and s,
        timeout, f"run {job}",
    )
    assert status == dg.DagsterRunStatus.SUCCESS, f"{job} ended {status}"
    return run_id


def test_dagster_dev_sensor_and_reselection(project, tmp_path):
    SubsetStore(str(project), remote_url=str(tmp_path / "remote")).ensure_initialized()
    landing = project / ".skmm" / "landing"
    write_digits_shards(landing, 3)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SKMM_PROJECT_ROOT": str(project), "SKMM_SENSOR_INTERVAL": "3"}
    server = start(
        [sys.executable, "-m", "dagster", "dev", "-m", "skmm_pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)],
        tmp_path / "dagster-dev.log", env=env, cwd=project,
    )
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/server_info"), 120, "dagster dev")
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        instance = dg.DagsterInstance.from_config(str(home))

        # The sensor registers the shards but waits for the model; then it sketches all three.
        wait_for(lambda: len(instance.get_dynamic_partitions("shards")) == 3, 120, "shards registered by the sensor")
        run_job(client, "pretrain", {"resources": {"settings": {"config": {"pretrain_epochs": 2}}}})
        wait_for(lambda: sketch_counts(instance) == {f"digits-00{k}": 1 for k in range(3)}, 300, "three shard sketches")

        run_job(client, "reselect")
        store = SubsetStore(str(project))
        assert [v.tag for v in store.list_versions()] == ["subset-v0001"]

        # A new delivery: the sensor registers and sketches it alone.
        name = write_new_digits_shard(landing, count=40)
        wait_for(lambda: sketch_counts(instance).get(name) == 1, 300, "the new shard's sketch")
        run_job(client, "reselect")
        versions = store.list_versions()
        assert [v.tag for v in versions] == ["subset-v0001", "subset-v0002"]
        assert name in versions[-1].meta["shards"]
        time.sleep(1)
        assert sketch_counts(instance) == {"digits-000": 1, "digits-001": 1, "digits-002": 1, name: 1}

        # Unknown jobs are refused through the same API with a clear error.
        with pytest.raises(DagsterGraphQLClientError):
            client.submit_job_execution("no_such_job")
    finally:
        stop(server, timeout=30)
    assert server.poll() is not None
