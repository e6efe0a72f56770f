"""The selection API: ``select(method, X, n, seed=..., labels=..., **options)`` and its input checks.

See the package docstring for the input handling (budgets, zero and duplicated rows, class balance,
``exclude`` and the outlier guard); the methods live in the registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from skmm_pipeline.core import moment_matching
from skmm_pipeline.core.budgets import class_budgets
from skmm_pipeline.core.moment_matching import MomentStats, moment_stats
from skmm_pipeline.core.outliers import outlier_guard
from skmm_pipeline.core.selection.registry import (
    SELECTORS,
    SelectorResult,
    method_options,
)
from skmm_pipeline.core.validation import InputError, check_budget, check_int


@dataclass(frozen=True)
class Selection:
    method: str
    indices: np.ndarray
    diagnostics: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # relaxed capped-simplex weights s (inclusion probabilities n*s)


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


def _run(method: str, X: np.ndarray, n: int, seed: int, labels, stats: MomentStats, options: dict) -> SelectorResult:
    fn = SELECTORS[method]
    allowed = method_options(method)
    unknown = set(options) - set(allowed)
    if unknown:
        raise InputError(f"method {method!r} does not take option(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    out = fn(X, n, seed=seed, labels=labels, stats=stats, **options)
    if not isinstance(out, SelectorResult):  # a method registered elsewhere may return (indices, diagnostics[, weights])
        out = SelectorResult(out[0], out[1], out[2] if len(out) > 2 else None)
    return SelectorResult(np.asarray(out.indices, dtype=np.int64), dict(out.diagnostics), out.weights)


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
            res_c = _run(method, Xc, b, sub_seed, labels[rows], stats_c, options)
            idx_c, diag_c = res_c.indices, res_c.diagnostics
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
    seed = check_int(seed, "seed", minimum=0)
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
        res = _run(method, sub, n, seed, sub_labels, sub_stats, options)
        idx, diag, weights = res.indices, res.diagnostics, res.weights
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
