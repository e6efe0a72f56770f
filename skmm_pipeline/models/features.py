"""Penultimate features of a model (its ``body``), and their standardisation with the pool's statistics.

FT-1 and the ``features`` selection methods work on these rows: :func:`extract_features` runs the
body in eval mode, :class:`Standardizer` centres and scales with statistics of the whole pool (known to
the selector anyway), not of a small training subset.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


class Standardizer:
    def __init__(self, pool: np.ndarray):
        self.mean = pool.mean(axis=0)
        self.scale = pool.std(axis=0) + 1e-6

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale


@torch.no_grad()
def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 512, device="cpu") -> np.ndarray:
    """Penultimate features (N x feature_dim), body in eval mode."""
    model.eval()
    out = [model.body(x.to(device)).cpu() for x in torch.as_tensor(images).split(batch_size)]
    return torch.cat(out).numpy()


def standardized_features(model, pool_inputs, others: Sequence, device="cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Penultimate features of the pool and of other splits, standardised with the pool's statistics."""
    pool = extract_features(model, pool_inputs, device=device)
    std = Standardizer(pool)
    return std(pool), [std(extract_features(model, x, device=device)) for x in others]
