"""The embedded default scenario: scikit-learn's 8x8 digits as a transfer task (no network needed).

Source task: digits 0-4 (80/20 train/validation) to pretrain a small CNN. Target task: digits 5-9
(relabelled 0-4), split 60/20/20 into the pool to select from, a validation split and a test split.
The pool is cut into shards, as if it had arrived in several deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skmm_pipeline.data.shards import write_shard

SPLIT_SEED = 20240707  # the split is part of the scenario, not of an experiment's seed


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class DigitsTransfer:
    source_train: Split
    source_val: Split
    pool: Split
    val: Split
    test: Split
    num_classes: int = 5

    def pool_shards(self, n_shards: int) -> list[tuple[str, Split]]:
        parts = np.array_split(np.arange(len(self.pool.labels)), n_shards)
        return [
            (f"digits-{k:03d}", Split(self.pool.images[p], self.pool.labels[p])) for k, p in enumerate(parts)
        ]


def load_digits_transfer() -> DigitsTransfer:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)

    src = rng.permutation(np.flatnonzero(labels < 5))
    cut = int(0.8 * len(src))
    tgt = rng.permutation(np.flatnonzero(labels >= 5))
    a, b = int(0.6 * len(tgt)), int(0.8 * len(tgt))

    def split(idx, offset=0):
        return Split(images[idx], labels[idx] - offset)

    return DigitsTransfer(
        source_train=split(src[:cut]),
        source_val=split(src[cut:]),
        pool=split(tgt[:a], 5),
        val=split(tgt[a:b], 5),
        test=split(tgt[b:], 5),
    )


def write_digits_shards(landing_dir: Path, n_shards: int = 3, overwrite: bool = False) -> list[str]:
    """Write the target pool as ``n_shards`` shard files into ``landing_dir``; returns the shard names."""
    landing_dir = Path(landing_dir)
    names = []
    for name, part in load_digits_transfer().pool_shards(n_shards):
        path = landing_dir / f"{name}.npz"
        if overwrite or not path.exists():
            write_shard(path, part.images, part.labels)
        names.append(name)
    return names


def write_new_digits_shard(landing_dir: Path, name: str | None = None, count: int = 100, seed: int = 0) -> str:
    """Land a new delivery for the demo: ``count`` target-task digits, each a fresh variant of a pool
    image (random +-1 pixel shift and mild pixel noise), so growth can be tried without a download.

    Returns the shard name (``digits-new-<k>`` by default, the first unused k).
    """
    from skmm_pipeline.data.shards import ShardError, check_shard_name

    landing_dir = Path(landing_dir)
    if name is None:
        k = 0
        while (landing_dir / f"digits-new-{k:03d}.npz").exists():
            k += 1
        name = f"digits-new-{k:03d}"
    check_shard_name(name)
    path = landing_dir / f"{name}.npz"
    if path.exists():
        raise ShardError(f"shard {name!r} already exists at {path}; shards are immutable deliveries")
    if count <= 0:
        raise ShardError(f"a shard needs at least one sample, got count={count}")
    pool = load_digits_transfer().pool
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pool.labels), size=count)
    images = pool.images[idx].copy()
    shifts = rng.integers(-1, 2, size=(count, 2))
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], shift=(int(dy), int(dx)), axis=(1, 2))
    images = np.clip(images + rng.normal(0, 0.05, size=images.shape), 0, 1).astype(np.float32)
    write_shard(path, images, pool.labels[idx])
    return name
