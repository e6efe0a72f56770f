"""Import a local dataset into a workspace: pool shards into the landing folder, validation/test
splits into the evaluation folder. One function behind the ``import_data`` Dagster job and
``skmm shards import``, so switching from the demo to your data is configuration, not code.

Sources (read from local paths only): ``cifar10`` (the ``cifar-10-batches-py`` folder or its parent;
``split`` train/test), ``imagefolder`` (``root/<class>/**/<image>``) and ``csv`` (image path + numeric
target, regression). Images are transformed for the configured backbone
(:func:`skmm_pipeline.models.backbones.default_transform`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skmm_pipeline.data.contract import ShardHashes
from skmm_pipeline.data.shards import ShardError, check_shard_name
from skmm_pipeline.data.vision import (
    CIFAR10,
    SMALL_CNN_TRANSFORM,
    DataError,
    ImageCSV,
    ImageFolder,
    ImageTransform,
    check_pixels,
    split_indices,
    write_shards,
    write_split,
)

SOURCES = ("cifar10", "imagefolder", "csv")
ROLES = ("pool", "val", "test")


@dataclass(frozen=True)
class ImportRequest:
    source: str
    path: str
    role: str = "pool"
    split: str = "train"  # cifar10 only
    name: str = ""  # shard name prefix (pool); default: derived from the path
    shards: int = 1
    val_fraction: float = 0.0  # role "pool": also hold out this share as the validation split
    test_fraction: float = 0.0  # role "pool": also hold out this share as the test split
    seed: int = 0
    on_corrupt: str = "skip"
    overwrite_eval: bool = False  # replace an existing val.npz / test.npz
    replace: bool = False  # replace existing pool shards of the same names (recorded as replacing them)
    path_column: str = "path"  # csv only
    target_column: str = "target"  # csv only
    pixels: str = "uint8"  # what shards and splits store: 8-bit pixels + their decode, or float32 inputs

    def checked(self) -> "ImportRequest":
        if self.source not in SOURCES:
            raise DataError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.role not in ROLES:
            raise DataError(f"role must be one of {ROLES}, got {self.role!r}")
        if not self.path:
            raise DataError("path is required: the dataset's folder (cifar10, imagefolder) or CSV file (csv)")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise DataError(f"shards must be a positive integer, got {self.shards!r}")
        for what in ("val_fraction", "test_fraction"):
            v = getattr(self, what)
            if not (0 <= v < 1):
                raise DataError(f"{what} must be in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise DataError("val_fraction + test_fraction must leave some rows for the pool")
        if self.role != "pool" and (self.val_fraction or self.test_fraction):
            raise DataError(f"val_fraction/test_fraction only apply to role 'pool', not {self.role!r}")
        check_pixels(self.pixels)
        if self.name:
            check_shard_name(f"{self.name}-000")
        return self

    def prefix(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.path).resolve()
        stem = stem.stem if self.source == "csv" else stem.name
        if stem == "cifar-10-batches-py":
            stem = "cifar10"
        cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-_") or self.source
        return check_shard_name(f"{cleaned}-{self.split}" if self.source == "cifar10" else cleaned)


@dataclass
class ImportResult:
    shards: list[str] = field(default_factory=list)  # written pool shard names
    rows: dict[str, int] = field(default_factory=dict)  # file stem -> rows written
    skipped: int = 0  # unreadable images left out
    eval_files: list[str] = field(default_factory=list)
    task: str = ""
    replaced: list[str] = field(default_factory=list)  # pool shards that replaced existing ones


def open_source(req: ImportRequest, tf: ImageTransform):
    if req.source == "cifar10":
        return CIFAR10(req.path, split=req.split, transform=tf)
    if req.source == "imagefolder":
        return ImageFolder(req.path, transform=tf)
    return ImageCSV(req.path, transform=tf, path_column=req.path_column, target_column=req.target_column)


def import_dataset(req: ImportRequest, landing_dir, eval_dir, transform: ImageTransform | None = None,
                   registry: ShardHashes | None = None) -> ImportResult:
    """Write ``req``'s dataset into ``landing_dir`` (pool shards ``<prefix>-000.npz`` ...) and/or
    ``eval_dir`` (``val.npz``, ``test.npz``). Everything is checked before the first file is written:
    existing shards are replaced only with ``replace`` (recorded in ``registry``, the shards' content-hash
    registry, as replacing their old content), an existing evaluation split only with ``overwrite_eval``.
    Files are written into a staging folder and moved into place at the end: an import that fails
    (e.g. an unreadable image with ``on_corrupt="raise"``) or is killed while writing leaves nothing
    behind (its staging folders are cleared by a later import once they are a day old).

    ``transform`` turns each image into the model's input (``models.backbones.default_transform`` of
    the backbone); the default is the embedded small CNN's (8 x 8 grey in [0, 1]).
    """
    req = req.checked()
    landing_dir, eval_dir = Path(landing_dir), Path(eval_dir)
    if landing_dir.resolve() == eval_dir.resolve():
        raise DataError("the evaluation folder must differ from the landing folder (the sensor takes every .npz there)")
    source = open_source(req, transform or SMALL_CNN_TRANSFORM)
    labels = source.targets if source.task == "classification" else None
    n = len(source)
    targets: dict[str, object] = {}  # eval role -> row indices
    pool_idx = None
    if req.role == "pool":
        prefix = req.prefix()
        fr = [1 - req.val_fraction - req.test_fraction, req.val_fraction, req.test_fraction]
        pool_idx, val_idx, test_idx = split_indices(n, fr, seed=req.seed, labels=labels)
        for role, idx, frac in (("val", val_idx, req.val_fraction), ("test", test_idx, req.test_fraction)):
            if idx.size:
                targets[role] = idx
            elif frac:
                raise DataError(f"{role}_fraction {frac} of {n} rows leaves no {role} row: raise it or import the "
                                f"{role} split with role '{role}'")
        if req.shards > pool_idx.size:
            raise DataError(f"{req.shards} shards for {pool_idx.size} pool rows: use fewer shards")
        existing = [p.name for k in range(req.shards) if (p := landing_dir / f"{prefix}-{k:03d}.npz").exists()]
        if existing and not req.replace:
            raise ShardError(f"shard file(s) already exist in {landing_dir}, shards are immutable deliveries: "
                             f"{existing[:3]}; choose another name, or replace them (skmm shards import --replace)")
    else:
        targets[req.role] = None  # the whole source
    for role in targets:
        out = eval_dir / f"{role}.npz"
        if out.exists() and not req.overwrite_eval:
            raise DataError(f"{out} already exists; set overwrite_eval to replace it")
    # Everything is written into staging folders of this run, inside the landing and the evaluation
    # folders (the sensor only looks at *.npz directly in the landing folder; same filesystem, so the
    # moves are renames), and moved into place at the end: a failed or killed import leaves no partial
    # delivery. Staging folders older than a day (left by killed imports) are cleared.
    result = ImportResult(task=source.task)
    stages = []
    try:
        if pool_idx is not None:
            stages.append(_stage(landing_dir))
            written = write_shards(source, stages[-1], prefix, n_shards=req.shards, indices=pool_idx,
                                   on_corrupt=req.on_corrupt, pixels=req.pixels)
            for w in written:
                result.skipped += len(w.skipped)
                if w.rows:
                    result.shards.append(w.name)
                    result.rows[w.name] = w.rows
        if targets:
            stages.append(_stage(eval_dir))
            for role, idx in targets.items():
                w = write_split(source, stages[-1] / f"{role}.npz", idx, on_corrupt=req.on_corrupt, pixels=req.pixels)
                result.skipped += len(w.skipped)
                result.rows[role] = w.rows
        for name in result.shards:
            if req.replace and (landing_dir / f"{name}.npz").exists():
                os.replace(stages[0] / f"{name}.npz", landing_dir / f"{name}.npz")
                result.replaced.append(name)
                if registry is not None:
                    registry.replace(name, landing_dir / f"{name}.npz")
            else:
                _move_new(stages[0] / f"{name}.npz", landing_dir / f"{name}.npz")
        for role in targets:
            os.replace(stages[-1] / f"{role}.npz", eval_dir / f"{role}.npz")
            result.eval_files.append(str(eval_dir / f"{role}.npz"))
    finally:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)
    return result


STAGE_PREFIX = ".import-"
STALE_SECONDS = 24 * 3600


def _stage(folder: Path) -> Path:
    """A fresh staging folder of this run inside ``folder``; stale ones of killed runs are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob(f"{STAGE_PREFIX}*"):
        try:
            if old.is_dir() and now - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:
            pass
    return Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))


def _move_new(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, never replacing an existing ``dst`` (shards are immutable deliveries)."""
    conflict = ShardError(f"shard file {dst} appeared during the import; shards are immutable deliveries")
    try:
        os.link(src, dst)  # fails if dst exists
    except FileExistsError:
        raise conflict from None
    except OSError:  # no hard links here: check, then rename
        if dst.exists():
            raise conflict from None
        os.replace(src, dst)
        return
    src.unlink()
