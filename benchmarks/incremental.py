"""Re-selection after one new shard: incremental (the sensor sketches only the new shard) vs
recomputing every sketch, on a real Dagster instance and a temp git+DVC repo.

    python benchmarks/incremental.py [--ks 4,8] [--shard-size 2000]

Prints, per k existing shards: samples sketched and sketching seconds (sum of the gradient_sketch
steps' own timings) for both strategies, the end-to-end wall time including re-selection, and the
ratios; the headline lines at the end are `name: value`.
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import dagster as dg

from skmm_pipeline.data.digits import write_new_digits_shard
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.automation import shard_sensor
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.defs.sketch import gradient_sketch
from skmm_pipeline.versioning.dvc_store import SubsetStore

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def tick(defs, instance, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"workspace": defs.resources["workspace"]})
    result = shard_sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def sketch_partitions(defs, instance, keys):
    job = defs.resolve_job_def("sketch_shard")
    samples, seconds = 0, 0.0
    for key in keys:
        result = job.execute_in_process(instance=instance, partition_key=key, run_config=QUIET)
        mat = [e for e in result.get_asset_materialization_events() if e.asset_key == gradient_sketch.key][0]
        meta = mat.step_materialization_data.materialization.metadata
        samples += int(meta["rows"].value)
        seconds += float(meta["seconds"].value)
    return samples, seconds


def scenario(k: int, shard_size: int, incremental: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        SubsetStore(str(root), remote_url=str(Path(tmp) / "remote")).ensure_initialized()
        defs = build_definitions(root, settings=SkmmSettings(budget=40, uniform_repeats=1, pretrain_epochs=5))
        landing = defs.resources["workspace"].landing
        for s in range(k):
            write_new_digits_shard(landing, f"shard-{s:03d}", shard_size, seed=s)
        with dg.instance_for_test() as instance:
            defs.resolve_job_def("pretrain").execute_in_process(instance=instance, run_config=QUIET)
            first = tick(defs, instance, None)
            sketch_partitions(defs, instance, [r.partition_key for r in first.run_requests])
            defs.resolve_job_def("reselect").execute_in_process(instance=instance, run_config=QUIET)

            write_new_digits_shard(landing, f"shard-{k:03d}", shard_size, seed=k)
            t0 = time.perf_counter()
            if incremental:
                keys = [r.partition_key for r in tick(defs, instance, first.cursor).run_requests]
            else:
                tick(defs, instance, first.cursor)
                keys = sorted(instance.get_dynamic_partitions("shards"))
            samples, seconds = sketch_partitions(defs, instance, keys)
            defs.resolve_job_def("reselect").execute_in_process(instance=instance, run_config=QUIET)
            wall = time.perf_counter() - t0
    return {"shards_sketched": len(keys), "samples": samples, "sketch_s": seconds, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: k = 2, shards of 60 samples")
    args = ap.parse_args()
    if args.quick:
        args.ks, args.shard_size = "2", 60
    ks = [int(k) for k in args.ks.split(",")]
    print(f"{'k':>3} {'strategy':>12} {'shards':>7} {'samples':>8} {'sketch s':>9} {'wall s':>7}")
    heads = []
    for k in ks:
        inc = scenario(k, args.shard_size, incremental=True)
        full = scenario(k, args.shard_size, incremental=False)
        for name, r in (("incremental", inc), ("recompute", full)):
            print(f"{k:>3} {name:>12} {r['shards_sketched']:>7} {r['samples']:>8} {r['sketch_s']:>9.2f} {r['wall_s']:>7.1f}")
        heads.append((k, full["samples"] / inc["samples"], full["sketch_s"] / inc["sketch_s"], full["wall_s"] / inc["wall_s"]))
    print()
    for k, work, sk, wall in heads:
        print(f"sketch_work_ratio_k{k}: {work:.2f}  (target >= {0.8 * k:.1f})")
        print(f"sketch_time_ratio_k{k}: {sk:.2f}")
        print(f"end_to_end_ratio_k{k}: {wall:.2f}")


if __name__ == "__main__":
    main()
