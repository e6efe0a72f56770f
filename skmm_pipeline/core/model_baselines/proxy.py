"""The seeded proxy softmax head trained on (frozen features, labels) before any model-based score.

See the package docstring for the training protocol (SGD with Nesterov momentum, cosine step size,
``lr="auto"``) and the options shared by every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from skmm_pipeline.core.validation import (
    InputError,
    as_finite_matrix,
    check_float,
    check_int,
)

CHUNK_ROWS = 1 << 14
MOMENTUM = 0.9
DEFAULT_EPOCHS = 10
DEFAULT_FORGETTING_EPOCHS = 20
DEFAULT_LR = "auto"
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_BATCH_SIZE = 128
DEFAULT_REPEATS = 10
_DT = torch.float64


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


def _rate(name: str, value):
    """A positive step size, or ``"auto"``."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    return check_float(value, name, positive=True)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = DEFAULT_EPOCHS
    lr: float | str = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    batch_size: int = DEFAULT_BATCH_SIZE

    def checked(self, min_epochs: int = 0) -> "TrainOptions":
        return TrainOptions(
            epochs=check_int(self.epochs, "epochs", minimum=min_epochs),
            lr=_rate("lr", self.lr),
            weight_decay=check_float(self.weight_decay, "weight_decay", minimum=0),
            batch_size=check_int(self.batch_size, "batch_size", minimum=1),
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
