"""The embedded default scenario: scikit-learn's 8x8 digits as a transfer task (no network needed).

Source task: digits 0-4 (80/20 train/validation) to pretrain a small CNN. Target task: digits 5-9
(relabelled 0-4), split 60/20/20 into the pool to select from, a validation split and a test split.
The pool is cut into shards, as if it had arrived in several deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skmm_pipeline.core import defaults
from skmm_pipeline.core.validation import InputError, check_int
from skmm_pipeline.data.shards import ShardError, check_shard_name, write_shard

SPLIT_SEED = 20240707  # the split is part of the scenario, not of an experiment's seed
SOURCE_CLASSES = (0, 1, 2, 3, 4)  # pretraining task
TARGET_CLASSES = (5, 6, 7, 8, 9)  # the task selected for, relabelled 0..K-1 in this order
TARGET_NAMES = tuple(str(c) for c in TARGET_CLASSES)  # the class names the embedded shards carry


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
    num_classes: int = len(TARGET_CLASSES)

    def pool_shards(self, n_shards: int) -> list[tuple[str, Split]]:
        parts = np.array_split(np.arange(len(self.pool.labels)), n_shards)
        return [
            (f"digits-{k:03d}", Split(self.pool.images[p], self.pool.labels[p])) for k, p in enumerate(parts)
        ]


def load_digits_transfer(source_classes=SOURCE_CLASSES, target_classes=TARGET_CLASSES,
                         pool_per_class=None) -> DigitsTransfer:
    """The digits transfer task: pretrain on ``source_classes`` (80/20), select for ``target_classes``
    (relabelled 0..K-1 in the given order, split 60/20/20 into pool, validation and test).

    ``pool_per_class`` (K counts, in ``target_classes`` order) keeps only that many pool images of each
    class (the first ones of the shuffled pool), e.g. an imbalanced pool; validation and test keep
    their class mix as drawn. The defaults give the embedded scenario.
    """
    source_classes, target_classes = _classes(source_classes, "source"), _classes(target_classes, "target")
    if set(source_classes) & set(target_classes):
        raise InputError(f"source and target classes overlap: {sorted(set(source_classes) & set(target_classes))}")
    # scikit-learn is imported here: it takes about 1 s (measured), which loading the Dagster definitions
    # (every step process) should not pay unless the embedded data is read.
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)

    src = rng.permutation(np.flatnonzero(np.isin(labels, source_classes)))
    cut = int(0.8 * len(src))
    tgt = rng.permutation(np.flatnonzero(np.isin(labels, target_classes)))
    a, b = int(0.6 * len(tgt)), int(0.8 * len(tgt))

    def split(idx, classes):
        relabel = np.full(10, -1, dtype=np.int64)
        relabel[list(classes)] = np.arange(len(classes))
        return Split(images[idx], relabel[labels[idx]])

    pool = tgt[:a]
    if pool_per_class is not None:
        pool = _per_class(pool, labels, target_classes, pool_per_class)
    return DigitsTransfer(
        source_train=split(src[:cut], source_classes),
        source_val=split(src[cut:], source_classes),
        pool=split(pool, target_classes),
        val=split(tgt[a:b], target_classes),
        test=split(tgt[b:], target_classes),
        num_classes=len(target_classes),
    )


def _classes(classes, what: str) -> tuple[int, ...]:
    out = tuple(check_int(c, f"{what} class", minimum=0, maximum=9) for c in classes)
    if len(out) < 2 or len(set(out)) != len(out):
        raise InputError(f"{what} classes must be at least two distinct digits, got {list(classes)}")
    return out


def _per_class(pool: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], counts) -> np.ndarray:
    counts = list(counts)
    if len(counts) != len(classes):
        raise InputError(f"pool_per_class needs one count per target class ({len(classes)}), got {len(counts)}")
    keep = np.zeros(len(pool), dtype=bool)
    for c, k in zip(classes, counts):
        rows = np.flatnonzero(labels[pool] == c)
        k = check_int(k, f"pool_per_class for digit {c}", minimum=1)
        if k > len(rows):
            raise InputError(f"pool_per_class asks {k} images of digit {c}; the pool has {len(rows)}")
        keep[rows[:k]] = True
    return pool[keep]


def jittered_copies(images: np.ndarray, rng: np.random.Generator, count: int, noise: float):
    """``count`` variants of randomly drawn ``images`` rows, each rolled by a random ±1 pixel in both
    directions, plus Gaussian pixel noise of std ``noise``, clipped to [0, 1]. Returns the variants
    and the rows they come from (drawn in that order from ``rng``: rows, shifts, noise)."""
    src = rng.integers(0, len(images), size=count)
    out = images[src].copy()
    shifts = rng.integers(-1, 2, size=(count, 2))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            rows = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            if rows.size and (dy or dx):
                out[rows] = np.roll(out[rows], (dy, dx), axis=(-2, -1))
    out = np.clip(out + rng.normal(0, noise, size=out.shape), 0, 1).astype(np.float32)
    return out, src


def write_digits_shards(landing_dir: Path, n_shards: int = defaults.DEMO_SHARDS, overwrite: bool = False) -> list[str]:
    """Write the target pool as ``n_shards`` shard files into ``landing_dir``; returns the shard names."""
    landing_dir = Path(landing_dir)
    names = []
    for name, part in load_digits_transfer().pool_shards(n_shards):
        path = landing_dir / f"{name}.npz"
        if overwrite or not path.exists():
            write_shard(path, part.images, part.labels, classes=TARGET_NAMES)
        names.append(name)
    return names


def write_new_digits_shard(landing_dir: Path, name: str | None = None, count: int = 100, seed: int = 0) -> str:
    """Land a new delivery for the demo: ``count`` target-task digits, each a fresh variant of a pool
    image (random +-1 pixel shift and mild pixel noise), so growth can be tried without a download.
    Each image's ``source_ids`` entry records its pool row and the seed (``pool/<row>@seed<seed>``).
    A delivery whose images equal those of a shard already in ``landing_dir`` is refused.

    Returns the shard name (``digits-new-<k>`` by default, the first unused k).
    """
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
    seed = check_int(seed, "seed", minimum=0)
    pool = load_digits_transfer().pool
    images, idx = jittered_copies(pool.images, np.random.default_rng(seed), count, noise=0.05)
    for other in sorted(landing_dir.glob("*.npz")):
        try:
            with np.load(other, allow_pickle=False) as z:
                same = "images" in z.files and z["images"].shape == images.shape and np.array_equal(z["images"], images)
        except (OSError, ValueError):
            continue  # an unreadable shard is the data contract's business, not a duplicate
        if same:
            raise ShardError(f"this delivery (seed {seed}) has the same images as shard {other.stem!r}; "
                             "use another seed")
    write_shard(path, images, pool.labels[idx], source_ids=[f"pool/{i}@seed{seed}" for i in idx],
                classes=TARGET_NAMES)
    return name


@dataclass(frozen=True)
class CuratedPool:
    """A pool polluted like real deliveries: near-duplicates and corrupted images (see
    :func:`curation_pool`). ``kind`` is 0 clean, 1 near-duplicate, 2 corrupted; ``source`` is the clean
    pool row an image was derived from (-1 for corrupted ones)."""

    pool: Split
    kind: np.ndarray
    source: np.ndarray
    corruption: np.ndarray  # index into CORRUPTIONS for corrupted images, -1 otherwise

    @property
    def corrupted(self) -> np.ndarray:
        return self.kind == 2


CORRUPTIONS = ("noise", "inverted", "salt-pepper", "blank-stripe")


def curation_pool(pool: Split, seed: int = 0, duplicate_frac: float = 0.2, corrupt_frac: float = 0.05) -> CuratedPool:
    """The curation variant of the embedded scenario: ``pool`` plus near-duplicates (a clean image
    shifted by one pixel with light noise, same label) making up ``duplicate_frac`` of the result, and
    corrupted images (uniform noise, inverted, salt-and-pepper or half-blanked digits, with a random
    label) making up ``corrupt_frac``. Rows are shuffled; a seed fixes everything."""
    if not (0 <= duplicate_frac and 0 <= corrupt_frac and duplicate_frac + corrupt_frac < 1):
        raise InputError("duplicate_frac and corrupt_frac must be non-negative and sum to less than 1")
    rng = np.random.default_rng(seed)
    n_clean = len(pool.labels)
    total = int(round(n_clean / (1 - duplicate_frac - corrupt_frac)))
    n_dup, n_bad = int(round(duplicate_frac * total)), int(round(corrupt_frac * total))
    k = int(pool.labels.max()) + 1

    dups, src = jittered_copies(pool.images, rng, n_dup, noise=0.03)

    base = pool.images[rng.integers(0, n_clean, size=n_bad)].copy()
    how = rng.integers(0, len(CORRUPTIONS), size=n_bad)
    bad = np.empty_like(base)
    noise = rng.uniform(0, 1, size=base.shape).astype(np.float32)
    bad[how == 0] = noise[how == 0]
    bad[how == 1] = 1.0 - base[how == 1]
    sp = np.where(rng.uniform(size=base.shape) < 0.5, base, (rng.uniform(size=base.shape) < 0.5).astype(np.float32))
    bad[how == 2] = sp[how == 2]
    stripe = base.copy()
    stripe[..., :, 4:] = 1.0
    bad[how == 3] = stripe[how == 3]

    images = np.concatenate([pool.images, dups, bad]).astype(np.float32)
    labels = np.concatenate([pool.labels, pool.labels[src], rng.integers(0, k, size=n_bad)]).astype(np.int64)
    kind = np.concatenate([np.zeros(n_clean, np.int64), np.ones(n_dup, np.int64), np.full(n_bad, 2, np.int64)])
    source = np.concatenate([np.arange(n_clean), src, np.full(n_bad, -1)]).astype(np.int64)
    corruption = np.concatenate([np.full(n_clean + n_dup, -1), how]).astype(np.int64)
    order = rng.permutation(len(labels))
    return CuratedPool(Split(images[order], labels[order]), kind[order], source[order], corruption[order])
