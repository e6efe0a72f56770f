"""Embedded digits transfer benchmark: FT-1 test accuracy of SkMM vs uniform selection over seeds.

The pretrained CNN is fixed (seed 0, as a user's pretrained model would be); each seed fixes the
sketch, the selection and the uniform draw. Prints mean +- s.e.m. per budget and method, and the
difference SkMM - uniform in units of its standard error (paired over seeds).

    python benchmarks/digits_transfer.py [--seeds 20] [--sketch-dims 32,64] [--extra-methods skmmv2,ridge-leverage]

``--extra-methods`` adds other registered selection methods (run on the sketch of each m, label-free),
e.g. ``skmmv2``, ``skmm-relaxation``, ``leverage``, ``ridge-leverage``, ``adaptive``, ``herding``,
``k-center``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from skmm_pipeline.core.finetune import Standardizer, linear_probe
from skmm_pipeline.core.gradients import gradient_dim
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch import make_sketch
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.models.small_cnn import extract_features, pretrain, sketch_head_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--budgets", default="10,20,40,80,160")
    ap.add_argument("--sketch-dims", default="64")
    ap.add_argument("--design-dims", default="none", help="comma list of none|auto|int for skmm")
    ap.add_argument("--extra-methods", default="", help="comma list of other registered methods to compare")
    args = ap.parse_args()
    extra = [m for m in args.extra_methods.split(",") if m]
    budgets = [int(b) for b in args.budgets.split(",")]
    dims = [int(m) for m in args.sketch_dims.split(",")]
    designs = [None if d == "none" else (d if d == "auto" else int(d)) for d in args.design_dims.split(",")]

    torch.set_num_threads(2)
    data = load_digits_transfer()
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, seed=0)
    std = Standardizer(extract_features(model, data.pool.images))
    pool_f, val_f, test_f = (std(extract_features(model, s.images)) for s in (data.pool, data.val, data.test))

    rows = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        methods = {}
        for m in dims:
            sk = make_sketch("gaussian", gradient_dim(model.feature_dim, model.num_classes, "expected"), m, seed, "head")
            G = sketch_head_gradients(model, data.pool.images, sk)
            for d in designs:
                methods[f"skmm(m={m},k={d})"] = ("skmm", G, {} if d is None else {"design_dim": d})
            for name in extra:
                methods[f"{name}(m={m})"] = (name, G, {})
        methods["uniform"] = ("uniform", pool_f, {})
        for n in budgets:
            for label, (method, X, opts) in methods.items():
                idx = select(method, X, n, seed=seed, **opts).indices
                res = linear_probe(pool_f[idx], data.pool.labels[idx], val_f, data.val.labels, test_f, data.test.labels)
                rows.append({"seed": seed, "n": n, "method": label, "acc": 100 * res.test_accuracy})
    df = pd.DataFrame(rows)
    table = df.groupby(["n", "method"])["acc"].agg(["mean", "sem"]).unstack("method")
    fmt = table["mean"].round(1).astype(str) + " ± " + table["sem"].round(1).astype(str)
    print(f"FT-1 test accuracy (%), digits 5-9 pool of {len(pool_f)}, {args.seeds} seeds\n")
    print(fmt.to_string())
    wide = df.pivot_table(index=["n", "seed"], columns="method", values="acc")
    print("\npaired difference vs uniform (points, z = mean / s.e.m.):")
    for col in [c for c in wide.columns if c != "uniform"]:
        diff = (wide[col] - wide["uniform"]).groupby("n")
        z = diff.mean() / diff.sem()
        print(f"  {col}: " + ", ".join(f"n={n}: {d:+.1f} (z={zz:.1f})" for n, d, zz in zip(z.index, diff.mean(), z)))
    print(f"\nseconds: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
