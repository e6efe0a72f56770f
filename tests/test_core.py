"""Core math against slow, obviously-correct oracles on small inputs."""

import itertools

import numpy as np
import pytest
import torch

from skmm_pipeline.core.gradients import gradient_dim, head_gradient_rows
from skmm_pipeline.core.moment_matching import greedy_trace_design, moment_ratio
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch import GaussianSketch, derive_seed, make_sketch
from skmm_pipeline.core.validation import InputError


def test_gaussian_sketch_equals_naive_product_and_has_jl_scale():
    rng = np.random.default_rng(0)
    G = torch.as_tensor(rng.normal(size=(7, 300)), dtype=torch.float32)
    sk = GaussianSketch(300, 16, seed=3, name="head", block_rows=64)
    gamma = sk.dense()
    assert gamma.shape == (300, 16)
    torch.testing.assert_close(sk.apply(G), G @ gamma, rtol=1e-5, atol=1e-5)
    # Entries ~ N(0, 1/m): E||x Gamma||^2 = ||x||^2.
    big = GaussianSketch(2000, 400, seed=1).dense()
    assert abs(big.var().item() * 400 - 1.0) < 0.02


def test_sketch_is_a_function_of_its_identity_only():
    a = GaussianSketch(300, 16, seed=3, name="head", block_rows=64, cache_bytes=0)
    b = GaussianSketch(300, 16, seed=3, name="head", block_rows=64)
    assert torch.equal(a.dense(), b.dense())
    assert not torch.equal(a.dense(), GaussianSketch(300, 16, seed=4, name="head", block_rows=64).dense())
    assert not torch.equal(a.dense(), GaussianSketch(300, 16, seed=3, name="body", block_rows=64).dense())
    # Any split of the data into batches gives the same rows.
    G = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    whole = a.apply(G)
    parts = torch.cat([a.apply(G[i : i + 7]) for i in range(0, 50, 7)])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
    assert derive_seed(0, "x") == derive_seed(0, "x") != derive_seed(0, "y")


def test_sketch_rejects_bad_input():
    with pytest.raises(InputError, match="sketch_dim"):
        make_sketch("gaussian", 10, 0)
    with pytest.raises(InputError, match="unknown sketch kind"):
        make_sketch("nope", 10, 4)
    sk = make_sketch("gaussian", 10, 4)
    with pytest.raises(InputError, match="rows of length 10"):
        sk.apply(torch.zeros(3, 11))
    with pytest.raises(InputError, match="non-finite"):
        sk.apply(torch.tensor([[float("nan")] * 10]))


def test_true_label_head_gradient_rows_equal_autograd_per_sample_gradients():
    torch.manual_seed(0)
    B, d, K = 6, 5, 4
    head = torch.nn.Linear(d, K)
    feats = torch.randn(B, d)
    labels = torch.randint(0, K, (B,))
    rows = head_gradient_rows(feats, head(feats).detach(), "true", labels)
    assert rows.shape == (B, gradient_dim(d, K, "true"))
    for i in range(B):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(feats[i : i + 1]), labels[i : i + 1]).backward()
        # Row layout is (class, [features, bias]).
        oracle = torch.cat([head.weight.grad, head.bias.grad[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(rows[i], oracle, rtol=1e-5, atol=1e-6)


def test_expected_mode_rows_are_jacobian_features_and_are_label_free():
    feats = torch.randn(3, 5)
    rows = head_gradient_rows(feats, torch.randn(3, 4), "expected")
    torch.testing.assert_close(rows, torch.cat([feats, torch.ones(3, 1)], dim=1))
    with pytest.raises(InputError, match="needs labels"):
        head_gradient_rows(feats, torch.randn(3, 4), "true")
    with pytest.raises(InputError, match="non-finite"):
        head_gradient_rows(torch.full((3, 5), float("inf")), torch.randn(3, 4))
    with pytest.raises(InputError, match="label_mode"):
        head_gradient_rows(feats, torch.randn(3, 4), "random")


def _brute_force_greedy(G, n):
    N, m = G.shape
    sigma = G.T @ G / N
    a = np.trace(sigma) / m
    chosen = []
    for _ in range(n):
        best = min(
            (np.trace(sigma @ np.linalg.inv(a * np.eye(m) + G[chosen + [i]].T @ G[chosen + [i]])), i)
            for i in range(N)
            if i not in chosen
        )
        chosen.append(best[1])
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_trace_design_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(40, 6)) * rng.uniform(0.1, 5, size=6)
    idx, diag = greedy_trace_design(G, 9)
    assert idx.tolist() == _brute_force_greedy(G, 9)
    chosen = idx.tolist()
    sigma = G.T @ G / 40
    exact = np.trace(sigma @ np.linalg.inv(diag["ridge"] * np.eye(6) + G[chosen].T @ G[chosen]))
    assert diag["objective_trace"] == pytest.approx(exact, rel=1e-9)


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


def test_select_is_deterministic_and_validates_input():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    for method in ("skmm", "uniform"):
        a, b = select(method, X, 5, seed=1), select(method, X, 5, seed=1)
        assert np.array_equal(a.indices, b.indices)
        assert len(set(a.indices.tolist())) == 5
        assert "moment_ratio" in a.diagnostics
    assert not np.array_equal(select("uniform", X, 5, seed=1).indices, select("uniform", X, 5, seed=2).indices)
    bad = X.copy()
    bad[3, 1] = np.nan
    cases = [
        (dict(X=X, n=0), "must be positive"),
        (dict(X=X, n=-2), "must be positive"),
        (dict(X=X, n=31), "larger than the pool"),
        (dict(X=X, n=2.5), "must be an integer"),
        (dict(X=bad, n=3), "row 3"),
        (dict(X=X[:, :0], n=3), "at least one row and one column"),
        (dict(X=X[0], n=1), "2-D"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(InputError, match=msg):
            select("skmm", **kwargs)
    with pytest.raises(InputError, match="unknown selection method"):
        select("best", X, 3)
    with pytest.raises(InputError, match="labels must have shape"):
        select("uniform", X, 3, labels=np.zeros(4))
    with pytest.raises(ValueError, match="all sketched gradients are zero"):
        select("skmm", np.zeros((5, 3)), 2)
