"""Quality over time: is a selection behind the uniform baseline, behind the previous version, or pulled
towards one shard? Pure functions over the pipeline's records, used by the asset checks.

* :func:`versus_uniform`: per finetuning mode, the subset's score against the mean ± s.e.m. of the uniform
  subsets of its size; *behind* when worse than the mean by more than one s.e.m.
* :func:`versus_previous`: against the previous version's score (same budget, finetuning mode and
  evaluation splits); *behind* when accuracy fell by more than ``PREVIOUS_DROP`` (2 points), or MAE
  rose by more than that fraction.
* :func:`shard_shares`: per shard, its share of the pool's rows and of the picks, with a binomial z of
  the picks against the share of rows; a shard is *over-picked* above ``OVERPICK_Z``. A delivery that
  resembles the evaluation data may earn more than its share; a z of 3 says it earns far more than
  chance, which is worth a look (a shifted or duplicated delivery does that to a pool-moment selection).
* :func:`history_points`: each earlier version's subset and uniform score, the points of the history plot.
"""

from __future__ import annotations

import math
from typing import Mapping

PREVIOUS_DROP = 0.02
OVERPICK_Z = 3.0
MODES = {"": "FT-1", "ft2_": "FT-2"}


def _score_names(task: str) -> tuple[str, bool]:
    """The metric's short name and whether higher is better."""
    return ("mae", False) if task == "regression" else ("acc", True)


def versus_uniform(metrics: Mapping[str, float], task: str = "classification") -> list[dict]:
    """One row per finetuning mode present in ``metrics`` (``finetune_eval``'s flat metrics)."""
    short, higher = _score_names(task)
    rows = []
    for prefix, mode in MODES.items():
        if f"{prefix}{short}_skmm" not in metrics:
            continue
        score, mean = float(metrics[f"{prefix}{short}_skmm"]), float(metrics[f"{prefix}{short}_uniform_mean"])
        sem = float(metrics.get(f"{prefix}{short}_uniform_sem", 0.0))
        gain = score - mean if higher else mean - score
        rows.append({"finetune": mode, "metric": short, "subset": round(score, 4), "uniform_mean": round(mean, 4),
                     "uniform_sem": round(sem, 4), "gain": round(gain, 4), "behind": bool(gain < -sem)})
    return rows


def versus_previous(metrics: Mapping[str, float], previous: Mapping[str, float] | None,
                    task: str = "classification") -> list[dict]:
    """One row per finetuning mode in both runs; ``[]`` without a previous run."""
    if not previous:
        return []
    short, higher = _score_names(task)
    rows = []
    for prefix, mode in MODES.items():
        key = f"{prefix}{short}_skmm"
        if key not in metrics or key not in previous:
            continue
        now, before = float(metrics[key]), float(previous[key])
        change = now - before if higher else before - now  # positive: better
        allowed = PREVIOUS_DROP if higher else PREVIOUS_DROP * abs(before)
        rows.append({"finetune": mode, "metric": short, "subset": round(now, 4), "previous": round(before, 4),
                     "change": round(change, 4), "behind": bool(change < -allowed)})
    return rows


def comparable(record: Mapping, previous: Mapping | None) -> bool:
    """Can two ``finetune_eval`` summaries be compared: same budget, finetuning mode and evaluation splits."""
    keys = ("n", "finetune", "eval_source", "task")
    return bool(previous) and all(record.get(k) == previous.get(k) for k in keys)


def shard_shares(picked: Mapping[str, int], shard_rows: Mapping[str, int]) -> list[dict]:
    """Per shard (name order): rows, share of the pool, picks, share of the picks and the binomial z of
    the picks against the share of rows (0 when the shard is the whole pool)."""
    total_rows, n = sum(shard_rows.values()), sum(picked.values())
    rows = []
    for name in sorted(shard_rows):
        p = shard_rows[name] / total_rows if total_rows else 0.0
        k = int(picked.get(name, 0))
        sd = math.sqrt(n * p * (1 - p))
        z = (k - n * p) / sd if sd > 0 else 0.0
        rows.append({"shard": name, "rows": int(shard_rows[name]), "pool_share": round(p, 4), "picks": k,
                     "pick_share": round(k / n, 4) if n else 0.0, "z": round(z, 2), "over_picked": bool(z > OVERPICK_Z)})
    return rows


def history_points(history: list[dict], task: str) -> list[dict]:
    """The rows :func:`history_plot` draws: each version's subset and uniform score (FT-1, or FT-2
    when the run had no FT-1), with n and pool size; versions of another task are left out."""
    short = "mae" if task == "regression" else "acc"
    points = []
    for h in history:
        m = h["metrics"]
        prefix = "" if f"{short}_skmm" in m else "ft2_"
        if h.get("task") != task or f"{prefix}{short}_skmm" not in m:
            continue
        points.append({"tag": h["dvc_tag"], "method": h.get("method"), "n": h.get("n"), "pool_size": h.get("pool_size"),
                       "selected": m[f"{prefix}{short}_skmm"], "uniform": m.get(f"{prefix}{short}_uniform_mean"),
                       "uniform_sem": m.get(f"{prefix}{short}_uniform_sem")})
    return points
