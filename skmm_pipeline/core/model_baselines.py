"""Model-based selection baselines (the DeepCore set the SkMM paper compares with), on frozen features.

Interface
---------
Every method here takes ``X`` = the pool's frozen penultimate features (N x d, e.g. the standardised
output of :func:`skmm_pipeline.models.small_cnn.extract_features`) and **requires** ``labels`` (N,).
The classes are the distinct label values, mapped in sorted order to ``0..K-1``; at least two are
needed. Before scoring, a seeded *proxy* softmax linear head ``z = W x + b`` is trained on
``(X, labels)``: this is DeepCore's protocol of training the model on the full pool for a few epochs
before scoring, applied to the head on top of the pretrained, frozen body (DeepCore trains a randomly
initialised network from scratch; the research code's baselines did the same).

Proxy training (:func:`fit_proxy_head`): cross-entropy, minibatch SGD with Nesterov momentum 0.9,
weight decay on ``W`` and ``b``, a cosine-annealed step size over all steps (DeepCore's selection
optimiser), ``epochs`` passes over the pool in seeded random minibatches of ``batch_size``, weights
initialised like ``torch.nn.Linear`` from the seed. ``lr="auto"`` is ``1 / lambda_max(E[x~ x~^T])``
with ``x~ = [x, 1]``: a stable step on any feature scale (the cross-entropy Hessian is at most half
that second moment). Everything runs in float64 on the CPU and is a deterministic function of the
seed. Options shared by all methods (defaults): ``epochs=10`` (``forgetting``: 20), ``lr="auto"``,
``weight_decay=5e-4``, ``batch_size=128``, and ``balance``: with ``balance=True`` (the default of the
registered methods, as in DeepCore; the functions here default to ``False``) the budget is split over
the classes in proportion to their sizes (largest remainder, at least one per class) and each class
gets its own top scores / its own greedy run. Without it, the most uncertain / highest-scored samples
of a small budget often come from one or two confused classes, and a head trained on them is near
chance (digits benchmark: 15-25% at n = 10 against 67% for class-balanced uniform) (the
selection API's ``class_balanced=True`` cannot be used with these methods: it runs the method inside a
single class, where no classifier can be trained).

Pool-wide passes go through chunks of rows; nothing of size N x N (or N x K x d) is ever formed.
Every method returns exactly ``n`` distinct indices in selection order; score ties are broken by a
seeded random order.

Methods
-------
* ``entropy`` / ``least-confidence`` / ``margin`` (uncertainty sampling, Settles 2009): the ``n`` most
  uncertain samples under the proxy's probabilities ``p``: largest entropy ``-sum_k p_k log p_k``,
  largest ``1 - max_k p_k``, smallest margin ``p_(1) - p_(2)`` (top two probabilities). *DeepCore
  differs*: it keeps the largest of the scores ``sum_k p_k log p_k`` (entropy) and ``p_(1) - p_(2)``
  (margin), i.e. the most *confident* samples, and its least confidence uses the largest *logit*
  instead of the largest probability.
* ``grand`` (GraNd, Paul, Ganguli & Dziugaite 2021): the expected norm of the per-sample loss gradient,
  averaged over ``repeats`` independently seeded proxy trainings; the largest are kept. For the linear
  softmax head the gradient of the cross-entropy w.r.t. ``(W, b)`` is ``(p - e_y) x~^T``, so the norm
  is ``||p - e_y||_2 sqrt(||x||^2 + 1)`` in closed form. The paper takes the gradient of all network
  parameters near initialisation; here the head is the only trainable part (use ``epochs=0`` for the
  at-initialisation score). DeepCore applies the cross-entropy to ``softmax(z)`` (a second softmax)
  and reseeds its repeats from the clock; neither is done here.
* ``el2n`` (EL2N, same paper): ``||p - e_y||_2`` averaged over ``repeats`` seeded trainings; largest kept.
* ``forgetting`` (Toneva et al. 2019): each sample's prediction is recorded every time it is presented
  in a minibatch (the forward pass of that training step, before the update); a forgetting event is a
  transition from correct to misclassified between consecutive presentations. Samples never
  classified correctly count as forgotten infinitely often (the paper's convention). The highest
  counts are kept, ties in seeded random order. DeepCore's counter never increments (it adds into a
  copy made by advanced indexing) and it does not single out never-learned samples.
* ``glister`` (GLISTER-ONLINE, Killamsetty et al. 2021): greedy maximisation of the validation
  log-likelihood with the first-order Taylor approximation. Starting from the proxy's parameters
  ``theta_0``, step ``t`` adds the unselected ``e`` maximising ``eta <grad L_T(e; theta_t),
  grad L_V(theta_t)>`` (the predicted increase of the validation log-likelihood after one SGD step on
  ``e``), then updates ``theta_{t+1} = theta_t - eta grad L_T(e; theta_t)``. The validation set is
  ``val_X``/``val_labels`` (features of the same body, labels among the pool's classes), by default the
  pool itself, as in DeepCore. ``eta="auto"`` is ``lr / n``, so the ``n`` incremental steps add up to
  one proxy-learning-rate step on the subset's mean loss (the scale of DeepCore's update, which moves by
  ``lr`` along the *mean* selected gradient). Gradients are those of the head, in closed form, and the
  pool and validation logits are kept current with rank-one updates; each pick costs
  ``O((N + N_val) K d)`` in row chunks. DeepCore keeps the training gradients at ``theta_0``, uses a
  second softmax in the loss, a lazy greedy (exact only for submodular gains, which these are not) and
  class balance by default; GLISTER's optional diversity regulariser is not used.
* ``deepfool`` (Ducoffe & Precioso 2018, DeepFool of Moosavi-Dezfooli et al. 2016): the samples closest
  to the decision boundary are kept. For the affine head DeepFool converges in one step to the exact
  minimal perturbation ``min_{k != pred} |z_pred - z_k| / ||w_pred - w_k||``, computed in closed form (in
  feature space: the body is frozen). DeepCore runs the iterative attack on the input pixels through
  the whole network and ranks by the squared perturbation norm (the same order).
* ``contextual-diversity`` (Agarwal, Arora, Anand & Arora 2020, CDAL-CS): k-center greedy (random
  seeded first center, then farthest-first) under the pairwise contextual-diversity distance
  ``d(i, j) = 1/2 KL(P_i || P_j) + 1/2 KL(P_j || P_i)``. In the paper ``P^c_I`` is the class-specific
  confusion of image ``I``: the entropy-weighted mean ``sum_r w_r P_r / sum_r w_r`` (``w_r`` = entropy
  of ``P_r``) of the softmax vectors of the regions predicted as ``c``, and ``d`` sums the symmetrised
  KL over classes. In classification a sample is a single region, so the weights cancel and ``P^c_I`` is
  the sample's own softmax vector ``P_i``, present only for its predicted class. Simplification (as in
  DeepCore): the confusion vectors are compared whatever the predicted classes; the paper's term for a
  class present in only one of the two samples is undefined, and the official code's choice (drop it)
  would give distance 0 between samples predicted differently, under which k-center never leaves the
  first center's class. ``covering_radius`` reports the largest distance to the nearest center.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from skmm_pipeline.core.budgets import class_budgets
from skmm_pipeline.core.validation import InputError, as_finite_matrix

CHUNK_ROWS = 1 << 14
MOMENTUM = 0.9
DEFAULT_EPOCHS = 10
DEFAULT_FORGETTING_EPOCHS = 20
DEFAULT_LR = "auto"
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_BATCH_SIZE = 128
DEFAULT_REPEATS = 10
_DT = torch.float64

UNCERTAINTY_KINDS = ("entropy", "least-confidence", "margin")


def _chunks(N: int, rows: int = CHUNK_ROWS):
    for lo in range(0, N, rows):
        yield lo, min(N, lo + rows)


def _block(X, lo: int, hi: int) -> np.ndarray:
    return np.asarray(X[lo:hi], dtype=np.float64)


def repeat_seed(seed: int, *tags: int) -> int:
    return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def encode_labels(labels, N: int, method: str = "this method") -> tuple[np.ndarray, np.ndarray]:
    """``(classes, y)``: the sorted distinct labels and each row's class index; at least two classes."""
    if labels is None:
        raise InputError(
            f"{method} needs labels: it trains a proxy classifier on (features, labels) before scoring"
        )
    lab = np.asarray(labels)
    if lab.shape != (N,):
        raise InputError(f"labels must have shape ({N},), got {lab.shape}")
    if lab.dtype.kind == "f" and not np.isfinite(lab).all():
        raise InputError(f"labels have non-finite values, first at row {int(np.flatnonzero(~np.isfinite(lab))[0])}")
    try:
        classes, y = np.unique(lab, return_inverse=True)
    except TypeError as exc:
        raise InputError(f"labels must be mutually comparable values: {exc}") from None
    if classes.size < 2:
        raise InputError(
            f"{method} needs at least two classes in labels, got only {classes[0]!r}"
            " (for per-class budgets use the method's balance=True, not class_balanced=True)"
        )
    return classes, y.reshape(-1).astype(np.int64)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_positive(name: str, value, allow_auto: bool = True, allow_zero: bool = False):
    if allow_auto and isinstance(value, str) and value == "auto":
        return "auto"
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "a non-negative number" if allow_zero else "a positive number"
        if allow_auto:
            what += ' or "auto"'
        raise InputError(f"{name} must be {what}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = DEFAULT_EPOCHS
    lr: float | str = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    batch_size: int = DEFAULT_BATCH_SIZE

    def checked(self, min_epochs: int = 0) -> "TrainOptions":
        return TrainOptions(
            epochs=_check_int("epochs", self.epochs, min_epochs),
            lr=_check_positive("lr", self.lr),
            weight_decay=_check_positive("weight_decay", self.weight_decay, allow_auto=False, allow_zero=True),
            batch_size=_check_int("batch_size", self.batch_size, 1),
        )


# --------------------------------------------------------------------------------------------------
# The proxy head
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyHead:
    """A trained softmax linear head ``z = W x + b`` over ``classes`` (row k of W is class ``classes[k]``)."""

    W: np.ndarray  # K x d
    b: np.ndarray  # K
    classes: np.ndarray
    lr: float
    epochs: int
    train_accuracy: float
    train_loss: float

    def logits(self, X) -> np.ndarray:
        X = np.asarray(X)
        Z = np.empty((X.shape[0], self.W.shape[0]))
        for lo, hi in _chunks(X.shape[0]):
            Z[lo:hi] = _block(X, lo, hi) @ self.W.T + self.b
        return Z

    def log_probs(self, X) -> np.ndarray:
        return _log_softmax(self.logits(X))

    def probs(self, X) -> np.ndarray:
        return np.exp(self.log_probs(X))


def _log_softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))


def auto_lr(X) -> float:
    """``1 / lambda_max(E[x~ x~^T])`` with ``x~ = [x, 1]`` (a (d+1) x (d+1) moment, accumulated in chunks)."""
    X = np.asarray(X)
    N, d = X.shape
    M = np.zeros((d + 1, d + 1))
    for lo, hi in _chunks(N):
        B = _block(X, lo, hi)
        M[:d, :d] += B.T @ B
        s = B.sum(axis=0)
        M[:d, d] += s
        M[d, :d] += s
    M[d, d] = N
    lam = float(np.linalg.eigvalsh(M / N)[-1])
    return 1.0 / lam


def _fit(
    X,
    y: np.ndarray,
    K: int,
    classes: np.ndarray,
    seed: int,
    opts: TrainOptions,
    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> ProxyHead:
    X = np.asarray(X)
    N, d = X.shape
    lr = auto_lr(X) if opts.lr == "auto" else float(opts.lr)
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(d)
    W = (torch.rand(K, d, generator=gen, dtype=_DT) * 2 - 1) * bound
    b = (torch.rand(K, generator=gen, dtype=_DT) * 2 - 1) * bound
    # SGD with Nesterov momentum and weight decay, as torch.optim.SGD defines them, on the closed-form
    # cross-entropy gradient of the affine head (d loss / d z = (softmax(z) - e_y) / batch).
    bufW = bufb = None
    eye = torch.eye(K, dtype=_DT)
    yt = torch.as_tensor(y)
    total = opts.epochs * math.ceil(N / opts.batch_size)
    step = 0
    for _ in range(opts.epochs):
        perm = torch.randperm(N, generator=gen).numpy()
        for lo in range(0, N, opts.batch_size):
            idx = perm[lo : lo + opts.batch_size]
            xb = torch.as_tensor(np.asarray(X[idx], dtype=np.float64))
            z = xb @ W.T + b
            if on_batch is not None:
                on_batch(idx, z.numpy())
            dz = (torch.softmax(z, dim=1) - eye[yt[idx]]) / idx.size
            gW = dz.T @ xb + opts.weight_decay * W
            gb = dz.sum(dim=0) + opts.weight_decay * b
            bufW = gW.clone() if bufW is None else bufW.mul_(MOMENTUM).add_(gW)
            bufb = gb.clone() if bufb is None else bufb.mul_(MOMENTUM).add_(gb)
            rate = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            W = W - rate * (gW + MOMENTUM * bufW)
            b = b - rate * (gb + MOMENTUM * bufb)
            step += 1
    head = ProxyHead(W.numpy().copy(), b.numpy().copy(), classes, lr, opts.epochs, float("nan"), float("nan"))
    logp = head.log_probs(X)
    acc = float(np.mean(np.argmax(logp, axis=1) == y))
    loss = float(-np.mean(logp[np.arange(N), y]))
    return ProxyHead(head.W, head.b, classes, lr, opts.epochs, acc, loss)


def fit_proxy_head(
    X,
    labels,
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    lr: float | str = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ProxyHead:
    """Train the seeded proxy softmax head on ``(X, labels)`` (see the module docstring)."""
    X = as_finite_matrix(X, "X")
    classes, y = encode_labels(labels, X.shape[0], "fit_proxy_head")
    opts = TrainOptions(epochs, lr, weight_decay, batch_size).checked()
    return _fit(X, y, classes.size, classes, seed, opts)


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
    return _gradient_norm_scores(X, y, classes, seed, _check_int("repeats", repeats, 1), opts)


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


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def _top(scores: np.ndarray, n: int, rng: np.random.Generator, largest: bool) -> np.ndarray:
    """The ``n`` best rows (largest or smallest score), ties in seeded random order; best first."""
    key = rng.random(scores.size)
    order = np.lexsort((key, -scores if largest else scores))
    return order[:n].astype(np.int64)


def _select_by_scores(scores, n, rng, largest, y, balance) -> np.ndarray:
    if not balance:
        return _top(scores, n, rng, largest)
    parts = []
    for c, b in class_budgets(y, n).items():
        if b:
            rows = np.flatnonzero(y == c)
            parts.append(rows[_top(scores[rows], b, rng, largest)])
    return np.concatenate(parts)


def _summary(scores: np.ndarray, idx: np.ndarray, name: str) -> dict:
    fin = scores[np.isfinite(scores)]
    sel = scores[idx]
    sel = sel[np.isfinite(sel)]
    nan = float("nan")
    return {
        "score": name,
        "score_min": float(fin.min()) if fin.size else nan,
        "score_max": float(fin.max()) if fin.size else nan,
        "score_mean": float(fin.mean()) if fin.size else nan,
        "selected_score_min": float(sel.min()) if sel.size else nan,
        "selected_score_max": float(sel.max()) if sel.size else nan,
    }


def _head_diag(head: ProxyHead) -> dict:
    return {"train_accuracy": head.train_accuracy, "train_loss": head.train_loss, "epochs": head.epochs,
            "lr": head.lr, "classes": int(head.classes.size)}


def _prepare(X, labels, method, train, min_epochs=0):
    X = np.asarray(X)
    classes, y = encode_labels(labels, X.shape[0], method)
    opts = TrainOptions(**train).checked(min_epochs)
    return X, classes, y, opts


def select_uncertainty(X, n, labels, *, kind, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, kind, train)
    if kind not in UNCERTAINTY_KINDS:
        raise InputError(f"unknown uncertainty kind {kind!r}; available: {list(UNCERTAINTY_KINDS)}")
    head = _fit(X, y, classes.size, classes, seed, opts)
    s = uncertainty_scores(head.probs(X), kind)
    idx = _select_by_scores(s, n, np.random.default_rng([seed, 1]), kind != "margin", y, balance)
    return idx, {**_summary(s, idx, kind), **_head_diag(head), "balance": bool(balance)}


def select_gradient_norm(X, n, labels, *, score, seed=0, repeats=DEFAULT_REPEATS, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, score, train)
    out = _gradient_norm_scores(X, y, classes, seed, _check_int("repeats", repeats, 1), opts)
    s = out[score]
    idx = _select_by_scores(s, n, np.random.default_rng([seed, 2]), True, y, balance)
    return idx, {**_summary(s, idx, score), "train_accuracy": out["train_accuracy"], "epochs": opts.epochs,
                 "lr": out["lr"], "repeats": int(repeats), "balance": bool(balance)}


def select_forgetting(X, n, labels, *, seed=0, balance=False, **train):
    train.setdefault("epochs", DEFAULT_FORGETTING_EPOCHS)
    X, classes, y, opts = _prepare(X, labels, "forgetting", train, min_epochs=1)
    counts, head = _forgetting_scores(X, y, classes, seed, opts)
    idx = _select_by_scores(counts, n, np.random.default_rng([seed, 3]), True, y, balance)
    never = ~np.isfinite(counts)
    return idx, {**_summary(counts, idx, "forgetting_events"), **_head_diag(head),
                 "never_learned": int(never.sum()), "selected_never_learned": int(never[idx].sum()),
                 "balance": bool(balance)}


def select_deepfool(X, n, labels, *, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "deepfool", train)
    head = _fit(X, y, classes.size, classes, seed, opts)
    dist = deepfool_distances(X, head)
    idx = _select_by_scores(dist, n, np.random.default_rng([seed, 4]), False, y, balance)
    return idx, {**_summary(dist, idx, "boundary_distance"), **_head_diag(head), "balance": bool(balance)}


def select_contextual_diversity(X, n, labels, *, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "contextual-diversity", train)
    head = _fit(X, y, classes.size, classes, seed, opts)
    logP = head.log_probs(X)
    rng = np.random.default_rng([seed, 5])
    if not balance:
        idx, diag = contextual_diversity_kcenter(logP, n, rng)
    else:
        parts, radius = [], 0.0
        for c, b in class_budgets(y, n).items():
            if b:
                rows = np.flatnonzero(y == c)
                sub, d = contextual_diversity_kcenter(logP[rows], b, rng)
                parts.append(rows[sub])
                radius = max(radius, d["covering_radius"])
        idx, diag = np.concatenate(parts), {"covering_radius": radius}
    return idx, {**diag, **_head_diag(head), "balance": bool(balance)}


def select_glister(X, n, labels, *, seed=0, val_X=None, val_labels=None, eta="auto", balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "glister", train)
    eta = _check_positive("eta", eta)
    XV = yV = None
    if (val_X is None) != (val_labels is None):
        raise InputError("glister needs both val_X and val_labels (or neither: the pool is the validation set)")
    if val_X is not None:
        XV = as_finite_matrix(val_X, "val_X")
        if XV.shape[1] != X.shape[1]:
            raise InputError(f"val_X must have {X.shape[1]} columns like X, got {XV.shape[1]}")
        vl = np.asarray(val_labels)
        if vl.shape != (XV.shape[0],):
            raise InputError(f"val_labels must have shape ({XV.shape[0]},), got {vl.shape}")
        try:
            pos = np.minimum(np.searchsorted(classes, vl), classes.size - 1)
            unknown = np.asarray(classes[pos] != vl, dtype=bool)
        except TypeError as exc:
            raise InputError(f"val_labels are not comparable with the pool's labels: {exc}") from None
        if unknown.any():
            first = vl[np.flatnonzero(unknown)[0]]
            raise InputError(f"val_labels has labels not in the pool's classes, first {first!r}")
        yV = pos.astype(np.int64)
    head = _fit(X, y, classes.size, classes, seed, opts)
    step = head.lr / n if eta == "auto" else eta
    if not balance:
        idx, diag = glister_greedy(X, y, head, n, step, XV, yV)
    else:
        parts, diag = [], {"eta": step}
        for c, b in class_budgets(y, n).items():
            if b:
                rows = np.flatnonzero(y == c)
                if XV is None:
                    sub, _ = glister_greedy(X, y, head, b, step, candidates=rows)
                else:
                    vrows = np.flatnonzero(yV == c)
                    vX, vy = (XV[vrows], yV[vrows]) if vrows.size else (XV, yV)
                    sub, _ = glister_greedy(X, y, head, b, step, vX, vy, candidates=rows)
                parts.append(sub)
        idx = np.concatenate(parts)
    return idx, {**diag, **_head_diag(head), "validation": "pool" if XV is None else "given",
                 "balance": bool(balance)}
