"""Geometric baselines against brute-force definitions on small inputs."""

import numpy as np
import pytest

from skmm_pipeline.core import baselines
from skmm_pipeline.core.moment_matching import moment_stats


def _data(seed=0, N=60, d=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, d)) * rng.uniform(0.2, 3, size=d)


def test_leverage_scores_match_the_pseudoinverse_formula():
    X = _data()
    X[:, 4] = X[:, 0] - X[:, 1]  # rank-deficient: the pseudoinverse, not the inverse
    h = baselines.leverage_scores(X)
    oracle = np.einsum("ij,jk,ik->i", X, np.linalg.pinv(X.T @ X), X)
    np.testing.assert_allclose(h, oracle, atol=1e-9)
    assert h.sum() == pytest.approx(4.0)  # = rank
    lam = 7.5
    hr = baselines.leverage_scores(X, ridge=lam)
    oracle = np.einsum("ij,jk,ik->i", X, np.linalg.inv(X.T @ X + lam * np.eye(5)), X)
    np.testing.assert_allclose(hr, oracle, atol=1e-9)


def test_ridge_leverage_uses_the_rank_k_regulariser():
    X = _data(1)
    stats = moment_stats(X)
    idx, diag = baselines.ridge_leverage(X, 10, np.random.default_rng(0), stats, rank=2)
    ev = np.sort(np.linalg.eigvalsh(X.T @ X))[::-1]
    assert diag["ridge"] == pytest.approx(ev[2:].sum() / 2)
    assert np.unique(idx).size == 10


def test_leverage_sampling_includes_rows_in_proportion_to_their_scores():
    X = _data(2, N=30, d=3)
    h = baselines.leverage_scores(X)
    n = 6
    R = 3000
    counts = np.zeros(30)
    rng = np.random.default_rng(5)
    for _ in range(R):
        idx, _ = baselines.leverage(X, n, rng)
        assert np.unique(idx).size == n
        counts[idx] += 1
    pi = np.minimum(1, h * n / h.sum())  # no score is large enough to be capped on this draw
    assert pi.max() < 1
    np.testing.assert_allclose(counts / R, pi, atol=4.5 * np.sqrt(0.25 / R))


def test_herding_is_greedy_mean_matching():
    X = _data(3, N=25, d=3)
    idx, _ = baselines.herding(X, 8)
    mu = X.mean(axis=0)
    chosen = []
    for t in range(8):
        best = min(
            (np.sum((mu - X[chosen + [i]].mean(axis=0)) ** 2), i) for i in range(25) if i not in chosen
        )
        chosen.append(best[1])
    assert idx.tolist() == chosen


def test_k_center_is_farthest_first_from_a_seeded_start():
    X = _data(4, N=30, d=2)
    idx, diag = baselines.k_center(X, 7, np.random.default_rng(3))
    D = np.linalg.norm(X[:, None, :] - X[None, :, :], axis=2)
    chosen = [int(idx[0])]
    for _ in range(6):
        mind = D[:, chosen].min(axis=1)
        mind[chosen] = -1
        chosen.append(int(np.argmax(mind)))
    assert idx.tolist() == chosen
    assert diag["covering_radius"] == pytest.approx(D[:, chosen].min(axis=1).max(), rel=1e-9)
    again, _ = baselines.k_center(X, 7, np.random.default_rng(3))
    assert np.array_equal(idx, again)


def test_adaptive_sampling_follows_residuals_and_reports_exhaustion():
    rng = np.random.default_rng(0)
    # Rank 2: after two pivots nothing is left, the rest is uniform and reported as such.
    X = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 6))
    idx, diag = baselines.adaptive(X, 10, np.random.default_rng(1))
    assert np.unique(idx).size == 10 and diag["rank_exhausted_at"] == 2
    # The first pivot is drawn proportionally to the squared row norms.
    Y = np.zeros((4, 2))
    Y[:, 0] = [1.0, 1.0, 1.0, np.sqrt(7.0)]
    first = np.array([baselines.adaptive(Y, 1, np.random.default_rng(s))[0][0] for s in range(4000)])
    assert np.mean(first == 3) == pytest.approx(0.7, abs=0.03)
    # A second pivot never repeats the direction of the first when a new direction exists.
    Z = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [0, 0.1]])
    for s in range(50):
        idx, _ = baselines.adaptive(Z, 2, np.random.default_rng(s))
        assert 3 in idx.tolist()


@pytest.mark.parametrize("name", ["uniform", "leverage", "ridge-leverage", "adaptive", "herding", "k-center"])
def test_baselines_return_n_distinct_indices_and_are_deterministic(name):
    from skmm_pipeline.core.selection import select

    X = _data(5, N=80, d=6).astype(np.float32)
    a = select(name, X, 12, seed=3)
    b = select(name, X, 12, seed=3)
    assert a.indices.shape == (12,) and np.unique(a.indices).size == 12
    assert np.array_equal(a.indices, b.indices)
