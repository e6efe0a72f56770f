"""Selection speed and memory.

1. N = 3000, m = 40 (the GMM benchmark's sketch, seed 0): the research code's v1 loop
   (``skmm-v1-reference``: Adam + clamp/renormalise, c_S = 0.999, 1e4 steps) against the capped-simplex
   solvers of ``skmm-relaxation`` (FISTA with exact projection, and the LP) on the same objective
   (c_S = 0.999), and the default ``skmm``. Reports seconds (each repeat), the relaxed objective
   ``f(s)``, the objective of the final subset ``f(1_S / n)``, the subset's worst moment ratio.
2. N = 1,000,000, m = 256, n = 10,000 float32 sketch (a 200-cluster mixture with clusters of 5 to
   ~30,000 points), default ``skmm``, in a fresh process: wall time, peak resident memory against the
   input's size, clusters covered (against a uniform sample of the same size).

    python benchmarks/selection_speed.py [--repeats 2] [--large-N 1000000] [--skip-small] [--skip-large]

Speed numbers depend on what else runs on the machine: run it twice and report both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from skmm_pipeline.core.moment_matching import moment_stats, subset_objective
from skmm_pipeline.core.selection import select
from skmm_pipeline.data.synthetic import make_gmm, sketch_features


def small(repeats: int = 2, budgets=(48, 200)) -> str:
    torch.set_num_threads(2)
    gmm = make_gmm(0)
    X, cluster = gmm.X, gmm.cluster
    G = sketch_features(X, 40, 0)
    stats = moment_stats(G)
    runs = [
        ("skmm-v1-reference", "skmm-v1-reference", {}),
        ("skmm-relaxation (FISTA)", "skmm-relaxation", {"c_S": 0.999}),
        ("skmm-relaxation (LP)", "skmm-relaxation", {"c_S": 0.999, "solver": "lp"}),
        ("skmm (default)", "skmm", {}),
    ]
    lines = [f"N = {G.shape[0]}, m = {G.shape[1]} (GMM seed 0); objective f(s) with c_S = 0.999", ""]
    header = f"{'n':>4}  {'method':<24} {'seconds (each repeat)':<24} {'speedup':>8} {'f(s) relaxed':>13} {'f(1_S/n)':>10} {'worst ratio':>11} {'clusters':>8}"
    lines.append(header)
    for n in budgets:
        base = None
        for label, method, opts in runs:
            secs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = select(method, G, n, seed=0, **opts)
                secs.append(time.perf_counter() - t0)
            d = res.diagnostics
            relaxed = d.get("relaxed_objective", float("nan"))
            sub = subset_objective(G, res.indices, 0.999, stats)
            med = float(np.median(secs))
            if base is None:
                base = med
            covered = np.unique(cluster[res.indices]).size
            lines.append(
                f"{n:>4}  {label:<24} {', '.join(f'{s:.4f}' for s in secs):<24} {base / med:>7.0f}x "
                f"{relaxed:>13.4g} {sub:>10.4g} {d['moment_ratio']:>11.3f} {covered:>5}/10"
            )
        lines.append("")
    return "\n".join(lines)


def _make_large(N: int, m: int, seed: int, K: int = 200):
    rng = np.random.default_rng(seed)
    sizes = np.sort(np.maximum(5, (rng.pareto(1.2, K) * 100).astype(np.int64)))[::-1]
    sizes[0] += N - sizes.sum()
    if sizes[0] <= 0:
        raise ValueError("cluster sizes exceed N")
    centres = rng.normal(size=(K, m)).astype(np.float32)
    centres *= (rng.uniform(2.0, 10.0, size=K) / np.linalg.norm(centres, axis=1)).astype(np.float32)[:, None]
    cluster = rng.permutation(np.repeat(np.arange(K), sizes))
    G = np.empty((N, m), dtype=np.float32)
    for lo in range(0, N, 1 << 16):
        hi = min(N, lo + (1 << 16))
        G[lo:hi] = rng.standard_normal((hi - lo, m), dtype=np.float32)
        G[lo:hi] *= 0.2
        G[lo:hi] += centres[cluster[lo:hi]]
    return G, cluster, sizes


def _child_large(N: int, m: int, n: int, seed: int) -> None:
    G, cluster, sizes = _make_large(N, m, seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = select("skmm", G, n, seed=seed)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    uni = np.random.default_rng(seed).choice(N, size=n, replace=False)
    d = res.diagnostics
    print(json.dumps({
        "N": N, "m": m, "n": n, "seconds": wall, "input_bytes": G.nbytes, "peak_rss_bytes": peak,
        "rss_after_data_bytes": rss_data, "clusters": int(sizes.size), "smallest_cluster": int(sizes.min()),
        "covered_skmm": int(np.unique(cluster[res.indices]).size), "covered_uniform": int(np.unique(cluster[uni]).size),
        "solver": d.get("solver"), "design_dim": d.get("design_dim"), "start_pivots": d.get("start_pivots"),
        "moment_ratio": d.get("moment_ratio"), "unique": int(np.unique(res.indices).size),
    }))


def large(N: int = 1_000_000, m: int = 256, n: int = 10_000, seed: int = 0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child-large", str(N), str(m), str(n), str(seed)],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    return "\n".join([
        f"N = {r['N']:,}, m = {r['m']}, n = {r['n']:,} (float32 input {r['input_bytes'] / gib:.2f} GiB), default skmm "
        f"({r['solver']}, design dim {r['design_dim']}, {r['start_pivots']} RPC start pivots)",
        f"  wall time: {r['seconds']:.1f} s (2 threads)",
        f"  peak RSS: {r['peak_rss_bytes'] / gib:.2f} GiB = {r['peak_rss_bytes'] / r['input_bytes']:.2f} x input "
        f"(after generating the input: {r['rss_after_data_bytes'] / gib:.2f} GiB)",
        f"  clusters covered: skmm {r['covered_skmm']}/{r['clusters']}, uniform {r['covered_uniform']}/{r['clusters']} "
        f"(smallest cluster: {r['smallest_cluster']} points); worst moment ratio {r['moment_ratio']:.3f}; "
        f"{r['unique']} distinct indices",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--large-N", type=int, default=1_000_000)
    ap.add_argument("--large-m", type=int, default=256)
    ap.add_argument("--large-n", type=int, default=10_000)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--child-large", nargs=4, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: the small case at n = 48 once, and N = 100,000, m = 32 for the large one")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.large_N, args.large_m, args.large_n = 1, 100_000, 32, 1000
    if args.child_large:
        _child_large(*args.child_large)
        return
    if not args.skip_small:
        print("== selection speed, small (N = 3000, m = 40) ==")
        print(small(args.repeats, budgets=(48,) if args.quick else (48, 200)))
    if not args.skip_large:
        for r in range(args.repeats):
            print(f"== selection speed, large (run {r + 1} of {args.repeats}) ==")
            print(large(args.large_N, args.large_m, args.large_n))


if __name__ == "__main__":
    main()
