"""Curation variant of the embedded digits task: a polluted pool, and what each method picks from it.

The clean pool (537 digits 5-9) gets near-duplicates (a clean image shifted by a pixel with light
noise, 20% of the result) and corrupted images (uniform noise, inverted, salt-and-pepper or
half-blanked digits with random labels, 5%): see ``data.digits.curation_pool``. A seed fixes the
pollution, the sketch and every selection; the pretrained CNN is fixed (seed 0). Every label-free
method selects on the same m = 128 sketch of the label-free head gradients; ``skmm+guard`` is the
default SkMM with ``outlier_guard=True``; ``(cb)`` marks the label-using, class-balanced variants
(per-class budgets; the guard then runs inside each class). For each method and budget the script prints the share of
corrupted and of near-duplicate images among the picks (against their base rates) and the FT-1 test
accuracy of a head trained on the picks (C chosen on the clean validation split). The clean pool's
rows are also run through the guard, to show what it costs when there is nothing to guard against.

    python benchmarks/digits_curation.py [--seeds 10] [--budgets 20,40,80,160]

Headline lines come last as ``name: value``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from skmm_pipeline.core.finetune import Standardizer, linear_probe
from skmm_pipeline.core.outliers import outlier_guard
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.data.digits import curation_pool, load_digits_transfer
from skmm_pipeline.models.small_cnn import extract_features, pretrain

METHODS = {
    "skmm": ("skmm", {}),
    "skmm+guard": ("skmm", {"outlier_guard": True}),
    "uniform": ("uniform", {}),
    "leverage": ("leverage", {}),
    "ridge-leverage": ("ridge-leverage", {}),
    "adaptive": ("adaptive", {}),
    "herding": ("herding", {}),
    "k-center": ("k-center", {}),
    "skmmv2": ("skmmv2", {}),
    # label-using: per-class budgets (the guard then runs inside each class)
    "uniform (cb)": ("uniform", {"class_balanced": True}),
    "skmm (cb)": ("skmm", {"class_balanced": True}),
    "skmm (cb)+guard": ("skmm", {"class_balanced": True, "outlier_guard": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", default="20,40,80,160")
    ap.add_argument("--sketch-dim", type=int, default=128)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = load_digits_transfer()
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, seed=0)
    val_raw, test_raw = (extract_features(model, s.images) for s in (data.val, data.test))

    rows, guard_rows = [], []
    for seed in range(args.seeds):
        cur = curation_pool(data.pool, seed=seed)
        pool = cur.pool
        G = GradientSketcher(model, args.sketch_dim, seed=seed).sketch(pool.images)
        feats = extract_features(model, pool.images)
        std = Standardizer(feats)
        pool_f, val_f, test_f = std(feats), std(val_raw), std(test_raw)
        keep = outlier_guard(G).keep
        guard_rows.append({"seed": seed, "corrupted_flagged": (~keep)[cur.corrupted].mean(),
                           "clean_flagged": (~keep)[cur.kind == 0].mean(), "duplicates_flagged": (~keep)[cur.kind == 1].mean()})
        clean_G = GradientSketcher(model, args.sketch_dim, seed=seed).sketch(data.pool.images)
        guard_rows[-1]["clean_pool_flagged"] = outlier_guard(clean_G).excluded / len(clean_G)
        for n in budgets:
            for name, (method, opts) in METHODS.items():
                labels = pool.labels if opts.get("class_balanced") else None
                idx = select(method, G, n, seed=seed, labels=labels, **opts).indices
                res = linear_probe(pool_f[idx], pool.labels[idx], val_f, data.val.labels, test_f, data.test.labels, seed=seed)
                rows.append({"seed": seed, "n": n, "method": name, "corrupted": 100 * cur.corrupted[idx].mean(),
                             "duplicates": 100 * (cur.kind[idx] == 1).mean(), "acc": 100 * res.test_accuracy})
        print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    df = pd.DataFrame(rows)
    base_bad = 100 * np.mean([curation_pool(data.pool, seed=s).corrupted.mean() for s in range(args.seeds)])

    def table(col):
        g = df.groupby(["n", "method"])[col].agg(["mean", "sem"]).unstack("method")
        out = g["mean"].round(1).astype(str) + " ± " + g["sem"].round(1).astype(str)
        return out[list(METHODS)]

    print(f"\nCurated pool: {len(curation_pool(data.pool, seed=0).pool.labels)} images, {args.seeds} seeds, m = {args.sketch_dim}")
    print(f"\ncorrupted images among the picks (%), base rate {base_bad:.1f}%:\n")
    print(table("corrupted").T.to_string())
    print("\nnear-duplicates among the picks (%), base rate 20.0%:\n")
    print(table("duplicates").T.to_string())
    print("\nFT-1 test accuracy (%):\n")
    print(table("acc").T.to_string())
    g = pd.DataFrame(guard_rows).mean()
    print(f"\nguard: flags {100 * g['corrupted_flagged']:.0f}% of the corrupted images, {100 * g['clean_flagged']:.1f}% of the "
          f"clean ones, {100 * g['duplicates_flagged']:.1f}% of the near-duplicates; on the unpolluted pool it flags "
          f"{100 * g['clean_pool_flagged']:.1f}%")
    mean_bad = df.groupby(["method", "n"])["corrupted"].mean()
    print(f"\nseconds: {time.perf_counter() - t0:.0f}")
    print(f"base_rate_corrupted_pct: {base_bad:.1f}")
    for name in METHODS:
        print(f"max_corrupted_pct[{name}]: {mean_bad[name].max():.1f}")
    for name in ("skmm+guard", "skmm (cb)+guard"):
        print(f"within_base_rate[{name}]: {bool((mean_bad[name] <= base_bad).all())}")


if __name__ == "__main__":
    main()
