"""On-disk shards: one ``<name>.npz`` file per data delivery with ``images`` and, optionally, either
int ``labels`` (classification) or float ``targets`` (regression), never both.

``images`` are the model's inputs, float32 ``(N, C, H, W)``, or 8-bit pixels (uint8) with the per-channel
map to those inputs, ``pixel_scale`` and ``pixel_offset`` (:class:`PixelDecode`): a quarter of the bytes
to store, to read and to send to a device, which decodes them there (``data.loader``).

A sample's id is ``<shard name>/<row>``; it never changes once the shard has landed.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from skmm_pipeline.core.atomic import atomic_save_npz
from skmm_pipeline.core.errors import ShardError

SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_shard_name(name: str) -> str:
    if not SHARD_NAME.match(name or "") or ".." in name:
        raise ShardError(
            f"invalid shard name {name!r}: use letters, digits, '_', '-' and '.', no path separators or '..'"
        )
    return name


@dataclass(frozen=True)
class PixelDecode:
    """8-bit pixels to the model's inputs, per channel: ``x = u8 * scale[c] + offset[c]`` in float32, as
    a multiply and then an add (never fused), so the host and a device give the same bits."""

    scale: np.ndarray  # (C,) float32, > 0
    offset: np.ndarray  # (C,) float32

    @classmethod
    def checked(cls, scale, offset, channels: int, what: str) -> "PixelDecode":
        scale = np.array(scale, dtype=np.float32).reshape(-1)  # own read-only copies: decodes are shared
        offset = np.array(offset, dtype=np.float32).reshape(-1)
        scale.flags.writeable = offset.flags.writeable = False
        if scale.shape != (channels,) or offset.shape != (channels,):
            raise ShardError(f"{what}: pixel_scale and pixel_offset need one value per channel ({channels}), got "
                             f"{scale.shape[0]} and {offset.shape[0]}")
        if not (np.isfinite(scale).all() and np.isfinite(offset).all() and (scale > 0).all()):
            raise ShardError(f"{what}: pixel_scale must be positive and finite and pixel_offset finite, got "
                             f"{scale.tolist()} and {offset.tolist()}")
        return cls(scale, offset)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Decode ``(..., C, H, W)`` uint8 pixels."""
        return np.asarray(raw).astype(np.float32) * self.scale[:, None, None] + self.offset[:, None, None]

    def peak(self, low: np.ndarray, high: np.ndarray) -> float:
        """The largest |decoded value| given each channel's smallest and largest 8-bit value."""
        ends = np.concatenate([self(np.asarray(low, np.uint8)[:, None, None]).ravel(),
                               self(np.asarray(high, np.uint8)[:, None, None]).ravel()])
        return float(np.abs(ends).max())


class DecodedImages:
    """A uint8 shard's images as the model takes them: rows decode when indexed (``images[a:b]``,
    ``images[rows]``, ``images[i]``) and the whole array through ``np.asarray``; the pixels stay
    memory-mapped. Only rows can be indexed."""

    dtype = np.dtype(np.float32)

    def __init__(self, pixels: np.ndarray, decode: PixelDecode):
        self.pixels, self.decode = pixels, decode

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    @property
    def ndim(self) -> int:
        return self.pixels.ndim

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            raise TypeError("the decoded images of a uint8 shard are indexed by rows only")
        return self.decode(self.pixels[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.decode(self.pixels)
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True)
class Shard:
    name: str
    images: np.ndarray  # (N, C, H, W) float32, or DecodedImages of a uint8 shard
    labels: np.ndarray | None  # (N,) int64, or None for an unlabelled pool
    targets: np.ndarray | None = None  # (N,) float32 regression targets (then labels is None)
    max_abs: float | None = None  # the largest |pixel|, when the pixels were read to verify them

    @property
    def pixels(self) -> np.ndarray:
        """The stored array: uint8 pixels (decode with :attr:`decode`) or the float32 images."""
        return self.images.pixels if isinstance(self.images, DecodedImages) else self.images

    @property
    def decode(self) -> PixelDecode | None:
        return self.images.decode if isinstance(self.images, DecodedImages) else None

    @property
    def ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(len(self.images))]

    @property
    def task(self) -> str | None:
        """``"classification"`` (labels), ``"regression"`` (targets) or ``None`` (unlabelled)."""
        if self.labels is not None:
            return "classification"
        return "regression" if self.targets is not None else None


def file_signature(path: Path) -> list[int]:
    """``[size, mtime_ns, inode]`` of a file: changes whenever the file is rewritten or replaced (the
    cheap check git's index and DVC's state use), so a verified shard need not be read twice."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray | None = None,
                targets: np.ndarray | None = None, source_ids=None, classes=None,
                pixel_scale=None, pixel_offset=None) -> None:
    """Write a shard: ``labels`` (int, classification) or ``targets`` (float, regression) or neither, and
    optionally where each image came from (``source_ids``, one string per image) and the task's class
    names (``classes``: label ``k`` is ``classes[k]``; see :func:`shard_class_names`).

    uint8 ``images`` are stored as they are, with the per-channel decode to the model's inputs
    (:class:`PixelDecode`; by default ``u8 / 255``, i.e. [0, 1]); any other dtype is stored as float32."""
    name = check_shard_name(Path(path).stem)
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4:
            raise ShardError(f"shard {name!r}: images must be (N, C, H, W), got shape {images.shape}")
        C = images.shape[1]
        decode = PixelDecode.checked(np.full(C, 1 / 255) if pixel_scale is None else pixel_scale,
                                     np.zeros(C) if pixel_offset is None else pixel_offset, C, f"shard {name!r}")
        arrays = {"images": images, "pixel_scale": decode.scale, "pixel_offset": decode.offset}
    elif pixel_scale is not None or pixel_offset is not None:
        raise ShardError(f"shard {name!r}: pixel_scale and pixel_offset decode uint8 images, these are {images.dtype}")
    else:
        arrays = {"images": images.astype(np.float32)}
    if labels is not None and targets is not None:
        raise ShardError(f"shard {name!r}: give labels (classification) or targets (regression), not both")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise ShardError(f"shard {name!r}: labels must be integer class indices, got dtype {labels.dtype}")
        arrays["labels"] = labels.astype(np.int64)
    if targets is not None:
        arrays["targets"] = _checked_targets(f"shard {name!r}", np.asarray(targets), len(arrays["images"]))
    if source_ids is not None:
        arrays["source_ids"] = np.array([str(s) for s in source_ids])
        if arrays["source_ids"].shape != (len(arrays["images"]),):
            raise ShardError(f"shard {name!r}: {len(arrays['source_ids'])} source ids for {len(arrays['images'])} images")
    if classes is not None:
        if labels is None:
            raise ShardError(f"shard {name!r}: class names need labels")
        arrays["classes"] = np.array([str(c) for c in classes])
        if arrays["labels"].size and arrays["labels"].max() >= len(arrays["classes"]):
            raise ShardError(f"shard {name!r}: label {int(arrays['labels'].max())} has no name among "
                             f"{len(arrays['classes'])} classes")
    atomic_save_npz(Path(path), **arrays)


def shard_class_names(path: Path) -> tuple[str, ...] | None:
    """The class names a shard file carries (its ``classes`` array: label ``k`` is ``classes[k]``), or
    ``None`` when it has none; an unreadable file is a :class:`ShardError`."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            return tuple(str(c) for c in z["classes"]) if "classes" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ShardError(f"shard {Path(path).stem!r} at {path} is unreadable: {exc}") from exc


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


CHECK_ELEMS = 1 << 22  # values per step of the streamed finiteness and checksum pass


def max_abs(images: np.ndarray, chunk: int = CHECK_ELEMS, visit: Callable[[np.ndarray], None] | None = None) -> float:
    """The largest absolute pixel value, streamed ``chunk`` values at a time (memory-mapped shards are
    not loaded whole); ``visit`` is called with every block read, in order, before it is measured."""
    step = max(1, chunk // max(1, int(np.prod(images.shape[1:]))))
    peak = 0.0
    for lo in range(0, len(images), step):
        block = np.asarray(images[lo : lo + step])
        if visit is not None:
            visit(block)
        peak = max(peak, float(block.max()), -float(block.min()))  # no |block| temporary
    return peak


def _mapped_images(path: Path, info: zipfile.ZipInfo) -> tuple[np.memmap, bytes] | None:
    """The ``images.npy`` member of an uncompressed ``.npz`` as a copy-on-write memory map, with the
    bytes of its ``.npy`` header (for the checksum); ``None`` when it cannot be mapped (compressed,
    Fortran order, not float32 or uint8), and the caller loads it instead."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ShardError(f"{path}: damaged zip entry for images.npy")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        offset = fh.tell()
        fh.seek(start)
        header = fh.read(offset - start)
    if fortran or dtype not in (np.float32, np.uint8) or len(shape) != 4:
        return None
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise ShardError(f"{path}: images.npy is truncated")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype), header
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=tuple(shape)), header


def read_shard(path: Path, verify: bool = True) -> Shard:
    """Load and validate a shard; every problem is a :class:`ShardError` naming the file.

    ``images`` of a shard written uncompressed (as :func:`write_shard` and the converters in
    ``data.vision`` write them) are memory-mapped (copy-on-write): reading a shard costs memory for its
    labels, not its pixels. They are still checked in full, streamed: every value finite, and the zip
    entry's CRC-32, so a damaged file is refused as when it is loaded. ``verify=False`` skips that
    pass over the pixels of a mapped shard (structure, shapes and labels are still checked): for a file
    already verified whose :func:`file_signature` has not changed since."""
    path = Path(path)
    name = check_shard_name(path.stem)
    if not path.is_file():
        raise ShardError(f"shard {name!r} not found at {path}")
    if not zipfile.is_zipfile(path):
        raise ShardError(f"shard {name!r} at {path} is unreadable or corrupt: not an .npz (zip) archive")
    mapped = None
    try:
        with np.load(path, allow_pickle=False) as z:
            info = z.zip.getinfo("images.npy") if "images" in z.files else None
            arrays = {k: z[k] for k in z.files if k != "images"}
            if info is not None:
                mapped = _mapped_images(path, info)
                if mapped is None:
                    arrays["images"] = z["images"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ShardError(f"shard {name!r} at {path} is unreadable or corrupt: {exc}") from exc
    images = mapped[0] if mapped is not None else arrays.get("images")
    if images is None:
        raise ShardError(f"shard {name!r} at {path} has no 'images' array (found {sorted(arrays)})")
    if images.ndim != 4:
        raise ShardError(f"shard {name!r}: images must be (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ShardError(f"shard {name!r} at {path} is empty")
    decode = _decode_of(name, path, images, arrays)
    verified = verify or mapped is None  # a loaded (not mapped) shard is always checked: it is in memory
    crc = zlib.crc32(mapped[1]) if mapped is not None and verified else None
    low = np.full(images.shape[1], 255, np.uint8)
    high = np.zeros(images.shape[1], np.uint8)

    def check(block: np.ndarray) -> None:
        nonlocal crc, low, high
        if decode is not None:  # 8-bit: the channels' ranges give the largest decoded value
            low = np.minimum(low, block.min(axis=(0, 2, 3)))
            high = np.maximum(high, block.max(axis=(0, 2, 3)))
        elif not np.isfinite(block).all():
            raise ShardError(f"shard {name!r}: images contain NaN or inf")
        if crc is not None:
            crc = zlib.crc32(block, crc)

    peak = max_abs(images, visit=check) if verified else None
    if crc is not None and crc != info.CRC:
        raise ShardError(f"shard {name!r} at {path} is corrupt: the images fail their CRC-32 check")
    if decode is not None and peak is not None:
        peak = decode.peak(low, high)
    labels, targets = arrays.get("labels"), arrays.get("targets")
    if labels is not None and targets is not None:
        raise ShardError(f"shard {name!r} at {path} has both 'labels' (classification) and 'targets' (regression): "
                         "a shard carries one of them")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ShardError(f"shard {name!r}: labels shape {labels.shape} does not match {images.shape[0]} images")
    if labels is not None and labels.dtype.kind not in "iu":
        raise ShardError(f"shard {name!r}: labels must be integer class indices, got dtype {labels.dtype} "
                         "(write them as int64)")
    if labels is not None and labels.size and labels.min() < 0:
        row = int(np.argmin(labels))
        raise ShardError(f"shard {name!r}: labels must be class indices >= 0, got {int(labels[row])} at row {row}")
    if targets is not None:
        targets = _checked_targets(f"shard {name!r} at {path}", targets, images.shape[0])
    images = DecodedImages(images, decode) if decode is not None else images.astype(np.float32, copy=False)
    return Shard(name, images, None if labels is None else labels.astype(np.int64), targets, peak)


def _decode_of(name: str, path: Path, images: np.ndarray, arrays: dict) -> PixelDecode | None:
    """The decode of a uint8 shard's pixels (checked), ``None`` for float images; a decode without
    8-bit pixels, or 8-bit pixels without one, is refused."""
    has = "pixel_scale" in arrays or "pixel_offset" in arrays
    if images.dtype != np.uint8:
        if has:
            raise ShardError(f"shard {name!r} at {path}: pixel_scale/pixel_offset decode uint8 images, these are "
                             f"{images.dtype}")
        return None
    if not ("pixel_scale" in arrays and "pixel_offset" in arrays):
        raise ShardError(f"shard {name!r} at {path}: uint8 images need 'pixel_scale' and 'pixel_offset' (the map to "
                         "the model's inputs): write the shard with write_shard or skmm shards import")
    return PixelDecode.checked(arrays["pixel_scale"], arrays["pixel_offset"], images.shape[1], f"shard {name!r} at {path}")
