"""Per-sample gradients of a linear softmax-cross-entropy head, label-free by default.

For a head ``z = W x~`` with ``x~ = [h, 1]`` (penultimate features plus a bias input), the per-sample
gradient of cross-entropy with label ``y`` is the outer product ``(softmax(z) - e_y) (x)  x~``; it is
never materialised for a whole dataset, only per batch, right before sketching.

Label modes:

``expected`` (default, label-free, noise-free)
    With uniformly random labels, ``E[(p - e_y)(p - e_y)^T] = (p - u)(p - u)^T + (I/K - 11^T/K^2)``;
    at a near-uniform softmax (a pretrained body with a fresh head) this is the same matrix
    ``C = I/K - 11^T/K^2`` for every sample, so the expected gradient second moment of a subset is
    ``C (x) sum_i x~_i x~_i^T``. Every moment-based criterion over subsets then depends on the samples
    only through their Jacobian rows ``x~_i``; those rows are what is sketched. A single random label
    draw per sample instead puts each sample in one random class block, which is noise.
``true``
    The exact gradient with the given labels, ``(softmax(z) - e_y) (x) x~`` flattened (K * (d+1)).
"""

from __future__ import annotations

import torch

from skmm_pipeline.core.validation import InputError

LABEL_MODES = ("expected", "true")


def gradient_dim(feature_dim: int, num_classes: int, label_mode: str) -> int:
    """Length of the per-sample gradient row for a head with ``feature_dim`` inputs (plus bias)."""
    check_label_mode(label_mode)
    return feature_dim + 1 if label_mode == "expected" else num_classes * (feature_dim + 1)


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise InputError(f"unknown label_mode {label_mode!r}; available: {list(LABEL_MODES)}")


def head_gradient_rows(
    features: torch.Tensor, logits: torch.Tensor, label_mode: str = "expected", labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample head gradient rows for one batch (B x gradient_dim)."""
    check_label_mode(label_mode)
    if features.ndim != 2 or logits.ndim != 2 or features.shape[0] != logits.shape[0]:
        raise InputError(
            f"features (B x d) and logits (B x K) must have the same batch size, got "
            f"{tuple(features.shape)} and {tuple(logits.shape)}"
        )
    if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
        raise InputError("non-finite activations or logits (NaN or inf) in the batch")
    x_tilde = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    if label_mode == "expected":
        return x_tilde
    if labels is None:
        raise InputError("label_mode='true' needs labels")
    labels = labels.to(device=logits.device, dtype=torch.long)
    K = logits.shape[1]
    if labels.shape != (logits.shape[0],) or labels.min() < 0 or labels.max() >= K:
        raise InputError(f"labels must be a vector of {logits.shape[0]} class indices in [0, {K})")
    delta = torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(labels, K).to(logits.dtype)
    return (delta[:, :, None] * x_tilde[:, None, :]).reshape(features.shape[0], -1)
