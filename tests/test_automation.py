"""Growing data: the shard sensor, incremental sketching, the re-selection schedule, asset checks."""

import multiprocessing
import os
import signal
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from skmm_pipeline.core.atomic import atomic_save_npz
from skmm_pipeline.data.digits import write_digits_shards, write_new_digits_shard
from skmm_pipeline.data.shards import ShardError, write_shard
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.automation import reselect_request, shard_sensor
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.defs.sketch import gradient_sketch
from skmm_pipeline.versioning.dvc_store import SubsetStore


@pytest.fixture
def pipeline(project, tmp_path):
    SubsetStore(str(project), remote_url=str(tmp_path / "remote")).ensure_initialized()
    defs = build_definitions(project, settings=SkmmSettings(budget=8, pretrain_epochs=1, uniform_repeats=2))
    with dg.instance_for_test() as instance:
        yield defs, instance, defs.resources["workspace"].landing


def tick(defs, instance, cursor=None):
    """Evaluate the shard sensor once and apply its partition requests, as the daemon would."""
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"workspace": defs.resources["workspace"]})
    result = shard_sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        else:
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)
    return result


def run_requests(defs, instance, result):
    job = defs.resolve_job_def("sketch_shard")
    for req in result.run_requests:
        assert job.execute_in_process(instance=instance, partition_key=req.partition_key).success


def sketch_counts(instance):
    counts = {}
    for p in instance.get_dynamic_partitions(shard_partitions.name):
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=gradient_sketch.key, asset_partitions=[p]), limit=100
        ).records
        counts[p] = len(recs)
    return counts


def test_sensor_waits_for_the_model_then_sketches_only_new_shards(pipeline):
    defs, instance, landing = pipeline
    write_digits_shards(landing, 3)
    (landing / "bad name.npz").write_bytes(b"x")

    first = tick(defs, instance)
    assert not first.run_requests and "pretrained_model has never been materialized" in first.skip_reason.skip_message
    assert sorted(instance.get_dynamic_partitions("shards")) == ["digits-000", "digits-001", "digits-002"]

    assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
    second = tick(defs, instance, first.cursor)
    assert sorted(r.partition_key for r in second.run_requests) == ["digits-000", "digits-001", "digits-002"]
    run_requests(defs, instance, second)

    idle = tick(defs, instance, second.cursor)
    assert not idle.run_requests and "no new or changed shards" in idle.skip_reason.skip_message
    assert "1 ignored for unsafe names" in idle.skip_reason.skip_message

    # Re-selection runs once, then the schedule skips while nothing changed.
    assert isinstance(reselect_request(instance), dg.RunRequest)
    reselect = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
    assert reselect.success
    checks = {e.check_name: e.passed for e in reselect.get_asset_check_evaluations()}
    assert checks["budget_met_with_unique_ids"] and checks["ids_in_registered_shards"]
    assert checks["single_sketch_identity"] and checks["dvc_remote_in_sync"]
    skip = reselect_request(instance)
    assert isinstance(skip, dg.SkipReason) and "no shard changed" in skip.skip_message

    # A new delivery: only its sketch is computed; the old shards keep their single materialization.
    name = write_new_digits_shard(landing, count=30)
    grow = tick(defs, instance, idle.cursor)
    assert [r.partition_key for r in grow.run_requests] == [name]
    # A tick racing the first one (same cursor, before the run happened) asks for the same run key,
    # which the daemon deduplicates.
    race = tick(defs, instance, idle.cursor)
    assert [r.run_key for r in race.run_requests] == [r.run_key for r in grow.run_requests]
    run_requests(defs, instance, grow)
    assert sketch_counts(instance) == {"digits-000": 1, "digits-001": 1, "digits-002": 1, name: 1}
    assert isinstance(reselect_request(instance), dg.RunRequest)
    regrown = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
    assert regrown.success
    # The new version is compared with the one before it, and the delivery's share of the picks is checked.
    checks = {e.check_name: e for e in regrown.get_asset_check_evaluations()}
    assert {"not_behind_uniform", "not_behind_previous_version", "picks_follow_shard_sizes",
            "no_duplicate_rows"} <= set(checks)
    assert checks["not_behind_previous_version"].metadata["previous_version"].value == "subset-v0001"
    shares = checks["picks_follow_shard_sizes"].metadata["shares"].value.records
    assert name in [r.data["shard"] for r in shares]
    quality = regrown.output_for_node("finetune_eval")["quality"]
    assert quality["previous_tag"] == "subset-v0001" and [r["finetune"] for r in quality["vs_previous"]] == ["FT-1"]
    store = SubsetStore(str(defs.resources["dvc"].repo_root))
    versions = store.list_versions()
    assert len(versions) == 2 and name in versions[-1].meta["shards"]

    # A shard that disappears is unregistered, so the next selection no longer includes it.
    (landing / f"{name}.npz").unlink()
    gone = tick(defs, instance, grow.cursor)
    assert name not in instance.get_dynamic_partitions("shards") and not gone.run_requests


def test_changed_shard_is_resketched(pipeline):
    defs, instance, landing = pipeline
    write_digits_shards(landing, 2)
    assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
    first = tick(defs, instance)
    run_requests(defs, instance, first)
    time.sleep(0.01)
    data = np.load(landing / "digits-001.npz")
    write_shard(landing / "digits-001.npz", data["images"][:50], data["labels"][:50])
    second = tick(defs, instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["digits-001"]


def test_unsafe_and_empty_shards(pipeline, tmp_path):
    defs, instance, landing = pipeline
    with pytest.raises(ShardError, match="invalid shard name"):
        write_new_digits_shard(landing, name="../escape")
    with pytest.raises(ShardError, match="invalid shard name"):
        defs.resources["workspace"].shard_path("a/b")
    write_shard(landing / "empty.npz", np.zeros((0, 1, 8, 8)))
    instance.add_dynamic_partitions("shards", ["empty"])
    with pytest.raises(ShardError, match="is empty"):
        defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key="empty")


def _write_forever(path: str) -> None:
    big = np.random.default_rng(0).normal(size=(2000, 1000)).astype(np.float32)
    k = 0
    while True:
        k += 1
        atomic_save_npz(Path(path), sketch=big + k, k=np.array(k))


def test_killed_writer_never_leaves_a_half_written_sketch(tmp_path):
    path = tmp_path / "sketch.npz"
    proc = multiprocessing.get_context("spawn").Process(target=_write_forever, args=(str(path),))
    proc.start()
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with np.load(path) as z:  # the last complete write, never a torn one
        assert np.array_equal(z["sketch"][0, :3], np.random.default_rng(0).normal(size=(2000, 1000)).astype(np.float32)[0, :3] + int(z["k"]))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "sketch.npz"]
    assert all(name.endswith(".tmp") for name in leftovers)  # a temp file at most, never read as a sketch
