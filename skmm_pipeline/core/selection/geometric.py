"""The geometric baselines (:mod:`skmm_pipeline.core.baselines`) as selectors."""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core import baselines
from skmm_pipeline.core.selection.registry import Family, SelectorResult

GEOMETRIC = Family("geometric")


@GEOMETRIC.method("uniform", "uniform random sample without replacement")
def _uniform(X, n, *, seed, labels=None, stats=None):
    return SelectorResult(*baselines.uniform(X, n, np.random.default_rng(seed)))


@GEOMETRIC.method("leverage", "leverage-score pi-ps sampling")
def _leverage(X, n, *, seed, labels=None, stats):
    return SelectorResult(*baselines.leverage(X, n, np.random.default_rng(seed), stats))


@GEOMETRIC.method("ridge-leverage", "rank-k ridge leverage-score pi-ps sampling")
def _ridge_leverage(X, n, *, seed, labels=None, stats, ridge=None, rank=None):
    return SelectorResult(*baselines.ridge_leverage(X, n, np.random.default_rng(seed), stats, ridge=ridge, rank=rank))


@GEOMETRIC.method("adaptive", "adaptive sampling = randomly pivoted Cholesky on the linear kernel")
def _adaptive(X, n, *, seed, labels=None, stats=None):
    return SelectorResult(*baselines.adaptive(X, n, np.random.default_rng(seed)))


@GEOMETRIC.method("herding", "kernel herding (greedy mean matching, linear kernel)")
def _herding(X, n, *, seed, labels=None, stats=None):
    return SelectorResult(*baselines.herding(X, n))


@GEOMETRIC.method("k-center", "greedy k-center (farthest-first traversal)")
def _k_center(X, n, *, seed, labels=None, stats=None):
    return SelectorResult(*baselines.k_center(X, n, np.random.default_rng(seed)))
