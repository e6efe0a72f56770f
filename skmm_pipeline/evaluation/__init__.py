"""Evaluation of selected subsets: finetuning protocols and the method comparison.

* Finetuning (``_finetune``): FT-1, a head on frozen standardised features (:func:`linear_probe`
  for classification, :func:`ridge_probe` for regression), and FT-2, the last block + head trained on
  the subset (:func:`finetune_tail`); hyper-parameters chosen on validation, test scored once.
* The comparison harness: :func:`compare` runs method x budget x seed (``_comparison``),
  :func:`summarize` / :func:`headline_checks` give mean ± s.e.m. and paired z against the group's
  uniform baseline (``_summary``), :func:`method_table`, :func:`z_table`, :func:`summary_markdown`
  and :func:`plot_comparison` lay them out (``_report``).
"""

from skmm_pipeline.evaluation._comparison import (
    CB_SUFFIX,
    COLUMNS,
    EXCLUDED_BY_DEFAULT,
    FULL_POOL,
    GROUPS,
    HP_COLUMNS,
    LABEL_FREE,
    LABEL_USING,
    REFERENCE,
    TIMING_COLUMNS,
    FT2Setup,
    MethodSpec,
    SeededSketches,
    Split,
    compare,
    default_methods,
    default_specs,
)
from skmm_pipeline.evaluation._finetune import (
    DEFAULT_ALPHAS,
    DEFAULT_CS,
    DEFAULT_FT2_GRID,
    FINETUNE_MODES,
    TASKS,
    EvalSplit,
    FinetuneGrid,
    FinetuneResult,
    ProbeResult,
    finetune_tail,
    linear_probe,
    macro_f1,
    ridge_probe,
)
from skmm_pipeline.evaluation._report import (
    markdown,
    method_table,
    plot_comparison,
    summary_markdown,
    to_json_records,
    z_table,
)
from skmm_pipeline.evaluation._summary import group_baselines, headline_checks, summarize

__all__ = [
    "CB_SUFFIX", "COLUMNS", "DEFAULT_ALPHAS", "DEFAULT_CS", "DEFAULT_FT2_GRID", "EXCLUDED_BY_DEFAULT", "FINETUNE_MODES",
    "FULL_POOL", "GROUPS", "HP_COLUMNS", "LABEL_FREE", "LABEL_USING", "REFERENCE", "TASKS", "TIMING_COLUMNS",
    "EvalSplit", "FT2Setup", "FinetuneGrid", "FinetuneResult", "MethodSpec", "ProbeResult", "SeededSketches", "Split",
    "compare", "default_methods", "default_specs", "finetune_tail", "group_baselines", "headline_checks",
    "linear_probe", "macro_f1", "markdown", "method_table", "plot_comparison", "ridge_probe", "summarize",
    "summary_markdown", "to_json_records", "z_table",
]
