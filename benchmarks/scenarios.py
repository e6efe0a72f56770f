"""Scenario suite: does the default selection stay ahead on pools it was not tuned on?

The defaults were chosen on the embedded digits split and on the paper's GMM. This suite runs the same
comparison core (``skmm_pipeline.evaluation.compare``, FT-1) on pools built to find where they fail:

* digits: the embedded split, two other source/target class splits, imbalanced pools (about 1:4,
  1:16, 1:20: digits has about 110 pool images per class, so the smallest class of a 1:50 pool would
  have 2), growth with shifted/noisy deliveries (15% and 40% of the pool: each delivered image is a
  pool image rolled by up to one pixel with pixel noise, as ``skmm shards add`` makes them),
  near-duplicates, and the curation pool (near-duplicates plus corrupted images);
* GMM (ridge regression risk, as ``benchmarks/gmm.py``): the paper's, 30 clusters, wide spreads and
  cluster sizes skewed 1:50.

Every scenario prints a table (mean ± s.e.m. over seeds, paired z against uniform, class or cluster
coverage at n = K and 2K) and the suite ends with one line per scenario: pass or fail of each goal.
The goals are checked for two label-free candidates: ``skmm-val``, SkMM matching the validation split's
sketched moment (the pipeline's default, ``settings.reference = "validation"``), and ``skmm``, matching
the pool's own (the paper's; the only one on GMM, which has no validation split); ``skmm-cb`` in the
label-using group:

* ``beats_uniform``: ≥ 2 s.e.m. above uniform (paired) at every n ≤ 40 (GMM: every n ≤ 4K);
* ``near_best``: never more than 1 s.e.m. below the best label-free method (paired) at any n;
* ``never_below``: never significantly below uniform (z > −1) at any n;
* ``coverage``: every class covered at n = 2K in ≥ 80% of seeds (imbalance up to 1:16, and GMM);
* ``growth``: after a delivery, ≥ the embedded pool's accuracy minus one s.e.m., and ≥ uniform;
* ``cb_beats_uniform_cb``: ``skmm-cb`` ≥ 2 s.e.m. above ``uniform-cb`` at every n ≤ 40.

A failed goal is information: the summary says by how much.

    python benchmarks/scenarios.py [--seeds 20] [--scenarios embedded,imbalance-16,...] [--csv rows.csv]
    python benchmarks/scenarios.py --quick          # 2 seeds, 2 budgets, 3 scenarios: a smoke run
    python benchmarks/scenarios.py --from-csv rows.csv [--markdown docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from skmm_pipeline import evaluation as ev
from skmm_pipeline.core import defaults
from skmm_pipeline.core.selection import select
from skmm_pipeline.data.digits import Split as DigitsSplit
from skmm_pipeline.data.digits import curation_pool, jittered_copies, load_digits_transfer
from skmm_pipeline.data.synthetic import make_gmm, sketch_features
from skmm_pipeline.evaluation.ridge import ridge_cv_risk
from skmm_pipeline.models.features import standardized_features
from skmm_pipeline.models.small_cnn import pretrain

BUDGETS = defaults.BENCHMARK_BUDGETS
LABEL_FREE = ("skmm", "uniform", "leverage", "adaptive", "herding", "k-center")
PRETRAIN_THREADS = 2  # the pipeline's thread count on a 2-core machine (the weights depend on it)
POOL_SEED = 0  # fixes how a scenario's pool is built; the run's seeds fix sketch, selection, training
GMM_METHODS = LABEL_FREE
DEFAULT = "skmm-val"  # the pipeline's default: skmm_selection with settings.reference = "validation"
ABOUT = {DEFAULT: "validation split's moment, the pipeline's default", "skmm": "the pool's moment"}


@dataclass
class Scenario:
    name: str
    kind: str  # "digits" or "gmm"
    about: str
    build: Callable[[], dict]
    goals: tuple[str, ...] = ("beats_uniform", "near_best", "never_below", "cb_beats_uniform_cb")
    notes: dict = field(default_factory=dict)


def _digits(source=(0, 1, 2, 3, 4), target=(5, 6, 7, 8, 9), pool_per_class=None, extra=None):
    def build():
        data = load_digits_transfer(source, target, pool_per_class)
        pool_x, pool_y = data.pool.images, data.pool.labels
        if extra is not None:
            add_x, add_y = extra(pool_x, pool_y)
            pool_x, pool_y = np.concatenate([pool_x, add_x]), np.concatenate([pool_y, add_y])
        return {"source": data.source_train, "pool": (pool_x, pool_y), "val": data.val, "test": data.test,
                "num_classes": data.num_classes, "source_classes": tuple(source)}
    return build


def _growth(share: float):
    def extra(x, y):
        copies, src = jittered_copies(x, np.random.default_rng(POOL_SEED), int(round(share * len(y))), noise=0.05)
        return copies, y[src]
    return extra


def _curated(duplicate_frac: float, corrupt_frac: float):
    def extra(x, y):
        cur = curation_pool(DigitsSplit(x, y), seed=POOL_SEED, duplicate_frac=duplicate_frac,
                            corrupt_frac=corrupt_frac)
        new = cur.kind != 0
        return cur.pool.images[new], cur.pool.labels[new]
    return extra


def _geometric(largest: int, ratio: float, k: int = 5) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in np.geomspace(largest, largest / ratio, k))


SCENARIOS = [
    Scenario("embedded", "digits", "source 0-4, target 5-9 (the demo)", _digits()),
    Scenario("split-odd", "digits", "source even digits, target odd digits",
             _digits((0, 2, 4, 6, 8), (1, 3, 5, 7, 9))),
    Scenario("split-reversed", "digits", "source 5-9, target 0-4", _digits((5, 6, 7, 8, 9), (0, 1, 2, 3, 4))),
    Scenario("imbalance-4", "digits", "target pool classes 1:4", _digits(pool_per_class=_geometric(100, 4)),
             ("beats_uniform", "near_best", "never_below", "coverage", "cb_beats_uniform_cb")),
    Scenario("imbalance-16", "digits", "target pool classes 1:16", _digits(pool_per_class=_geometric(96, 16)),
             ("beats_uniform", "near_best", "never_below", "coverage", "cb_beats_uniform_cb")),
    Scenario("imbalance-20", "digits", "target pool classes 1:20 (smallest class 5)",
             _digits(pool_per_class=_geometric(100, 20))),
    Scenario("growth-15", "digits", "pool + one shifted/noisy delivery of 15%", _digits(extra=_growth(0.15)),
             ("beats_uniform", "near_best", "never_below", "growth", "cb_beats_uniform_cb")),
    Scenario("growth-40", "digits", "pool + shifted/noisy deliveries of 40%", _digits(extra=_growth(0.40)),
             ("beats_uniform", "near_best", "never_below", "growth", "cb_beats_uniform_cb")),
    Scenario("near-duplicates", "digits", "pool + 30% near-duplicates", _digits(extra=_curated(0.3, 0.0))),
    Scenario("curation", "digits", "pool + 20% near-duplicates + 5% corrupted images",
             _digits(extra=_curated(0.2, 0.05))),
    Scenario("gmm-paper", "gmm", "the paper's GMM: 10 clusters, N = 3000, r = 5000",
             lambda: {"clusters": 10}, ("beats_uniform", "near_best", "never_below", "coverage")),
    Scenario("gmm-30", "gmm", "30 clusters", lambda: {"clusters": 30},
             ("beats_uniform", "near_best", "never_below", "coverage")),
    Scenario("gmm-wide", "gmm", "10 clusters, noise std up to 2 (50x the paper's)",
             lambda: {"clusters": 10, "std_max": 2.0}, ("beats_uniform", "near_best", "never_below", "coverage")),
    Scenario("gmm-skewed", "gmm", "20 clusters, sizes skewed 1:50", lambda: {"clusters": 20, "skew": 50.0},
             ("beats_uniform", "near_best", "never_below", "coverage")),
]
BY_NAME = {s.name: s for s in SCENARIOS}


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------

_MODELS: dict = {}


def _model(source_classes, source):
    if source_classes not in _MODELS:
        _MODELS[source_classes] = pretrain(source.images, source.labels, len(source_classes), seed=0,
                                           threads=PRETRAIN_THREADS)
    return _MODELS[source_classes]


def run_digits(sc: Scenario, seeds: list[int], budgets, log) -> pd.DataFrame:
    d = sc.build()
    model = _model(d["source_classes"], d["source"])
    pool_x, pool_y = d["pool"]
    pool_f, (val_f, test_f) = standardized_features(model, pool_x, [d["val"].images, d["test"].images])
    pool = ev.Split.of("pool", pool_f, pool_y, pool_x)
    val = ev.Split.of("val", val_f, d["val"].labels, d["val"].images)
    test = ev.Split.of("test", test_f, d["test"].labels, d["test"].images)
    how = dict(sketch_dim=128, kind="gaussian", layers="ft1", label_mode="expected", device="cpu")
    sketches = ev.SeededSketches(model, pool_x, labels=pool_y, sample_ids=list(pool.ids), **how)
    val_sketches = ev.SeededSketches(model, d["val"].images, **how)  # label-free: the images only
    k = int(d["num_classes"])
    ns = sorted({n for n in (k, 2 * k, *budgets) if n <= len(pool_y)})
    specs = ev.default_specs(list(LABEL_FREE), class_balanced=True)
    specs.insert(1, ev.MethodSpec("skmm", options={"reference": "validation"}, label="skmm-val"))
    df = ev.compare(pool, val, test, specs, ns, seeds, sketch=sketches, finetune="ft1", progress=log, threads=1,
                    validation_sketch=val_sketches)
    failed = df[df.status != "ok"]
    if len(failed):
        log(f"{sc.name}: {len(failed)} failed runs, e.g. {failed.method.iloc[0]} n={failed.n.iloc[0]}: {failed.reason.iloc[0]}")
    df = df[df.status == "ok"].copy()
    df["covered"] = [np.unique(pool_y[_indices(s)]).size == k if isinstance(s, str) and s else np.nan
                     for s in df["selected"]]
    df["score"] = df["test_accuracy"]
    df["clusters"] = k
    df["pool_size"] = len(pool_y)
    return df


def _indices(text: str) -> np.ndarray:
    return np.array([int(t) for t in text.split()], dtype=np.int64)


def run_gmm(sc: Scenario, seeds: list[int], budgets, log) -> pd.DataFrame:
    spec = sc.build()
    k = spec["clusters"]
    rows = []
    for seed in seeds:
        g = make_gmm(seed, n_clusters=k, std_max=spec.get("std_max", 0.04), skew=spec.get("skew"))
        G = sketch_features(g.X, 4 * k, seed)
        for n in budgets:
            for method in GMM_METHODS:
                sel = select(method, G, n, seed=seed)
                risk, _ = ridge_cv_risk(g.X, g.y, sel.indices, np.random.default_rng([seed, n]))
                rows.append({"method": method, "group": ev.LABEL_FREE, "n": n, "seed": seed, "status": "ok",
                             "risk": risk, "score": -np.log10(risk),
                             "covered": np.unique(g.cluster[sel.indices]).size == k})
        log(f"{sc.name}: seed {seed} done")
    df = pd.DataFrame(rows)
    df["clusters"] = k
    df["pool_size"] = len(g.y)
    return df


def gmm_budgets(k: int, quick: bool) -> list[int]:
    """The paper's budgets for 10 clusters (48, 80, 200, 400), scaled with the number of clusters."""
    factors = (4.8, 8) if quick else (4.8, 8, 20, 40)
    return [int(round(f * k)) for f in factors]


# --------------------------------------------------------------------------------------------------
# goals and tables
# --------------------------------------------------------------------------------------------------


def _means(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby(["method", "n"])["score"].agg(["mean", "sem"])


def goals(sc: Scenario, df: pd.DataFrame, before: pd.DataFrame | None, method: str = "skmm") -> dict[str, tuple[bool, str]]:
    """Each goal of the scenario for ``method`` as the label-free default: (passed, the worst value and where)."""
    out: dict[str, tuple[bool, str]] = {}
    k = int(df.clusters.iloc[0])
    budgets = sorted(set(df.n))
    limit = 40 if sc.kind == "digits" else budgets[1]
    vs_uniform = ev.paired_difference(df, method, "uniform", "score")
    if "beats_uniform" in sc.goals:
        part = vs_uniform[vs_uniform.index <= limit]
        worst = part.z.idxmin()
        out["beats_uniform"] = (bool((part.z >= 2).all()), f"min z {part.z.min():.1f} at n={worst}")
    if "never_below" in sc.goals:
        worst = vs_uniform.z.idxmin()
        out["never_below"] = (bool((vs_uniform.z > -1).all()), f"min z {vs_uniform.z.min():.1f} at n={worst}")
    if "near_best" in sc.goals:
        free = df[df.group == ev.LABEL_FREE]
        means = _means(free)["mean"].unstack("n")
        zs = []
        for n in means.columns:
            best = means[n].drop(method).idxmax()
            if means.at[method, n] >= means.at[best, n]:
                continue
            p = ev.paired_difference(free[free.n == n], method, best, "score")
            zs.append((float(p.z.iloc[0]), n, best))
        worst = min(zs) if zs else (np.inf, "-", "-")
        out["near_best"] = (worst[0] >= -1, "best at every n" if not zs else f"min z {worst[0]:.1f} vs {worst[2]} at n={worst[1]}")
    if "coverage" in sc.goals:
        at_n = 2 * k if sc.kind == "digits" else budgets[0]
        at = df[(df.method == method) & (df.n == at_n)]
        share = float(at.covered.mean()) if len(at) else np.nan
        out["coverage"] = (bool(share >= 0.8), f"{100 * share:.0f}% of seeds at n={at_n}")
    if "growth" in sc.goals and before is not None:
        after_m, before_m = _means(df), _means(before)
        worst = []
        for n in sorted(set(df.n) & set(before.n)):
            a, b, u = after_m.loc[(method, n)], before_m.loc[(method, n)], after_m.loc[("uniform", n)]
            worst.append(((a["mean"] - (b["mean"] - a["sem"])), a["mean"] - u["mean"], n))
        ok = all(d1 >= 0 and d2 >= 0 for d1, d2, _ in worst)
        w = min(worst, key=lambda t: min(t[0], t[1]))
        out["growth"] = (ok, f"n={w[2]}: {100 * w[0]:+.1f} vs before - 1 s.e.m., {100 * w[1]:+.1f} vs uniform")
    if "cb_beats_uniform_cb" in sc.goals and (df.method == "skmm-cb").any():
        p = ev.paired_difference(df, "skmm-cb", "uniform-cb", "score")
        part = p[p.index <= limit]
        out["cb_beats_uniform_cb"] = (bool((part.z >= 2).all()), f"min z {part.z.min():.1f} at n={part.z.idxmin()}")
    return out


def scenario_table(sc: Scenario, df: pd.DataFrame) -> str:
    scale, unit = (100.0, "test accuracy (%)") if sc.kind == "digits" else (1.0, "risk (MSE)")
    value = "score" if sc.kind == "digits" else "risk"
    stats = df.groupby(["method", "n"])[value].agg(["mean", "sem"])
    methods = list(dict.fromkeys(df.method))
    budgets = sorted(set(df.n))
    k = int(df.clusters.iloc[0])
    cover_at = (k, 2 * k) if sc.kind == "digits" else tuple(budgets[:2])
    lines = [f"{sc.name}: {sc.about}; pool {int(df.pool_size.iloc[0])}, {k} "
             f"{'classes' if sc.kind == 'digits' else 'clusters'}; {unit}, mean ± s.e.m. over "
             f"{df.seed.nunique()} seeds; z = paired difference to uniform (uniform-cb for -cb) / s.e.m."]
    head = ["method"] + [f"n={n}" for n in budgets] + [f"covered n={n}" for n in cover_at]
    rows = [head]
    for m in methods:
        ref = "uniform-cb" if m.endswith("-cb") else "uniform"
        z = ev.paired_difference(df, m, ref, "score") if m != ref else None
        cells = [m]
        for n in budgets:
            mean, sem = stats.loc[(m, n)] if (m, n) in stats.index else (np.nan, np.nan)
            cell = f"{scale * mean:.3g} ± {scale * sem:.2g}" if sc.kind == "gmm" else f"{scale * mean:.1f} ± {scale * sem:.1f}"
            if z is not None and n in z.index:
                cell += f" ({z.z[n]:+.1f})"
            cells.append(cell)
        for n in cover_at:
            cov = df[(df.method == m) & (df.n == n)].covered
            cells.append(f"{100 * cov.mean():.0f}%" if len(cov) and cov.notna().all() else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def summary(results: dict[str, dict]) -> str:
    names = ["beats_uniform", "near_best", "never_below", "coverage", "growth", "cb_beats_uniform_cb"]
    lines = ["| scenario | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for scenario, g in results.items():
        cells = []
        for name in names:
            if name not in g:
                cells.append("-")
            else:
                ok, why = g[name]
                cells.append(("pass" if ok else "**FAIL**") + f" ({why})")
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(df: pd.DataFrame, results: dict[str, dict], n: int = 40) -> str:
    """One row per digits scenario at budget ``n`` (the largest run below it if it was not run): uniform,
    SkMM against the pool's moment and against the validation split's (paired z to uniform), and how
    many goals the default passes."""
    n = max([b for b in set(df.n) if b <= n], default=n)
    lines = [f"FT-1 test accuracy (%) at n = {n}, mean ± s.e.m. over {df.seed.nunique()} seeds, (paired z vs "
             "uniform); goals passed by the default (`benchmarks/scenarios.py --markdown`).", "",
             "| scenario | uniform | skmm, pool moment | **skmm, validation moment (default)** | default's goals passed |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(df.scenario):
        part = df[(df.scenario == name) & (df.n == n)]
        if BY_NAME[name].kind != "digits" or not (part.method == DEFAULT).any():
            continue
        stats = part.groupby("method")["score"].agg(["mean", "sem"])
        cells = [f"{100 * stats.at['uniform', 'mean']:.1f} ± {100 * stats.at['uniform', 'sem']:.1f}"]
        for method in ("skmm", DEFAULT):
            z = float(ev.paired_difference(part, method, "uniform", "score").z.iloc[0])
            cells.append(f"{100 * stats.at[method, 'mean']:.1f} ± {100 * stats.at[method, 'sem']:.1f} ({z:+.1f})")
        passed = [ok for ok, _ in results[DEFAULT].get(name, {}).values()]
        cells.append(f"{sum(passed)} of {len(passed)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--scenarios", default="", help="comma list (default: all): " + ", ".join(BY_NAME))
    ap.add_argument("--quick", action="store_true", help="2 seeds, budgets 10 and 20, three scenarios")
    ap.add_argument("--csv", default="", help="write every run's row here")
    ap.add_argument("--from-csv", default="", help="print the report of rows saved with --csv; run nothing")
    ap.add_argument("--markdown", default="", help="also write the summary table to DIR/scenarios.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.from_csv:
        df = pd.read_csv(args.from_csv, keep_default_na=False, na_values=[""])
    else:
        names = [n for n in args.scenarios.split(",") if n] or (
            ["embedded", "growth-15", "gmm-paper"] if args.quick else list(BY_NAME))
        unknown = sorted(set(names) - set(BY_NAME))
        if unknown:
            ap.error(f"unknown scenarios {unknown}; choose from {list(BY_NAME)}")
        if any(BY_NAME[n].kind == "digits" and "growth" in BY_NAME[n].goals for n in names) and "embedded" not in names:
            names.insert(0, "embedded")  # the growth goal compares with the pool before the delivery
        seeds = list(range(2 if args.quick else args.seeds))
        budgets = BUDGETS[:2] if args.quick else BUDGETS
        frames = []
        with threadpool_limits(limits=1, user_api="blas"):
            for name in names:
                sc = BY_NAME[name]
                log(f"{name}: {sc.about}")
                if sc.kind == "digits":
                    part = run_digits(sc, seeds, budgets, log)
                else:
                    part = run_gmm(sc, seeds, gmm_budgets(sc.build()["clusters"], args.quick), log)
                part["scenario"] = name
                frames.append(part)
        df = pd.concat(frames, ignore_index=True)
        if args.csv:
            df.to_csv(args.csv, index=False)
    results: dict[str, dict] = {DEFAULT: {}, "skmm": {}}
    before = df[df.scenario == "embedded"] if (df.scenario == "embedded").any() else None
    for name in dict.fromkeys(df.scenario):
        sc = BY_NAME[name]
        part = df[df.scenario == name]
        print("\n" + scenario_table(sc, part))
        for method in results:
            if (part.method == method).any():
                results[method][name] = goals(sc, part, before if name != "embedded" else None, method)
    texts = [f"**{m}** ({ABOUT[m]}) as the label-free default:\n\n{summary(r)}" for m, r in results.items() if r]
    text = "\n\n".join(texts)
    print("\nGoals per scenario (pass/FAIL, with the worst value):\n\n" + text)
    head = headline(df, results)
    print("\n" + head)
    if args.markdown:
        folder = Path(args.markdown)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scenarios.md").write_text(
            f"Goals per scenario, {df.seed.nunique()} seeds (`benchmarks/scenarios.py`):\n\n{text}\n")
        (folder / "scenarios_headline.md").write_text(head + "\n")
    print(f"\nreport of {len(df)} saved runs" if args.from_csv else f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
