"""Label modes of the per-sample gradients: the loss gradient with respect to the logits.

The closed-form cross-entropy gradient ``softmax(z) - e_y`` (and its cancellation-free weighted form),
the rows of a linear softmax head on precomputed features (FT-1), the seeded random labels of mode
``random`` (a pure function of ``(seed, sample id, draw)``) and the fixed class-space basis of the
label-free modes. See the package docstring for the modes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.sketch import derive_seed
from skmm_pipeline.core.validation import InputError

LABEL_MODES = ("expected", "random", "true", "jacobian")


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise InputError(f"unknown label_mode {label_mode!r}; available: {list(LABEL_MODES)}")


# --------------------------------------------------------------------------------------------------
# Linear softmax head on precomputed features (the embedded pipeline's FT-1 path).


def gradient_dim(feature_dim: int, num_classes: int, label_mode: str) -> int:
    """Length of the per-sample gradient row for a linear head with ``feature_dim`` inputs (plus bias)."""
    check_label_mode(label_mode)
    return feature_dim + 1 if label_mode in ("expected", "jacobian") else num_classes * (feature_dim + 1)


def head_gradient_rows(
    features: torch.Tensor, logits: torch.Tensor, label_mode: str = "expected", labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample head gradient rows for one batch (B x gradient_dim), materialised.

    ``expected``/``jacobian``: the Jacobian rows ``x~ = [h, 1]``; ``true``: ``(softmax(z) - e_y) (x) x~``.
    ``random`` needs sample ids and lives in :class:`GradientFactorizer`.
    """
    check_label_mode(label_mode)
    if features.ndim != 2 or logits.ndim != 2 or features.shape[0] != logits.shape[0]:
        raise InputError(
            f"features (B x d) and logits (B x K) must have the same batch size, got "
            f"{tuple(features.shape)} and {tuple(logits.shape)}"
        )
    if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
        raise InputError("non-finite activations or logits (NaN or inf) in the batch")
    x_tilde = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    if label_mode in ("expected", "jacobian"):
        return x_tilde
    if label_mode == "random":
        raise InputError(
            "label_mode='random' draws labels per sample id: use core.sketch_engine.GradientSketcher "
            "with sample_ids"
        )
    delta = softmax_ce_delta(logits, _check_labels(labels, logits.shape[0], logits.shape[1], logits.device))
    return (delta[:, :, None] * x_tilde[:, None, :]).reshape(features.shape[0], -1)


def softmax_ce_delta(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of per-sample cross-entropy with respect to the logits, ``softmax(z) - e_y``."""
    onehot = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return label_weighted_delta(logits, onehot, 1.0)


def label_weighted_delta(logits: torch.Tensor, A: torch.Tensor, W) -> torch.Tensor:
    """``W p - A`` for label weights ``A`` (B x K) summing to ``W`` per row, without cancellation.

    Written as ``(W - A) p - A (1 - p)`` with ``1 - p`` of the top class computed as the mass of the
    others, ``t / (1 + t)`` with ``t = sum_{c != top} exp(z_c - z_top)``: a confident sample's gradient
    (``p_y`` within float rounding of 1) keeps its relative accuracy instead of becoming 0 or noise.
    """
    top = logits.argmax(dim=1, keepdim=True)
    e = torch.exp(logits - logits.gather(1, top))
    is_top = torch.zeros_like(e, dtype=torch.bool).scatter_(1, top, True)
    t = e.masked_fill(is_top, 0.0).sum(1, keepdim=True)
    p = e / (1 + t)
    q = torch.where(is_top, t / (1 + t), 1 - p)
    return (W - A) * p - A * q


def _check_labels(labels, B: int, K: int, device) -> torch.Tensor:
    if labels is None:
        raise InputError("label_mode='true' needs labels")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    if labels.shape != (B,) or (B and (labels.min() < 0 or labels.max() >= K)):
        raise InputError(f"labels must be a vector of {B} class indices in [0, {K}), got shape {tuple(labels.shape)}")
    return labels


# --------------------------------------------------------------------------------------------------
# Seeded random labels, a pure function of (seed, sample id, draw).

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def sample_keys(sample_ids) -> np.ndarray:
    """64-bit keys for sample ids (strings, or non-negative integers), stable across processes."""
    arr = np.asarray(sample_ids)
    if arr.ndim != 1:
        raise InputError(f"sample ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.size and arr.min() < 0:
            raise InputError("integer sample ids must be non-negative")
        with np.errstate(over="ignore"):
            return _splitmix64(arr.astype(np.uint64))
    if arr.dtype.kind not in "UO":
        raise InputError(f"sample ids must be strings or integers, got dtype {arr.dtype}")
    digests = b"".join(hashlib.blake2b(str(s).encode(), digest_size=8).digest() for s in arr.tolist())
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def draw_random_labels(keys: np.ndarray, num_classes: int, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N x draws, uniform in [0, K)) and combination signs (N x draws, first column +1)."""
    keys = np.asarray(keys, dtype=np.uint64)
    base = np.uint64(derive_seed(seed, "random-labels"))
    with np.errstate(over="ignore"):
        streams = _splitmix64((base + np.arange(draws, dtype=np.uint64)) & _M64)  # one stream per draw
        u = _splitmix64(keys[:, None] ^ streams[None, :])
        v = _splitmix64(u)
    # 53 high bits -> [0, 1) exactly in float64, then K buckets.
    labels = np.floor((u >> np.uint64(11)).astype(np.float64) * 2.0**-53 * num_classes).astype(np.int64)
    signs = np.where((v & np.uint64(1)) == 1, -1.0, 1.0)
    signs[:, 0] = 1.0
    return labels, signs


def class_probes(num_classes: int, label_mode: str, probes: int | None = None, seed: int = 0) -> torch.Tensor:
    """The class-space basis ``P`` (R x K) of the label-free modes, of unit Frobenius norm (in expectation
    when sketched).

    ``expected``: Helmert rows spanning the centred classes (``P^T P = (I - 11^T/K)/(K-1)``);
    ``jacobian``: ``I/sqrt(K)``. With ``probes`` = r below that basis' R rows, the basis is sketched
    in class space: ``S P / sqrt(r)`` with ``S`` a seeded r x R Rademacher matrix (a pure function of
    ``(seed, K, r, mode)``), so that ``E[P_r^T P_r] = P^T P`` and the rows' inner products are unbiased.
    A deep block then needs r output gradients per sample instead of R (see ``core.gradients``).
    """
    K = int(num_classes)
    if label_mode == "jacobian":
        basis = torch.eye(K, dtype=torch.float64) / math.sqrt(K)
    else:
        if K < 2:
            raise InputError(f"label_mode='expected' needs at least 2 classes, the model has {K} output(s)")
        k = torch.arange(1, K, dtype=torch.float64)[:, None]  # row k has k ones, then -k
        col = torch.arange(K, dtype=torch.float64)[None, :]
        H = torch.where(col < k, 1.0, torch.where(col == k, -k, 0.0)) / torch.sqrt(k * (k + 1))
        basis = H / math.sqrt(K - 1)
    r = probe_count(K, label_mode, probes)
    if r == basis.shape[0]:
        return basis
    rng = np.random.default_rng(derive_seed(seed, "class-probes", label_mode, K, r))
    signs = torch.as_tensor(rng.integers(0, 2, size=(r, basis.shape[0])) * 2.0 - 1.0, dtype=torch.float64)
    return signs @ basis / math.sqrt(r)


def probe_count(num_classes: int, label_mode: str, probes: int | None = None) -> int:
    """How many class-space probes a deep block of a label-free mode takes: the basis' rows (K - 1 for
    ``expected``, K for ``jacobian``), or ``probes`` when that is fewer."""
    full = int(num_classes) - 1 if label_mode == "expected" else int(num_classes)
    return full if probes is None else min(full, int(probes))
