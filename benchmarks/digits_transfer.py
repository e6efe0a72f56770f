"""Embedded digits transfer benchmark: every selection method, FT-1 (and FT-2) test accuracy over seeds.

The pretrained CNN is fixed (pretrained once with seed 0, as a user's pretrained model would be). Each
seed fixes the gradient sketch (the engine's Gaussian sketch of the head's label-free Jacobian rows,
m = 128 by default), the selection and the training. Runs the comparison core
(``skmm_pipeline.evaluation``) and prints, per finetuning mode:

* the label-free group (methods that never see a label) and the label-using group (class-balanced
  variants ``<method>-cb`` and the model-based baselines, which train a head on the labelled pool),
  each as a table of mean ± s.e.m. test accuracy (%) per budget;
* per group, the paired difference to the group's uniform baseline (``uniform`` / ``uniform-cb``) in
  points and in s.e.m. units (z), paired over seeds;
* last, ``name: value`` headline lines: whether the default SkMM is best in its group or within one
  s.e.m. of the best (paired) at every n <= 80, beats uniform by >= 2 s.e.m. at every n <= 40 and is
  never below uniform; the same for class-balanced SkMM among the label-using methods.

    python benchmarks/digits_transfer.py [--seeds 20] [--finetune ft1|ft2|both] [--methods skmm,uniform,...]
        [--budgets 10,20,40,80,160] [--sketch-dim 128] [--no-class-balanced] [--csv rows.csv] [--plot plot.png]
    python benchmarks/digits_transfer.py --from-csv rows.csv      # the report of a saved run
    python benchmarks/digits_transfer.py --from-csv rows.csv --markdown docs/results   # + the docs' excerpt

``--markdown DIR`` also writes ``DIR/digits_transfer_<ft>.md`` per finetuning mode: the excerpt the README
and docs/benchmarks.md show (SkMM and uniform of each group, the paired difference, the best other method
of the group), which ``benchmarks/publish_docs.py`` copies into them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from skmm_pipeline import evaluation as cmp
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.evaluation import FinetuneGrid
from skmm_pipeline.models.backbones import finetune_split
from skmm_pipeline.models.features import standardized_features
from skmm_pipeline.models.small_cnn import pretrain


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="number of seeds (default 20)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budgets", default="10,20,40,80,160")
    ap.add_argument("--finetune", default="ft1", choices=sorted(cmp.FINETUNE_MODES),
                    help="FT-1 (logistic head on frozen features), FT-2 (last block + head), or both")
    ap.add_argument("--methods", default="", help="comma list of registered methods (default: all but "
                    + ", ".join(cmp.EXCLUDED_BY_DEFAULT) + ")")
    ap.add_argument("--no-class-balanced", action="store_true", help="skip the label-using group")
    ap.add_argument("--sketch-dim", type=int, default=128, help="m of the gradient sketch (default 128)")
    ap.add_argument("--label-mode", default="expected", help="label mode of the sketched gradients (default expected)")
    ap.add_argument("--ft2-epochs", default="10,30,60", help="FT-2 epoch checkpoints chosen on validation")
    ap.add_argument("--pretrain-threads", type=int, default=2,
                    help="torch threads while pretraining (default 2, as the pipeline on a 2-core machine: the "
                    "pretrained weights depend on the thread count)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (default 1: many small problems run faster on one thread)")
    ap.add_argument("--csv", default="", help="write the tidy per-seed rows here")
    ap.add_argument("--plot", default="", help="write the accuracy-vs-n plot (PNG) here")
    ap.add_argument("--from-csv", default="", help="print the report of rows saved with --csv; run nothing")
    ap.add_argument("--markdown", default="", help="also write the excerpt table per finetuning mode into this folder")
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: 2 seeds, n = 10 and 20, three methods, 3 pretraining epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets, args.methods, args.pretrain_epochs = 2, "10,20", "skmm,uniform,k-center", 3
    if args.from_csv:
        report(pd.read_csv(args.from_csv, keep_default_na=False, na_values=[""]), args)
        return 0

    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    data = load_digits_transfer()
    torch.set_num_threads(args.pretrain_threads)
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, epochs=args.pretrain_epochs,
                     seed=0)
    log("pretrained")
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads, user_api="blas")
    pool_f, (val_f, test_f) = standardized_features(model, data.pool.images, [data.val.images, data.test.images])
    pool = cmp.Split.of("pool", pool_f, data.pool.labels, data.pool.images)
    val = cmp.Split.of("val", val_f, data.val.labels, data.val.images)
    test = cmp.Split.of("test", test_f, data.test.labels, data.test.images)
    sketches = cmp.SeededSketches(model, data.pool.images, labels=data.pool.labels, sample_ids=list(pool.ids),
                                  sketch_dim=args.sketch_dim, kind="gaussian", layers="ft1",
                                  label_mode=args.label_mode, device="cpu")
    methods = [m for m in args.methods.split(",") if m] or None
    specs = cmp.default_specs(methods, class_balanced=not args.no_class_balanced)
    ft2 = None
    if args.finetune != "ft1":
        prefix, tail = finetune_split(model, "ft2")
        ft2 = cmp.FT2Setup(prefix, tail, FinetuneGrid(epochs=tuple(_ints(args.ft2_epochs))), "cpu")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    log(f"{len(specs)} methods x {len(_ints(args.budgets))} budgets x {len(seeds)} seeds, {args.finetune}")
    df = cmp.compare(pool, val, test, specs, _ints(args.budgets), seeds, sketch=sketches, finetune=args.finetune,
                     ft2=ft2, full_pool=True, progress=log, threads=args.threads)
    seconds = time.perf_counter() - t0
    if args.csv:
        df.to_csv(args.csv, index=False)
    report(df, args, seconds)
    return 0


def report(df, args, seconds: float | None = None) -> None:
    """Print the tables and the headline lines of a run (the tidy rows of ``evaluation.compare``)."""
    summary = cmp.summarize(df)
    if args.plot:
        with open(args.plot, "wb") as fh:
            fh.write(cmp.plot_comparison(summary))
    seeds = sorted(set(df[df.group != cmp.REFERENCE].seed))
    pool_size = int(df[df.method == cmp.FULL_POOL].n.max()) if (df.method == cmp.FULL_POOL).any() else "?"
    print(f"Digits 5-9 transfer: pool {pool_size}; pretrained CNN fixed (seed 0); sketch: engine, gaussian, "
          f"m = {args.sketch_dim}, label_mode = {args.label_mode}; {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}); "
          "test accuracy (%), mean ± s.e.m. over seeds")
    headlines: list[tuple[str, str]] = []
    for ft in dict.fromkeys(df.finetune):
        ceiling = summary[(summary.finetune == ft) & (summary.method == cmp.FULL_POOL)]
        for group in cmp.GROUPS:
            table = cmp.method_table(summary, ft, group)
            if table.empty:
                continue
            print(f"\n{ft}, {group}:\n{table.to_string()}")
            z = cmp.z_table(summary, ft, group)
            if len(z):
                print(f"\n{ft}, {group}: paired difference to {z.index.name[3:]} (points, z = mean / s.e.m.):\n{z.to_string()}")
        failed = df[(df.finetune == ft) & (df.status != "ok")]
        if len(failed):
            print(f"\n{ft}: {len(failed)} failed runs:")
            for (method, n), g in failed.groupby(["method", "n"], sort=False):
                print(f"  {method} n={n} ({len(g)} seeds): {g.reason.iloc[0]}")
        if len(ceiling):
            print(f"\n{ft} full-pool ceiling ({pool_size} samples): {100 * ceiling['mean'].iloc[0]:.1f}")
        key = ft.lower().replace("-", "")
        for method, group in (("skmm", cmp.LABEL_FREE), ("skmm" + cmp.CB_SUFFIX, cmp.LABEL_USING)):
            if method not in set(df.method):
                continue
            checks = cmp.headline_checks(df, ft, method, group)
            ref = cmp.group_baselines(df)[group]
            headlines += [
                (f"{key}_{method}_best_{group.replace('-', '_')}_or_within_1sem_n_le_80", checks["best_or_within_1sem"]),
                (f"{key}_{method}_beats_{ref}_by_2sem_n_le_40", checks["beats_baseline"]),
                (f"{key}_{method}_never_below_{ref}", checks["never_below_baseline"]),
            ]
        if len(ceiling):
            headlines.append((f"{key}_full_pool_accuracy", f"{100 * ceiling['mean'].iloc[0]:.1f}"))
    headlines += [("failed_runs", str(int((df.status != "ok").sum()))), ("seeds", str(len(seeds)))]
    if seconds is not None:
        headlines.append(("seconds", f"{seconds:.0f}"))
    print()
    for name, value in headlines:
        print(f"{name}: {value}")
    if getattr(args, "markdown", ""):
        for ft in dict.fromkeys(df.finetune):
            path = Path(args.markdown) / f"digits_transfer_{ft.lower().replace('-', '')}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(excerpt_markdown(summary, ft, len(seeds), pool_size) + "\n")
            print(f"wrote {path}")


def _best_other(summary, ft: str, group: str, exclude: set[str], n: int) -> str:
    s = summary[(summary.finetune == ft) & (summary.group == group) & (summary.n == n) & ~summary.method.isin(exclude)]
    s = s[s.seeds > 0]
    if s.empty:
        return "-"
    top = s["mean"].max()
    names = ", ".join(s[s["mean"] >= top - 1e-12].method)
    row = s[s["mean"] >= top - 1e-12].iloc[0]
    return f"{names} {100 * row['mean']:.1f} ± {100 * row['sem']:.1f}"


def excerpt_markdown(summary, ft: str, seeds: int, pool_size) -> str:
    """SkMM vs uniform in each group, with the paired difference and the group's best other method."""
    refs = {cmp.LABEL_FREE: ("skmm", "uniform"), cmp.LABEL_USING: ("skmm" + cmp.CB_SUFFIX, "uniform" + cmp.CB_SUFFIX)}
    head = ["n"]
    groups = [g for g, (m, _) in refs.items() if (summary[(summary.finetune == ft)].method == m).any()]
    for g in groups:
        m, u = refs[g]
        head += [m, u, f"{m} − {u} (paired)", f"best other {g}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(method, n):
        r = summary[(summary.finetune == ft) & (summary.method == method) & (summary.n == n)]
        return "-" if r.empty or not r.seeds.iloc[0] else f"{100 * r['mean'].iloc[0]:.1f} ± {100 * r['sem'].iloc[0]:.1f}"

    for n in sorted(set(summary[summary.finetune == ft].n) - {int(pool_size) if pool_size != "?" else -1}):
        row = [str(n)]
        for g in groups:
            m, u = refs[g]
            d = summary[(summary.finetune == ft) & (summary.method == m) & (summary.n == n)]
            diff = "-" if d.empty or d["diff"].isna().iloc[0] else f"{100 * d['diff'].iloc[0]:+.1f} (z = {d['z'].iloc[0]:.1f})"
            row += [cell(m, n), cell(u, n), diff, _best_other(summary, ft, g, {m, u}, n)]
        rows.append("| " + " | ".join(row) + " |")
    ceiling = summary[(summary.finetune == ft) & (summary.method == cmp.FULL_POOL)]
    note = f"; full-pool ceiling {100 * ceiling['mean'].iloc[0]:.1f}%" if len(ceiling) else ""
    caption = (f"{ft} test accuracy (%) on the digits 5–9 test split, mean ± s.e.m. over {seeds} seeds "
               f"(pool {pool_size}){note}. Printed by `benchmarks/digits_transfer.py --markdown`.")
    return caption + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
