"""Randomly pivoted Cholesky (adaptive sampling) with a linear kernel: the start of the trace design."""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.moment_matching._compute import _chunks


def rpc_pivots(Z: np.ndarray, k: int, rng: np.random.Generator, exclude=None, tol: float = 1e-12) -> np.ndarray:
    """Up to ``k`` pivots of randomly pivoted Cholesky on the linear kernel ``Z Z^T`` (never formed).

    Pivot ``i`` is drawn with probability proportional to its residual ``||z_i - Q Q^T z_i||^2``;
    the pivot's residual direction joins the orthonormal basis ``Q``. Stops early when the residual
    is exhausted (relative ``tol``). O(N k) per pivot.
    """
    N, d = Z.shape
    resid = np.einsum("ij,ij->i", Z, Z)
    if exclude is not None and len(exclude):
        resid[np.asarray(exclude)] = 0.0
    total0 = resid.sum()
    Q = np.zeros((d, 0))
    piv: list[int] = []
    for _ in range(min(k, N)):
        total = resid.sum()
        if total <= tol * total0 or total <= 0:
            break
        p = int(rng.choice(N, p=resid / total))
        r = Z[p] - Q @ (Q.T @ Z[p])
        nr = np.linalg.norm(r)
        piv.append(p)
        resid[p] = 0.0
        if nr <= 1e-12 * max(1.0, np.linalg.norm(Z[p])):
            continue
        q = r / nr
        Q = np.column_stack([Q, q])
        resid -= (Z @ q) ** 2
        np.clip(resid, 0.0, None, out=resid)
        resid[piv] = 0.0
    return np.asarray(piv, dtype=np.int64)


def block_rpc_pivots(
    G, Vk: np.ndarray | None, k: int, rng: np.random.Generator, block: int = 64, accept: float = 0.5,
    row_sqnorm: np.ndarray | None = None,
) -> np.ndarray:
    """Blocked randomly pivoted Cholesky over a large sketch, one pass over the data per block.

    Each round draws ``block`` candidates proportionally to their residual, then accepts them in draw
    order only while a candidate keeps at least ``accept`` of its residual after the candidates already
    accepted in this round are projected out (robust blockwise random pivoting), so that one round
    never spends two pivots on the same uncovered direction. The residual update is one float32 pass
    ``G Q_new`` per round; ``row_sqnorm`` (the initial residuals when ``Vk`` is None) saves a pass.
    """
    G = np.asarray(G)
    N = G.shape[0]
    d = G.shape[1] if Vk is None else Vk.shape[1]
    V32 = None if Vk is None else Vk.astype(np.float32)

    def coords(rows, dtype=np.float64):
        Zr = np.asarray(G[rows], dtype=np.float32 if dtype == np.float32 else np.float64)
        if Vk is None:
            return Zr
        return Zr @ (V32 if dtype == np.float32 else Vk)

    if Vk is None and row_sqnorm is not None:
        resid = np.array(row_sqnorm, dtype=np.float64)
    else:
        resid = np.empty(N)
        for lo, hi in _chunks(N):
            Zb = coords(slice(lo, hi), np.float32)
            resid[lo:hi] = np.einsum("ij,ij->i", Zb, Zb)
    total0 = resid.sum()
    Q = np.zeros((d, 0))
    piv: list[int] = []
    while len(piv) < k:
        total = resid.sum()
        if total <= 1e-12 * total0:
            break
        b = min(block, k - len(piv))
        cand = np.unique(rng.choice(N, size=b, p=resid / total))
        cand = cand[rng.permutation(cand.size)]
        Zc = coords(cand)
        R = Zc - (Zc @ Q) @ Q.T
        accepted = []
        basis: list[np.ndarray] = []
        for c, r in zip(cand, R):
            r0 = r @ r
            for q in basis:
                r = r - (r @ q) * q
            if r0 > 0 and r @ r >= accept * r0:
                basis.append(r / np.linalg.norm(r))
                accepted.append(int(c))
        if not accepted:
            resid[cand] = 0.0
            continue
        piv.extend(accepted)
        Qn = np.column_stack(basis)
        Q = np.column_stack([Q, Qn])
        Qn32 = Qn.astype(np.float32)
        for lo, hi in _chunks(N):
            T = coords(slice(lo, hi), np.float32) @ Qn32
            resid[lo:hi] -= np.einsum("ij,ij->i", T, T)
        np.clip(resid, 0.0, None, out=resid)
        resid[piv] = 0.0
    return np.asarray(piv[:k], dtype=np.int64)
