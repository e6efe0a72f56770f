"""Stage 2 of SkMM: choose a subset whose second moment controls the full data's in the sketch.

The default solver is variance reduction by A-optimal design in the sketch (SPEC section 3b): greedily
add the sample that most decreases ``tr(Sigma (a I + G_S^T G_S)^{-1})`` where ``Sigma = G^T G / N`` is
the full (uncentred) sketched second moment and ``a = tr(Sigma) / m`` a ridge. With
``P = (a I + G_S^T G_S)^{-1}`` and ``u_i = P g_i`` the decrease from adding ``g_i`` is
``u_i^T Sigma u_i / (1 + g_i^T u_i)`` (Sherman-Morrison). After adding ``g_j`` with ``w = P g_j`` and
``c = 1 + g_j^T w``, every ``u_i`` moves by ``-(g_i^T w / c) w``, so both the numerators and the
denominators are updated from two matrix-vector products ``G w`` and ``G P Sigma w``: O(N m) per pick,
never O(N m^2).
"""

from __future__ import annotations

import time

import numpy as np

from skmm_pipeline.core.validation import as_finite_matrix, check_budget


def second_moment(G: np.ndarray) -> np.ndarray:
    return G.T @ G / G.shape[0]


def greedy_trace_design(G, n: int, ridge: float | None = None) -> tuple[np.ndarray, dict]:
    """Greedy A-optimal design: indices of ``n`` rows of ``G`` (N x m) and diagnostics."""
    G = as_finite_matrix(G, "sketched gradients")
    N, m = G.shape
    n = check_budget(n, N)
    t0 = time.perf_counter()
    sigma = second_moment(G)
    trace = float(np.trace(sigma))
    if trace <= 0:
        raise ValueError("all sketched gradients are zero: there is nothing to select on")
    a = trace / m if ridge is None else float(ridge)
    P = np.eye(m) / a
    U = G / a  # rows u_i = P g_i
    num = np.einsum("ij,jk,ik->i", U, sigma, U)
    den = 1.0 + np.einsum("ij,ij->i", G, U)
    available = np.ones(N, dtype=bool)
    chosen = np.empty(n, dtype=np.int64)
    for t in range(n):
        gain = np.where(available, num / den, -np.inf)
        j = int(np.argmax(gain))
        chosen[t] = j
        available[j] = False
        w = P @ G[j]
        c = 1.0 + G[j] @ w
        Gw = G @ w
        sigma_w = sigma @ w
        beta = Gw / c
        num += -2.0 * beta * (G @ (P @ sigma_w)) + beta**2 * (w @ sigma_w)
        den -= Gw * beta
        P -= np.outer(w, w) / c
    objective = float(np.trace(sigma @ P))
    return chosen, {
        "solver": "greedy-trace",
        "ridge": a,
        "objective_trace": objective,
        "seconds": time.perf_counter() - t0,
    }


def moment_ratio(G, indices, rel_tol: float = 1e-6) -> float:
    """Worst ratio ``min_j (v_j^T Sigma_S v_j) / lambda_j`` over the eigenpairs of the full moment.

    ``Sigma_S`` is the subset's second moment (mean over the subset). 1.0 means the subset matches the
    full data's moment along every principal direction; small values flag directions the subset misses.
    Directions with eigenvalue below ``rel_tol * lambda_max`` are ignored.
    """
    G = as_finite_matrix(G, "sketched gradients")
    lam, V = np.linalg.eigh(second_moment(G))
    keep = lam > rel_tol * max(lam.max(), 0.0)
    if not keep.any():
        return float("nan")
    proj = G[np.asarray(indices)] @ V[:, keep]
    return float(np.min((proj**2).mean(axis=0) / lam[keep]))


def principal_coordinates(G, k: int) -> np.ndarray:
    """Coordinates of the rows of ``G`` in the top-``k`` eigenvectors of its second moment."""
    G = as_finite_matrix(G, "sketched gradients")
    k = max(1, min(int(k), G.shape[1]))
    lam, V = np.linalg.eigh(second_moment(G))
    return G @ V[:, ::-1][:, :k]


def auto_design_dim(n: int, m: int) -> int:
    """Dimension of the design space for budget ``n``: small at small budgets, growing with n."""
    return int(min(m, max(32, 3 * n)))
