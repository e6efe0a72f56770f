"""Summaries of a comparison (``compare``'s tidy rows): mean ± s.e.m. per method and budget, the paired
difference to the group's baseline in s.e.m. units, and whether a method leads its group."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from skmm_pipeline.evaluation._comparison import CB_SUFFIX, LABEL_FREE, LABEL_USING


def group_baselines(df: pd.DataFrame, baseline: str = "uniform") -> dict[str, str]:
    """The reference method of each group: ``baseline`` for label-free, ``baseline-cb`` for label-using
    (``baseline`` itself if there is no class-balanced variant)."""
    present = set(df["method"])
    out = {LABEL_FREE: baseline}
    out[LABEL_USING] = baseline + CB_SUFFIX if baseline + CB_SUFFIX in present else baseline
    return out


def paired_difference(df: pd.DataFrame, a: str, b: str, metric: str = "test_accuracy",
                      finetune: str | None = None) -> pd.DataFrame:
    """Per-n paired difference a - b of ``metric`` over the seeds where both succeeded (in one finetuning
    mode, if given): mean ``diff``, ``diff_sem``, ``z = diff / diff_sem`` and the number of ``pairs``."""
    ok = df[df.status == "ok"] if finetune is None else df[(df.finetune == finetune) & (df.status == "ok")]
    wide = ok[ok.method.isin([a, b])].pivot_table(index=["n", "seed"], columns="method", values=metric)
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=["diff", "diff_sem", "z", "pairs"])
    d = (wide[a] - wide[b]).dropna().groupby(level="n")
    out = pd.DataFrame({"diff": d.mean(), "diff_sem": d.sem(), "pairs": d.count()})
    out["z"] = [_z(m, s) for m, s in zip(out["diff"], out["diff_sem"])]
    return out


def _z(mean: float, sem: float) -> float:
    if not np.isfinite(sem):
        return np.nan
    if sem <= 1e-12:  # identical differences on every seed (rounding noise aside)
        return 0.0 if abs(mean) <= 1e-12 else math.copysign(math.inf, mean)
    return float(mean / sem)


def summarize(df: pd.DataFrame, metric: str = "test_accuracy", baseline: str = "uniform") -> pd.DataFrame:
    """Mean +- s.e.m. over seeds per finetuning mode x method x budget, with the paired difference to
    the group's baseline (:func:`group_baselines`): ``diff`` (mean of per-seed differences),
    ``diff_sem`` and ``z = diff / diff_sem``. ``failed`` counts failed seeds, ``reason`` names the first."""
    refs = group_baselines(df, baseline)
    keys = ["finetune", "group", "method", "n"]
    order = list(dict.fromkeys(df["method"]))
    out = []
    for (ft, group, method, n), g in df.groupby(keys, sort=False):
        ok = g[g.status == "ok"][metric]
        bad = g[g.status != "ok"]
        out.append({
            "finetune": ft, "group": group, "method": method, "n": int(n),
            "seeds": int(ok.size), "failed": int(len(bad)),
            "mean": float(ok.mean()) if ok.size else np.nan,
            "sem": float(ok.sem()) if ok.size > 1 else (0.0 if ok.size == 1 else np.nan),
            "baseline": refs.get(group, ""), "diff": np.nan, "diff_sem": np.nan, "z": np.nan,
            "reason": bad["reason"].iloc[0] if len(bad) else "",
        })
    summary = pd.DataFrame(out)
    if summary.empty:
        return summary
    for (ft, group, method), _ in summary.groupby(["finetune", "group", "method"], sort=False):
        ref = refs.get(group)
        if not ref or method == ref:
            continue
        paired = paired_difference(df, method, ref, metric, ft)
        mask = (summary.finetune == ft) & (summary.method == method)
        for i in summary.index[mask]:
            n = summary.at[i, "n"]
            if n in paired.index:
                summary.loc[i, ["diff", "diff_sem", "z"]] = paired.loc[n, ["diff", "diff_sem", "z"]].to_numpy(float)
    summary["_order"] = summary["method"].map({m: k for k, m in enumerate(order)})
    summary = summary.sort_values(["finetune", "group", "_order", "n"], kind="stable").drop(columns="_order")
    return summary.reset_index(drop=True)



def headline_checks(df: pd.DataFrame, finetune: str, method: str, group: str, *, baseline: str | None = None,
                    metric: str = "test_accuracy", best_max_n: int = 80, beat_max_n: int = 40,
                    beat_z: float = 2.0) -> dict[str, str]:
    """Does ``method`` lead its group? Three statements, each ``yes`` or ``no (...)``:

    * ``best_or_within_1sem``: at every n <= ``best_max_n``, ``method`` has the highest mean of its
      group, or the best method's lead over it is at most one s.e.m. of their paired difference;
    * ``beats_baseline``: at every n <= ``beat_max_n``, the paired z against the baseline is >= ``beat_z``;
    * ``never_below_baseline``: at every n, the mean difference to the baseline is >= 0.
    """
    baseline = baseline or group_baselines(df)[group]
    ok = df[(df.finetune == finetune) & (df.group == group) & (df.status == "ok")]
    means = ok.groupby(["n", "method"])[metric].mean().unstack("method")
    if method not in means:
        return {k: f"no ({method} has no results)" for k in ("best_or_within_1sem", "beats_baseline", "never_below_baseline")}
    misses = []
    for n in [n for n in means.index if n <= best_max_n]:
        row = means.loc[n].dropna()
        best = row.idxmax()
        if best == method or row[best] == row.get(method):
            continue
        p = paired_difference(df, best, method, metric, finetune)
        if n not in p.index or not p.loc[n, "diff"] <= p.loc[n, "diff_sem"]:
            lead = float(row[best] - row.get(method, np.nan))
            misses.append(f"n={n}: {best} ahead by {100 * lead:.1f}")
    p = paired_difference(df, method, baseline, metric, finetune)
    weak = [f"n={n}: z={p.loc[n, 'z']:.1f}" for n in p.index if n <= beat_max_n and not p.loc[n, "z"] >= beat_z]
    weak += [f"n={n}: no pairs" for n in means.index if n <= beat_max_n and n not in p.index]
    below = [f"n={n}: {100 * p.loc[n, 'diff']:+.1f}" for n in p.index if p.loc[n, "diff"] < 0]

    def verdict(problems):
        return "yes" if not problems else "no (" + "; ".join(problems) + ")"

    return {"best_or_within_1sem": verdict(misses), "beats_baseline": verdict(weak), "never_below_baseline": verdict(below)}
