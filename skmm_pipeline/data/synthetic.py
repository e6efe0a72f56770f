"""Synthetic pools with known structure: the paper's Gaussian mixture (SPEC section 4) and variants.

``make_gmm(seed)`` is the paper's setting: N = 3000 points in r = 5000 dimensions on 10 clusters whose
centres lie on the first coordinate axes (norms 10 k, k uniform in 1..K), cluster sizes from random
breakpoints, per-cluster noise std uniform in [0, std_max] (0.04), labels linear in the centres
(``y = c_k . theta``, constant per cluster). The variants change one thing each: more clusters,
wider spreads (std_max), or sizes skewed by a ratio between the largest and the smallest cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skmm_pipeline.core.sketch import make_sketch
from skmm_pipeline.core.validation import InputError, check_float, check_int


@dataclass(frozen=True)
class GMM:
    X: np.ndarray  # N x r features
    y: np.ndarray  # N targets
    cluster: np.ndarray  # N cluster ids

    @property
    def n_clusters(self) -> int:
        return int(self.cluster.max()) + 1


def cluster_sizes(rng: np.random.Generator, N: int, n_clusters: int, skew: float | None) -> np.ndarray:
    """Random breakpoints (``skew=None``, the paper's), or sizes spaced geometrically from the largest to
    the smallest = largest / ``skew`` (in random order), summing to N."""
    if skew is None:
        cuts = np.sort(rng.integers(1, N - 1, n_clusters - 1))
        return np.diff(np.concatenate([[0], cuts, [N]]))
    weights = np.geomspace(1.0, 1.0 / skew, n_clusters)
    sizes = np.maximum(1, np.floor(N * weights / weights.sum()).astype(np.int64))
    sizes[0] += N - sizes.sum()
    return rng.permutation(sizes)


def make_gmm(seed: int, N: int = 3000, r: int = 5000, n_clusters: int = 10, std_max: float = 0.04,
             skew: float | None = None) -> GMM:
    """The paper's synthetic GMM (see the module doc), or a variant of it."""
    N, r = check_int(N, "N", minimum=2), check_int(r, "r", minimum=1)
    n_clusters = check_int(n_clusters, "n_clusters", minimum=1, maximum=min(N, r))
    std_max = check_float(std_max, "std_max", minimum=0.0)
    if skew is not None and check_float(skew, "skew", minimum=1.0) * n_clusters > N:
        raise InputError(f"skew {skew} leaves clusters empty with N = {N}")
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(rng, N, n_clusters, skew)
    norms = rng.integers(1, n_clusters + 1, n_clusters) * 10.0
    std = std_max * rng.random(n_clusters)
    theta = rng.normal(size=n_clusters)
    cluster = np.repeat(np.arange(n_clusters), sizes)
    X = rng.normal(size=(N, r)) * std[cluster][:, None]
    X[np.arange(N), cluster] += norms[cluster]
    y = (norms * theta)[cluster]
    return GMM(X, y, cluster)


def sketch_features(X: np.ndarray, m: int, seed: int) -> np.ndarray:
    """The seeded m-dimensional Gaussian sketch of the features (float64): for ridge regression at
    theta = 0 these are the sketched per-sample gradients every method selects on."""
    sk = make_sketch("gaussian", X.shape[1], m, seed, "gmm-features")
    return sk.apply(torch.as_tensor(X, dtype=torch.float64)).numpy()
