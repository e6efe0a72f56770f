"""Evaluation of selected subsets: finetuning protocols and the method comparison.

* Finetuning (``_finetune``): FT-1, a head on frozen standardised features (:func:`linear_probe`
  for classification, :func:`ridge_probe` for regression), and FT-2, the last block + head trained on
  the subset (:func:`finetune_tail`); hyper-parameters chosen on validation, test scored once.
* The comparison harness: :func:`compare` runs method x budget x seed (``_comparison``),
  :func:`summarize` / :func:`headline_checks` give mean ± s.e.m. and paired z against the group's
  uniform baseline (``_summary``), :func:`method_table`, :func:`z_table`, :func:`summary_markdown`
  and :func:`plot_comparison` lay them out (``_report``).
* The pipeline's evaluation of one selection: :class:`EvalData` (validation and test splits) and
  :func:`load_pool` (the registered pool and its model, a :class:`Pool`) in ``_data``;
  :func:`evaluate_selection` finetunes on the selection, on uniform subsets of its size and on the
  full pool, and summarises (``_selection_eval``); :func:`versus_uniform`, :func:`versus_previous` and
  :func:`shard_shares` tell whether it fell behind uniform, the previous version or the pool's shard mix
  (``_quality``).
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
from skmm_pipeline.evaluation._data import (
    EvalData,
    Pool,
    check_regression_model,
    check_regression_setup,
    check_same_task,
    load_labelled_pool,
    load_pool,
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
from skmm_pipeline.evaluation._gallery import class_names, shard_grid, subset_grid
from skmm_pipeline.evaluation._plots import accuracy_plot, history_plot
from skmm_pipeline.evaluation._quality import comparable, history_points, shard_shares, versus_previous, versus_uniform
from skmm_pipeline.evaluation._report import (
    image_markdown,
    markdown,
    method_table,
    plot_comparison,
    rows_markdown,
    summary_markdown,
    to_json_records,
    z_table,
)
from skmm_pipeline.evaluation._selection_eval import (
    SUMMARY_METRICS,
    SelectionEvaluation,
    comparison_subsets,
    evaluate_selection,
    ft1_evaluator,
    ft2_evaluator,
    ft2_history,
    summarize_scores,
)
from skmm_pipeline.evaluation._summary import group_baselines, headline_checks, paired_difference, summarize

__all__ = [
    "CB_SUFFIX", "COLUMNS", "DEFAULT_ALPHAS", "DEFAULT_CS", "DEFAULT_FT2_GRID", "EXCLUDED_BY_DEFAULT", "FINETUNE_MODES",
    "FULL_POOL", "GROUPS", "HP_COLUMNS", "LABEL_FREE", "LABEL_USING", "REFERENCE", "SUMMARY_METRICS", "TASKS",
    "TIMING_COLUMNS", "EvalData", "EvalSplit", "FT2Setup", "FinetuneGrid", "FinetuneResult", "MethodSpec", "Pool",
    "ProbeResult", "SeededSketches", "SelectionEvaluation", "Split", "accuracy_plot", "class_names", "history_plot",
    "shard_grid", "subset_grid", "check_regression_model",
    "check_regression_setup", "check_same_task", "compare", "comparison_subsets", "default_methods", "default_specs",
    "evaluate_selection", "finetune_tail", "ft1_evaluator", "ft2_evaluator", "ft2_history", "group_baselines", "headline_checks", "paired_difference",
    "image_markdown", "linear_probe", "load_labelled_pool", "load_pool", "macro_f1", "markdown", "method_table",
    "plot_comparison", "ridge_probe", "rows_markdown", "summarize", "summarize_scores", "summary_markdown",
    "to_json_records", "z_table", "comparable", "history_points", "shard_shares", "versus_previous", "versus_uniform",
]
