"""On-disk shards: one ``<name>.npz`` file per data delivery with ``images`` and (optional) ``labels``.

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

    @property
    def ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(len(self.images))]


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


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    check_shard_name(Path(path).stem)
    arrays = {"images": np.asarray(images, dtype=np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    atomic_save_npz(Path(path), **arrays)


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
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ShardError(f"shard {name!r}: labels shape {labels.shape} does not match {images.shape[0]} images")
    return Shard(name, images.astype(np.float32, copy=False), None if labels is None else labels.astype(np.int64))
