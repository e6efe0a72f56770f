"""Image datasets from local files, and their conversion into pipeline shards.

Three sources, all read from disk only (nothing is ever downloaded):

- :class:`CIFAR10` — the ``cifar-10-batches-py`` folder of the python version of CIFAR-10
  (``data_batch_1`` ... ``data_batch_5``, ``test_batch``, ``batches.meta``); sample ids
  ``<batch file>/<row>``, e.g. ``data_batch_3/17``.
- :class:`ImageFolder` — ``root/<class>/**/<image>`` (the torchvision layout; classes sorted by name
  unless given); sample ids are the paths relative to ``root``, e.g. ``cat/0001.png``.
- :class:`ImageCSV` — a CSV of (image path, numeric target) for regression; relative paths are
  resolved against the CSV's folder; sample ids are the paths as written in the CSV.

Every source decodes lazily and yields float32 ``(N, C, H, W)`` arrays through an
:class:`ImageTransform` (resize, centre crop, normalise), with int64 labels (classification) or float32
targets (regression). :func:`write_shards` cuts a source into ``k`` shard files for the landing folder,
one shard at a time, through a memory map: memory stays bounded by one batch whatever the shard size.

Unreadable images (truncated, not an image, undecodable) are **skipped** by default
(``on_corrupt="skip"``): each call logs one warning with the count and the first ids, and returns the
skipped ids. ``on_corrupt="raise"`` stops at the first one with a :class:`CorruptImageError` naming
the file. A *missing* file listed in a CSV, a missing or empty class folder, and a malformed CIFAR
batch are errors of the dataset's layout, not of one image: they raise :class:`DataError` when the
source is opened.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import struct
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from skmm_pipeline.core.atomic import atomic_save_npz
from skmm_pipeline.data.shards import ShardError, check_shard_name
from skmm_pipeline.core.errors import DataError, CorruptImageError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ON_CORRUPT = ("skip", "raise")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST = ("test_batch",)


# --------------------------------------------------------------------------------------------------
# Transform


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 ``(C, H, W)``: convert to ``mode``, resize, centre crop, scale to [0, 1],
    then ``(x - mean) / std`` per channel.

    ``size``: output ``(H, W)`` (an int means square); ``None`` keeps each image's own size (all images
    of a source must then have the same size). ``resize``: the shorter side is resized to this before
    the crop; by default to the larger side of ``size``, so a square image is resized to ``size`` exactly
    and nothing but the longer side's excess is cropped.
    """

    size: int | tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    mode: str = "RGB"

    def __post_init__(self):
        if self.mode not in ("RGB", "L"):
            raise DataError(f"ImageTransform mode must be 'RGB' or 'L', got {self.mode!r}")
        channels = 3 if self.mode == "RGB" else 1
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise DataError(f"ImageTransform {what} needs 1 or {channels} values for mode {self.mode!r}, got {values}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"ImageTransform std must be positive, got {self.std}")
        if self.size is not None and min(self.out_size) <= 0:
            raise DataError(f"ImageTransform size must be positive, got {self.size}")

    @classmethod
    def imagenet(cls, size: int = 224, resize: int | None = None) -> "ImageTransform":
        """The usual ImageNet evaluation transform: shorter side to ``size * 256 / 224``, centre crop
        ``size``, ImageNet mean/std (what torchvision's classification weights expect)."""
        return cls(size=size, resize=resize or int(round(size * 256 / 224)), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def out_size(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        return (self.size, self.size) if isinstance(self.size, int) else (int(self.size[0]), int(self.size[1]))

    def as_dict(self) -> dict:
        return {"size": self.out_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std), "mode": self.mode}

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        img = image.convert(self.mode)
        if self.size is not None:
            H, W = self.out_size
            target = self.resize or max(H, W)
            w, h = img.size
            scale = target / min(w, h)
            new = (max(W, int(round(w * scale))), max(H, int(round(h * scale))))
            if new != (w, h):
                img = img.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - W) // 2, (new[1] - H) // 2
            if (left, top, new[0], new[1]) != (0, 0, W, H):
                img = img.crop((left, top, left + W, top + H))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


# The embedded small CNN's input: 8 x 8 grey in [0, 1], like scikit-learn's digits.
SMALL_CNN_TRANSFORM = ImageTransform(size=8, mode="L")


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class ImageBatch:
    ids: tuple[str, ...]
    images: np.ndarray  # (n, C, H, W) float32
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

    def _decode(self, index: int, on_corrupt: str) -> np.ndarray | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return self.transform(self._image(index))
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

    def iter_rows(self, indices=None, on_corrupt: str = "skip") -> Iterator[tuple[int, np.ndarray | None]]:
        """``(index, image or None)`` for ``indices`` in the given order (``None``: unreadable, skipped).

        Ascending indices read fastest (CIFAR keeps one batch file in memory at a time)."""
        _check_on_corrupt(on_corrupt)
        for i in self._indices(indices):
            yield int(i), self._decode(int(i), on_corrupt)

    def batches(self, batch_size: int = 256, indices=None, on_corrupt: str = "skip") -> Iterator[ImageBatch]:
        """Consecutive batches of at most ``batch_size`` readable images (a batch's ``skipped`` lists the
        unreadable ones among its rows)."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        rows: list[tuple[int, np.ndarray]] = []
        skipped: list[str] = []
        shape = None
        for i, img in self.iter_rows(indices, on_corrupt):
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
                yield self._batch(rows, skipped)
                rows, skipped = [], []
        if rows or skipped:
            yield self._batch(rows, skipped)

    def _batch(self, rows, skipped) -> ImageBatch:
        idx = np.array([i for i, _ in rows], dtype=np.int64)
        if rows:
            images = np.stack([img for _, img in rows])
        else:
            out = self.transform.out_size or (0, 0)
            images = np.empty((0, self.transform.channels, *out), dtype=np.float32)
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
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not later
        return img


# ---- CIFAR-10 -----------------------------------------------------------------------------------

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
        from PIL import Image

        b = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._cached is None or self._cached[0] != b:
            self._cached = None  # free the previous batch before reading the next one
            self._cached = (b, _cifar_batch(self.root / self._files[b], len(self.classes))[0])
        row = self._cached[1][index - self._starts[b]]
        return Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))


# ---- ImageFolder --------------------------------------------------------------------------------


class ImageFolder(ImageSource):
    """``root/<class>/**/<image>``: one folder per class, labels in the order of ``classes``.

    ``classes=None`` takes every sub-folder, sorted by name; a given list must all exist as folders
    (others are ignored). A class folder without image files is an error. Files are listed
    recursively in the order of ``torchvision.datasets.ImageFolder``, so ids and labels line up with
    it; unlike it, hidden folders and files (``.ipynb_checkpoints``, ``._x.jpg``) are left out.
    """

    kind = "imagefolder"

    def __init__(self, root, transform: ImageTransform | None = None, classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"ImageFolder root {root} is not a directory")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not found:
                raise DataError(f"ImageFolder root {root} has no class folders (expected {root}/<class>/<image>)")
            classes = found
        else:
            classes = [str(c) for c in classes]
            if len(set(classes)) != len(classes):
                raise DataError(f"ImageFolder classes must be unique, got {classes}")
            missing = [c for c in classes if c not in found]
            if missing:
                raise DataError(f"ImageFolder {root}: missing class folder(s) {missing}; found {found}")
        loose = [p.name for p in root.iterdir() if p.is_file()]
        if loose:
            log.warning("ImageFolder %s: ignoring %d file(s) outside class folders", root, len(loose))
        ext = tuple(e.lower() for e in extensions)
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files = [
                Path(dirpath) / f
                for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True))
                for f in sorted(fnames)
                if Path(f).suffix.lower() in ext and not f.startswith(".")
            ]
            if not files:
                raise DataError(f"ImageFolder {root}: class folder {cls!r} has no image files ({', '.join(ext)})")
            paths.extend(files)
            labels.extend([label] * len(files))
        self.root = root
        self.classes = tuple(classes)
        self.task = "classification"
        self.transform = transform or ImageTransform()
        self._paths = paths
        self.ids = tuple(p.relative_to(root).as_posix() for p in paths)
        self.targets = np.asarray(labels, dtype=np.int64)

    def _image(self, index: int):
        return _open_image(self._paths[index])


# ---- CSV of (image path, target) -------------------------------------------------------------------


class ImageCSV(ImageSource):
    """Regression: a CSV with an image-path column and a numeric target column.

    Relative paths are resolved against the CSV's folder. Every listed file must exist (checked when
    opened); targets must be finite numbers; paths must be unique (they are the sample ids).
    """

    kind = "imagecsv"

    def __init__(self, csv_path, transform: ImageTransform | None = None, path_column: str = "path",
                 target_column: str = "target"):
        import pandas as pd

        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"CSV {csv_path} not found")
        try:
            table = pd.read_csv(csv_path, dtype={path_column: str})
        except Exception as exc:
            raise DataError(f"CSV {csv_path} is unreadable: {exc}") from exc
        for col in (path_column, target_column):
            if col not in table.columns:
                raise DataError(f"CSV {csv_path} has no column {col!r} (columns: {list(table.columns)})")
        if table.empty:
            raise DataError(f"CSV {csv_path} lists no images")
        targets = pd.to_numeric(table[target_column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(targets))
        if bad.size:
            rows = [int(r) + 2 for r in bad[:5]]  # +2: header line, 1-based
            raise DataError(f"CSV {csv_path}: {bad.size} target(s) in {target_column!r} are not finite numbers, at lines {rows}")
        raw = table[path_column].fillna("").astype(str).str.strip().tolist()
        empty = [i + 2 for i, p in enumerate(raw) if not p]
        if empty:
            raise DataError(f"CSV {csv_path}: empty image path at lines {empty[:5]}")
        ids = [Path(p).as_posix() for p in raw]
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        if dup:
            raise DataError(f"CSV {csv_path}: image paths must be unique (they are the sample ids), repeated: {dup[:5]}")
        paths = [p if p.is_absolute() else csv_path.parent / p for p in map(Path, raw)]
        missing = [ids[i] for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            raise DataError(
                f"CSV {csv_path}: {len(missing)} listed image(s) not found (relative paths are resolved "
                f"against {csv_path.parent}): {missing[:5]}"
            )
        self.root = csv_path
        self.classes = None
        self.task = "regression"
        self.transform = transform or ImageTransform()
        self._paths = paths
        self.ids = tuple(ids)
        self.targets = targets.astype(np.float32)

    def _image(self, index: int):
        return _open_image(self._paths[index])


# --------------------------------------------------------------------------------------------------
# Splits and shards


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


def _write_rows(source: ImageSource, path: Path, indices: np.ndarray, batch_size: int, on_corrupt: str,
                spool_dir: Path) -> tuple[int, tuple[str, ...]]:
    """Stream ``indices`` of ``source`` into one npz file through an on-disk spool (bounded memory).
    Writes nothing and returns 0 rows when none of the images is readable."""
    images = None
    targets = np.empty(len(indices), dtype=source.targets.dtype)
    ids: list[str] = []
    skipped: list[str] = []
    fd, spool = tempfile.mkstemp(dir=spool_dir, prefix=f".{path.stem}.", suffix=".npy")
    os.close(fd)
    try:
        for batch in source.batches(batch_size, indices, on_corrupt):
            skipped.extend(batch.skipped)
            if not batch.ids:
                continue
            if images is None:
                images = np.lib.format.open_memmap(spool, mode="w+", dtype=np.float32,
                                                   shape=(len(indices), *batch.images.shape[1:]))
            start = len(ids)
            images[start : start + len(batch.ids)] = batch.images
            targets[start : start + len(batch.ids)] = batch.targets
            ids.extend(batch.ids)
        if not ids:
            return 0, tuple(skipped)
        n = len(ids)
        arrays = {"images": images[:n], "source_ids": np.array(ids)}
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
) -> list[WrittenShard]:
    """Write ``source`` (or its rows ``indices``) as shard files ``<prefix>-000.npz`` ... into ``landing_dir``.

    Give exactly one of ``n_shards`` (near-equal contiguous parts) or ``rows_per_shard``. ``seed``
    shuffles the rows first (``None`` keeps the source order). Shards are written one after the other,
    each streamed batch by batch through a temporary memory map next to it: memory is bounded by
    ``batch_size`` images. Each file holds ``images`` (float32 N x C x H x W), ``labels`` (int64, plus
    ``classes``) for classification or ``targets`` (float32) for regression, and ``source_ids``
    (row -> the source's sample id); :func:`skmm_pipeline.data.shards.read_shard` reads it as usual.

    Existing shard files are never replaced unless ``overwrite`` (deliveries are immutable); this is
    checked for every shard before anything is written. Unreadable images are skipped (a shard keeps
    its other rows) or raise, per ``on_corrupt``; a part whose images are all unreadable writes no
    file (its entry has ``rows == 0``; logged).
    """
    _check_on_corrupt(on_corrupt)
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
        rows, skipped = _write_rows(source, path, part, batch_size, on_corrupt, landing_dir)
        if rows:
            _log_skipped(f"shard {name}", skipped, len(part))
        else:
            log.warning("shard %s not written: none of its %d images is readable in %s %s",
                        name, len(part), source.kind, source.location)
        written.append(WrittenShard(name, path, rows, skipped))
    return written


def write_split(source: ImageSource, path, indices=None, *, batch_size: int = 256, on_corrupt: str = "skip") -> WrittenShard:
    """Write one split (e.g. validation or test) as a single file in the shard format, streamed like
    :func:`write_shards`. Keep such files out of the landing folder: the sensor takes every ``*.npz``
    there for a pool shard."""
    _check_on_corrupt(on_corrupt)
    path = Path(path)
    check_shard_name(path.stem)
    idx = source._indices(indices)
    if idx.size == 0:
        raise DataError("nothing to write: no rows selected")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, skipped = _write_rows(source, path, idx, batch_size, on_corrupt, path.parent)
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
