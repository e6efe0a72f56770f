"""The image transform of every source: PIL image -> normalised float32 ``(C, H, W)``, or its 8-bit
pixels and the per-channel map to those values (what 8-bit shards store)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.shards import PixelDecode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 ``(C, H, W)``: convert to ``mode``, resize, centre crop, then per channel
    ``(x/255 - mean) / std``, computed as ``x * 1/(255 std) - mean/std`` (:meth:`decode`).

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

    def decode(self) -> PixelDecode:
        """The per-channel map of an 8-bit pixel ``u8`` (:meth:`encode`) to its normalised value,
        ``u8 * 1/(255 std) + (-mean/std)``: what 8-bit shards store with their pixels."""
        return _decode(tuple(self.mean), tuple(self.std), self.channels)

    def encode(self, image) -> np.ndarray:
        """PIL image -> uint8 ``(C, H, W)``: converted, resized and centre-cropped, not yet normalised."""
        arr = np.asarray(self._geometry(image), dtype=np.uint8)
        return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))

    def __call__(self, image) -> np.ndarray:
        """PIL image -> the model's float32 input: :meth:`decode` of :meth:`encode`, so an 8-bit shard
        decodes to the same bits."""
        return np.ascontiguousarray(self.decode()(self.encode(image)))

    def _geometry(self, image):
        """Converted to ``mode``, resized and centre-cropped."""
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
        return img


@functools.lru_cache(maxsize=64)
def _decode(mean: tuple, std: tuple, channels: int) -> PixelDecode:
    """:meth:`ImageTransform.decode`, built once per normalisation (the transform runs per image)."""
    std_ = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
    mean_ = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
    return PixelDecode.checked(1.0 / (255.0 * std_), -mean_ / std_, channels, "ImageTransform")


# The embedded small CNN's input: 8 x 8 grey in [0, 1], like scikit-learn's digits.
SMALL_CNN_TRANSFORM = ImageTransform(size=8, mode="L")
