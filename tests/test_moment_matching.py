"""SkMM solvers against slow, obviously-correct oracles on small inputs."""

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize

from skmm_pipeline.core import moment_matching as mm
from skmm_pipeline.core.validation import InputError


def _qp_oracle(fun, jac, N, cap, x0=None):
    """Brute-force QP over the capped simplex with SLSQP (slow, generic)."""
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}]
    x0 = np.full(N, 1.0 / N) if x0 is None else x0
    res = minimize(fun, x0, jac=jac, bounds=[(0, cap)] * N, constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 2000})
    return res.x


@pytest.mark.parametrize("seed", range(8))
def test_capped_simplex_projection_matches_brute_force_qp(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(3, 12))
    n = int(rng.integers(1, N + 1))
    cap = 1.0 / n
    v = rng.normal(scale=rng.choice([0.01, 1, 10]), size=N)
    if seed % 3 == 0:
        v[: N // 2] = v[0]  # ties
    x = mm.project_capped_simplex(v, cap)
    assert x.min() >= 0 and x.max() <= cap + 1e-15 and abs(x.sum() - 1) < 1e-12
    oracle = _qp_oracle(lambda z: 0.5 * np.sum((z - v) ** 2), lambda z: z - v, N, cap)
    np.testing.assert_allclose(x, oracle, atol=1e-6)
    # A projection is idempotent and never further from v than any feasible point.
    np.testing.assert_allclose(mm.project_capped_simplex(x, cap), x, atol=1e-12)
    y = mm.project_capped_simplex(rng.normal(size=N), cap)
    assert np.sum((x - v) ** 2) <= np.sum((y - v) ** 2) + 1e-12


def test_projection_edge_cases():
    np.testing.assert_allclose(mm.project_capped_simplex([5.0, -3.0, 0.2], 1 / 3), [1 / 3] * 3)  # N cap = 1
    np.testing.assert_allclose(mm.project_capped_simplex([0.0, 0.0, 0.0, 0.0], 0.5), [0.25] * 4)
    np.testing.assert_allclose(mm.project_capped_simplex([1e6, 0.0, 0.0], 1.0), [1.0, 0.0, 0.0])
    with pytest.raises(InputError, match="empty"):
        mm.project_capped_simplex([0.0, 0.0], 0.4)


def _problem(seed, N=14, m=3, c_S=1.0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(N, m)) * rng.uniform(0.3, 3, size=m)
    stats = mm.moment_stats(G)
    return G, stats, mm.MatchingProblem.build(G, c_S, stats)


@pytest.mark.parametrize("seed,n,c_S", [(0, 3, 1.0), (1, 5, 0.9), (2, 2, 1.0), (3, 4, 1.2)])
def test_fista_reaches_the_qp_optimum_and_decreases_the_objective(seed, n, c_S):
    G, stats, prob = _problem(seed, c_S=c_S)
    N = G.shape[0]
    res = mm.fista(prob, n, tol=1e-12, max_iter=20000, record=True)
    hist = np.array(res.history)
    assert np.all(np.diff(hist) <= 1e-12 * max(hist[0], 1e-300))  # monotone (restart guards it)
    s = res.s
    assert s.min() >= 0 and s.max() <= 1 / n + 1e-12 and abs(s.sum() - 1) < 1e-10
    best = min(
        prob.objective(_qp_oracle(prob.objective, lambda z: prob.value_and_grad(z)[1], N, 1 / n, x0=x0))
        for x0 in (None, mm.project_capped_simplex(np.random.default_rng(seed).random(N), 1 / n))
    )
    assert res.objective <= best + 1e-7 * max(1.0, best)


@pytest.mark.parametrize("seed,n", [(0, 3), (4, 6), (5, 2)])
def test_fista_solution_satisfies_kkt(seed, n):
    G, stats, prob = _problem(seed, N=12, c_S=0.3)  # targets 3.3 lambda: infeasible, f* > 0
    res = mm.fista(prob, n, tol=1e-13, max_iter=50000)
    assert res.objective > 0
    _, g = prob.value_and_grad(res.s)
    cap = 1 / n
    s = res.s
    eps = 1e-9
    free = (s > eps) & (s < cap - eps)
    # KKT for min f over {0 <= s <= cap, sum s = 1}: there is a tau with g_i = tau where 0 < s_i < cap,
    # g_i >= tau where s_i = 0 and g_i <= tau where s_i = cap.
    scale = np.abs(g).max()
    lo = g[s >= cap - eps].max(initial=-np.inf)
    hi = g[s <= eps].min(initial=np.inf)
    assert lo <= hi + 1e-6 * scale
    if free.any():
        tau = np.median(g[free])
        assert np.all(np.abs(g[free] - tau) <= 1e-6 * scale)
        assert lo - 1e-6 * scale <= tau <= hi + 1e-6 * scale


@pytest.mark.parametrize("seed,n", [(0, 3), (1, 4), (2, 5)])
def test_lp_is_optimal_by_a_duality_certificate_and_is_a_vertex(seed, n):
    G, stats, prob = _problem(seed, N=16, m=3, c_S=1.0)
    res, info = mm.solve_lp(prob, n)
    t, y = info["lp_t"], info["lp_dual"]
    # Primal feasibility: every constraint holds at the returned s.
    assert np.all(prob.A.T @ res.s >= t * prob.b - 1e-9)
    # Dual certificate: for any y >= 0 with y.b = 1, t <= max over the capped simplex of s^T (A y),
    # which is the mean of the n largest entries of A y; the optimal dual attains it.
    assert np.all(y >= -1e-12)
    y = y / (y @ prob.b)
    upper = np.sort(prob.A @ y)[-n:].mean()
    assert t == pytest.approx(upper, rel=1e-7)
    # Brute force over subsets (the integer points) never beats the relaxation.
    best_int = max(
        np.min(prob.A[list(S)].mean(axis=0) / prob.b) for S in itertools.combinations(range(16), n)
    )
    assert best_int <= t + 1e-9
    # A vertex: at most (#moment constraints + 1) coordinates strictly between the bounds.
    frac = np.count_nonzero((res.s > 1e-9) & (res.s < 1 / n - 1e-9))
    assert frac <= prob.b.size + 1


def test_loewner_cuts_reduce_the_violation():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4))
    stats = mm.moment_stats(G)
    n = 10
    # Diagonal matching along the eigenvectors is reached (f = 0) but leaves the Loewner order
    # violated off the eigenvectors; each cut adds the worst direction as a constraint.
    s0, d0 = mm.capped_simplex_matching(G, n, stats=stats, c_S=0.9, cuts=0)
    s1, d1 = mm.capped_simplex_matching(G, n, stats=stats, c_S=0.9, cuts=5)

    def worst(s):
        D = G.T @ (s[:, None] * G) - stats.sigma / 0.9
        return np.linalg.eigvalsh(D)[0]

    assert d0["relaxed_objective"] < 1e-10 and worst(s0) < -1e-3
    assert d1["cuts"] >= 1
    assert worst(s1) > 0.05 * worst(s0)
    cut = mm.loewner_cut(G, np.full(60, 1 / 60), stats, 1.0)
    assert cut is None  # the full data trivially matches itself


def test_capped_simplex_matching_rejects_bad_c_S_and_solver():
    G = np.random.default_rng(0).normal(size=(10, 2))
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(InputError, match="c_S"):
            mm.capped_simplex_matching(G, 3, c_S=bad)
    with pytest.raises(InputError, match="solver"):
        mm.capped_simplex_matching(G, 3, solver="adam")


def _brute_force_greedy(G, n, a):
    N, m = G.shape
    sigma = G.T @ G / N
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
    res = mm.trace_design(G, 9, design_dim="full", exchange=False, ridge="x1")
    a = res.diagnostics["ridge"]
    assert a == pytest.approx(np.trace(G.T @ G / 40) / 6)
    assert res.indices.tolist() == _brute_force_greedy(G, 9, a)
    sigma = G.T @ G / 40
    chosen = res.indices.tolist()
    exact = np.trace(sigma @ np.linalg.inv(a * np.eye(6) + G[chosen].T @ G[chosen]))
    assert res.diagnostics["objective_trace"] == pytest.approx(exact, rel=1e-9)


def test_fedorov_exchange_reaches_a_swap_local_optimum():
    rng = np.random.default_rng(4)
    G = rng.normal(size=(25, 4)) * rng.uniform(0.2, 3, size=4)
    stats = mm.moment_stats(G)
    Z = mm.principal_coordinates(G, 4, stats)
    lam = stats.lam
    a = 0.3
    start = np.arange(6)
    S, swaps = mm.fedorov_exchange(Z, lam, start, a, max_exchanges=1000)
    obj = mm.trace_objective(Z, lam, S, a)
    assert obj <= mm.trace_objective(Z, lam, start, a) and swaps > 0
    assert np.unique(S).size == 6
    for pos in range(6):  # no single swap improves any more (brute force)
        for j in set(range(25)) - set(S.tolist()):
            T = S.copy()
            T[pos] = j
            assert mm.trace_objective(Z, lam, T, a) >= obj * (1 - 1e-8)


def _clusters(seed, sizes, dim=None, spread=0.01, scale=3.0):
    rng = np.random.default_rng(seed)
    dim = dim or len(sizes)
    G = np.concatenate([np.eye(dim)[k] * scale + spread * rng.normal(size=(s, dim)) for k, s in enumerate(sizes)])
    return G, np.repeat(np.arange(len(sizes)), sizes)


def test_rpc_pivots_are_distinct_and_cover_orthogonal_clusters():
    G, cluster = _clusters(0, [400, 300, 200, 100, 50])
    piv = mm.rpc_pivots(G, 5, np.random.default_rng(0))
    assert np.unique(piv).size == 5
    assert sorted(cluster[piv].tolist()) == [0, 1, 2, 3, 4]
    stats = mm.moment_stats(G)
    bpiv = mm.block_rpc_pivots(G, stats.V, 5, np.random.default_rng(0), block=8)
    assert np.unique(bpiv).size == bpiv.size and sorted(set(cluster[bpiv].tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("design_dim", ["full", 6])
def test_pooled_greedy_is_close_to_exact_greedy(design_dim):
    G, cluster = _clusters(1, [3000, 1500, 800, 60, 20, 5], dim=8, spread=0.01)
    stats = mm.moment_stats(G)
    exact = mm.trace_design(G, 40, stats=stats, design_dim=design_dim, candidates="all", exchange=False)
    pooled = mm.trace_design(G, 40, stats=stats, design_dim=design_dim, candidates=30, seed=1, start="rpc")
    assert pooled.diagnostics["solver"] == "pooled-greedy-trace"
    assert pooled.diagnostics["objective_trace"] <= 1.25 * exact.diagnostics["objective_trace"]
    assert np.unique(pooled.indices).size == 40
    assert set(cluster[pooled.indices].tolist()) == set(range(6))  # the RPC start finds the 5-point cluster


def test_intrinsic_dimension_counts_directions_above_the_noise_floor():
    lam = np.concatenate([[500, 300, 90, 40, 9, 3, 1.5], 0.1 + 0.02 * np.random.default_rng(0).random(33)])
    assert mm.intrinsic_dimension(lam) == 7
    assert mm.intrinsic_dimension(np.zeros(5)) == 0
    # No noise floor (a smoothly decaying spectrum, or a sketch no larger than the signal): the rank.
    assert mm.intrinsic_dimension(0.5 ** np.arange(30)) == 30
    assert mm.intrinsic_dimension([3.4, 2.6, 1.7, 0.86, 0.43, 0.0]) == 5
    assert mm.intrinsic_dimension(np.ones(20)) == 20


def test_v1_reference_runs_and_returns_simplex_weights():
    G, cluster = _clusters(2, [30, 20, 10])
    idx, w, diag = mm.v1_reference(G, 6, seed=0, steps=50)
    assert idx.size == 6 and np.unique(idx).size == 6
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9 and w.max() <= 1 / 6 + 1e-9
    assert diag["steps"] == 50 and diag["relaxed_objective"] >= 0


def test_moment_ratio_flags_missed_directions():
    G, cluster = _clusters(0, [400, 300, 200, 100, 50])
    assert mm.moment_ratio(G, np.arange(400)) < 1e-3
    assert mm.moment_ratio(G, np.arange(G.shape[0])) == pytest.approx(1.0)


def test_ridge_forms():
    G = np.random.default_rng(0).normal(size=(50, 4)) * [2, 1, 1, 0.5]
    stats = mm.moment_stats(G)
    unit = np.trace(stats.sigma) / 4
    assert mm.resolve_ridge("x0.5", stats, 10) == pytest.approx(0.5 * unit)
    assert mm.resolve_ridge("n3", stats, 30) == pytest.approx(0.1 * unit)
    assert mm.resolve_ridge("n3", stats, 2) == pytest.approx(unit)  # capped at one unit
    assert mm.resolve_ridge("auto", stats, 30) == mm.resolve_ridge(mm.AUTO_RIDGE, stats, 30)
    assert mm.resolve_ridge(0.25, stats, 30) == 0.25
    for bad in (0, -1, "x-1", "abc", float("inf")):
        with pytest.raises(InputError, match="ridge"):
            mm.resolve_ridge(bad, stats, 30)


def test_design_dimension_follows_the_noise_floor_and_the_budget():
    rng = np.random.default_rng(0)
    # 10 signal directions of very different strength plus 30 noise directions.
    G = np.concatenate([rng.normal(size=(2000, 10)) * np.logspace(1, -0.5, 10), 0.05 * rng.normal(size=(2000, 30))], axis=1)
    stats = mm.moment_stats(G)
    assert mm.intrinsic_dimension(stats.lam) == 10
    assert mm.design_dimension(48, stats, "auto") == 12  # just above the intrinsic dimension
    assert mm.design_dimension(300, stats, "auto") == 30  # grows with the budget
    assert mm.design_dimension(3000, stats, "auto") == 40  # up to the whole sketch
    assert mm.design_dimension(48, stats, "full") == 40 and mm.design_dimension(48, stats, 7) == 7
    with pytest.raises(InputError, match="design_dim"):
        mm.design_dimension(48, stats, "most")


def test_auto_start_uses_rpc_only_for_the_sampled_greedy():
    G, cluster = _clusters(3, [500, 300, 40, 5], dim=6, spread=0.01)
    stats = mm.moment_stats(G)
    exact = mm.trace_design(G, 12, stats=stats, start="auto")
    sampled = mm.trace_design(G, 12, stats=stats, start="auto", candidates=20, seed=2)
    assert exact.diagnostics["start_pivots"] == 0 and exact.diagnostics["solver"] == "greedy-trace"
    assert sampled.diagnostics["start_pivots"] > 0 and sampled.diagnostics["solver"] == "pooled-greedy-trace"
    assert "exchange_skipped" not in exact.diagnostics
    for res in (exact, sampled):
        assert set(cluster[res.indices].tolist()) == {0, 1, 2, 3}
    with pytest.raises(InputError, match="start"):
        mm.trace_design(G, 5, stats=stats, start="kmeans")
