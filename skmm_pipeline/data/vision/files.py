"""Sources of image files: :class:`ImageFolder` (one folder per class) and :class:`ImageCSV`
(a CSV of image paths and regression targets)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.vision.source import ImageSource, _open_image
from skmm_pipeline.data.vision.transform import ImageTransform

# The package's logger: the name the warnings had before the package was split into modules.
log = logging.getLogger(__package__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        # pandas only here: importing it costs about 0.3 s (measured with python -X importtime, after
        # numpy), three times the rest of data.vision, which models.backbones imports for its transform.
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
