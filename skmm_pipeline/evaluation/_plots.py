"""Plots sized for the differences they show: one selection against uniform subsets of its size
(:func:`accuracy_plot`, what ``finetune_eval`` shows) and every subset version against its uniform
baseline (:func:`history_plot`, ``skmm versions list --plot``). Axes are zoomed to the data, not 0-1."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from skmm_pipeline.evaluation._report import pyplot, render_png

SELECTED, UNIFORM, FULL = "#1f77b4", "#444444", "#999999"


def _zoomed(ax, values: Sequence[float], axis: str, pad: float = 0.25, floor: float | None = 1.0) -> None:
    """Limits around ``values`` with ``pad`` of their spread on each side, at least ``floor`` (``None``:
    5% of the largest magnitude)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    margin = max(pad * (hi - lo), floor if floor is not None else 0.05 * max(abs(lo), abs(hi)) or 1.0)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo - margin, hi + margin)


def accuracy_plot(rows: list[dict], metric: str = "test_accuracy") -> bytes:
    """Per finetuning mode, a panel of the selected subset, the uniform subsets' mean ± s.e.m. and the full
    pool, as points with error bars on an axis zoomed to them, each labelled with its value; the panel
    title gives the difference to uniform. ``metric``: ``test_accuracy`` (shown in %) or ``test_mae``
    (lower is better)."""
    plt = pyplot()
    percent = metric == "test_accuracy"
    scale = 100.0 if percent else 1.0
    modes = list(dict.fromkeys(r["finetune"] for r in rows))
    # About 500 px wide: what a metadata value's column of the Dagster UI shows on a 1600 px screen.
    fig, axes = plt.subplots(len(modes), 1, figsize=(5.0, 1.0 + 1.6 * len(modes)), dpi=100, squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in rows if r["finetune"] == mode]
        labels = [f"{r['method']}  (n={r['n']})" for r in mine][::-1]
        values = [scale * r[metric] for r in mine][::-1]
        errors = [scale * r.get("sem", 0.0) for r in mine][::-1]
        colours = [SELECTED, UNIFORM, FULL][: len(mine)][::-1]
        for y, (v, e, c) in enumerate(zip(values, errors, colours)):
            ax.errorbar(v, y, xerr=e or None, fmt="o", color=c, markersize=8, capsize=5, elinewidth=2)
            text = f"{v:.1f}" + (f" ± {e:.1f}" if e else "") if percent else f"{v:.3g}" + (f" ± {e:.2g}" if e else "")
            ax.annotate(text, (v, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=9)
        ax.set_ylim(-0.6, len(labels) - 0.2)
        _zoomed(ax, [v + s * e for v, e in zip(values, errors) for s in (-1, 1)], "x", floor=1.0 if percent else None)
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("test accuracy (%)" if percent else "test MAE (lower is better)", fontsize=10)
        if len(mine) >= 2:
            delta = values[-1] - values[-2]
            unit = " points" if percent else ""
            ax.set_title(f"{mode}: {mine[0]['method']} − uniform = {delta:+.1f}{unit}"
                         + (f" (s.e.m. {errors[-2]:.1f})" if errors[-2] else ""), fontsize=10)
    return render_png(fig)


def history_plot(history: Sequence[Mapping], metric_label: str = "FT-1 test accuracy (%)", scale: float = 100.0) -> bytes:
    """Every subset version (``history``: dicts with ``tag``, ``method``, ``n``, ``pool_size``, ``selected``,
    ``uniform``, ``uniform_sem``; ``None`` where not evaluated) in order: the selection's score and its
    uniform baseline (mean ± s.e.m.), tick labels with the version's n and pool size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(history) + 2.5), 4.2), dpi=100)
    x = np.arange(len(history))
    get = lambda key: np.array([np.nan if h.get(key) is None else scale * float(h[key]) for h in history])  # noqa: E731
    selected, uniform, sem = get("selected"), get("uniform"), get("uniform_sem")
    ax.errorbar(x, uniform, yerr=np.nan_to_num(sem), fmt="s--", color=UNIFORM, capsize=4, markersize=5,
                label="uniform (same n), mean ± s.e.m.")
    methods = sorted({str(h.get("method")) for h in history})
    ax.plot(x, selected, "o-", color=SELECTED, markersize=7, linewidth=2, label=f"selected ({', '.join(methods)})")
    ax.set_xticks(x, [f"{str(h['tag']).replace('subset-', '')}\nn={h.get('n')}/{h.get('pool_size')}" for h in history],
                  fontsize=8)
    _zoomed(ax, list(selected) + list(uniform - np.nan_to_num(sem)) + list(uniform + np.nan_to_num(sem)), "y", 0.15)
    ax.set_ylabel(metric_label, fontsize=10)
    ax.set_xlabel("subset version (n = budget / pool size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    ax.set_title("subset versions: selected vs uniform", fontsize=11)
    return render_png(fig)
