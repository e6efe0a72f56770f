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
:class:`ImageTransform` (resize, centre crop, normalise), or their 8-bit pixels, with int64 labels
(classification) or float32 targets (regression). :func:`write_shards` cuts a source into ``k`` shard
files for the landing folder, one shard at a time, through a memory map: memory stays bounded by one
batch whatever the shard size. Shards store the 8-bit pixels and the transform's per-channel decode by
default (``pixels="uint8"``: a quarter of the bytes of float32, decoded where the model runs).

Unreadable images (truncated, not an image, undecodable) are **skipped** by default
(``on_corrupt="skip"``): each call logs one warning with the count and the first ids, and returns the
skipped ids. ``on_corrupt="raise"`` stops at the first one with a :class:`CorruptImageError` naming
the file. A *missing* file listed in a CSV, a missing or empty class folder, and a malformed CIFAR
batch are errors of the dataset's layout, not of one image: they raise :class:`DataError` when the
source is opened.

Modules: :mod:`.transform` (:class:`ImageTransform`), :mod:`.source` (the :class:`ImageSource`
interface), :mod:`.cifar` and :mod:`.files` (the sources), :mod:`.writing` (splits, shards). Import
from the package.
"""

from skmm_pipeline.core.errors import CorruptImageError, DataError
from skmm_pipeline.data.vision.cifar import (
    CIFAR10,
    CIFAR10_DIR,
    CIFAR10_TEST,
    CIFAR10_TRAIN,
)
from skmm_pipeline.data.vision.files import IMAGE_EXTENSIONS, ImageCSV, ImageFolder
from skmm_pipeline.data.vision.source import ON_CORRUPT, ImageBatch, ImageSource
from skmm_pipeline.data.vision.transform import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_CNN_TRANSFORM,
    ImageTransform,
)
from skmm_pipeline.data.vision.writing import (
    PIXELS,
    ShardSources,
    WrittenShard,
    check_pixels,
    read_shard_sources,
    split_indices,
    write_shards,
    write_split,
)

__all__ = [
    "CIFAR10",
    "CIFAR10_DIR",
    "CIFAR10_TEST",
    "CIFAR10_TRAIN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ON_CORRUPT",
    "PIXELS",
    "SMALL_CNN_TRANSFORM",
    "CorruptImageError",
    "DataError",
    "ImageBatch",
    "ImageCSV",
    "ImageFolder",
    "ImageSource",
    "ImageTransform",
    "ShardSources",
    "WrittenShard",
    "check_pixels",
    "read_shard_sources",
    "split_indices",
    "write_shards",
    "write_split",
]
