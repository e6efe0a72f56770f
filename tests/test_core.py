"""Selection behaviour seen from the public API (the solvers' oracle tests live in test_moment_matching)."""

import numpy as np

from skmm_pipeline.core.moment_matching import moment_ratio
from skmm_pipeline.core.selection import select


def test_greedy_design_spreads_the_budget_over_clusters():
    # Tight clusters on orthogonal axes: the design takes one point per cluster before any second
    # point, where a uniform draw of the same size usually misses a cluster.
    rng = np.random.default_rng(0)
    sizes = [400, 300, 200, 100, 50]
    G = np.concatenate([np.eye(5)[k] * 3 + 0.01 * rng.normal(size=(s, 5)) for k, s in enumerate(sizes)])
    cluster = np.repeat(np.arange(5), sizes)
    idx = select("skmm", G, 5).indices
    assert sorted(cluster[idx].tolist()) == [0, 1, 2, 3, 4]
    assert moment_ratio(G, idx) > 0.1
    assert moment_ratio(G, np.arange(400)) < 1e-3  # one cluster only: the other directions are missed


def test_select_is_deterministic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    for method in ("skmm", "uniform"):
        a, b = select(method, X, 5, seed=1), select(method, X, 5, seed=1)
        assert np.array_equal(a.indices, b.indices)
        assert len(set(a.indices.tolist())) == 5
        assert "moment_ratio" in a.diagnostics
    assert not np.array_equal(select("uniform", X, 5, seed=1).indices, select("uniform", X, 5, seed=2).indices)

