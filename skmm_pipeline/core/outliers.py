"""Outlier guard: keep corrupted or off-manifold samples out of a selection.

Moment-based selectors (A-optimal design, leverage, k-center) favour samples that stick out of the
pool's distribution in the sketch, which on real deliveries are often corrupted images (noise, inverted
or half-blank scans): on the digits curation benchmark the unguarded default picks them at 3-4x their
base rate. The guard scores every row by its ridge-regularised Mahalanobis distance to the pool

    d_i = (x_i - mu)^T (C + rho * lambda_max(C) I)^{-1} (x_i - mu)

with the mean ``mu`` and covariance ``C`` re-estimated on the rows kept so far (``iterations`` times,
so a group of outliers does not hide itself by inflating ``C``), and excludes rows with
``d_i > threshold * median(d)``. Those rows stay in the pool and in the data; they only cannot be
selected, and the selection reports how many were excluded. The ridge ``rho`` makes the score a
ridge-leverage score: directions with little variance are not blown up. Cost O(N m^2), memory O(m^2)
beyond the input (rows are streamed in chunks).

No geometry of the sketch tells a tight cluster of junk (e.g. pure-noise images, which a pretrained
network maps to one place) from a small genuine class, and covering small clusters is what SkMM is
for. The input check catches what the sketch cannot: :func:`spatial_structure` scores each image by
the correlation of neighbouring pixels (about 0.5 for 8x8 digits, typically above 0.8 for
photographs, 0 for noise), and :func:`lacks_structure` flags images whose score is more than
``threshold`` robust standard deviations (1.4826 x MAD) *below* the pool's median: noise,
salt-and-pepper damage, blank frames. It is one-sided and relative to the pool, so a dataset of
smooth or textured images sets its own scale; it costs one streamed pass over the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skmm_pipeline.core.validation import InputError, check_float, check_int

CHUNK = 1 << 15


@dataclass(frozen=True)
class GuardResult:
    keep: np.ndarray  # (N,) bool: rows that may be selected
    scores: np.ndarray  # (N,) float64 ridge Mahalanobis distances of the last pass
    cutoff: float  # threshold * median(scores)

    @property
    def excluded(self) -> int:
        return int((~self.keep).sum())

    def diagnostics(self) -> dict:
        return {"outliers_excluded": self.excluded, "outlier_cutoff": self.cutoff,
                "outlier_score_median": float(np.median(self.scores))}


def _moments(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = X.shape[1]
    s, S = np.zeros(m), np.zeros((m, m))
    for a in range(0, rows.size, CHUNK):
        B = np.asarray(X[rows[a : a + CHUNK]], dtype=np.float64)
        s += B.sum(0)
        S += B.T @ B
    mu = s / rows.size
    return mu, S / rows.size - np.outer(mu, mu)


def _scores(X: np.ndarray, mu: np.ndarray, P: np.ndarray) -> np.ndarray:
    out = np.empty(X.shape[0])
    for a in range(0, X.shape[0], CHUNK):
        B = np.asarray(X[a : a + CHUNK], dtype=np.float64) - mu
        out[a : a + CHUNK] = np.einsum("ij,ij->i", B @ P, B)
    return out


def spatial_structure(images, chunk_elems: int = 1 << 24) -> np.ndarray:
    """Per image (``images``: N x C x H x W, any float/int dtype, memory-mapped is fine): the Pearson
    correlation of horizontally adjacent pixels averaged with that of vertically adjacent ones, each
    channel centred on its own mean and the channels pooled. A constant image scores 0 (it has no
    structure). Streamed in chunks of about ``chunk_elems`` values; float64 accumulation."""
    if getattr(images, "ndim", None) != 4:
        raise InputError(f"images must be an N x C x H x W array, got shape {getattr(images, 'shape', None)}")
    N, C, H, W = images.shape
    if H < 2 and W < 2:
        raise InputError(f"images of {H}x{W} pixels have no neighbouring pixels to correlate")
    step = max(1, int(chunk_elems) // max(1, C * H * W))
    out = np.empty(N)

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=(2, 3), keepdims=True)
        b = b - b.mean(axis=(2, 3), keepdims=True)
        den = np.sqrt((a * a).sum(axis=(1, 2, 3)) * (b * b).sum(axis=(1, 2, 3)))
        num = (a * b).sum(axis=(1, 2, 3))
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    for lo in range(0, N, step):
        x = np.asarray(images[lo : lo + step], dtype=np.float64)
        if not np.isfinite(x).all():
            raise InputError(f"images {lo}..{lo + len(x) - 1} contain NaN or inf")
        parts = []
        if W > 1:
            parts.append(corr(x[..., :, 1:], x[..., :, :-1]))
        if H > 1:
            parts.append(corr(x[..., 1:, :], x[..., :-1, :]))
        out[lo : lo + len(x)] = sum(parts) / len(parts)
    return out


def lacks_structure(scores, threshold: float = 4.0) -> np.ndarray:
    """Flags (N bool) images whose :func:`spatial_structure` score lies more than ``threshold`` robust
    standard deviations below the median of ``scores``. Nothing is flagged when the scores do not vary."""
    threshold = check_float(threshold, "structure threshold (robust standard deviations)", positive=True)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise InputError("structure scores must be a finite 1-D array")
    med = float(np.median(s))
    spread = 1.4826 * float(np.median(np.abs(s - med)))
    if spread <= 0:
        return np.zeros(s.shape, dtype=bool)
    return (med - s) > threshold * spread


def outlier_guard(X, n: int | None = None, *, threshold: float = 3.0, ridge: float = 0.01, iterations: int = 3) -> GuardResult:
    """Rows of ``X`` (N x m) that may be selected. At least ``n`` rows are always kept (the ``n`` with
    the lowest scores if the rule would keep fewer), so a budget stays satisfiable."""
    threshold = check_float(threshold, "outlier threshold")
    if not threshold > 1:
        raise InputError(f"outlier threshold must be a number > 1 (a multiple of the median score), got {threshold!r}")
    ridge = check_float(ridge, "outlier ridge", positive=True)
    iterations = check_int(iterations, "outlier iterations", minimum=1)
    N = X.shape[0]
    keep = np.ones(N, dtype=bool)
    scores, cutoff = np.zeros(N), float("inf")
    for _ in range(iterations):
        mu, C = _moments(X, np.flatnonzero(keep))
        w, V = np.linalg.eigh(C)
        top = float(w[-1])
        if top <= 0:  # all kept rows are equal: nothing sticks out
            return GuardResult(np.ones(N, dtype=bool), np.zeros(N), float("inf"))
        P = (V / (np.maximum(w, 0) + ridge * top)) @ V.T
        scores = _scores(X, mu, P)
        cutoff = float(threshold * np.median(scores))
        new = scores <= cutoff
        if n is not None and new.sum() < n:
            new = np.zeros(N, dtype=bool)
            new[np.argsort(scores, kind="stable")[:n]] = True
        if np.array_equal(new, keep):
            break
        keep = new
    return GuardResult(keep, scores, cutoff)
