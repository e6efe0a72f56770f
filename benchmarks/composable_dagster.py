"""Composable selection as one Dagster job run with the multiprocess executor, against the same work in one process.

    python benchmarks/composable_dagster.py [--rows 1000000 --m 256 --shards 128 --n 500 --c 2] [--markdown docs/results]
    python benchmarks/composable_dagster.py --quick        # a smoke run: numbers mean nothing

A simulated pool (``skmm_pipeline.data.simulated``: rows x m in S shards, generated per shard on the fly
into memory-mapped sketch files) is written and selected by a job run on a real DagsterInstance (a temp
DAGSTER_HOME), every step in its own process, ``max_concurrent`` = the number of cores:

* ``shards`` fans out one mapping per shard (DynamicOut);
* ``shard_moment[s]``: writes the shard's sketch file and its moment (``data.composable.cached_moment``);
* ``pool_moment``: their sum (from the cached shard moments);
* ``shard_candidates[s]``: the shard's c n candidates against the pool's moment (``cached_candidates``);
* ``merge``: ``composable_selection`` over every shard, which reuses every cached candidate set.

Each step records its seconds and its process's peak RSS (VmHWM) as output metadata; the table is read
back from the run's output events. The named alternative, in the same run of this script: one fresh
process writing the same pool (same generator, its own folder) and running ``composable_selection``
with an empty cache; the selections must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from skmm_pipeline.data.composable import cached_candidates, cached_moment, composable_selection, pool_moment_of
from skmm_pipeline.data.simulated import shard_sizes, write_simulated_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composable import md_table, peak_rss_mib  # noqa: E402 - benchmarks/composable.py, a script beside this one

# Each step runs in a process forked from a server that imported these once (VmHWM restarts at the fork).
PRELOAD = ["dagster", "pandas", "skmm_pipeline.data.composable", "skmm_pipeline.data.simulated"]


class SimPool(dg.ConfigurableResource):
    """Where the simulated pool lives and what to select from it."""

    root: str
    rows: int
    m: int
    shards: int
    n: int
    c: float

    @property
    def cache(self) -> Path:
        return Path(self.root) / "cache"


def _name(index: int) -> str:
    return f"s{index:04d}"


def _measured(value, t0: float, base: float, **meta) -> dg.Output:
    return dg.Output(value, metadata={"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
                                      "imports_rss_mib": base, **meta})


def _write(root: Path, pool: SimPool, index: int) -> dict:
    name = _name(index)
    record = write_simulated_shard(root / name, name, shard_sizes(pool.rows, pool.shards)[index], pool.m, index=index)
    return {"name": name, **record}


@dg.op(out=dg.DynamicOut(int))
def shards(pool: SimPool):
    for i in range(pool.shards):
        yield dg.DynamicOutput(i, mapping_key=_name(i))


@dg.op
def shard_moment(index: int, pool: SimPool) -> dg.Output:
    t0, base = time.perf_counter(), peak_rss_mib()
    record = _write(Path(pool.root) / "sk", pool, index)
    written = time.perf_counter() - t0
    cached_moment(pool.cache, record["name"], record)
    return _measured(record, t0, base, write_seconds=written)


@dg.op
def pool_moment(written: list, pool: SimPool) -> dg.Output:
    t0, base = time.perf_counter(), peak_rss_mib()
    moment, computed = pool_moment_of(pool.cache, {r["name"]: r for r in written})
    return _measured(moment, t0, base, rows=int(moment.count), moments_computed=len(computed))


@dg.op
def shard_candidates(record: dict, moment, pool: SimPool) -> dg.Output:
    t0, base = time.perf_counter(), peak_rss_mib()
    cands, computed = cached_candidates(pool.cache, record["name"], record, moment, pool.n, c=pool.c)
    return _measured(record, t0, base, candidates=int(cands.rows.size), computed=computed)


@dg.op
def merge(records: list, pool: SimPool) -> dg.Output:
    t0, base = time.perf_counter(), peak_rss_mib()
    res = composable_selection(pool.cache, {r["name"]: r for r in records}, pool.n, c=pool.c)
    d = res["diagnostics"]
    return _measured(res["sample_ids"], t0, base, candidates=int(d["candidates"]), recomputed=len(res["recomputed"]),
                     moments_computed=len(res["moments_computed"]), merge_seconds=float(d["merge_seconds"]))


@dg.job(resource_defs={"pool": SimPool.configure_at_launch()}, executor_def=dg.multiprocess_executor)
def composable_pool():
    written = shards().map(shard_moment)
    moment = pool_moment(written.collect())
    merge(written.map(lambda record: shard_candidates(record, moment)).collect())


def run_dagster(root: Path, spec: dict, cores: int) -> dict:
    """One run of ``composable_pool`` on an instance in ``root/home``: per-stage rows and the run's wall time."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    config = {"resources": {"pool": {"config": {"root": str(root / "dagster"), **spec}}},
              "execution": {"config": {"max_concurrent": cores, "start_method": {"forkserver": {"preload_modules": PRELOAD}}}},
              "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with dg.DagsterInstance.get() as instance:
        t0 = time.perf_counter()
        with dg.execute_job(dg.reconstructable(composable_pool), instance=instance, run_config=config) as result:
            wall = time.perf_counter() - t0
            if not result.success:
                raise RuntimeError(f"the run failed: {[e.message for e in result.all_events if e.is_failure]}")
            steps = [{"stage": e.step_key.split("[")[0], "step": e.step_key,
                      **{k: v.value for k, v in e.step_output_data.metadata.items()}}
                     for e in result.all_events
                     if e.event_type == dg.DagsterEventType.STEP_OUTPUT and "seconds" in e.step_output_data.metadata]
            chosen = result.output_for_node("merge")
    return {"wall": wall, "steps": pd.DataFrame(steps), "sample_ids": chosen}


def in_process(root: Path, spec: dict) -> dict:
    """The alternative, in this (fresh) process: write the pool, then ``composable_selection`` from an empty cache."""
    pool = SimPool(root=str(root), **spec)
    t0 = time.perf_counter()
    records = {r["name"]: r for r in (_write(root / "sk", pool, i) for i in range(pool.shards))}
    t1 = time.perf_counter()
    res = composable_selection(pool.cache, records, pool.n, c=pool.c)
    t2 = time.perf_counter()
    return {"write_seconds": t1 - t0, "select_seconds": t2 - t1, "wall": t2 - t0, "peak_rss_mib": peak_rss_mib(),
            "candidates": int(res["diagnostics"]["candidates"]), "sample_ids": res["sample_ids"]}


def stage_table(steps: pd.DataFrame) -> pd.DataFrame:
    order = ["shard_moment", "pool_moment", "shard_candidates", "merge"]
    g = steps.groupby("stage")
    table = pd.DataFrame({"steps": g.size(), "total step seconds": g["seconds"].sum(),
                          "max step seconds": g["seconds"].max(), "max per-step peak RSS MiB": g["peak_rss_mib"].max(),
                          "imports RSS MiB": g["imports_rss_mib"].max()})
    return table.reindex([s for s in order if s in table.index]).reset_index()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--shards", type=int, default=128)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--c", type=float, default=2.0)
    ap.add_argument("--markdown", help="write composable_dagster.md into this folder")
    ap.add_argument("--in-process", help=argparse.SUPPRESS)  # the alternative's worker: a root folder
    args = ap.parse_args(argv)
    spec = ({"rows": 20_000, "m": 32, "shards": 4, "n": 20, "c": 2.0} if args.quick else
            {"rows": args.rows, "m": args.m, "shards": args.shards, "n": args.n, "c": args.c})
    if args.in_process:
        print(json.dumps(in_process(Path(args.in_process), spec)))
        return 0
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()
        run = run_dagster(root, spec, cores)
        cmd = [sys.executable, __file__, "--in-process", str(root / "alone")] + (
            ["--quick"] if args.quick else [f"--{k}={v}" for k, v in spec.items()])
        alone = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    steps = run["steps"]
    merged = steps[steps["stage"] == "merge"].iloc[0]
    table = stage_table(steps)
    heads = {
        "run_wall_seconds": f"{run['wall']:.1f}",
        "merge_peak_rss_mib": f"{merged['peak_rss_mib']:.0f} ({merged['imports_rss_mib']:.0f} after imports)",
        "candidates": f"{int(merged['candidates'])} (recomputed by the merge: {int(merged['recomputed'])} shards)",
        "in_process_seconds": f"{alone['wall']:.1f} (write {alone['write_seconds']:.1f}, select "
                              f"{alone['select_seconds']:.1f}; peak RSS {alone['peak_rss_mib']:.0f} MiB)",
        "dagster_to_in_process_wall_ratio": f"{run['wall'] / alone['wall']:.2f}",
        "same_selection": str(run["sample_ids"] == alone["sample_ids"]),
        "cores": f"{cores} (max_concurrent), load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}",
    }
    title = (f"## Composable selection through Dagster (multiprocess executor): {spec['rows']} rows x m = {spec['m']} "
             f"in {spec['shards']} shards, n = {spec['n']}, c = {spec['c']:g}")
    text = "\n".join([title, "", md_table(table, 4), ""] + [f"{k}: {v}" for k, v in heads.items()]) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).mkdir(parents=True, exist_ok=True)
        flags = "--quick" if args.quick else " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
                                                      for k, v in spec.items())
        (Path(args.markdown) / "composable_dagster.md").write_text(
            f"Generated by `python benchmarks/composable_dagster.py {flags}`.\n\n" + text.replace("## ", "#### "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
