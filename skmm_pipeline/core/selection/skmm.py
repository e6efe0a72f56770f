"""The SkMM selectors: ``skmm`` (the default), ``skmmv2``, ``skmm-relaxation`` and ``skmm-v1-reference``."""

from __future__ import annotations

from skmm_pipeline.core import moment_matching
from skmm_pipeline.core.rounding import ROUNDINGS, round_to_subset
from skmm_pipeline.core.selection.registry import Family, SelectorResult
from skmm_pipeline.core.validation import InputError, check_float

SKMM = Family("skmm")

# The default SkMM configuration, chosen by benchmarks/gmm.py and benchmarks/digits_transfer.py.
SKMM_DEFAULTS: dict = dict(design_dim="auto", ridge="auto", start="auto", exchange=True)


@SKMM.method("skmm", "SkMM (default): A-optimal design in the sketch on the final integer subset")
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
    reference=None,
):
    """``reference``: rows sketched like the pool (e.g. the validation split) whose second moment the
    design matches instead of the pool's (:func:`moment_matching.target_stats`)."""
    if reference is not None:
        stats = moment_matching.target_stats(stats, reference)
    res = moment_matching.trace_design(
        X, n, stats=stats, seed=seed, design_dim=design_dim, ridge=ridge, start=start, exchange=exchange, candidates=candidates
    )
    return SelectorResult(res.indices, _with_objective(res.diagnostics, n))


def _with_objective(diag: dict, n: int) -> dict:
    """Common names: ``objective`` (the solver's own) and ``iterations`` (greedy picks + exchanges)."""
    return {
        "objective": diag["objective_trace"],
        "iterations": n - diag.get("start_pivots", 0) + diag.get("exchanges", 0),
        **diag,
    }


@SKMM.method("skmmv2", "SkMMv2: RPC start, then blocks of trace-decrease picks sampled with a temperature")
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
    diag = {**_with_objective(res.diagnostics, n), "block": b, "temperature": float(temperature)}
    return SelectorResult(res.indices, diag)


@SKMM.method("skmm-relaxation", "SkMM capped-simplex moment matching + rounding that keeps the inclusion probabilities")
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
    c_S = check_float(c_S, "c_S", positive=True)
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
    return SelectorResult(idx, diag, s)


@SKMM.method("skmm-v1-reference", "The research code's v1 loop (Adam + clamp/renormalise, weighted sampling); comparison only")
def _skmm_v1(X, n, *, seed, labels=None, stats, c_S=0.999, steps=10_000, lr=1e-5):
    c_S = check_float(c_S, "c_S", positive=True)
    idx, w, diag = moment_matching.v1_reference(X, n, seed=seed, c_S=c_S, steps=steps, lr=lr, stats=stats)
    diag = {"objective": diag["relaxed_objective"], **diag, "subset_objective": moment_matching.subset_objective(X, idx, c_S, stats)}
    return SelectorResult(idx, diag, w)
