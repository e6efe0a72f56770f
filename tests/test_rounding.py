"""Rounding relaxed weights to n indices: exact size, uniqueness, realised inclusion probabilities."""

import numpy as np
import pytest

from skmm_pipeline.core.rounding import (
    inclusion_probabilities,
    pipage_round,
    proportional_inclusion,
    round_to_subset,
    systematic_sample,
)
from skmm_pipeline.core.validation import InputError

SCHEMES = {"systematic": systematic_sample, "pipage": pipage_round}


def _pi_example():
    # Certain units, impossible units and a diffuse middle; sums to 7.
    rng = np.random.default_rng(3)
    pi = np.concatenate([[1.0, 1.0], np.zeros(3), rng.uniform(0.05, 0.95, 12)])
    frac = pi[5:]
    pi[5:] = frac * (5.0 / frac.sum())
    assert pi.max() <= 1 and abs(pi.sum() - 7) < 1e-12
    return pi


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_exactly_n_unique_indices_and_certain_units(scheme):
    pi = _pi_example()
    for seed in range(200):
        idx = SCHEMES[scheme](pi, np.random.default_rng(seed))
        assert idx.size == 7 and np.unique(idx).size == 7
        assert {0, 1} <= set(idx.tolist())
        assert not {2, 3, 4} & set(idx.tolist())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_inclusion_frequencies_match_pi(scheme):
    pi = _pi_example()
    R = 6000
    counts = np.zeros(pi.size)
    rng = np.random.default_rng(11)
    for _ in range(R):
        counts[SCHEMES[scheme](pi, rng)] += 1
    freq = counts / R
    tol = 4.5 * np.sqrt(pi * (1 - pi) / R) + 1e-9
    assert np.all(np.abs(freq - pi) <= tol), np.abs(freq - pi) / np.maximum(tol, 1e-12)


def test_pipage_indicators_are_negatively_correlated():
    pi = np.array([0.5, 0.5, 0.5, 0.5, 0.4, 0.6])
    R = 8000
    rng = np.random.default_rng(0)
    X = np.zeros((R, pi.size))
    for r in range(R):
        X[r, pipage_round(pi, rng)] = 1
    joint = X.T @ X / R
    off = ~np.eye(pi.size, dtype=bool)
    assert np.all(joint[off] <= np.outer(pi, pi)[off] + 0.02)


@pytest.mark.parametrize("scheme", ["systematic", "pipage"])
def test_rounding_keeps_the_matched_moment_in_expectation(scheme):
    rng = np.random.default_rng(0)
    G = rng.normal(size=(30, 3))
    n = 6
    s = rng.dirichlet(np.ones(30))
    s = np.minimum(s, 1 / n)
    s /= s.sum()
    s = np.minimum(s, 1 / n)  # still <= 1/n after one renormalisation on this draw
    s /= s.sum()
    assert s.max() <= 1 / n + 1e-12
    target = G.T @ (s[:, None] * G)
    acc = np.zeros((3, 3))
    R = 4000
    for r in range(R):
        idx = round_to_subset(s, n, method=scheme, seed=r)
        acc += G[idx].T @ G[idx] / n
    np.testing.assert_allclose(acc / R, target, atol=0.06 * np.abs(target).max())


@pytest.mark.parametrize("scheme", ["systematic", "pipage"])
def test_rounding_is_deterministic_for_a_seed(scheme):
    s = np.full(40, 1 / 40)
    a = round_to_subset(s, 10, method=scheme, seed=5)
    b = round_to_subset(s, 10, method=scheme, seed=5)
    c = round_to_subset(s, 10, method=scheme, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(np.sort(a), np.sort(c))


def test_vertex_solutions_round_to_themselves():
    s = np.zeros(20)
    s[[1, 4, 7, 9]] = 0.25
    for scheme in ("systematic", "pipage"):
        assert sorted(round_to_subset(s, 4, method=scheme, seed=0).tolist()) == [1, 4, 7, 9]


def test_inclusion_probabilities_reject_points_outside_the_capped_simplex():
    with pytest.raises(InputError, match="capped simplex"):
        inclusion_probabilities(np.array([0.6, 0.4, 0.0]), 2)  # 2 * 0.6 > 1
    with pytest.raises(InputError, match="capped simplex"):
        inclusion_probabilities(np.array([0.3, 0.3, 0.3]), 2)  # sums to 0.9
    with pytest.raises(InputError, match="finite"):
        inclusion_probabilities(np.array([np.nan, 1.0]), 1)
    with pytest.raises(InputError, match="unknown rounding"):
        round_to_subset(np.full(4, 0.25), 2, method="top-n")
    with pytest.raises(InputError, match="sum to a positive integer"):
        systematic_sample(np.array([0.5, 0.7]), np.random.default_rng(0))
    # Tiny floating-point drift is repaired rather than rejected.
    pi = inclusion_probabilities(np.full(3, 1 / 3 + 1e-12), 3)
    assert np.all(pi <= 1) and abs(pi.sum() - 3) < 1e-12


def test_proportional_inclusion_caps_and_sums_to_n():
    scores = np.array([100.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0])
    pi = proportional_inclusion(scores, 3)
    assert abs(pi.sum() - 3) < 1e-12 and pi[0] == 1.0 and pi[5] == 0.0
    # Uncapped units keep the score ratios.
    assert pi[6] == pytest.approx(2 * pi[1])
    # Fewer positive scores than the budget: all positives certain, the rest spread evenly.
    pi = proportional_inclusion(np.array([1.0, 0.0, 0.0, 0.0]), 2)
    np.testing.assert_allclose(pi, [1, 1 / 3, 1 / 3, 1 / 3])
