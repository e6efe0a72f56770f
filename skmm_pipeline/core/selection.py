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
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from skmm_pipeline.core import baselines, model_baselines, moment_matching
from skmm_pipeline.core.budgets import class_budgets
from skmm_pipeline.core.moment_matching import MomentStats, moment_stats
from skmm_pipeline.core.rounding import ROUNDINGS, round_to_subset
from skmm_pipeline.core.validation import InputError, check_budget


@dataclass(frozen=True)
class Selection:
    method: str
    indices: np.ndarray
    diagnostics: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # relaxed capped-simplex weights s (inclusion probabilities n*s)


Selector = Callable[..., tuple]
SELECTORS: dict[str, Selector] = {}
DESCRIPTIONS: dict[str, str] = {}
# Per method: ``group`` "label-free" (never looks at labels) or "label-using"; ``input`` "any" (any N x d
# matrix, e.g. a gradient sketch) or "features" (frozen penultimate features, together with labels).
METHOD_INFO: dict[str, dict[str, str]] = {}
GROUPS = ("label-free", "label-using")
INPUTS = ("any", "features")


def register(
    name: str, description: str = "", *, group: str = "label-free", input: str = "any"
) -> Callable[[Selector], Selector]:
    if group not in GROUPS or input not in INPUTS:
        raise ValueError(f"register({name!r}): group must be one of {GROUPS} and input one of {INPUTS}")

    def deco(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        METHOD_INFO[name] = {"group": group, "input": input}
        return fn

    return deco


def method_info(name: str) -> dict:
    """``{"group": "label-free" | "label-using", "input": "any" | "features"}`` for a registered method."""
    if name not in METHOD_INFO:
        raise InputError(f"unknown selection method {name!r}; available: {sorted(SELECTORS)}")
    return dict(METHOD_INFO[name])


def method_options(method: str) -> dict[str, object]:
    """The options a method accepts, with their defaults."""
    sig = inspect.signature(SELECTORS[method])
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in ("seed", "labels", "stats")
    }


# --------------------------------------------------------------------------------------------------
# SkMM
# --------------------------------------------------------------------------------------------------

# The default SkMM configuration, chosen by benchmarks/gmm.py and benchmarks/digits_transfer.py.
SKMM_DEFAULTS: dict = dict(design_dim="auto", ridge="auto", start="auto", exchange=True)


@register("skmm", "SkMM (default): A-optimal design in the sketch on the final integer subset")
def _skmm(
    X,
    n,
    *,
    seed,
    labels=None,
    stats,
    design_dim=SKMM_DEFAULTS["design_dim"],
    ridge=SKMM_DEFAULTS["ridge"],
    start=SKMM_DEFAULTS["start"],
    exchange=SKMM_DEFAULTS["exchange"],
    candidates="auto",
):
    res = moment_matching.trace_design(
        X, n, stats=stats, seed=seed, design_dim=design_dim, ridge=ridge, start=start, exchange=exchange, candidates=candidates
    )
    return res.indices, _with_objective(res.diagnostics, n)


def _with_objective(diag: dict, n: int) -> dict:
    """Common names: ``objective`` (the solver's own) and ``iterations`` (greedy picks + exchanges)."""
    return {
        "objective": diag["objective_trace"],
        "iterations": n - diag.get("start_pivots", 0) + diag.get("exchanges", 0),
        **diag,
    }


@register("skmmv2", "SkMMv2: RPC start, then blocks of trace-decrease picks sampled with a temperature")
def _skmmv2(
    X,
    n,
    *,
    seed,
    labels=None,
    stats,
    design_dim="full",
    ridge="x1",
    block=None,
    temperature=0.1,
    candidates="auto",
):
    b = max(1, n // 20) if block is None else int(block)
    res = moment_matching.trace_design(
        X,
        n,
        stats=stats,
        seed=seed,
        design_dim=design_dim,
        ridge=ridge,
        start="rpc",
        block=b,
        temperature=float(temperature),
        candidates=candidates,
    )
    return res.indices, {**_with_objective(res.diagnostics, n), "block": b, "temperature": float(temperature)}


def _check_c_S(c_S) -> float:
    if isinstance(c_S, bool) or not isinstance(c_S, (int, float, np.integer, np.floating)) or not np.isfinite(c_S) or c_S <= 0:
        raise InputError(f"c_S must be a positive number, got {c_S!r}")
    return float(c_S)


@register("skmm-relaxation", "SkMM capped-simplex moment matching + rounding that keeps the inclusion probabilities")
def _skmm_relaxation(
    X,
    n,
    *,
    seed,
    labels=None,
    stats,
    c_S=0.999,
    solver="fista",
    max_iter=5000,
    tol=1e-7,
    cuts=0,
    scale="absolute",
    rounding="systematic",
    repair=False,
    design_dim="auto",
    ridge="auto",
):
    c_S = _check_c_S(c_S)
    if rounding not in ROUNDINGS:
        raise InputError(f"unknown rounding {rounding!r}; available: {list(ROUNDINGS)}")
    s, diag = moment_matching.capped_simplex_matching(
        X, n, stats=stats, c_S=c_S, solver=solver, max_iter=max_iter, tol=tol, cuts=cuts, scale=scale
    )
    idx = round_to_subset(s, n, method=rounding, seed=seed)
    diag = {
        "objective": diag["relaxed_objective"],
        **diag,
        "rounding": rounding,
        "subset_objective": moment_matching.subset_objective(X, idx, c_S, stats),
    }
    if repair:
        res = moment_matching.trace_design(X, n, stats=stats, seed=seed, design_dim=design_dim, ridge=ridge, init=idx)
        idx = res.indices
        diag.update(repair="exchange", exchanges=res.diagnostics["exchanges"], objective_trace=res.diagnostics["objective_trace"])
    return idx, diag, s


@register("skmm-v1-reference", "The research code's v1 loop (Adam + clamp/renormalise, weighted sampling); comparison only")
def _skmm_v1(X, n, *, seed, labels=None, stats, c_S=0.999, steps=10_000, lr=1e-5):
    c_S = _check_c_S(c_S)
    idx, w, diag = moment_matching.v1_reference(X, n, seed=seed, c_S=c_S, steps=steps, lr=lr, stats=stats)
    return idx, {"objective": diag["relaxed_objective"], **diag,
                 "subset_objective": moment_matching.subset_objective(X, idx, c_S, stats)}, w


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


@register("uniform", "uniform random sample without replacement")
def _uniform(X, n, *, seed, labels=None, stats=None):
    return baselines.uniform(X, n, np.random.default_rng(seed))


@register("leverage", "leverage-score pi-ps sampling")
def _leverage(X, n, *, seed, labels=None, stats):
    return baselines.leverage(X, n, np.random.default_rng(seed), stats)


@register("ridge-leverage", "rank-k ridge leverage-score pi-ps sampling")
def _ridge_leverage(X, n, *, seed, labels=None, stats, ridge=None, rank=None):
    return baselines.ridge_leverage(X, n, np.random.default_rng(seed), stats, ridge=ridge, rank=rank)


@register("adaptive", "adaptive sampling = randomly pivoted Cholesky on the linear kernel")
def _adaptive(X, n, *, seed, labels=None, stats=None):
    return baselines.adaptive(X, n, np.random.default_rng(seed))


@register("herding", "kernel herding (greedy mean matching, linear kernel)")
def _herding(X, n, *, seed, labels=None, stats=None):
    return baselines.herding(X, n)


@register("k-center", "greedy k-center (farthest-first traversal)")
def _k_center(X, n, *, seed, labels=None, stats=None):
    return baselines.k_center(X, n, np.random.default_rng(seed))


# Model-based baselines (see :mod:`skmm_pipeline.core.model_baselines`): X = frozen penultimate features,
# labels required; a seeded proxy softmax head is trained on (X, labels) before scoring.
_MB = model_baselines
_EP, _LR, _WD, _BS, _REP = _MB.DEFAULT_EPOCHS, _MB.DEFAULT_LR, _MB.DEFAULT_WEIGHT_DECAY, _MB.DEFAULT_BATCH_SIZE, _MB.DEFAULT_REPEATS


def _training(epochs, lr, weight_decay, batch_size) -> dict:
    return dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size)


@register("entropy", "uncertainty: largest predictive entropy of a proxy head", group="label-using", input="features")
def _entropy(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return _MB.select_uncertainty(X, n, labels, kind="entropy", seed=seed, balance=balance,
                                  **_training(epochs, lr, weight_decay, batch_size))


@register("margin", "uncertainty: smallest top-two probability margin of a proxy head", group="label-using", input="features")
def _margin(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return _MB.select_uncertainty(X, n, labels, kind="margin", seed=seed, balance=balance,
                                  **_training(epochs, lr, weight_decay, batch_size))


@register("least-confidence", "uncertainty: smallest top probability of a proxy head", group="label-using", input="features")
def _least_confidence(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
                      balance=True):
    return _MB.select_uncertainty(X, n, labels, kind="least-confidence", seed=seed, balance=balance,
                                  **_training(epochs, lr, weight_decay, batch_size))


@register("grand", "GraNd: largest expected head-gradient norm over seeded proxy trainings", group="label-using", input="features")
def _grand(X, n, *, seed, labels=None, stats=None, repeats=_REP, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
           balance=True):
    return _MB.select_gradient_norm(X, n, labels, score="grand", seed=seed, repeats=repeats, balance=balance,
                                    **_training(epochs, lr, weight_decay, batch_size))


@register("el2n", "EL2N: largest expected L2 error of the proxy's probabilities", group="label-using", input="features")
def _el2n(X, n, *, seed, labels=None, stats=None, repeats=_REP, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
          balance=True):
    return _MB.select_gradient_norm(X, n, labels, score="el2n", seed=seed, repeats=repeats, balance=balance,
                                    **_training(epochs, lr, weight_decay, batch_size))


@register("forgetting", "forgetting events while training the proxy (never learned first)", group="label-using", input="features")
def _forgetting(X, n, *, seed, labels=None, stats=None, epochs=_MB.DEFAULT_FORGETTING_EPOCHS, lr=_LR, weight_decay=_WD,
                batch_size=_BS, balance=True):
    return _MB.select_forgetting(X, n, labels, seed=seed, balance=balance,
                                 **_training(epochs, lr, weight_decay, batch_size))


@register("glister", "GLISTER-ONLINE: greedy validation log-likelihood (Taylor) with head updates", group="label-using",
          input="features")
def _glister(X, n, *, seed, labels=None, stats=None, val_X=None, val_labels=None, eta="auto", epochs=_EP, lr=_LR,
             weight_decay=_WD, batch_size=_BS, balance=True):
    return _MB.select_glister(X, n, labels, seed=seed, val_X=val_X, val_labels=val_labels, eta=eta, balance=balance,
                              **_training(epochs, lr, weight_decay, batch_size))


@register("deepfool", "DeepFool: smallest exact distance to the proxy head's decision boundary", group="label-using",
          input="features")
def _deepfool(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return _MB.select_deepfool(X, n, labels, seed=seed, balance=balance, **_training(epochs, lr, weight_decay, batch_size))


@register("contextual-diversity", "k-center greedy under the symmetric-KL contextual-diversity distance",
          group="label-using", input="features")
def _contextual_diversity(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
                          balance=True):
    return _MB.select_contextual_diversity(X, n, labels, seed=seed, balance=balance,
                                           **_training(epochs, lr, weight_decay, batch_size))


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def as_selection_matrix(X, name: str = "X") -> np.ndarray:
    """``X`` as a 2-D float32/float64 array (float32 kept as is, no copy), finite, or :class:`InputError`."""
    arr = np.asarray(X)
    if arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (samples x features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    for lo in range(0, arr.shape[0], 1 << 16):
        blk = arr[lo : lo + (1 << 16)]
        if not np.isfinite(blk).all():
            bad = np.flatnonzero(~np.isfinite(blk).all(axis=1))
            total = sum(
                int((~np.isfinite(arr[j : j + (1 << 16)]).all(axis=1)).sum()) for j in range(lo, arr.shape[0], 1 << 16)
            )
            raise InputError(
                f"{name} has non-finite values (NaN or inf) in {total} row(s), first at row {lo + int(bad[0])}"
            )
    return arr


def duplicate_rows(X, chunk_elems: int = 1 << 22) -> int:
    """Number of rows that repeat an earlier row exactly (candidate pairs are compared about
    ``chunk_elems`` values at a time, so memory stays bounded whatever the row width)."""
    X = np.asarray(X)
    N, d = X.shape
    r = np.random.default_rng(12345).standard_normal(d)
    key = np.empty(N)
    for lo in range(0, N, 1 << 16):
        key[lo : lo + (1 << 16)] = np.asarray(X[lo : lo + (1 << 16)], dtype=np.float64) @ r
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1])
    if same.size == 0:
        return 0
    # Confirm candidate pairs exactly (the random projection only proposes them), in chunks.
    first, second = order[same], order[same + 1]
    step = max(1, int(chunk_elems) // max(1, d))
    dup = 0
    for lo in range(0, same.size, step):
        a, b = X[first[lo : lo + step]], X[second[lo : lo + step]]
        dup += int(np.all(a == b, axis=1).sum())
    return dup


def _run(method: str, X: np.ndarray, n: int, seed: int, labels, stats: MomentStats, options: dict):
    fn = SELECTORS[method]
    allowed = method_options(method)
    unknown = set(options) - set(allowed)
    if unknown:
        raise InputError(f"method {method!r} does not take option(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    out = fn(X, n, seed=seed, labels=labels, stats=stats, **options)
    idx, diag = out[0], dict(out[1])
    weights = out[2] if len(out) > 2 else None
    return np.asarray(idx, dtype=np.int64), diag, weights


def _select_balanced(method: str, X: np.ndarray, n: int, seed: int, labels: np.ndarray, given_budgets, options: dict):
    """Run ``method`` inside each class with per-class budgets (see :func:`class_budgets`)."""
    budgets = class_budgets(labels, n, given_budgets)
    parts, per_class = [], {}
    for ci, (c, b) in enumerate(budgets.items()):
        if b == 0:
            continue
        rows = np.flatnonzero(labels == c)
        sub_seed = int(np.random.SeedSequence([seed, ci]).generate_state(1)[0])
        Xc = X[rows]
        stats_c = moment_stats(Xc)
        if stats_c.lam[0] <= 0 and method != "uniform":
            idx_c = np.random.default_rng(sub_seed).choice(rows.size, size=b, replace=False)
            diag_c = {"note": "class has only zero rows: drawn uniformly"}
        else:
            idx_c, diag_c, _ = _run(method, Xc, b, sub_seed, labels[rows], stats_c, options)
        parts.append(rows[idx_c])
        per_class[str(c)] = {"budget": b, **{k: v for k, v in diag_c.items() if np.isscalar(v)}}
    idx = np.concatenate(parts)
    return idx, {"class_balanced": True, "class_budgets": {str(c): b for c, b in budgets.items()}, "per_class": per_class}


def select(method: str, X, n: int, *, seed: int = 0, labels=None, **options) -> Selection:
    """Select ``n`` of the ``N`` rows of ``X`` with the registered ``method``.

    Options common to every method: ``class_balanced`` (bool), ``class_budgets`` (dict),
    ``outlier_guard`` (bool, or a dict of :func:`core.outliers.outlier_guard` options: rows it flags
    cannot be selected; ``outliers_excluded`` reports how many) and ``exclude`` (N booleans, e.g. from
    :func:`core.outliers.lacks_structure`: those rows are removed before anything else, so class
    budgets and the guard see the rest as the pool; ``rows_excluded`` reports how many); the rest are
    the method's own (see :func:`method_options`).
    """
    if method not in SELECTORS:
        raise InputError(f"unknown selection method {method!r}; available: {sorted(SELECTORS)}")
    X = as_selection_matrix(X, "X")
    N = X.shape[0]
    n = check_budget(n, N)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (N,):
            raise InputError(f"labels must have shape ({N},), got {labels.shape}")
    exclude = options.pop("exclude", None)
    balanced = bool(options.pop("class_balanced", False))
    given_budgets = options.pop("class_budgets", None)
    if given_budgets is not None:
        balanced = True
    guard = options.pop("outlier_guard", False)
    t0 = time.perf_counter()
    stats = moment_stats(X)
    zero_error = "all rows of X are zero (all sketched gradients are zero): there is nothing to select on"
    if stats.lam[0] <= 0 and method != "uniform":
        raise InputError(zero_error)
    # The rows that may be selected: ``pool`` (indices into X) narrows with ``exclude``, then the guard;
    # everything after runs on X[pool] as if it were the pool, and the indices are mapped back at the end.
    pool, pool_diag = np.arange(N), {}
    if exclude is not None:
        mask = np.asarray(exclude)
        if mask.shape != (N,) or mask.dtype != bool:
            raise InputError(f"exclude must be {N} booleans (one per row of X), got dtype {mask.dtype} and shape {mask.shape}")
        pool = np.flatnonzero(~mask)
        if pool.size < n:
            raise InputError(f"budget n={n} is larger than the {pool.size} rows left after excluding {N - pool.size} of {N}")
        pool_diag["rows_excluded"] = int(N - pool.size)
    sub = X if pool.size == N else X[pool]
    if pool.size < N and method != "uniform" and not np.any(sub):
        raise InputError(zero_error)
    if guard:
        from skmm_pipeline.core.outliers import outlier_guard

        if guard is not True and not isinstance(guard, dict):
            raise InputError(f"outlier_guard must be a bool or a dict of options (threshold, ridge, iterations), got {guard!r}")
        guard_opts = {} if guard is True else guard
        keep = np.ones(pool.size, dtype=bool)
        if balanced and labels is not None:
            # Inside each class, where a corrupted image carrying a wrong label stands out; every class
            # keeps at least its budget, and the budgets are those of the pool before the guard.
            work_labels = labels[pool]
            given_budgets = class_budgets(work_labels, n, given_budgets)
            cutoffs = {}
            for c, b in given_budgets.items():
                rows = np.flatnonzero(work_labels == c)
                res_c = outlier_guard(sub[rows], b, **guard_opts)
                keep[rows] = res_c.keep
                cutoffs[str(c)] = res_c.cutoff
            pool_diag.update({"outliers_excluded": int((~keep).sum()), "outlier_cutoff": cutoffs})
        else:
            result = outlier_guard(sub, n, **guard_opts)
            keep = result.keep
            pool_diag.update(result.diagnostics())
        if not keep.all():
            pool, sub = pool[keep], sub[keep]
    sub_labels = None if labels is None else labels[pool]
    sub_stats = stats if pool.size == N else moment_stats(sub)
    if balanced:
        if labels is None:
            raise InputError("class_balanced selection needs labels")
        idx, diag = _select_balanced(method, sub, n, seed, sub_labels, given_budgets, options)
        weights = None
    else:
        idx, diag, weights = _run(method, sub, n, seed, sub_labels, sub_stats, options)
    if pool.size != N:
        idx = pool[idx]
        if weights is not None:
            full = np.zeros(N)
            full[pool] = weights
            weights = full
    diag.update(pool_diag)
    if idx.shape != (n,) or np.unique(idx).size != n or idx.min() < 0 or idx.max() >= N:
        raise RuntimeError(f"selector {method!r} returned {idx.size} indices ({np.unique(idx).size} unique), expected {n}")
    seconds = time.perf_counter() - t0
    diag = {
        **diag,
        "select_seconds": seconds,
        "moment_ratio": moment_matching.moment_ratio(X, idx, stats=stats) if stats.lam[0] > 0 else float("nan"),
        "zero_rows": stats.zero_rows,
        "duplicate_rows": duplicate_rows(X),
    }
    return Selection(method=method, indices=idx, diagnostics=diag, weights=weights)
