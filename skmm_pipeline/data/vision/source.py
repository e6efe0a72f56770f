"""The image source interface: ids, targets and lazily decoded images, read in batches.

:class:`ImageSource` holds what every source shares (batching, shape checks, the handling of
unreadable images per ``on_corrupt``); the sources (``cifar``, ``files``) implement ``_image``.
"""

from __future__ import annotations

import logging
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from skmm_pipeline.core.errors import CorruptImageError, DataError
from skmm_pipeline.data.vision.transform import ImageTransform

# The package's logger: the name the warnings had before the package was split into modules.
log = logging.getLogger(__package__)

ON_CORRUPT = ("skip", "raise")


@dataclass(frozen=True)
class ImageBatch:
    ids: tuple[str, ...]
    images: np.ndarray  # (n, C, H, W) float32 (uint8 when read as pixels)
    targets: np.ndarray  # (n,) int64 labels or float32 regression targets
    skipped: tuple[str, ...] = ()  # ids of unreadable images left out


def _check_on_corrupt(on_corrupt: str) -> str:
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    return on_corrupt


def _log_skipped(where: str, skipped: Sequence[str], total: int) -> None:
    if skipped:
        log.warning(
            "skipped %d unreadable image(s) of %d in %s: %s%s",
            len(skipped), total, where, ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "",
        )


class ImageSource:
    """A labelled collection of images with stable, unique ids, decoded on demand.

    Subclasses set ``ids``, ``targets``, ``task`` (``"classification"`` or ``"regression"``),
    ``classes`` (class names, or ``None``) and ``transform``, and implement :meth:`_image`.
    """

    ids: tuple[str, ...]
    targets: np.ndarray
    task: str
    classes: tuple[str, ...] | None
    transform: ImageTransform
    kind: str = "images"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def location(self) -> str:
        return str(getattr(self, "root", ""))

    def describe(self) -> dict:
        """What the arrays depend on (for lineage metadata)."""
        return {
            "kind": self.kind,
            "location": self.location,
            "task": self.task,
            "size": len(self),
            "classes": None if self.classes is None else list(self.classes),
            "transform": self.transform.as_dict(),
        }

    def _image(self, index: int):
        """The PIL image at ``index`` (raises on an unreadable file)."""
        raise NotImplementedError

    def _decode(self, index: int, on_corrupt: str, pixels: bool = False) -> np.ndarray | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = self._image(index)
                return self.transform.encode(image) if pixels else self.transform(image)
        except DataError:
            raise  # the dataset's layout, not one image
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error,
                Image.DecompressionBombError) as exc:
            # PIL reports truncated or garbled files as OSError/SyntaxError/ValueError depending on format.
            if on_corrupt == "raise":
                raise CorruptImageError(f"unreadable image {self.ids[index]!r} in {self.location}: {exc}") from exc
            return None

    def _indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(len(self))
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"indices out of range for a source of {len(self)} images")
        return idx

    def iter_rows(self, indices=None, on_corrupt: str = "skip", pixels: bool = False) -> Iterator[tuple[int, np.ndarray | None]]:
        """``(index, image or None)`` for ``indices`` in the given order (``None``: unreadable, skipped).

        Ascending indices read fastest (CIFAR keeps one batch file in memory at a time). ``pixels``:
        uint8 images before normalisation (``transform.encode``), instead of the model's inputs."""
        _check_on_corrupt(on_corrupt)
        for i in self._indices(indices):
            yield int(i), self._decode(int(i), on_corrupt, pixels)

    def batches(self, batch_size: int = 256, indices=None, on_corrupt: str = "skip",
                pixels: bool = False) -> Iterator[ImageBatch]:
        """Consecutive batches of at most ``batch_size`` readable images (a batch's ``skipped`` lists the
        unreadable ones among its rows); ``pixels``: uint8, see :meth:`iter_rows`."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        rows: list[tuple[int, np.ndarray]] = []
        skipped: list[str] = []
        shape = None
        for i, img in self.iter_rows(indices, on_corrupt, pixels):
            if img is None:
                skipped.append(self.ids[i])
                continue
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DataError(
                    f"image {self.ids[i]!r} in {self.location} has shape {img.shape}, earlier images {shape}: "
                    "give the transform a size (ImageTransform(size=...)) so all images match"
                )
            rows.append((i, img))
            if len(rows) == batch_size:
                yield self._batch(rows, skipped, pixels)
                rows, skipped = [], []
        if rows or skipped:
            yield self._batch(rows, skipped, pixels)

    def _batch(self, rows, skipped, pixels: bool = False) -> ImageBatch:
        idx = np.array([i for i, _ in rows], dtype=np.int64)
        if rows:
            images = np.stack([img for _, img in rows])
        else:
            out = self.transform.out_size or (0, 0)
            images = np.empty((0, self.transform.channels, *out), dtype=np.uint8 if pixels else np.float32)
        return ImageBatch(tuple(self.ids[i] for i in idx), images, self.targets[idx], tuple(skipped))

    def load(self, indices=None, on_corrupt: str = "skip", batch_size: int = 256) -> ImageBatch:
        """All (or the given) images at once: for small datasets and evaluation splits."""
        parts = list(self.batches(batch_size, indices, on_corrupt))
        skipped = tuple(s for b in parts for s in b.skipped)
        total = len(self._indices(indices))
        _log_skipped(f"{self.kind} {self.location}", skipped, total)
        kept = [b for b in parts if len(b.ids)]
        if not kept:
            raise DataError(f"no readable images among the {total} asked for in {self.kind} {self.location}")
        return ImageBatch(
            tuple(i for b in kept for i in b.ids),
            np.concatenate([b.images for b in kept]),
            np.concatenate([b.targets for b in kept]),
            skipped,
        )


def _open_image(path: Path):
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not later
        return img
