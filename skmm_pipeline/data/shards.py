"""On-disk shards: one ``<name>.npz`` file per data delivery with ``images`` and, optionally, either
int ``labels`` (classification) or float ``targets`` (regression), never both.

A sample's id is ``<shard name>/<row>``; it never changes once the shard has landed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ShardError(ValueError):
    """A shard that is missing, unreadable, empty or malformed."""


def check_shard_name(name: str) -> str:
    if not SHARD_NAME.match(name or "") or ".." in name:
        raise ShardError(
            f"invalid shard name {name!r}: use letters, digits, '_', '-' and '.', no path separators or '..'"
        )
    return name


@dataclass(frozen=True)
class Shard:
    name: str
    images: np.ndarray  # (N, C, H, W) float32
    labels: np.ndarray | None  # (N,) int64, or None for an unlabelled pool
    targets: np.ndarray | None = None  # (N,) float32 regression targets (then labels is None)

    @property
    def ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(len(self.images))]

    @property
    def task(self) -> str | None:
        """``"classification"`` (labels), ``"regression"`` (targets) or ``None`` (unlabelled)."""
        if self.labels is not None:
            return "classification"
        return "regression" if self.targets is not None else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npz(path: Path, **arrays) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray | None = None,
                targets: np.ndarray | None = None) -> None:
    """Write a shard: ``labels`` (int, classification) or ``targets`` (float, regression) or neither."""
    name = check_shard_name(Path(path).stem)
    arrays = {"images": np.asarray(images, dtype=np.float32)}
    if labels is not None and targets is not None:
        raise ShardError(f"shard {name!r}: give labels (classification) or targets (regression), not both")
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    if targets is not None:
        arrays["targets"] = _checked_targets(f"shard {name!r}", np.asarray(targets), len(arrays["images"]))
    atomic_save_npz(Path(path), **arrays)


def _checked_targets(what: str, targets: np.ndarray, n: int) -> np.ndarray:
    """Regression targets as float32 (N,), finite; a :class:`ShardError` naming ``what`` otherwise."""
    if targets.dtype == bool or not (np.issubdtype(targets.dtype, np.integer) or np.issubdtype(targets.dtype, np.floating)):
        raise ShardError(f"{what}: targets must be real numbers, got dtype {targets.dtype}")
    if targets.shape != (n,):
        raise ShardError(f"{what}: targets shape {targets.shape} does not match {n} images (expected ({n},))")
    with np.errstate(over="ignore"):
        out = targets.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ShardError(f"{what}: {bad.size} target(s) are NaN, inf or beyond float32, at rows {bad[:5].tolist()}")
    return out


def read_shard(path: Path) -> Shard:
    """Load and validate a shard; every problem is a :class:`ShardError` naming the file."""
    path = Path(path)
    name = check_shard_name(path.stem)
    if not path.is_file():
        raise ShardError(f"shard {name!r} not found at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ShardError(f"shard {name!r} at {path} is unreadable or corrupt: {exc}") from exc
    images = arrays.get("images")
    if images is None:
        raise ShardError(f"shard {name!r} at {path} has no 'images' array (found {sorted(arrays)})")
    if images.ndim != 4:
        raise ShardError(f"shard {name!r}: images must be (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ShardError(f"shard {name!r} at {path} is empty")
    if not np.isfinite(images).all():
        raise ShardError(f"shard {name!r}: images contain NaN or inf")
    labels, targets = arrays.get("labels"), arrays.get("targets")
    if labels is not None and targets is not None:
        raise ShardError(f"shard {name!r} at {path} has both 'labels' (classification) and 'targets' (regression): "
                         "a shard carries one of them")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ShardError(f"shard {name!r}: labels shape {labels.shape} does not match {images.shape[0]} images")
    if targets is not None:
        targets = _checked_targets(f"shard {name!r} at {path}", targets, images.shape[0])
    return Shard(name, images.astype(np.float32, copy=False), None if labels is None else labels.astype(np.int64),
                 targets)
