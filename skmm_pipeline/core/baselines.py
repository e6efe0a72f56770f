"""Geometric selection baselines over an N x d array (gradients, sketches or features).

Each method is implemented as its own paper defines it (not as the research code's variants), works
chunk by chunk or one N-vector at a time (never an N x N matrix), and returns exactly ``n`` distinct
indices in selection order:

* ``uniform``: a simple random sample without replacement.
* ``leverage``: leverage scores ``h_i = x_i^T (X^T X)^+ x_i`` (Drineas, Mahoney, Muthukrishnan 2006).
  The papers sample i.i.d. with replacement proportionally to ``h``; to return ``n`` distinct rows we
  use the fixed-size analogue: inclusion probabilities ``min(1, c h_i)`` summing to ``n``, realised
  by systematic pi-ps sampling.
* ``ridge-leverage``: ridge leverage scores ``x_i^T (X^T X + lambda I)^{-1} x_i`` (Alaoui & Mahoney
  2015) with the rank-k regulariser ``lambda = ||X - X_k||_F^2 / k`` (Cohen, Musco & Musco 2017),
  ``k`` = the intrinsic dimension of the spectrum unless given; sampled as ``leverage``.
* ``adaptive``: randomly pivoted Cholesky (Chen, Epperly, Tropp & Webber 2023) on the linear kernel
  ``X X^T``, i.e. adaptive sampling proportional to the squared residual distance to the span of the
  rows already chosen (Deshpande & Vempala 2006). When the kernel's rank is exhausted before ``n``
  pivots (possible for n > d), the rest is drawn uniformly; ``rank_exhausted_at`` reports when.
* ``herding``: kernel herding with the linear kernel (Welling 2009; Chen, Welling & Smola 2010): each
  step adds the point that brings the running mean of the chosen points closest to the pool mean
  ("nearest to the mean gap"), not the argmax of a score.
* ``k-center``: greedy k-center / farthest-first traversal (Gonzalez 1985; Sener & Savarese 2018):
  a random first center, then repeatedly the point farthest from its nearest chosen center.
"""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.moment_matching import (
    MomentStats,
    intrinsic_dimension,
    moment_stats,
)
from skmm_pipeline.core.rounding import proportional_inclusion, systematic_sample

CHUNK_ROWS = 1 << 16


def _chunks(N: int):
    for lo in range(0, N, CHUNK_ROWS):
        yield lo, min(N, lo + CHUNK_ROWS)


def uniform(X, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    return rng.choice(np.asarray(X).shape[0], size=n, replace=False).astype(np.int64), {}


def leverage_scores(X, ridge: float = 0.0, stats: MomentStats | None = None, rel_tol: float = 1e-10) -> np.ndarray:
    """``h_i = x_i^T (X^T X + ridge I)^+ x_i`` from the eigendecomposition of ``X^T X`` (d x d)."""
    X = np.asarray(X)
    stats = stats or moment_stats(X)
    ev = stats.lam * stats.N  # eigenvalues of X^T X
    if ridge > 0:
        inv = 1.0 / (ev + ridge)
    else:
        keep = ev > rel_tol * max(ev[0], 0.0)
        inv = np.where(keep, 1.0 / np.where(keep, ev, 1.0), 0.0)
    W = stats.V * np.sqrt(inv)
    h = np.empty(X.shape[0])
    for lo, hi in _chunks(X.shape[0]):
        T = np.asarray(X[lo:hi], dtype=np.float64) @ W
        h[lo:hi] = np.einsum("ij,ij->i", T, T)
    return np.clip(h, 0.0, None)


def _sample_by_scores(h: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if not np.any(h > 0):
        return rng.choice(h.size, size=n, replace=False).astype(np.int64)
    pi = proportional_inclusion(h, n)
    idx = systematic_sample(pi, rng)
    return idx[rng.permutation(idx.size)]


def leverage(X, n: int, rng: np.random.Generator, stats: MomentStats | None = None) -> tuple[np.ndarray, dict]:
    h = leverage_scores(X, 0.0, stats)
    return _sample_by_scores(h, n, rng), {"sum_scores": float(h.sum())}


def ridge_leverage(
    X, n: int, rng: np.random.Generator, stats: MomentStats | None = None, ridge: float | None = None, rank: int | None = None
) -> tuple[np.ndarray, dict]:
    stats = stats or moment_stats(X)
    ev = stats.lam * stats.N
    if ridge is None:
        k = intrinsic_dimension(stats.lam) if rank is None else int(rank)
        k = max(1, min(k, ev.size - 1)) if ev.size > 1 else 1
        ridge = float(ev[k:].sum() / k)
        if ridge <= 0:
            ridge = 1e-12 * float(ev[0])
    h = leverage_scores(X, float(ridge), stats)
    return _sample_by_scores(h, n, rng), {"ridge": float(ridge), "effective_dim": float(h.sum())}


def adaptive(X, n: int, rng: np.random.Generator, tol: float = 1e-12) -> tuple[np.ndarray, dict]:
    """Randomly pivoted Cholesky on the linear kernel; uniform fill once the residual is exhausted."""
    X = np.asarray(X)
    N, d = X.shape
    resid = np.empty(N)
    for lo, hi in _chunks(N):
        blk = np.asarray(X[lo:hi], dtype=np.float64)
        resid[lo:hi] = np.einsum("ij,ij->i", blk, blk)
    total0 = resid.sum()
    Q = np.zeros((d, 0))
    chosen: list[int] = []
    taken = np.zeros(N, dtype=bool)
    exhausted_at = None
    while len(chosen) < n:
        total = resid.sum()
        if total <= tol * total0 or total <= 0:
            exhausted_at = len(chosen)
            break
        p = int(rng.choice(N, p=resid / total))
        chosen.append(p)
        taken[p] = True
        x = np.asarray(X[p], dtype=np.float64)
        r = x - Q @ (Q.T @ x)
        nr = np.linalg.norm(r)
        resid[p] = 0.0
        if nr > 1e-12 * max(1.0, np.linalg.norm(x)):
            q = r / nr
            Q = np.column_stack([Q, q])
            for lo, hi in _chunks(N):
                resid[lo:hi] -= (np.asarray(X[lo:hi], dtype=np.float64) @ q) ** 2
            np.clip(resid, 0.0, None, out=resid)
            resid[taken] = 0.0
    if len(chosen) < n:
        rest = np.flatnonzero(~taken)
        chosen.extend(rng.choice(rest, size=n - len(chosen), replace=False).tolist())
    return np.asarray(chosen, dtype=np.int64), {"rank_exhausted_at": exhausted_at}


def herding(X, n: int) -> tuple[np.ndarray, dict]:
    """Greedy mean matching: step t adds argmin_x ||(t+1) mu - sum_S x_s - x||^2 (deterministic)."""
    X = np.asarray(X)
    N, d = X.shape
    dt = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    mu = np.zeros(d)
    sq = np.empty(N)
    for lo, hi in _chunks(N):
        blk = np.asarray(X[lo:hi], dtype=np.float64)
        mu += blk.sum(axis=0)
        sq[lo:hi] = np.einsum("ij,ij->i", blk, blk)
    mu /= N
    total = np.zeros(d)
    taken = np.zeros(N, dtype=bool)
    chosen = np.empty(n, dtype=np.int64)
    for t in range(n):
        target = (t + 1) * mu - total
        score = sq - 2.0 * (X @ target.astype(dt, copy=False))
        score[taken] = np.inf
        j = int(np.argmin(score))
        chosen[t] = j
        taken[j] = True
        total += np.asarray(X[j], dtype=np.float64)
    return chosen, {}


def k_center(X, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Farthest-first traversal from a random first center; distances kept as one N-vector."""
    X = np.asarray(X)
    N = X.shape[0]
    dt = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    sq = np.empty(N)
    for lo, hi in _chunks(N):
        blk = np.asarray(X[lo:hi], dtype=np.float64)
        sq[lo:hi] = np.einsum("ij,ij->i", blk, blk)
    chosen = np.empty(n, dtype=np.int64)
    j = int(rng.integers(N))
    mind = np.full(N, np.inf)
    for t in range(n):
        chosen[t] = j
        c = np.asarray(X[j], dtype=np.float64)
        dist = sq - 2.0 * (X @ c.astype(dt, copy=False)) + c @ c
        np.minimum(mind, np.maximum(dist, 0.0), out=mind)
        mind[chosen[: t + 1]] = -1.0
        j = int(np.argmax(mind))
    return chosen, {"covering_radius": float(np.sqrt(max(mind.max(), 0.0)))}
