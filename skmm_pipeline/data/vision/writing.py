"""Random splits of a source, and its conversion into shard files streamed through a memory map."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from skmm_pipeline.core.atomic import atomic_save_npz
from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.shards import ShardError, check_shard_name
from skmm_pipeline.data.vision.source import (
    ImageSource,
    _check_on_corrupt,
    _log_skipped,
)

# The package's logger: the name the warnings had before the package was split into modules.
log = logging.getLogger(__package__)


def split_indices(n: int, fractions: Sequence[float], seed: int = 0, labels=None) -> list[np.ndarray]:
    """Deterministic random split of ``range(n)`` into parts of the given fractions (summing to 1),
    stratified by ``labels`` when given (every part gets its share of every class). Each part is sorted."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or (fractions < 0).any() or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6):
        raise DataError(f"split fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(np.asarray(labels) == c) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for g in groups:
        g = rng.permutation(g)
        cuts = np.round(np.cumsum(fractions)[:-1] * len(g)).astype(int)
        for k, piece in enumerate(np.split(g, cuts)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


@dataclass(frozen=True)
class WrittenShard:
    name: str
    path: Path
    rows: int  # 0: nothing was readable, no file was written
    skipped: tuple[str, ...]


PIXELS = ("uint8", "float32")


def check_pixels(pixels: str) -> bool:
    """Whether shards store 8-bit pixels (``"uint8"``) rather than the model's float32 inputs."""
    if pixels not in PIXELS:
        raise DataError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    return pixels == "uint8"


def _write_rows(source: ImageSource, path: Path, indices: np.ndarray, batch_size: int, on_corrupt: str,
                spool_dir: Path, pixels: str = "uint8") -> tuple[int, tuple[str, ...]]:
    """Stream ``indices`` of ``source`` into one npz file through an on-disk spool (bounded memory).
    Writes nothing and returns 0 rows when none of the images is readable. ``pixels="uint8"`` stores
    the 8-bit images and the transform's decode (``data.shards.PixelDecode``)."""
    raw = check_pixels(pixels)
    images = None
    targets = np.empty(len(indices), dtype=source.targets.dtype)
    ids: list[str] = []
    skipped: list[str] = []
    fd, spool = tempfile.mkstemp(dir=spool_dir, prefix=f".{path.stem}.", suffix=".npy")
    os.close(fd)
    try:
        for batch in source.batches(batch_size, indices, on_corrupt, pixels=raw):
            skipped.extend(batch.skipped)
            if not batch.ids:
                continue
            if images is None:
                images = np.lib.format.open_memmap(spool, mode="w+", dtype=np.uint8 if raw else np.float32,
                                                   shape=(len(indices), *batch.images.shape[1:]))
            start = len(ids)
            images[start : start + len(batch.ids)] = batch.images
            targets[start : start + len(batch.ids)] = batch.targets
            ids.extend(batch.ids)
        if not ids:
            return 0, tuple(skipped)
        n = len(ids)
        arrays = {"images": images[:n], "source_ids": np.array(ids)}
        if raw:
            decode = source.transform.decode()
            arrays["pixel_scale"], arrays["pixel_offset"] = decode.scale, decode.offset
        if source.task == "classification":
            arrays["labels"] = targets[:n].astype(np.int64)
            arrays["classes"] = np.array(source.classes)
        else:
            arrays["targets"] = targets[:n].astype(np.float32)
        atomic_save_npz(path, **arrays)
        return n, tuple(skipped)
    finally:
        del images
        Path(spool).unlink(missing_ok=True)


def write_shards(
    source: ImageSource,
    landing_dir,
    prefix: str,
    n_shards: int | None = None,
    *,
    rows_per_shard: int | None = None,
    indices=None,
    seed: int | None = None,
    batch_size: int = 256,
    on_corrupt: str = "skip",
    overwrite: bool = False,
    pixels: str = "uint8",
) -> list[WrittenShard]:
    """Write ``source`` (or its rows ``indices``) as shard files ``<prefix>-000.npz`` ... into ``landing_dir``.

    Give exactly one of ``n_shards`` (near-equal contiguous parts) or ``rows_per_shard``. ``seed``
    shuffles the rows first (``None`` keeps the source order). Shards are written one after the other,
    each streamed batch by batch through a temporary memory map next to it: memory is bounded by
    ``batch_size`` images. Each file holds ``images`` (N x C x H x W: by default the 8-bit pixels with
    the transform's per-channel decode, ``pixel_scale`` and ``pixel_offset``, a quarter of the bytes;
    ``pixels="float32"``: the transformed float32 values), ``labels`` (int64, plus
    ``classes``) for classification or ``targets`` (float32) for regression, and ``source_ids``
    (row -> the source's sample id); :func:`skmm_pipeline.data.shards.read_shard` reads it as usual.

    Existing shard files are never replaced unless ``overwrite`` (deliveries are immutable); this is
    checked for every shard before anything is written. Unreadable images are skipped (a shard keeps
    its other rows) or raise, per ``on_corrupt``; a part whose images are all unreadable writes no
    file (its entry has ``rows == 0``; logged).
    """
    _check_on_corrupt(on_corrupt)
    check_pixels(pixels)
    idx = source._indices(indices)
    if idx.size == 0:
        raise DataError("nothing to write: no rows selected")
    if seed is not None:
        idx = np.random.default_rng(seed).permutation(idx)
    if (n_shards is None) == (rows_per_shard is None):
        raise DataError("give exactly one of n_shards or rows_per_shard")
    if n_shards is None:
        if rows_per_shard <= 0:
            raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
        n_shards = math.ceil(idx.size / rows_per_shard)
    if n_shards <= 0 or n_shards > idx.size:
        raise DataError(f"n_shards must be between 1 and the number of rows ({idx.size}), got {n_shards}")
    landing_dir = Path(landing_dir)
    names = [check_shard_name(f"{prefix}-{k:03d}") for k in range(n_shards)]
    paths = [landing_dir / f"{name}.npz" for name in names]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ShardError(f"shard file(s) already exist, shards are immutable deliveries: {existing[:3]}")
    landing_dir.mkdir(parents=True, exist_ok=True)
    parts = (np.array_split(idx, n_shards) if rows_per_shard is None
             else [idx[k : k + rows_per_shard] for k in range(0, idx.size, rows_per_shard)])
    # Rows of a shard follow the source order: block-stored sources (CIFAR) then read each file once.
    parts = [np.sort(p) for p in parts]
    written = []
    for name, path, part in zip(names, paths, parts):
        rows, skipped = _write_rows(source, path, part, batch_size, on_corrupt, landing_dir, pixels)
        if rows:
            _log_skipped(f"shard {name}", skipped, len(part))
        else:
            log.warning("shard %s not written: none of its %d images is readable in %s %s",
                        name, len(part), source.kind, source.location)
        written.append(WrittenShard(name, path, rows, skipped))
    return written


def write_split(source: ImageSource, path, indices=None, *, batch_size: int = 256, on_corrupt: str = "skip",
                pixels: str = "uint8") -> WrittenShard:
    """Write one split (e.g. validation or test) as a single file in the shard format, streamed like
    :func:`write_shards`. Keep such files out of the landing folder: the sensor takes every ``*.npz``
    there for a pool shard."""
    _check_on_corrupt(on_corrupt)
    check_pixels(pixels)
    path = Path(path)
    check_shard_name(path.stem)
    idx = source._indices(indices)
    if idx.size == 0:
        raise DataError("nothing to write: no rows selected")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, skipped = _write_rows(source, path, idx, batch_size, on_corrupt, path.parent, pixels)
    if not rows:
        raise DataError(f"split {path.stem}: none of its {idx.size} images is readable in {source.kind} {source.location}")
    _log_skipped(f"split {path.stem}", skipped, idx.size)
    return WrittenShard(path.stem, path, rows, skipped)


@dataclass(frozen=True)
class ShardSources:
    """What a converted shard holds beyond ``images``/``labels`` (see :func:`write_shards`)."""

    source_ids: tuple[str, ...]
    targets: np.ndarray | None  # float32 regression targets, None for classification shards
    classes: tuple[str, ...] | None


def read_shard_sources(path) -> ShardSources:
    """Source ids, regression targets and class names of a shard written by :func:`write_shards`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "source_ids" not in z.files:
                raise ShardError(f"shard {path} was not written from an image source (no 'source_ids')")
            ids = tuple(str(s) for s in z["source_ids"])
            targets = z["targets"].astype(np.float32) if "targets" in z.files else None
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else None
    except (OSError, ValueError) as exc:
        raise ShardError(f"shard {path} is unreadable: {exc}") from exc
    return ShardSources(ids, targets, classes)
