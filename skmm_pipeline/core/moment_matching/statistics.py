"""The pool's sketch: second moment, spectrum, intrinsic and design dimension, principal coordinates.

Notation (SPEC section 3): ``G`` is the N x m sketch with rows ``g_i``, ``Sigma = G^T G / N = V Lambda V^T``
(uncentred).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from skmm_pipeline.core.moment_matching._compute import CHUNK_ROWS, _chunks
from skmm_pipeline.core.validation import InputError, as_finite_matrix


def second_moment(G) -> np.ndarray:
    """``G^T G / N`` accumulated in float64, chunk by chunk (no float64 copy of a float32 input)."""
    G = np.asarray(G)
    N, m = G.shape
    S = np.zeros((m, m))
    for lo, hi in _chunks(N):
        blk = np.asarray(G[lo:hi], dtype=np.float64)
        S += blk.T @ blk
    return S / N


@dataclass
class MomentStats:
    """What every SkMM solver needs to know about the pool's sketch, computed in one pass."""

    N: int
    m: int
    sigma: np.ndarray  # m x m, uncentred second moment
    lam: np.ndarray  # eigenvalues, descending
    V: np.ndarray  # eigenvectors as columns, same order
    row_sqnorm: np.ndarray  # ||g_i||^2, float64

    @property
    def zero_rows(self) -> int:
        return int(np.count_nonzero(self.row_sqnorm == 0))

    def rank(self, rel_tol: float = 1e-10) -> int:
        return int(np.count_nonzero(self.lam > rel_tol * max(self.lam[0], 0.0)))


def moment_stats(G) -> MomentStats:
    """Second moment, its eigendecomposition and the row norms in one pass over ``G``.

    Accumulated in float64. A large float32 sketch (N > 65536) is multiplied in float32 chunk by chunk
    (8192 rows, so each partial sum is short) for speed; anything smaller is multiplied in float64.
    """
    G = np.asarray(G)
    N, m = G.shape
    sigma = np.zeros((m, m))
    sq = np.empty(N)
    fast32 = G.dtype == np.float32 and N > CHUNK_ROWS
    rows = 8192 if fast32 else CHUNK_ROWS
    for lo, hi in _chunks(N, rows):
        blk = G[lo:hi] if fast32 else np.asarray(G[lo:hi], dtype=np.float64)
        sigma += (blk.T @ blk).astype(np.float64)
        sq[lo:hi] = np.einsum("ij,ij->i", blk, blk)
    sigma /= N
    sigma = (sigma + sigma.T) / 2
    lam, V = np.linalg.eigh(sigma)
    lam = np.clip(lam[::-1], 0.0, None)
    return MomentStats(N=N, m=m, sigma=sigma, lam=lam, V=np.ascontiguousarray(V[:, ::-1]), row_sqnorm=sq)


def target_stats(pool: MomentStats, reference) -> MomentStats:
    """The pool's statistics with the moment to match replaced by ``reference``'s (R x m rows sketched
    like the pool, e.g. the validation split): the design then covers the directions the reference
    occupies, in its proportions, and rows of the pool are only worth what they add there."""
    R = as_finite_matrix(reference, "reference")
    if R.shape[1] != pool.m:
        raise InputError(f"reference rows have {R.shape[1]} columns, the pool's sketch has {pool.m}")
    ref = moment_stats(R)
    if ref.lam[0] <= 0:
        raise InputError("the reference rows are all zero: there is no moment to match")
    return MomentStats(N=pool.N, m=pool.m, sigma=ref.sigma, lam=ref.lam, V=ref.V, row_sqnorm=pool.row_sqnorm)


def moment_ratio(G, indices, rel_tol: float = 1e-6, stats: MomentStats | None = None) -> float:
    """Worst ratio ``min_j (v_j^T Sigma_S v_j) / lambda_j`` over the eigenpairs of the full moment.

    ``Sigma_S`` is the subset's second moment (mean over the subset). 1.0 means the subset matches the
    full data's moment along every principal direction; small values flag directions the subset misses.
    Directions with eigenvalue below ``rel_tol * lambda_max`` are ignored.
    """
    stats = stats or moment_stats(G)
    keep = stats.lam > rel_tol * max(stats.lam[0], 0.0)
    if not keep.any():
        return float("nan")
    proj = np.asarray(np.asarray(G)[np.asarray(indices)], dtype=np.float64) @ stats.V[:, keep]
    return float(np.min((proj**2).mean(axis=0) / stats.lam[keep]))


def intrinsic_dimension(lam, flat: float = 2.0, gap: float = 4.0, min_tail: float = 0.25) -> int:
    """Number of sketch directions above the spectrum's noise floor; the rank if there is no floor.

    A noise floor is a flat tail of the spectrum (largest tail eigenvalue within ``flat`` times the
    tail's median) covering at least ``min_tail`` of the sketch's non-null directions, preceded by a
    gap (the last signal eigenvalue at least ``gap`` times the largest noise eigenvalue). The smallest
    such split is returned. The criterion is scale-free, so a small cluster whose total energy is
    below the noise's still counts as long as its direction stands above a single noise direction.
    Spectra that decay smoothly, or a sketch no larger than the signal, have no floor: every non-null
    direction counts. (A sketch should be sized above the intrinsic dimension for the floor to show.)
    """
    lam = np.sort(np.clip(np.asarray(lam, dtype=np.float64), 0.0, None))[::-1]
    if lam.size == 0 or lam[0] <= 0:
        return 0
    rank = int(np.count_nonzero(lam > 1e-10 * lam[0]))
    lam = lam[:rank]
    min_len = max(2, int(math.ceil(min_tail * rank)))
    for k in range(1, rank - min_len + 1):
        tail = lam[k:]
        if tail[0] <= flat * np.median(tail) and lam[k - 1] >= gap * tail[0]:
            return k
    return rank


def design_dimension(n: int, stats: MomentStats, rule: int | str | None = "auto", per_point: float = 10.0) -> int:
    """Dimension ``k`` of the design space for budget ``n`` (SPEC 3b: the sketch size matters).

    ``"auto"``: just above the intrinsic dimension at small budgets, growing with the budget
    (``n / per_point`` directions) up to the whole sketch: ``clip(max(d_int + 2, n / 10), 1, rank)``.
    ``None`` or ``"full"``: the whole sketch. An int: that many (at most m).
    """
    rank = max(1, stats.rank())
    if rule is None or rule == "full":
        return stats.m
    if rule == "auto":
        d_int = intrinsic_dimension(stats.lam[:rank])
        return int(min(stats.m, max(d_int + 2, math.ceil(n / per_point))))
    if isinstance(rule, (int, np.integer)) and not isinstance(rule, bool) and rule > 0:
        return int(min(stats.m, rule))
    raise InputError(f"design_dim must be 'auto', 'full', None or a positive int, got {rule!r}")


def principal_coordinates(G, k: int, stats: MomentStats | None = None) -> np.ndarray:
    """Coordinates (float64) of the rows of ``G`` in the top-``k`` eigenvectors of its second moment."""
    stats = stats or moment_stats(G)
    k = max(1, min(int(k), stats.m))
    Vk = stats.V[:, :k]
    G = np.asarray(G)
    out = np.empty((G.shape[0], k))
    for lo, hi in _chunks(G.shape[0]):
        out[lo:hi] = np.asarray(G[lo:hi], dtype=np.float64) @ Vk
    return out
