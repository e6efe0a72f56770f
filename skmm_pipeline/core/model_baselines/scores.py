"""Per-sample scores of the model-based baselines under a trained proxy head, and GLISTER's greedy.

Uncertainty, GraNd/EL2N, forgetting events, DeepFool boundary distances, the contextual-diversity
k-center and GLISTER-ONLINE; the package docstring defines each one and how it differs from DeepCore.
"""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.model_baselines.proxy import (
    DEFAULT_FORGETTING_EPOCHS,
    DEFAULT_REPEATS,
    ProxyHead,
    TrainOptions,
    _block,
    _chunks,
    _fit,
    _log_softmax,
    encode_labels,
    repeat_seed,
)
from skmm_pipeline.core.validation import InputError, as_finite_matrix, check_int

UNCERTAINTY_KINDS = ("entropy", "least-confidence", "margin")


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def uncertainty_scores(P: np.ndarray, kind: str) -> np.ndarray:
    """Entropy ``-sum p log p``, least confidence ``1 - max p`` or margin ``p_(1) - p_(2)`` per row of ``P``."""
    P = np.asarray(P, dtype=np.float64)
    if kind == "entropy":
        safe = np.where(P > 0, P, 1.0)
        return -np.sum(np.where(P > 0, P * np.log(safe), 0.0), axis=1)
    if kind == "least-confidence":
        return 1.0 - P.max(axis=1)
    if kind == "margin":
        top2 = np.partition(P, P.shape[1] - 2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    raise InputError(f"unknown uncertainty kind {kind!r}; available: {list(UNCERTAINTY_KINDS)}")


def _residual_norms(X, head: ProxyHead, y: np.ndarray) -> np.ndarray:
    """``||softmax(z_i) - e_{y_i}||_2`` per row, in chunks."""
    X = np.asarray(X)
    out = np.empty(X.shape[0])
    for lo, hi in _chunks(X.shape[0]):
        R = np.exp(_log_softmax(_block(X, lo, hi) @ head.W.T + head.b))
        R[np.arange(hi - lo), y[lo:hi]] -= 1.0
        out[lo:hi] = np.linalg.norm(R, axis=1)
    return out


def _row_sq_norms(X) -> np.ndarray:
    X = np.asarray(X)
    out = np.empty(X.shape[0])
    for lo, hi in _chunks(X.shape[0]):
        B = _block(X, lo, hi)
        out[lo:hi] = np.einsum("ij,ij->i", B, B)
    return out


def _gradient_norm_scores(X, y, classes, seed: int, repeats: int, opts: TrainOptions) -> dict:
    el2n = np.zeros(X.shape[0])
    accs = []
    for r in range(repeats):
        head = _fit(X, y, classes.size, classes, repeat_seed(seed, r), opts)
        el2n += _residual_norms(X, head, y)
        accs.append(head.train_accuracy)
    el2n /= repeats
    grand = el2n * np.sqrt(_row_sq_norms(X) + 1.0)
    return {"grand": grand, "el2n": el2n, "train_accuracy": float(np.mean(accs)), "lr": head.lr}


def gradient_norm_scores(X, labels, *, seed: int = 0, repeats: int = DEFAULT_REPEATS, **train) -> dict:
    """GraNd and EL2N scores averaged over ``repeats`` seeded proxy trainings.

    Returns ``{"grand", "el2n", "train_accuracy", "lr"}``; repeat ``r`` trains with the seed derived
    from ``(seed, r)``.
    """
    X = as_finite_matrix(X, "X")
    classes, y = encode_labels(labels, X.shape[0], "GraNd/EL2N")
    opts = TrainOptions(**train).checked()
    return _gradient_norm_scores(X, y, classes, seed, check_int(repeats, "repeats", minimum=1), opts)


class ForgettingTracker:
    """Counts correct -> misclassified transitions between consecutive presentations of each sample."""

    def __init__(self, N: int):
        self.last = np.zeros(N, dtype=bool)  # correct at the previous presentation (False before the first)
        self.learned = np.zeros(N, dtype=bool)
        self.events = np.zeros(N, dtype=np.int64)
        self.presentations = np.zeros(N, dtype=np.int64)

    def update(self, idx: np.ndarray, correct: np.ndarray) -> None:
        idx = np.asarray(idx)
        correct = np.asarray(correct, dtype=bool)
        self.events[idx] += self.last[idx] & ~correct
        self.last[idx] = correct
        self.learned[idx] |= correct
        self.presentations[idx] += 1

    def counts(self) -> np.ndarray:
        """Forgetting events per sample; ``inf`` for samples never classified correctly."""
        c = self.events.astype(np.float64)
        c[~self.learned] = np.inf
        return c


def forgetting_counts(correct) -> np.ndarray:
    """Forgetting events from a (presentations x N) boolean sequence of correctness flags."""
    seq = np.asarray(correct, dtype=bool)
    if seq.ndim != 2:
        raise InputError(f"correctness flags must be a 2-D (presentations x samples) array, got shape {seq.shape}")
    tracker = ForgettingTracker(seq.shape[1])
    every = np.arange(seq.shape[1])
    for row in seq:
        tracker.update(every, row)
    return tracker.counts()


def _forgetting_scores(X, y, classes, seed: int, opts: TrainOptions) -> tuple[np.ndarray, ProxyHead]:
    tracker = ForgettingTracker(X.shape[0])
    head = _fit(X, y, classes.size, classes, seed, opts,
                on_batch=lambda idx, z: tracker.update(idx, np.argmax(z, axis=1) == y[idx]))
    return tracker.counts(), head


def forgetting_scores(X, labels, *, seed: int = 0, **train) -> tuple[np.ndarray, ProxyHead]:
    """Forgetting counts recorded while training the proxy head (``inf`` = never learned)."""
    X = as_finite_matrix(X, "X")
    classes, y = encode_labels(labels, X.shape[0], "forgetting")
    train.setdefault("epochs", DEFAULT_FORGETTING_EPOCHS)
    return _forgetting_scores(X, y, classes, seed, TrainOptions(**train).checked(min_epochs=1))


def deepfool_distances(X, head: ProxyHead) -> np.ndarray:
    """Exact distance (in feature space) to the head's decision boundary: ``min_k |z_p - z_k| / ||w_p - w_k||``."""
    W = head.W
    sq = np.einsum("ij,ij->i", W, W)
    D2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (W @ W.T), 0.0)  # K x K: ||w_j - w_k||^2
    X = np.asarray(X)
    out = np.empty(X.shape[0])
    for lo, hi in _chunks(X.shape[0]):
        Z = _block(X, lo, hi) @ W.T + head.b
        rows = np.arange(hi - lo)
        p = np.argmax(Z, axis=1)
        gap = Z[rows, p][:, None] - Z
        norm = np.sqrt(D2[p])
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = np.where(norm > 0, gap / np.where(norm > 0, norm, 1.0), np.inf)
        dist[rows, p] = np.inf
        out[lo:hi] = dist.min(axis=1)
    return out


def symmetric_kl_to(
    logP: np.ndarray, P: np.ndarray, negent: np.ndarray, c: int, lo: int = 0, hi: int | None = None
) -> np.ndarray:
    """``1/2 KL(P_i || P_c) + 1/2 KL(P_c || P_i)`` for rows ``lo:hi`` (``negent`` = ``sum_k P log P``)."""
    hi = P.shape[0] if hi is None else hi
    d = 0.5 * (negent[lo:hi] + negent[c] - P[lo:hi] @ logP[c] - logP[lo:hi] @ P[c])
    return np.maximum(d, 0.0)


def contextual_diversity_kcenter(logP: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """k-center greedy under the symmetrised-KL contextual-diversity distance; one N-vector of distances."""
    P = np.exp(logP)
    N = P.shape[0]
    negent = np.einsum("ij,ij->i", P, logP)
    chosen = np.empty(n, dtype=np.int64)
    mind = np.full(N, np.inf)
    j = int(rng.integers(N))
    for t in range(n):
        chosen[t] = j
        for lo, hi in _chunks(N):
            np.minimum(mind[lo:hi], symmetric_kl_to(logP, P, negent, j, lo, hi), out=mind[lo:hi])
        mind[chosen[: t + 1]] = -1.0
        j = int(np.argmax(mind))
    return chosen, {"covering_radius": float(max(mind.max(), 0.0))}


# --------------------------------------------------------------------------------------------------
# GLISTER
# --------------------------------------------------------------------------------------------------


def _tilde(B: np.ndarray) -> np.ndarray:
    return np.hstack([B, np.ones((B.shape[0], 1))])


def _val_gradient(XV, yV: np.ndarray, ZV: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean cross-entropy gradient w.r.t. ``[W, b]`` (K x (d+1)) and the mean log-likelihood."""
    NV = ZV.shape[0]
    G = np.zeros((ZV.shape[1], np.asarray(XV).shape[1] + 1))
    ll = 0.0
    for lo, hi in _chunks(NV):
        logp = _log_softmax(ZV[lo:hi])
        rows = np.arange(hi - lo)
        ll += float(logp[rows, yV[lo:hi]].sum())
        R = np.exp(logp)
        R[rows, yV[lo:hi]] -= 1.0
        G += R.T @ _tilde(_block(XV, lo, hi))
    return G / NV, ll / NV


def glister_greedy(
    X,
    y: np.ndarray,
    head: ProxyHead,
    n: int,
    eta: float,
    XV=None,
    yV: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """GLISTER-ONLINE greedy over ``candidates`` (default: all rows) with incremental head updates."""
    X = np.asarray(X)
    same = XV is None
    if candidates is None:
        rows, Xc, yc = np.arange(X.shape[0]), X, y
    else:
        rows = np.asarray(candidates)
        Xc, yc = X[rows], y[rows]
    Z = head.logits(Xc)
    if same:
        XV, yV, ZV = Xc, yc, Z
    else:
        ZV = head.logits(XV)
    Nc = Xc.shape[0]
    taken = np.zeros(Nc, dtype=bool)
    chosen = np.empty(n, dtype=np.int64)
    gains = np.empty(Nc)
    first_gain = last_gain = float("nan")
    ll0 = None
    for t in range(n):
        GV, ll = _val_gradient(XV, yV, ZV)
        if ll0 is None:
            ll0 = ll
        for lo, hi in _chunks(Nc):
            R = np.exp(_log_softmax(Z[lo:hi]))
            R[np.arange(hi - lo), yc[lo:hi]] -= 1.0
            gains[lo:hi] = eta * np.einsum("ik,ik->i", R, _tilde(_block(Xc, lo, hi)) @ GV.T)
        gains[taken] = -np.inf
        e = int(np.argmax(gains))
        if t == 0:
            first_gain = float(gains[e])
        last_gain = float(gains[e])
        chosen[t] = e
        taken[e] = True
        # theta <- theta - eta * r_e x~_e^T, so every logit row moves by -eta (x~_i . x~_e) r_e.
        r_e = np.exp(_log_softmax(Z[e : e + 1]))[0]
        r_e[yc[e]] -= 1.0
        xe = np.append(Xc[e].astype(np.float64), 1.0)
        for lo, hi in _chunks(Nc):
            Z[lo:hi] -= eta * np.outer(_tilde(_block(Xc, lo, hi)) @ xe, r_e)
        if not same:
            for lo, hi in _chunks(ZV.shape[0]):
                ZV[lo:hi] -= eta * np.outer(_tilde(_block(XV, lo, hi)) @ xe, r_e)
    _, ll_end = _val_gradient(XV, yV, ZV)
    return rows[chosen], {
        "val_log_likelihood_start": ll0,
        "val_log_likelihood_end": ll_end,
        "first_gain": first_gain,
        "last_gain": last_gain,
        "eta": eta,
    }
