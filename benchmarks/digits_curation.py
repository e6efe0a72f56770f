"""Curation variant of the embedded digits task: a polluted pool, and what each method picks from it.

The clean pool (537 digits 5-9) gets near-duplicates (a clean image shifted by a pixel with light
noise, 20% of the result) and corrupted images (uniform noise, inverted, salt-and-pepper or
half-blanked digits with random labels, 5%): see ``data.digits.curation_pool``. A seed fixes the
pollution, the sketch and every selection; the pretrained CNN is fixed (seed 0). Every label-free
method selects on the same m = 128 sketch of the label-free head gradients; ``skmm+guard`` is the
default SkMM with the outlier guard as the pipeline runs it (``settings.outlier_guard``: images that
lack the pool's spatial structure are excluded, then rows that stick out of the sketch),
``skmm+sketch-guard`` the sketch part alone (``structure_threshold=0``); ``(cb)`` marks the
label-using, class-balanced variants (per-class budgets; the sketch guard then runs inside each
class); the model-based baselines (entropy ... contextual-diversity) select on the pool's frozen
features with its (partly wrong) labels, per class. For each method and budget the script prints the share of corrupted and of near-duplicate
images among the picks (against their base rates) and the FT-1 test accuracy of a head trained on
the picks (C chosen on the clean validation split). The clean pool's rows are also run through the
guard, to show what it costs when there is nothing to guard against.

    python benchmarks/digits_curation.py [--seeds 10] [--budgets 20,40,80,160]

Headline lines come last as ``name: value``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from skmm_pipeline.core.outliers import lacks_structure, outlier_guard, spatial_structure
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.data.digits import CORRUPTIONS, curation_pool, load_digits_transfer
from skmm_pipeline.evaluation import linear_probe
from skmm_pipeline.models.features import Standardizer, extract_features
from skmm_pipeline.models.small_cnn import pretrain

METHODS = {
    "skmm": ("skmm", {}),
    "skmm+sketch-guard": ("skmm", {"outlier_guard": True, "structure": False}),
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
# Model-based baselines (label-using): a proxy head on the pool's standardised frozen features, per-class
# budgets (their default); see core.model_baselines.
MODEL_BASED = ("entropy", "margin", "least-confidence", "grand", "el2n", "forgetting", "glister", "deepfool",
               "contextual-diversity")
METHODS.update({name: (name, {"features": True}) for name in MODEL_BASED})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", default="20,40,80,160")
    ap.add_argument("--sketch-dim", type=int, default=128)
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: 1 seed, n = 20, 3 pretraining epochs")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.pretrain_epochs = 1, "20", 3
    budgets = [int(b) for b in args.budgets.split(",")]

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = load_digits_transfer()
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, epochs=args.pretrain_epochs,
                     seed=0)
    val_raw, test_raw = (extract_features(model, s.images) for s in (data.val, data.test))

    clean_flag = lacks_structure(spatial_structure(data.pool.images))  # the unpolluted pool: the same every seed
    clean_rest = np.flatnonzero(~clean_flag)
    rows, guard_rows, bad_rates = [], [], []
    for seed in range(args.seeds):
        cur = curation_pool(data.pool, seed=seed)
        bad_rates.append(cur.corrupted.mean())
        pool = cur.pool
        G = GradientSketcher(model, args.sketch_dim, seed=seed).sketch(pool.images)
        feats = extract_features(model, pool.images)
        std = Standardizer(feats)
        pool_f, val_f, test_f = std(feats), std(val_raw), std(test_raw)
        unstructured = lacks_structure(spatial_structure(pool.images))
        sketch_out = ~outlier_guard(G).keep
        rest = np.flatnonzero(~unstructured)
        flagged = unstructured.copy()
        flagged[rest] |= ~outlier_guard(G[rest]).keep  # the pipeline's order: input check, then the sketch
        row = {"seed": seed, "clean_flagged": flagged[cur.kind == 0].mean(), "duplicates_flagged": flagged[cur.kind == 1].mean(),
               "corrupted_flagged": flagged[cur.corrupted].mean(), "corrupted_sketch_only": sketch_out[cur.corrupted].mean(),
               "clean_input_check": unstructured[cur.kind == 0].mean()}
        for c, what in enumerate(CORRUPTIONS):
            row[f"input:{what}"] = unstructured[cur.corruption == c].mean()
            row[f"both:{what}"] = flagged[cur.corruption == c].mean()
        clean_G = GradientSketcher(model, args.sketch_dim, seed=seed).sketch(data.pool.images)
        row["clean_pool_flagged"] = (clean_flag.sum() + outlier_guard(clean_G[clean_rest]).excluded) / len(clean_G)
        guard_rows.append(row)
        for n in budgets:
            for name, (method, opts) in METHODS.items():
                opts = dict(opts)
                on_features = opts.pop("features", False)
                labels = pool.labels if opts.get("class_balanced") or on_features else None
                if opts.pop("structure", True) and opts.get("outlier_guard"):
                    opts["exclude"] = unstructured
                idx = select(method, pool_f if on_features else G, n, seed=seed, labels=labels, **opts).indices
                res = linear_probe(pool_f[idx], pool.labels[idx], val_f, data.val.labels, test_f, data.test.labels, seed=seed)
                rows.append({"seed": seed, "n": n, "method": name, "corrupted": 100 * cur.corrupted[idx].mean(),
                             "duplicates": 100 * (cur.kind[idx] == 1).mean(), "acc": 100 * res.test_accuracy})
        print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    df = pd.DataFrame(rows)
    base_bad = 100 * np.mean(bad_rates)

    def table(col):
        g = df.groupby(["n", "method"])[col].agg(["mean", "sem"]).unstack("method")
        out = g["mean"].round(1).astype(str) + " ± " + g["sem"].round(1).astype(str)
        return out[list(METHODS)]

    print(f"\nCurated pool: {len(cur.pool.labels)} images, {args.seeds} seeds, m = {args.sketch_dim}")
    print(f"\ncorrupted images among the picks (%), base rate {base_bad:.1f}%:\n")
    print(table("corrupted").T.to_string())
    print("\nnear-duplicates among the picks (%), base rate 20.0%:\n")
    print(table("duplicates").T.to_string())
    print("\nFT-1 test accuracy (%):\n")
    print(table("acc").T.to_string())
    g = pd.DataFrame(guard_rows).mean()
    print(f"\nguard (input check + sketch): flags {100 * g['corrupted_flagged']:.0f}% of the corrupted images "
          f"(sketch part alone: {100 * g['corrupted_sketch_only']:.0f}%), {100 * g['clean_flagged']:.1f}% of the clean ones "
          f"({100 * g['clean_input_check']:.1f}% by the input check), {100 * g['duplicates_flagged']:.1f}% of the "
          f"near-duplicates; on the unpolluted pool it flags {100 * g['clean_pool_flagged']:.1f}%")
    print("  by corruption, input check / both: " + ", ".join(
        f"{w} {100 * g[f'input:{w}']:.0f}% / {100 * g[f'both:{w}']:.0f}%" for w in CORRUPTIONS))
    mean_bad = df.groupby(["method", "n"])["corrupted"].mean()
    print(f"\nseconds: {time.perf_counter() - t0:.0f}")
    print(f"base_rate_corrupted_pct: {base_bad:.1f}")
    for name in METHODS:
        print(f"max_corrupted_pct[{name}]: {mean_bad[name].max():.1f}")
    for name in ("skmm+sketch-guard", "skmm+guard", "skmm (cb)+guard"):
        print(f"within_base_rate[{name}]: {bool((mean_bad[name] <= base_bad).all())}")


if __name__ == "__main__":
    main()
