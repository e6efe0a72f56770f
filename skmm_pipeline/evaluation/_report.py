"""A comparison's summary laid out for people: method x budget tables (mean ± s.e.m., paired z), Markdown,
the metric-vs-budget plot, and JSON-safe rows."""

from __future__ import annotations

import base64
import io
import json
from typing import Sequence

import numpy as np
import pandas as pd

from skmm_pipeline.evaluation._comparison import CB_SUFFIX, FULL_POOL, GROUPS, LABEL_FREE, REFERENCE


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Imported on first use, not at module top: ``import matplotlib.pyplot`` takes about 0.4 s (measured
    on the 2-core machine) and selects a global backend, which loading the Dagster definitions (every
    step process) should not pay or do unless a plot is drawn."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def render_png(fig, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (``tight``: laid out tightly first); the figure is closed."""
    plt = pyplot()
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def image_markdown(alt: str, png: bytes) -> str:
    """A PNG as an inline Markdown image (a data URI), e.g. for the Dagster UI's metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def rows_markdown(rows: list[dict]) -> str:
    """Records with the same keys as a Markdown table (the first record's keys as columns); ``""`` for none."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _cell(mean, sem, seeds, failed, scale, digits) -> str:
    if not seeds:
        return f"failed ({failed})" if failed else "-"
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * sem:.{digits}f}" if seeds > 1 else "")
    return text + (f" [{failed} failed]" if failed else "")


def method_table(summary: pd.DataFrame, finetune: str, group: str | None = None, scale: float = 100.0,
                 digits: int = 1) -> pd.DataFrame:
    """Methods x budgets, cells ``mean ± s.e.m.`` (``scale``: 100 for percent); ``group=None``: all."""
    s = summary[(summary.finetune == finetune) & ((summary.group == group) if group else True)]
    cells = {(m, n): _cell(mean, sem, k, f, scale, digits)
             for m, n, mean, sem, k, f in zip(s.method, s.n, s["mean"], s["sem"], s.seeds, s.failed)}
    methods = list(dict.fromkeys(s.method))
    budgets = sorted(set(s.n))
    table = pd.DataFrame([[cells.get((m, n), "") for n in budgets] for m in methods], index=methods,
                         columns=[f"n={n}" for n in budgets])
    table.index.name = "method"
    return table


def z_table(summary: pd.DataFrame, finetune: str, group: str, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Methods x budgets, cells ``difference to the group baseline (z = diff / s.e.m.)``, paired over seeds."""
    s = summary[(summary.finetune == finetune) & (summary.group == group) & (summary.method != summary.baseline)]
    cells = {}
    for m, n, d, z in zip(s.method, s.n, s["diff"], s["z"]):
        cells[(m, n)] = "-" if not np.isfinite(d) else f"{scale * d:+.{digits}f} (z={z:.1f})"
    methods = list(dict.fromkeys(s.method))
    budgets = sorted(set(s.n))
    table = pd.DataFrame([[cells.get((m, n), "") for n in budgets] for m in methods], index=methods,
                         columns=[f"n={n}" for n in budgets])
    table.index.name = f"vs {s.baseline.iloc[0]}" if len(s) else "method"
    return table


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index as the first column)."""
    head = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


def summary_markdown(summary: pd.DataFrame, metric_label: str = "test accuracy (%)") -> str:
    """Every finetuning mode and group: the mean ± s.e.m. table and the paired z table, in Markdown."""
    parts = []
    for ft in dict.fromkeys(summary.finetune):
        for group in [g for g in (*GROUPS, REFERENCE) if ((summary.finetune == ft) & (summary.group == g)).any()]:
            parts.append(f"**{ft}, {group}: {metric_label}, mean ± s.e.m.**\n\n" + markdown(method_table(summary, ft, group)))
            if group != REFERENCE:
                z = z_table(summary, ft, group)
                if len(z):
                    parts.append(f"**{ft}, {group}: paired difference to {z.index.name[3:]} (points)**\n\n" + markdown(z))
    return "\n\n".join(parts)


def plot_comparison(summary: pd.DataFrame, metric_label: str = "test accuracy (%)", scale: float = 100.0,
                    highlight: Sequence[str] = ("skmm",), dpi: int = 80) -> bytes:
    """PNG of metric vs budget: one panel per finetuning mode x group (label-free: solid lines, circles;
    label-using: dashed, squares), one line per method with s.e.m. error bars, the same colour for a
    method and its class-balanced variant (uniform in black), the full pool as a grey dotted line;
    ``highlight``ed base methods drawn thicker."""
    plt = pyplot()
    modes = list(dict.fromkeys(summary.finetune))
    groups = [g for g in GROUPS if (summary.group == g).any()] or list(GROUPS[:1])
    base = lambda m: m[: -len(CB_SUFFIX)] if m.endswith(CB_SUFFIX) else m  # noqa: E731
    bases = list(dict.fromkeys(base(m) for m in summary.method if m != FULL_POOL))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(k) for k in range(0, 20, 2)] + [cmap(k) for k in range(1, 20, 2)]  # dark shades first
    others = [b for b in bases if b != "uniform"]
    colour = {b: palette[k % 20] for k, b in enumerate(others)}
    colour["uniform"] = "black"  # the reference line of both groups
    fig, axes = plt.subplots(len(modes), len(groups), figsize=(5.2 * len(groups), 3.6 * len(modes)), dpi=dpi,
                             squeeze=False, sharey="row")
    for r, ft in enumerate(modes):
        ceiling = summary[(summary.finetune == ft) & (summary.method == FULL_POOL) & (summary.seeds > 0)]
        for c, group in enumerate(groups):
            ax = axes[r][c]
            s = summary[(summary.finetune == ft) & (summary.group == group) & (summary.seeds > 0)]
            style = dict(linestyle="-", marker="o") if group == LABEL_FREE else dict(linestyle="--", marker="s")
            for method in dict.fromkeys(s.method):
                m = s[s.method == method].sort_values("n")
                thick = base(method) in highlight
                ax.errorbar(m.n, scale * m["mean"], yerr=scale * m["sem"].fillna(0), color=colour[base(method)],
                            label=method, linewidth=2.4 if thick else 1.0, markersize=4 if thick else 3, capsize=2,
                            zorder=3 if thick else 2, **style)
            if len(ceiling):
                ax.axhline(scale * ceiling["mean"].iloc[0], color="grey", linestyle=":", linewidth=1, label="full pool")
            ax.set_xscale("log", base=2)
            budgets = sorted(set(s.n)) or sorted(set(summary.n))
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(f"{ft} — {group}", fontsize=9)
            ax.set_xlabel("budget n", fontsize=8)
            if c == 0:
                ax.set_ylabel(metric_label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2, loc="lower right")
    return render_png(fig)


def to_json_records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-safe dicts (NaN -> None)."""
    return json.loads(df.to_json(orient="records"))
