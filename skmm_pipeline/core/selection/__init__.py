"""One selection API for SkMM and every baseline: ``select(method, X, n, seed=..., labels=..., **options)``.

``X`` is an N x d array (sketched gradients, gradients or features); the result carries exactly ``n``
distinct row indices (in selection order), the relaxed weights where the method has them, and
per-method diagnostics (always ``select_seconds``, ``moment_ratio``, ``zero_rows``, ``duplicate_rows``).

Methods (``method_options(name)`` lists each one's options and defaults):

* ``skmm`` (default): A-optimal design in the sketch, ``tr(Sigma (a I + G_S^T G_S)^{-1})`` minimised
  greedily with Sherman-Morrison updates over the top ``design_dim`` principal directions and finished
  with Fedorov exchanges on the integer subset; ridge ``a = min(1, 3/n) tr(Sigma) / m``. Pools too
  large for the exact greedy use a randomly-pivoted-Cholesky start and stochastic greedy picks.
* ``skmmv2``: the research code's SkMMv2 (RPC start, blocks of picks sampled with a temperature).
* ``skmm-relaxation``: the paper's capped-simplex moment matching (FISTA with exact projection, or
  the LP; optional Loewner cuts) and a rounding that keeps the inclusion probabilities ``n s``;
  ``repair=True`` finishes with the exchanges of ``skmm``.
* ``skmm-v1-reference``: the research code's v1 loop, for comparison only.
* baselines (see :mod:`skmm_pipeline.core.baselines`): ``uniform``, ``leverage``, ``ridge-leverage``,
  ``adaptive``, ``herding``, ``k-center``.
* model-based baselines (see :mod:`skmm_pipeline.core.model_baselines`; they take frozen features and
  need labels): ``entropy``, ``margin``, ``least-confidence``, ``grand``, ``el2n``, ``forgetting``,
  ``glister``, ``deepfool``, ``contextual-diversity``. :func:`method_info` gives each method's group
  (label-free or label-using) and input (any matrix, or features).

Input handling (checked before any method runs):

* ``n`` must be an integer with ``0 < n <= N``; ``X`` must be 2-D with at least one row and column
  and only finite values (the first bad row is named); labels must have shape ``(N,)``.
* All-zero rows carry no gradient signal. They stay eligible (they are real samples): the moment-based
  methods, leverage and adaptive sampling give them zero weight, so they are chosen only once nothing
  informative is left; the distance-based baselines (herding, k-center) treat the origin like any
  other point. ``zero_rows`` counts them. A pool whose rows are *all* zero is rejected by every method
  but ``uniform``.
* Duplicated rows are distinct samples: each copy may be chosen, the moment-based methods see a
  second copy as worth less than the first (it adds less to the subset's moment), and
  ``duplicate_rows`` counts the copies beyond the first.
* ``class_balanced=True`` (needs ``labels``) splits the budget over classes in proportion to their
  sizes (largest remainder, at least one per class when ``n`` allows) or as ``class_budgets`` gives
  (a dict label -> count summing to ``n``), and runs the method inside each class.
* ``exclude`` (N booleans, e.g. images flagged by :func:`skmm_pipeline.core.outliers.lacks_structure`)
  removes rows before anything else: class budgets and the guard see the rest as the pool.
* ``outlier_guard=True`` (or a dict of options) first sets aside rows that stick out of the pool
  (ridge Mahalanobis distance, :mod:`skmm_pipeline.core.outliers`); they cannot be selected. With
  ``class_balanced`` the guard runs inside each class (a corrupted image with a wrong label stands out
  there) and every class keeps at least its budget.

Modules: :mod:`.registry` (the method tables, :func:`register`, the :class:`SelectorResult` every
selector returns), :mod:`.api` (:func:`select` and its input checks), one module per method family
(:mod:`.skmm`, :mod:`.geometric`, :mod:`.model_based`). Import from the package.
"""

from skmm_pipeline.core.budgets import class_budgets
from skmm_pipeline.core.selection.api import (
    Selection,
    as_selection_matrix,
    duplicate_rows,
    select,
)
from skmm_pipeline.core.selection.geometric import GEOMETRIC
from skmm_pipeline.core.selection.model_based import MODEL_BASED
from skmm_pipeline.core.selection.registry import (
    DESCRIPTIONS,
    GROUPS,
    INPUTS,
    METHOD_INFO,
    SELECTORS,
    Family,
    Selector,
    SelectorResult,
    method_info,
    method_options,
    register,
    register_family,
)
from skmm_pipeline.core.selection.skmm import SKMM, SKMM_DEFAULTS

# Every built-in method is registered here, family by family in this order (the order of SELECTORS,
# which the comparison's default method list follows), whatever order the modules were imported in.
for _family in (SKMM, GEOMETRIC, MODEL_BASED):
    register_family(_family)
del _family

__all__ = [
    "DESCRIPTIONS",
    "GROUPS",
    "INPUTS",
    "METHOD_INFO",
    "SELECTORS",
    "SKMM_DEFAULTS",
    "Family",
    "Selection",
    "Selector",
    "SelectorResult",
    "as_selection_matrix",
    "class_budgets",
    "duplicate_rows",
    "method_info",
    "method_options",
    "register",
    "register_family",
    "select",
]
