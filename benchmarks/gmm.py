"""The paper's synthetic experiment (SPEC section 4): ridge regression on a selected subset of a GMM.

N = 3000 points in r = 5000 dimensions on 10 Gaussian clusters whose centres lie on the first 10
coordinate axes (norms 10 k, k uniform in 1..10), random cluster sizes (random breakpoints), per-cluster
noise std uniform in [0, 0.04]; labels are linear in the centres (``y = c_k . theta``, ``theta`` ~ N(0, I)
on the first 10 coordinates), hence constant per cluster. A seed fixes the data, the sketch, every
selection and the CV folds. Every method gets the same Gaussian sketch of the features (``--sketch-dim``,
default 40 as in the paper), i.e. the sketched gradients of the squared loss at theta = 0. The subset
trains ridge regression (no intercept) with alpha chosen by 2-fold cross-validation on *shuffled*
folds; the risk is the MSE over all N points. A cluster is covered when at least one of its points is
selected.

    python benchmarks/gmm.py [--seeds 8] [--budgets 48,64,...] [--methods skmm,uniform,...] [--speed]

Prints risk mean +- s.e.m., the all-clusters-covered fraction, and the median selection time per
method. ``--speed`` also runs the selection-speed comparison at N = 3000, m = 40 (see
benchmarks/selection_speed.py for the N = 1e6 run).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
import selection_speed
import torch

from skmm_pipeline.core.selection import select
from skmm_pipeline.data.synthetic import make_gmm, sketch_features
from skmm_pipeline.evaluation.ridge import ridge_cv_risk

BUDGETS = (48, 64, 80, 120, 200, 400, 800, 1600)
METHODS = (
    "skmm",
    "skmm-relaxation",
    "skmm-v1-reference",
    "skmmv2",
    "uniform",
    "leverage",
    "ridge-leverage",
    "adaptive",
    "herding",
    "k-center",
)


def run(seeds: int, budgets, methods, sketch_dim: int, options: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for seed in range(seeds):
        gmm = make_gmm(seed)
        X, y, cluster = gmm.X, gmm.y, gmm.cluster
        G = sketch_features(X, sketch_dim, seed)
        for n in budgets:
            for method in methods:
                sel = select(method.split("@")[0], G, n, seed=seed, **options.get(method, {}))
                risk, alpha = ridge_cv_risk(X, y, sel.indices, np.random.default_rng([seed, n]))
                covered = np.unique(cluster[sel.indices]).size == np.unique(cluster).size
                rows.append(
                    {
                        "seed": seed,
                        "n": n,
                        "method": method,
                        "risk": risk,
                        "covered": covered,
                        "seconds": sel.diagnostics["select_seconds"],
                        "alpha": alpha,
                    }
                )
            print(f"  seed {seed} n={n} done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def format_tables(df: pd.DataFrame, methods) -> str:
    g = df.groupby(["n", "method"])
    mean, sem = g["risk"].mean().unstack(), g["risk"].sem().unstack()
    cov = g["covered"].mean().unstack()
    cols = [m for m in methods if m in mean.columns]
    risk = pd.DataFrame(index=mean.index)
    for m in cols:
        risk[m] = [f"{a:.3g} ± {b:.2g}" for a, b in zip(mean[m], sem[m])]
    best = mean[cols].idxmin(axis=1)
    risk["best"] = best
    out = ["risk (MSE over all N), mean ± s.e.m.:", risk.to_string(), ""]
    out += ["all clusters covered (fraction of seeds):", cov[cols].round(2).to_string(), ""]
    secs = df.groupby("method")["seconds"].median()
    out += ["median selection time (s):", secs[cols].map(lambda s: f"{s:.4f}").to_string()]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sketch-dim", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: 1 seed, n = 48, skmm and uniform")
    ap.add_argument("--speed", action="store_true", help="also run the N=3000, m=40 speed comparison")
    ap.add_argument("--csv", default=None, help="write the per-run rows to this CSV")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.methods = 1, "48", "skmm,uniform"
    torch.set_num_threads(2)
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    df = run(args.seeds, budgets, methods, args.sketch_dim, {})
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(f"GMM (N=3000, r=5000, 10 clusters), sketch m={args.sketch_dim}, {args.seeds} seeds\n")
    print(format_tables(df, methods))
    within = []
    mean = df.groupby(["n", "method"])["risk"].mean().unstack()
    sem = df.groupby(["n", "method"])["risk"].sem().unstack()
    if "skmm" in mean.columns:
        for n in mean.index:
            best = mean.loc[n].min()
            within.append(f"n={n}: skmm {mean.loc[n, 'skmm']:.3g} vs best {best:.3g} ({mean.loc[n].idxmin()}), "
                          f"within 1 s.e.m.: {mean.loc[n, 'skmm'] - sem.loc[n, 'skmm'] <= best}")
        print("\n" + "\n".join(within))
    print(f"\nseconds: {time.perf_counter() - t0:.1f}")
    if args.speed:
        print()
        selection_speed.main(["--repeats", "2"])


if __name__ == "__main__":
    main()
