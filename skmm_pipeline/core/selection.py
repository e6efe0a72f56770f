"""One selection API for SkMM and every baseline: ``select(method, X, n, seed=..., labels=...)``.

``X`` is an N x d array (sketched gradients, gradients or features); the result carries the chosen
row indices (exactly ``n`` unique, in selection order) and per-method diagnostics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from skmm_pipeline.core import moment_matching
from skmm_pipeline.core.validation import InputError, as_finite_matrix, check_budget


@dataclass(frozen=True)
class Selection:
    method: str
    indices: np.ndarray
    diagnostics: dict = field(default_factory=dict)


Selector = Callable[..., tuple[np.ndarray, dict]]
SELECTORS: dict[str, Selector] = {}


def register(name: str) -> Callable[[Selector], Selector]:
    def deco(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn

    return deco


@register("uniform")
def _uniform(X: np.ndarray, n: int, *, seed: int, labels=None) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    return rng.choice(X.shape[0], size=n, replace=False), {}


@register("skmm")
def _skmm(
    X: np.ndarray, n: int, *, seed: int, labels=None, ridge: float | None = None, design_dim: int | str | None = None
) -> tuple[np.ndarray, dict]:
    # Current default: A-optimal (trace) design in the sketch; deterministic given the sketch,
    # whose seed is the source of randomness.
    if design_dim is not None:
        k = moment_matching.auto_design_dim(n, X.shape[1]) if design_dim == "auto" else int(design_dim)
        X = moment_matching.principal_coordinates(X, k)
    idx, diag = moment_matching.greedy_trace_design(X, n, ridge=ridge)
    return idx, {**diag, "design_dim": X.shape[1]}


def select(method: str, X, n: int, *, seed: int = 0, labels=None, **options) -> Selection:
    """Select ``n`` of the ``N`` rows of ``X`` with the registered ``method``."""
    if method not in SELECTORS:
        raise InputError(f"unknown selection method {method!r}; available: {sorted(SELECTORS)}")
    X = as_finite_matrix(X, "X")
    n = check_budget(n, X.shape[0])
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (X.shape[0],):
            raise InputError(f"labels must have shape ({X.shape[0]},), got {labels.shape}")
    t0 = time.perf_counter()
    idx, diag = SELECTORS[method](X, n, seed=seed, labels=labels, **options)
    idx = np.asarray(idx, dtype=np.int64)
    if idx.shape != (n,) or np.unique(idx).size != n:
        raise RuntimeError(f"selector {method!r} returned {idx.size} indices ({np.unique(idx).size} unique), expected {n}")
    diag = {**diag, "select_seconds": time.perf_counter() - t0, "moment_ratio": moment_matching.moment_ratio(X, idx)}
    return Selection(method=method, indices=idx, diagnostics=diag)
