"""Composable selection (per-shard candidates against the pool's moment, one merge) against global selection.

    python benchmarks/composable.py [--seeds 10] [--n20-seeds 10] [--grid-c 2,4,8] [--parts quality,grid,...]
                                    [--scale-rows 1000000] [--markdown docs/results]
    python benchmarks/composable.py --quick        # a smoke run: seconds of work, numbers mean nothing

Four parts, each a table:

* quality: the GMM variants (ridge risk, as benchmarks/scenarios.py: gmm-paper, gmm-30, gmm-wide,
  gmm-skewed at N = 3000 in 8 shards, c = 2) and the embedded digits pool (FT-1 test accuracy of a
  logistic head on the pool's standardised features; selection on the gradient sketch, m = 128, in 4
  shards): paired over seeds, composable minus global on the score (-log10 risk, or accuracy), its
  s.e.m., z, the risk (accuracy) ratio and the fraction of seeds covering every cluster (class); each
  also with a reference target (``*-val``: the validation split sketched like the pool for digits, the
  product's default; rows held out of the GMM draw), and against the noise floor: a second global design
  as good by the criterion (another start of the same design), whose score differs from the first by
  what two equally good designs differ by (``within_floor``: composable loses no more than that);
* shards and c: a GMM of N = 100 000 rows (r = 100, 20 clusters skewed 1:50, m = 80) cut into 4..256
  shards, c in 2, 4, 8;
* incremental: 64 shards of sketch files, then one more; the shards whose candidates are recomputed
  (the new one, unless the pool's moment moved beyond the tolerance), the rows that work touches, and the
  quality against recomputing everything; the moment's drift for a like shard and for a shifted one;
* scale: a simulated pool (rows x m = 256, generated shard by shard into memory-mapped sketch files), the
  composable selection in a fresh process: wall time per stage and peak RSS, against the joined N x m
  array a global selection would hold.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from skmm_pipeline.core.composable import composable_select, moment_drift, pool_moment, shard_moment
from skmm_pipeline.core.moment_matching import (
    design_dimension,
    moment_stats,
    principal_coordinates,
    resolve_ridge,
    target_stats,
    trace_objective,
)
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_io import SketchShardWriter, save_sketch_shard
from skmm_pipeline.data.composable import composable_selection
from skmm_pipeline.data.synthetic import make_gmm, sketch_features
from skmm_pipeline.evaluation.ridge import ridge_cv_risk

GMM_VARIANTS = {"gmm-paper": {"n_clusters": 10}, "gmm-30": {"n_clusters": 30},
                "gmm-wide": {"n_clusters": 10, "std_max": 2.0}, "gmm-skewed": {"n_clusters": 20, "skew": 50.0}}


def _split(N: int, shards: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng([seed, shards]).permutation(N), shards)


def _objective(G, n: int, reference=None):
    """The design's own criterion under the target moment (the pool's, or ``reference``'s rows'),
    ``tr(Sigma (a I + G_S^T G_S)^{-1})`` in its principal coordinates (what every mode minimises; far less
    noisy than a risk)."""
    st = moment_stats(G) if reference is None else target_stats(moment_stats(G), reference)
    k = design_dimension(n, st)
    Z, lam, a = principal_coordinates(G, k, st), st.lam[:k], resolve_ridge("auto", st, n)
    return lambda idx: trace_objective(Z, lam, idx, a)


def _global_alt(G, n: int, seed: int, reference=None) -> np.ndarray:
    """The noise floor's second global design, as good by the criterion: the same SkMM design (exchanges
    included) started from randomly pivoted Cholesky pivots drawn with another seed, instead of the exact
    greedy's deterministic first picks (a permutation of the pool gives the greedy's very rows back)."""
    return select("skmm", G, n, seed=seed + 10_000, start="rpc", reference=reference).indices


def _write_shards(root: Path, G, parts, seed: int) -> dict:
    records = {}
    for i, p in enumerate(parts):
        name = f"s{i:03d}"
        save_sketch_shard(root / name, G[p], [f"{name}/{r}" for r in range(p.size)], {"seed": seed})
        records[name] = {"path": str(root / name), "data_version": f"{seed}-{i}", "rows": int(p.size)}
    return records


def _back(res: dict, parts) -> np.ndarray:
    """A composable_selection's sample ids (``shard/row``) as positions in the pool."""
    where = {f"s{i:03d}": p for i, p in enumerate(parts)}
    return np.array([where[s][int(r)] for s, r in (sid.split("/") for sid in res["sample_ids"])])


def _composable(G, parts, n, c, seed, reference=None):
    if reference is None:
        idx, _ = composable_select([G[p] for p in parts], n, c=c, seed=seed)
        return np.concatenate(parts)[idx]
    with tempfile.TemporaryDirectory() as tmp:  # the pipeline's own path: shard files, the target from `reference`
        records = _write_shards(Path(tmp) / "sk", G, parts, seed)
        return _back(composable_selection(Path(tmp) / "cache", records, n, c=c, seed=seed, reference=reference), parts)


def _designs(G, n, seed, parts, c, reference=None):
    """(mode, indices): global, its equally good second draw (the noise floor) and composable."""
    return (("global", select("skmm", G, n, seed=seed, reference=reference).indices),
            ("global2", _global_alt(G, n, seed, reference)),
            ("composable", _composable(G, parts, n, c, seed, reference)))


HELD_OUT = 300  # GMM rows held out of the pool as the reference target (a draw from the same mixture)


def quality_gmm(seeds, variants, shards: int, c: float, quick: bool) -> pd.DataFrame:
    rows = []
    for name in variants:
        spec = GMM_VARIANTS[name]
        k = spec["n_clusters"]
        for seed in seeds:
            g = make_gmm(seed, **spec)
            G = sketch_features(g.X, 4 * k, seed)
            held = np.random.default_rng([seed, 7]).permutation(len(G))
            pool, ref = np.sort(held[HELD_OUT:]), held[:HELD_OUT]
            for n in ([int(4.8 * k)] if quick else [int(4.8 * k), 8 * k]):
                for scen, P, R in ((name, np.arange(len(G)), None), (f"{name}-val", pool, G[ref])):
                    obj = _objective(G[P], n, R)
                    for mode, idx in _designs(G[P], n, seed, _split(len(P), shards, seed), c, R):
                        risk, _ = ridge_cv_risk(g.X, g.y, P[idx], np.random.default_rng([seed, n]))
                        rows.append({"scenario": scen, "n": n, "seed": seed, "mode": mode, "score": -np.log10(risk),
                                     "objective": obj(idx), "covered": np.unique(g.cluster[P[idx]]).size == k})
    return pd.DataFrame(rows)


def quality_digits(seeds, shards: int, c: float, quick: bool, n20_seeds: int) -> pd.DataFrame:
    """Digits at n = 20, 40, 80 (n = 20 over ``n20_seeds`` seeds, at least ``seeds``), matching the pool's
    moment (``digits``) and the validation split's sketched like the pool (``digits-val``, the default)."""
    from skmm_pipeline import evaluation as ev  # noqa: PLC0415 - torch models: only this part needs them
    from skmm_pipeline.data.digits import load_digits_transfer  # noqa: PLC0415 - same
    from skmm_pipeline.models.features import standardized_features  # noqa: PLC0415 - same
    from skmm_pipeline.models.small_cnn import pretrain  # noqa: PLC0415 - same

    d = load_digits_transfer()
    model = pretrain(d.source_train.images, d.source_train.labels, 5, epochs=3 if quick else 40, seed=0, threads=2)
    pool_f, (val_f, test_f) = standardized_features(model, d.pool.images, [d.val.images, d.test.images])
    y, k = d.pool.labels, d.num_classes
    how = dict(sketch_dim=128, kind="gaussian", layers="ft1", label_mode="expected", device="cpu")
    sketches = ev.SeededSketches(model, d.pool.images, **how)
    val_sketches = ev.SeededSketches(model, d.val.images, **how)  # label-free: the images only
    rows = []
    for seed in range(max(len(seeds), n20_seeds)):
        G, V = sketches(seed), val_sketches(seed)
        for n in ([20] if quick or seed >= len(seeds) else [20, 40, 80]):
            for scen, R in (("digits", None), ("digits-val", V)):
                obj = _objective(G, n, R)
                for mode, idx in _designs(G, n, seed, _split(len(G), shards, seed), c, R):
                    acc = ev.linear_probe(pool_f[idx], y[idx], val_f, d.val.labels, test_f, d.test.labels, seed=seed)
                    rows.append({"scenario": scen, "n": n, "seed": seed, "mode": mode, "score": acc.test_accuracy,
                                 "objective": obj(idx), "covered": np.unique(y[idx]).size == k})
    return pd.DataFrame(rows)


def _sem(x: pd.Series) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group: composable minus global on the score (mean, s.e.m., z), the ratio and the coverage; where a
    second global design (``global2``) was drawn, the noise floor: ``global2`` minus ``global`` (mean, mean
    absolute, s.e.m., criterion ratio) and ``within_floor``: composable's mean loss no larger than the mean
    absolute difference between the two equally good global designs."""
    out = []
    for key, grp in df.groupby(keys, sort=False):
        wide = grp.pivot_table(index="seed", columns="mode", values="score")
        objs = grp.pivot_table(index="seed", columns="mode", values="objective")
        cov = grp.groupby("mode")["covered"].mean()
        diff = wide["composable"] - wide["global"]
        sem = _sem(diff)
        gmm = not str(grp["scenario"].iloc[0]).startswith("digits")
        ratio = float(10 ** (-diff.mean())) if gmm else float(wide["composable"].mean() / wide["global"].mean())
        row = {**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "seeds": len(diff),
               "global": float(wide["global"].mean()), "composable": float(wide["composable"].mean()),
               "diff": float(diff.mean()), "sem": sem, "z": float(diff.mean() / sem) if sem > 1e-12 else 0.0,
               "ratio": ratio, "obj_ratio": float((objs["composable"] / objs["global"]).mean()),
               "within_1sem": bool(diff.mean() >= -sem) if sem == sem else bool(diff.mean() >= 0)}
        if "global2" in wide:
            floor = (wide["global2"] - wide["global"]).dropna()
            row.update({"abs_diff": float(diff.abs().mean()), "floor_diff": float(floor.mean()),
                        "floor_abs": float(floor.abs().mean()), "floor_sem": _sem(floor),
                        "floor_obj": float((objs["global2"] / objs["global"]).mean()),
                        "within_floor": bool(diff.mean() >= -floor.abs().mean())})
        row.update({"cov_global": float(cov.get("global", np.nan)), "cov_composable": float(cov.get("composable", np.nan))})
        out.append(row)
    return pd.DataFrame(out)


def grid(seeds, N: int, shard_counts, cs, n: int) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        g = make_gmm(seed, N=N, r=100, n_clusters=20, skew=50.0)
        G = sketch_features(g.X, 80, seed)
        obj = _objective(G, n)
        configs = [("global", None, None), ("global2", None, None)] + [("composable", s, c) for s in shard_counts for c in cs]
        for mode, s, c in configs:
            t0 = time.perf_counter()
            idx = (select("skmm", G, n, seed=seed).indices if mode == "global" else _global_alt(G, n, seed)
                   if mode == "global2" else _composable(G, _split(N, s, seed), n, c, seed))
            secs = time.perf_counter() - t0
            risk, _ = ridge_cv_risk(g.X, g.y, idx, np.random.default_rng([seed, n]))
            rows.append({"scenario": "gmm-skewed-100k", "seed": seed, "shards": s, "c": c, "mode": mode,
                         "score": -np.log10(risk), "objective": obj(idx), "covered": np.unique(g.cluster[idx]).size == 20,
                         "seconds": secs})
    df = pd.DataFrame(rows)
    base = df[df["mode"].isin(["global", "global2"])]
    parts = []
    for (s, c), grp in df[df["mode"] == "composable"].groupby(["shards", "c"]):
        both = pd.concat([base, grp]).assign(shards=s, c=c)
        summary = paired(both, ["scenario", "shards", "c"])
        summary["seconds"] = grp["seconds"].median()
        parts.append(summary)
    return pd.concat(parts, ignore_index=True)


def _gmm_shards(root: Path, seed: int, shards: int, per: int, n_clusters: int = 20):
    g = make_gmm(seed, N=shards * per, r=100, n_clusters=n_clusters, skew=50.0)
    G = sketch_features(g.X, 80, seed).astype(np.float32)
    parts = _split(len(G), shards, seed)
    return g, G, parts, _write_shards(root, G, parts, seed)


def incremental(seeds, base: int, per: int, n: int, c: float) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            g, G, parts, records = _gmm_shards(root / "sk", seed, base + 1, per)
            names = sorted(records)
            old = {k: records[k] for k in names[:base]}
            composable_selection(root / "cache", old, n, c=c, seed=seed)
            grown = composable_selection(root / "cache", records, n, c=c, seed=seed)
            full = composable_selection(root / "fresh", records, n, c=c, seed=seed)
            where = {name: p for name, p in zip(names, parts)}
            obj = _objective(G, n)
            drift_like = moment_drift(pool_moment(shard_moment(G[where[k]]) for k in names[:base]).sigma,
                                      pool_moment(shard_moment(G[where[k]]) for k in names).sigma)
            small = np.flatnonzero(np.bincount(g.cluster) == np.bincount(g.cluster).min())[0]
            shifted = G[g.cluster == small][:per]
            drift_shifted = moment_drift(pool_moment(shard_moment(G[where[k]]) for k in names[:base]).sigma,
                                         pool_moment([*(shard_moment(G[where[k]]) for k in names[:base]),
                                                      shard_moment(shifted)]).sigma)
            for mode, res in (("incremental", grown), ("full", full)):
                idx = _back(res, parts)
                risk, _ = ridge_cv_risk(g.X, g.y, idx, np.random.default_rng([seed, n]))
                work = sum(records[k]["rows"] for k in res["recomputed"]) / sum(r["rows"] for r in records.values())
                rows.append({"seed": seed, "mode": mode, "recomputed": len(res["recomputed"]), "work": work,
                             "score": -np.log10(risk), "objective": obj(idx), "covered": np.unique(g.cluster[idx]).size == 20,
                             "drift_like": drift_like, "drift_shifted": drift_shifted})
    return pd.DataFrame(rows)


def peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (reset by exec, unlike ``getrusage``'s ``ru_maxrss``,
    which keeps the forking parent's), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_worker(args) -> None:
    """One stage in a fresh process (so its peak RSS is its own): 'write' the pool or 'select' from it."""
    root, rows, m, shards, n, c = Path(args.root), args.scale_rows, args.scale_m, args.scale_shards, args.n, args.c
    t0 = time.perf_counter()
    base_rss = peak_rss_mib()  # the interpreter and its imports
    per = np.array_split(np.arange(rows), shards)
    if args.scale_worker == "write":
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(64, m)).astype(np.float32) * np.geomspace(4, 0.25, 64)[:, None].astype(np.float32)
        for i, p in enumerate(per):
            name = f"s{i:04d}"
            with SketchShardWriter(root / "sk" / name, {"seed": 0, "m": m}, [f"{name}/{r}" for r in range(p.size)], m) as w:
                for lo in range(0, p.size, 1 << 15):
                    k = min(1 << 15, p.size - lo)
                    lab = rng.zipf(1.6, size=k) % 64
                    w.rows[lo : lo + k] = centres[lab] + 0.3 * rng.standard_normal((k, m), dtype=np.float32)
        out = {"write_seconds": time.perf_counter() - t0}
    else:
        records = {f"s{i:04d}": {"path": str(root / "sk" / f"s{i:04d}"), "data_version": "v", "rows": int(p.size)}
                   for i, p in enumerate(per)}
        res = composable_selection(root / "cache", records, n, c=c, seed=0)
        d = res["diagnostics"]
        out = {k: d[k] for k in ("moment_seconds", "candidate_seconds", "merge_seconds", "select_seconds", "candidates",
                                 "moment_ratio")}
        out["selected"] = len(res["sample_ids"])
    out["peak_rss_mib"] = peak_rss_mib()
    out["imports_rss_mib"] = base_rss
    print(json.dumps(out))


def scale(rows: int, m: int, shards: int, n: int, c: float) -> dict:
    result = {"rows": rows, "m": m, "shards": shards, "n": n, "c": c, "joined_mib": rows * m * 4 / 2**20}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for stage in ("write", "select"):
            cmd = [sys.executable, __file__, "--scale-worker", stage, "--root", tmp, "--scale-rows", str(rows),
                   "--scale-m", str(m), "--scale-shards", str(shards), "--n", str(n), "--c", str(c)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update({f"{stage}_{k}" if k.endswith("rss_mib") else k: v for k, v in got.items()})
    return result


PARTS = ("quality", "grid", "incremental", "scale")


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--scale-rows", type=int, default=1_000_000, help="rows of the simulated pool (10^7: --scale-rows 10000000)")
    ap.add_argument("--scale-m", type=int, default=256)
    ap.add_argument("--scale-shards", type=int, default=128)
    ap.add_argument("--markdown", help="write composable.md (and composable_scale.md) into this folder")
    ap.add_argument("--grid-c", default="2,4,8", help="the c values of the shards-and-c grid (comma-separated)")
    ap.add_argument("--n20-seeds", type=int, default=10, help="seeds for digits at n = 20 (borderline; at least --seeds)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    ap.add_argument("--scale-worker", choices=("write", "select"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=500, help=argparse.SUPPRESS)
    ap.add_argument("--c", type=float, default=2.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scale_worker:
        scale_worker(args)
        return 0
    q = args.quick
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; available: {list(PARTS)}")
    seeds = list(range(2 if q else args.seeds))
    t0 = time.perf_counter()
    report: list[str] = []
    heads: dict[str, str] = {}
    within, floor_ok, settings = 0, 0, 0
    if "quality" in parts:
        qual = pd.concat([quality_gmm(seeds, ["gmm-paper"] if q else list(GMM_VARIANTS), 8, 2.0, q),
                          quality_digits(seeds, 4, 2.0, q, 2 if q else args.n20_seeds)], ignore_index=True)
        q_table = paired(qual, ["scenario", "n"])
        within, settings = within + int(q_table["within_1sem"].sum()), settings + len(q_table)
        floor_ok += int(q_table["within_floor"].sum())
        report += [
            "## Quality: composable (c = 2; GMM in 8 shards, digits in 4) vs global, paired over seeds",
            "score: -log10 ridge risk (GMM) or FT-1 test accuracy (digits); diff = composable - global; ratio: risk "
            "ratio (GMM, < 1 is better) or accuracy ratio (digits); obj_ratio: the design criterion under the target "
            "moment, composable / global (1 = as good); cov: fraction of seeds covering every cluster/class",
            "*-val: the target is a reference's moment, not the pool's: the validation split sketched like the pool "
            f"(digits), or {HELD_OUT} rows held out of the GMM draw (the pool is the rest)",
            "noise floor: global2 is a second global design as good by the criterion (the same SkMM design and "
            "exchanges from a randomly pivoted Cholesky start, another seed; floor_obj = its criterion / global's); "
            "floor_diff, floor_abs, floor_sem: mean, mean absolute and s.e.m. of global2 - global; abs_diff: mean "
            "|composable - global|; within_floor: diff >= -floor_abs (composable loses no more than two equally "
            "good global designs differ by)",
            "", md_table(q_table), ""]
    if "grid" in parts:
        N = 20_000 if q else 100_000
        grid_c = [2] if q else [float(v) for v in args.grid_c.split(",")]
        g_table = grid(seeds, N, [4, 16] if q else [4, 16, 64, 256], grid_c, 96)
        within, settings = within + int(g_table["within_1sem"].sum()), settings + len(g_table)
        floor_ok += int(g_table["within_floor"].sum())
        report += [f"## Shards and c: GMM, 20 clusters skewed 1:50, N = {N}, n = 96 (global vs composable)",
                   "", md_table(g_table), ""]
    if settings:
        heads["quality_within_one_sem"] = f"{within}/{settings}"
        heads["quality_within_floor"] = f"{floor_ok}/{settings}"
    if "incremental" in parts:
        base = 8 if q else 64
        inc = incremental(seeds, base, 300 if q else 1000, 96, 2.0)
        inc_table = paired(inc.rename(columns={"mode": "m0"}).assign(
            mode=lambda d: d["m0"].map({"incremental": "composable", "full": "global"}), scenario="gmm-incremental"),
            ["scenario"])
        incr = inc[inc["mode"] == "incremental"]
        report += [
            f"## Incremental: {base} shards + 1 (like the others); incremental (reused candidates) vs full recompute",
            "", md_table(inc_table), "",
            f"shards recomputed: {incr['recomputed'].mean():.3g} of {base + 1}; candidate work (rows) "
            f"{incr['work'].mean():.4f} of a full recompute; moment drift from the new shard: like "
            f"{inc['drift_like'].mean():.4f}, shifted (rows of the smallest cluster) {inc['drift_shifted'].mean():.4f} "
            f"(tolerance 0.05: above it every shard's candidates are recomputed)", ""]
        heads.update({"incremental_shards_recomputed": f"{incr['recomputed'].mean():.3g}",
                      "incremental_candidate_work_ratio": f"{incr['work'].mean():.4f}",
                      "incremental_within_one_sem": str(bool(inc_table["within_1sem"].iloc[0]))})
    scale_text = ""
    if "scale" in parts:
        sc = scale(100_000 if q else args.scale_rows, 64 if q else args.scale_m, 10 if q else args.scale_shards,
                   100 if q else 500, 2.0)
        scale_text = "\n".join([
            f"## Scale: {sc['rows']} rows x m = {sc['m']} in {sc['shards']} shards, n = {sc['n']}, c = {sc['c']:g}",
            "", md_table(pd.DataFrame([sc])), "",
            f"scale_peak_rss_mib: {sc['select_peak_rss_mib']:.0f}, {sc['select_imports_rss_mib']:.0f} after imports "
            f"(joined sketch {sc['joined_mib']:.0f} MiB)",
            f"scale_select_seconds: {sc['select_seconds']:.1f}"]) + "\n"
    heads["seconds"] = f"{time.perf_counter() - t0:.0f}"
    text = "\n".join(report) + "\n" + "\n".join(f"{k}: {v}" for k, v in heads.items()) + "\n"
    print(text + scale_text)
    if args.markdown:
        out = Path(args.markdown)
        out.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/composable.py" + (" --quick" if q else f" --seeds {args.seeds} --n20-seeds "
                                                   f"{args.n20_seeds} --grid-c {args.grid_c}")
        if report:
            (out / "composable.md").write_text(f"Generated by `{cmd} --parts {','.join(p for p in parts if p != 'scale')}`."
                                               "\n\n" + text.replace("## ", "#### "))
        if scale_text:
            scmd = "python benchmarks/composable.py --parts scale" + (
                " --quick" if q else f" --scale-rows {args.scale_rows} --scale-shards {args.scale_shards}")
            (out / "composable_scale.md").write_text(f"Generated by `{scmd}`.\n\n" + scale_text.replace("## ", "#### "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
