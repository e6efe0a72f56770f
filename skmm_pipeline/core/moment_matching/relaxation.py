"""Capped-simplex moment matching (the paper's relaxation): exact projection, FISTA, the LP, Loewner cuts.

``v_j^T G^T diag(s) G v_j = (A^T s)_j`` with ``A = (G V) o (G V)`` is linear in ``s``; see the package
docstring for the objective and the solvers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from skmm_pipeline.core.moment_matching._compute import _chunks, _single_thread_blas
from skmm_pipeline.core.moment_matching.statistics import (
    MomentStats,
    moment_stats,
    principal_coordinates,
)
from skmm_pipeline.core.validation import InputError, check_float


def project_capped_simplex(v, cap: float, total: float = 1.0, tau0: float | None = None) -> np.ndarray:
    """Exact Euclidean projection of ``v`` onto ``{x : 0 <= x_i <= cap, sum x = total}``.

    The solution is ``clip(v - tau, 0, cap)`` where ``h(tau) = sum clip(v - tau, 0, cap)`` meets
    ``total``; ``h`` is piecewise linear and non-increasing. ``tau`` is found by an active-set Newton
    iteration, safeguarded by bisection on a bracket: given the sets of free and capped coordinates,
    ``tau`` has a closed form, and when that ``tau`` reproduces the same sets it is exact. Warm-started
    (``tau0``, e.g. from the previous iteration of a solver) it takes a few O(N) steps; after 64 steps
    it falls back to sorting the 2N breakpoints (O(N log N)). (Clamping and renormalising is not a
    projection and can leave the set.)
    """
    v = np.asarray(v, dtype=np.float64)
    N = v.size
    if cap * N < total * (1 - 1e-12):
        raise InputError(f"capped simplex is empty: N * cap = {N * cap:.6g} < {total}")
    if cap * N <= total * (1 + 1e-12):
        return np.full(N, cap)
    tau = _capped_simplex_tau(v, cap, total, tau0)
    return np.clip(v - tau, 0.0, cap)


def _capped_simplex_tau(v: np.ndarray, cap: float, total: float, tau0: float | None) -> float:
    lo, hi = float(v.min()) - cap, float(v.max())  # h(lo) = N cap >= total >= 0 = h(hi)
    tau = float(tau0) if tau0 is not None and lo < tau0 < hi else (float(v.sum()) - total) / v.size
    tau = min(max(tau, lo), hi)
    for _ in range(64):
        x = v - tau
        capped = x >= cap
        free = (x > 0) & ~capped
        k = int(np.count_nonzero(free))
        n_cap = int(np.count_nonzero(capped))
        h = cap * n_cap + float(x[free].sum())
        if h > total:
            lo = tau
        elif h < total:
            hi = tau
        if k:
            t_new = (float(v[free].sum()) + cap * n_cap - total) / k
            x_new = v - t_new
            capped_new = x_new >= cap
            free_new = (x_new > 0) & ~capped_new
            if np.array_equal(free_new, free) and np.array_equal(capped_new, capped):
                return t_new
        else:
            t_new = math.nan
        tau = t_new if lo < t_new < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    return _capped_simplex_tau_sorted(v, cap, total)


def _capped_simplex_tau_sorted(v: np.ndarray, cap: float, total: float) -> float:
    """The same ``tau`` by sorting the breakpoints ``v_i`` and ``v_i - cap`` (O(N log N))."""
    N = v.size
    bp = np.concatenate([v, v - cap])
    slope_change = np.concatenate([np.ones(N), -np.ones(N)])  # as tau decreases past a breakpoint
    order = np.argsort(-bp, kind="stable")
    bp = bp[order]
    slope = np.cumsum(slope_change[order])  # slope of h on (bp[j+1], bp[j]) for decreasing tau
    h = np.concatenate([[0.0], np.cumsum(slope[:-1] * (bp[:-1] - bp[1:]))])  # h at each breakpoint
    j = int(np.searchsorted(h, total, side="left"))  # first breakpoint with h >= total
    j = min(j, h.size - 1)
    if j == 0:
        return float(bp[0])
    return float(bp[j - 1] - (total - h[j - 1]) / slope[j - 1]) if slope[j - 1] > 0 else float(bp[j])


@dataclass
class MatchingProblem:
    """``f(s) = sum_j w_j relu(b_j - (A^T s)_j)^2`` with ``A = (G V) o (G V)`` and ``b = lambda / c_S``."""

    A: np.ndarray  # N x q (float64)
    b: np.ndarray  # q targets
    lam: np.ndarray  # q eigenvalues (or cut curvatures)
    weights: np.ndarray  # q

    @classmethod
    def build(cls, G, c_S: float, stats: MomentStats, rel_tol: float = 1e-6, scale: str = "absolute") -> "MatchingProblem":
        check_float(c_S, "c_S", positive=True)
        keep = stats.lam > rel_tol * max(stats.lam[0], 0.0)
        if not keep.any():
            raise InputError("all sketched gradients are zero: there is nothing to match")
        lam = stats.lam[keep]
        GV = principal_coordinates(G, int(keep.sum()), stats)  # eigenvalues are sorted: kept = a prefix
        A = GV * GV
        if scale == "absolute":
            weights = np.ones(lam.size)
        elif scale == "relative":
            weights = 1.0 / lam**2
        else:
            raise InputError(f"scale must be 'absolute' or 'relative', got {scale!r}")
        return cls(A=A, b=lam / c_S, lam=lam, weights=weights)

    def add_column(self, col: np.ndarray, target: float, curvature: float, weight: float) -> None:
        self.A = np.column_stack([self.A, col])
        self.b = np.append(self.b, target)
        self.lam = np.append(self.lam, curvature)
        self.weights = np.append(self.weights, weight)

    def residual(self, s: np.ndarray) -> np.ndarray:
        return np.maximum(self.b - self.A.T @ s, 0.0)

    def objective(self, s: np.ndarray) -> float:
        r = self.residual(s)
        return float(np.sum(self.weights * r * r))

    def value_and_grad(self, s: np.ndarray) -> tuple[float, np.ndarray]:
        r = self.residual(s)
        wr = self.weights * r
        return float(np.sum(wr * r)), -2.0 * (self.A @ wr)

    def lipschitz(self) -> float:
        # L = 2 || diag(sqrt(w)) A^T ||_2^2 = 2 lambda_max(A^T A weighted); q x q, cheap.
        Aw = self.A * np.sqrt(self.weights)
        return 2.0 * float(np.linalg.eigvalsh(Aw.T @ Aw)[-1])

    def ratios(self, s: np.ndarray) -> np.ndarray:
        return (self.A.T @ s) / self.lam


@dataclass
class RelaxationResult:
    s: np.ndarray
    objective: float
    iterations: int
    converged: bool
    seconds: float
    history: list = field(default_factory=list)


def fista(
    problem: MatchingProblem, n: int, *, s0=None, max_iter: int = 5000, tol: float = 1e-7, ftol: float = 1e-12,
    record: bool = False,
) -> RelaxationResult:
    """Accelerated projected gradient (FISTA, adaptive restart) over the capped simplex.

    Stops when the objective is zero to working precision (``f <= ftol * sum_j w_j b_j^2``: the moment
    constraints are met up to a relative residual of ~1e-6), or when the gradient mapping
    ``L ||s - proj(s - grad / L)||`` falls below ``tol`` times its first value.
    """
    t0 = time.perf_counter()
    A_N = problem.A.shape[0]
    cap = 1.0 / n
    L = max(problem.lipschitz(), 1e-300)
    s = project_capped_simplex(np.full(A_N, 1.0 / A_N) if s0 is None else np.asarray(s0, float), cap)
    if cap * A_N <= 1.0 + 1e-12:  # n = N: the capped simplex is a single point
        f = problem.objective(s)
        return RelaxationResult(s, f, 0, True, time.perf_counter() - t0, [f] if record else [])
    y = s.copy()
    t = 1.0
    f_s = problem.objective(s)
    history = [f_s] if record else []
    gm0 = None
    f_zero = ftol * float(np.sum(problem.weights * problem.b**2))
    converged = False
    it = 0
    tau = None
    for it in range(1, max_iter + 1):
        _, g = problem.value_and_grad(y)
        z = y - g / L
        tau = _capped_simplex_tau(z, cap, 1.0, tau)
        s_new = np.clip(z - tau, 0.0, cap)
        f_new = problem.objective(s_new)
        if f_new > f_s:  # function restart: drop momentum, take a plain projected step from s
            t = 1.0
            _, g = problem.value_and_grad(s)
            s_new = project_capped_simplex(s - g / L, cap)
            f_new = problem.objective(s_new)
        y_step = s_new - s
        gm = L * float(np.linalg.norm(y_step))
        if gm0 is None:
            gm0 = max(gm, 1e-300)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = s_new + ((t - 1.0) / t_new) * y_step
        s, f_s, t = s_new, f_new, t_new
        if record:
            history.append(f_s)
        if f_s <= f_zero or gm <= tol * gm0:
            converged = True
            break
    return RelaxationResult(s, f_s, it, converged, time.perf_counter() - t0, history)


def solve_lp(problem: MatchingProblem, n: int) -> tuple[RelaxationResult, dict]:
    """Max-min-ratio LP ``max t  s.t.  A^T s >= t b,  s in capped simplex`` (HiGHS, vertex solution)."""
    # Imported here: scipy.optimize takes about 0.5 s to import (measured), three times the rest of the
    # package, and only the LP solver needs it.
    from scipy.optimize import linprog  # noqa: PLC0415
    from scipy.sparse import csr_matrix, hstack  # noqa: PLC0415

    t0 = time.perf_counter()
    N, q = problem.A.shape
    c = np.zeros(N + 1)
    c[-1] = -1.0
    A_ub = hstack([csr_matrix(-problem.A.T), csr_matrix(problem.b[:, None])]).tocsr()
    A_eq = csr_matrix(np.concatenate([np.ones(N), [0.0]])[None, :])
    bounds = [(0.0, 1.0 / n)] * N + [(0.0, None)]
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(q), A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"LP solver failed: {res.message}")
    s = project_capped_simplex(np.clip(res.x[:N], 0, 1.0 / n), 1.0 / n)
    dual = -np.asarray(res.ineqlin.marginals)  # >= 0, one per moment constraint
    info = {"lp_t": float(res.x[-1]), "lp_dual": dual}
    return RelaxationResult(s, problem.objective(s), int(getattr(res, "nit", 0)), True, time.perf_counter() - t0), info


def loewner_cut(G, s: np.ndarray, stats: MomentStats, c_S: float, rel_tol: float = 1e-6) -> tuple[np.ndarray, float] | None:
    """Most violated direction ``w`` of ``G^T diag(s) G - Sigma / c_S`` (None if within ``rel_tol``)."""
    G = np.asarray(G)
    S_s = np.zeros((stats.m, stats.m))
    for lo, hi in _chunks(G.shape[0]):
        blk = np.asarray(G[lo:hi], dtype=np.float64)
        S_s += blk.T @ (s[lo:hi, None] * blk)
    D = S_s - stats.sigma / c_S
    ev, EV = np.linalg.eigh(D)
    if ev[0] >= -rel_tol * max(stats.lam[0], 1e-300):
        return None
    return EV[:, 0], float(ev[0])


def capped_simplex_matching(
    G,
    n: int,
    *,
    stats: MomentStats | None = None,
    c_S: float = 1.0,
    solver: str = "fista",
    max_iter: int = 5000,
    tol: float = 1e-7,
    cuts: int = 0,
    scale: str = "absolute",
) -> tuple[np.ndarray, dict]:
    """Relaxed SkMM weights ``s`` (capped simplex) and diagnostics."""
    t0 = time.perf_counter()
    stats = stats or moment_stats(G)
    problem = MatchingProblem.build(G, c_S, stats, scale=scale)
    if solver == "fista":
        with _single_thread_blas():
            res = fista(problem, n, max_iter=max_iter, tol=tol)
        extra: dict = {}
    elif solver == "lp":
        res, extra = solve_lp(problem, n)
        extra = {"lp_t": extra["lp_t"]}
    else:
        raise InputError(f"solver must be 'fista' or 'lp', got {solver!r}")
    n_cuts = 0
    iters = res.iterations
    for _ in range(int(cuts)):
        cut = loewner_cut(G, res.s, stats, c_S)
        if cut is None:
            break
        w = cut[0]
        col = project_rows(G, w)
        curv = float(w @ stats.sigma @ w)
        weight = 1.0 if scale == "absolute" else 1.0 / max(curv, 1e-300) ** 2
        problem.add_column(col**2, curv / c_S, curv, weight)
        res = fista(problem, n, s0=res.s, max_iter=max_iter, tol=tol) if solver == "fista" else solve_lp(problem, n)[0]
        iters += res.iterations
        n_cuts += 1
    ratios = problem.ratios(res.s)
    diag = {
        "solver": solver,
        "c_S": c_S,
        "relaxed_objective": res.objective,
        "relaxed_worst_ratio": float(ratios.min()),
        "iterations": iters,
        "converged": bool(res.converged),
        "cuts": n_cuts,
        "fractional": int(np.count_nonzero((res.s > 1e-12) & (res.s < 1.0 / n - 1e-12))),
        "support": int(np.count_nonzero(res.s > 1e-12)),
        "relax_seconds": time.perf_counter() - t0,
        **extra,
    }
    return res.s, diag


def project_rows(G, w: np.ndarray) -> np.ndarray:
    """``G w`` in float64, chunk by chunk."""
    G = np.asarray(G)
    out = np.empty(G.shape[0])
    for lo, hi in _chunks(G.shape[0]):
        out[lo:hi] = np.asarray(G[lo:hi], dtype=np.float64) @ w
    return out


def subset_objective(G, indices, c_S: float, stats: MomentStats | None = None, rel_tol: float = 1e-6) -> float:
    """``f(1_S / n)``: the moment-matching objective of an integer subset (absolute scale)."""
    stats = stats or moment_stats(G)
    keep = stats.lam > rel_tol * max(stats.lam[0], 0.0)
    proj = np.asarray(np.asarray(G)[np.asarray(indices)], dtype=np.float64) @ stats.V[:, keep]
    r = np.maximum(stats.lam[keep] / c_S - (proj**2).mean(axis=0), 0.0)
    return float(np.sum(r * r))
