"""CIFAR-10 from the ``cifar-10-batches-py`` folder of its python version (nothing is downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.vision.source import ImageSource
from skmm_pipeline.data.vision.transform import ImageTransform

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST = ("test_batch",)


# The python batches are pickles of plain dicts with numpy arrays. Only these globals may be
# resolved, so a tampered batch file cannot run code when it is read.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} not found")
    try:
        with open(path, "rb") as fh:
            blob = _RestrictedUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # unpickling raises many types for a damaged file
        raise DataError(f"CIFAR-10 file {path} is not a readable python batch: {exc}") from exc
    if not isinstance(blob, dict):
        raise DataError(f"CIFAR-10 file {path} holds a {type(blob).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in blob.items()}


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    blob = _read_cifar_pickle(path)
    if "data" not in blob or "labels" not in blob:
        raise DataError(f"CIFAR-10 batch {path} lacks 'data'/'labels' (found {sorted(blob)})")
    data = np.asarray(blob["data"])
    labels = np.asarray(blob["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"CIFAR-10 batch {path}: labels outside 0..{num_classes - 1}")
    return data, labels


class CIFAR10(ImageSource):
    """CIFAR-10 in its python pickle format. ``root`` is the ``cifar-10-batches-py`` folder or its parent.

    ``split="train"`` reads ``data_batch_1..5`` (in that order), ``"test"`` reads ``test_batch``.
    Default transform: the 32x32 RGB images scaled to [0, 1]. One batch file is in memory at a time.
    """

    kind = "cifar10"

    def __init__(self, root, split: str = "train", transform: ImageTransform | None = None):
        root = Path(root)
        if (root / CIFAR10_DIR).is_dir():
            root = root / CIFAR10_DIR
        if split not in ("train", "test"):
            raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
        files = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
        expected = ("batches.meta", *files)
        missing = [f for f in expected if not (root / f).is_file()]
        if missing:
            raise DataError(
                f"not a CIFAR-10 python folder: {root} lacks {missing}; expected {CIFAR10_DIR}/ with "
                f"{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)} and batches.meta (nothing is downloaded)"
            )
        meta = _read_cifar_pickle(root / "batches.meta")
        names = meta.get("label_names")
        if not names:
            raise DataError(f"{root / 'batches.meta'} has no 'label_names'")
        self.root = root
        self.split = split
        self.classes = tuple(str(n) for n in names)
        self.task = "classification"
        self.transform = transform or ImageTransform()
        self._files = files
        ids, targets, starts = [], [], [0]
        for f in files:
            data, labels = _cifar_batch(root / f, len(self.classes))
            ids.extend(f"{f}/{r}" for r in range(len(labels)))
            targets.append(labels)
            starts.append(starts[-1] + len(labels))
            del data
        self.ids = tuple(ids)
        self.targets = np.concatenate(targets)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    def _image(self, index: int):
        b = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._cached is None or self._cached[0] != b:
            self._cached = None  # free the previous batch before reading the next one
            self._cached = (b, _cifar_batch(self.root / self._files[b], len(self.classes))[0])
        row = self._cached[1][index - self._starts[b]]
        return Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))
