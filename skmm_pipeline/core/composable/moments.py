"""The pool's sketched second moment as a sum over shards, and how far it moves as shards arrive.

``Sigma = G^T G / N`` is additive: each shard keeps ``sum_i g_i g_i^T`` (m x m), ``sum_i g_i`` and its
row count, streamed from its sketch file chunk by chunk (memory O(m^2 + chunk m), whatever the shard's
size); the pool's moment is their sum. Shards sketched with different identities are never summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from skmm_pipeline.core.errors import SketchMismatchError
from skmm_pipeline.core.moment_matching import CHUNK_ROWS, MomentStats
from skmm_pipeline.core.sketch_io import canonical_identity, check_identity, read_sketch_shard
from skmm_pipeline.core.validation import InputError

# The ridge of :func:`moment_drift`, relative to the average eigenvalue: directions weaker than 1% of it
# are noise whose relative moves do not count.
DRIFT_RIDGE = 0.01


@dataclass(frozen=True)
class ShardMoment:
    """Sufficient statistics of a set of sketch rows: their count, ``sum g g^T`` and ``sum g`` (float64)."""

    count: int
    total: np.ndarray  # m x m
    row_sum: np.ndarray  # m
    identity: dict | None = None

    @property
    def m(self) -> int:
        return int(self.total.shape[0])

    @property
    def sigma(self) -> np.ndarray:
        """The uncentred second moment ``sum g g^T / count``, symmetrised as :func:`moment_stats` does."""
        s = self.total / self.count
        return (s + s.T) / 2

    @property
    def mean(self) -> np.ndarray:
        return self.row_sum / self.count

    def stats(self, row_sqnorm: np.ndarray) -> MomentStats:
        """The moment as the target of a design over rows whose squared norms are ``row_sqnorm``."""
        sigma = self.sigma
        lam, V = np.linalg.eigh(sigma)
        lam = np.clip(lam[::-1], 0.0, None)
        return MomentStats(N=int(row_sqnorm.size), m=self.m, sigma=sigma, lam=lam, V=np.ascontiguousarray(V[:, ::-1]),
                           row_sqnorm=np.asarray(row_sqnorm, dtype=np.float64))


def shard_moment(rows, identity: dict | None = None) -> ShardMoment:
    """The moment of ``rows`` (N x m, e.g. a memory-mapped sketch), accumulated in float64 chunk by chunk."""
    rows = np.asarray(rows) if not isinstance(rows, np.memmap) else rows
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise InputError(f"a shard's sketch must be a non-empty N x m array, got shape {rows.shape}")
    N, m = rows.shape
    total, row_sum = np.zeros((m, m)), np.zeros(m)
    for lo in range(0, N, CHUNK_ROWS):
        blk = np.asarray(rows[lo : lo + CHUNK_ROWS], dtype=np.float64)
        if not np.isfinite(blk).all():
            raise InputError(f"the shard's sketch has non-finite values near row {lo}")
        total += blk.T @ blk
        row_sum += blk.sum(axis=0)
    return ShardMoment(int(N), total, row_sum, None if identity is None else canonical_identity(identity))


def shard_moment_from_file(path, expected_identity: dict | None = None) -> ShardMoment:
    """The moment of a sketch shard file, read through its memory map (refused if its identity differs)."""
    shard = read_sketch_shard(path, expected_identity)
    return shard_moment(shard.rows, shard.identity)


def pool_moment(moments: Iterable[ShardMoment]) -> ShardMoment:
    """The sum of the shards' moments; :class:`SketchMismatchError` if their identities or widths differ."""
    moments = list(moments)
    if not moments:
        raise InputError("no shard moments to sum: sketch at least one shard")
    first = moments[0]
    total, row_sum, count = np.zeros_like(first.total), np.zeros_like(first.row_sum), 0
    for i, mo in enumerate(moments):
        if mo.m != first.m:
            raise SketchMismatchError(f"shard moment {i} is {mo.m} x {mo.m}, the first is {first.m} x {first.m}: "
                                      "sketches of different widths are never mixed")
        if (mo.identity is None) != (first.identity is None):
            raise SketchMismatchError(f"shard moment {i} has no sketch identity while others do: sketches are never mixed")
        if first.identity is not None:
            check_identity(mo.identity, first.identity, where=f"shard moment {i}")
        total += mo.total
        row_sum += mo.row_sum
        count += mo.count
    return ShardMoment(count, total, row_sum, first.identity)


def moment_drift(old: np.ndarray, new: np.ndarray, ridge: float = DRIFT_RIDGE) -> float:
    """How far the pool's moment moved, direction by direction: the largest ``|v^T (new - old) v| / (v^T old v + a)``
    over unit vectors ``v`` (the spectral norm of the whitened change), ``a = ridge tr(old) / m``.

    Scale-free and blind to nothing: a direction new to the pool (zero energy before) moves by its whole
    energy over ``a``, however small next to the pool's largest ones (a relative Frobenius distance would
    hide it); a like shard joining S others moves every direction by about ``1 / S`` of its own noise.
    """
    old, new = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if old.shape != new.shape:
        raise SketchMismatchError(f"moments of shapes {old.shape} and {new.shape} cannot be compared")
    a = float(ridge) * float(np.trace(old)) / old.shape[0]
    if not a > 0:
        return float("inf") if np.any(new) else 0.0
    w, V = np.linalg.eigh((old + old.T) / 2)
    W = V / np.sqrt(np.clip(w, 0.0, None) + a)
    D = W.T @ (new - old) @ W
    return float(np.max(np.abs(np.linalg.eigvalsh((D + D.T) / 2))))
