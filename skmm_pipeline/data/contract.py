"""The data contract a pool shard must meet before anything downstream sees it.

``read_shard`` checks what a file can say about itself (structure, finite values, integer labels
``>= 0``). :class:`ShardContract` checks what the run expects of every shard, from the evaluation
splits and the settings: the images' shape (what the model takes), the task (labels or targets, as
the splits carry), labels inside the task's classes, pixel values in the range the model's inputs
take, and content that is not a copy of another landed shard. Each refusal is one line naming the
shard, the field and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.data.shards import (
    Shard,
    ShardError,
    file_sha256,
    file_signature,
    max_abs,
)

CARRIES = {"classification": "class labels", "regression": "regression targets", None: "neither labels nor targets"}


@dataclass(frozen=True)
class ShardContract:
    """What every pool shard of a run must be: ``image_shape`` per sample, the ``task`` of the
    evaluation splits, labels in ``[0, num_classes)``, and ``|pixel| <= max_abs_pixel`` (0: no bound)."""

    image_shape: tuple[int, ...]
    task: str
    num_classes: int
    max_abs_pixel: float = 0.0

    def check(self, shard: Shard) -> None:
        name = shard.name
        shape = tuple(shard.images.shape[1:])
        if shape != tuple(self.image_shape):
            raise ShardError(f"shard {name!r}: images are {shape} per sample but the model takes {tuple(self.image_shape)} "
                             "(the evaluation splits' shape): import the data for this backbone "
                             "(skmm shards import --backbone ..., or the import_data job)")
        if shard.task != self.task:
            raise ShardError(f"shard {name!r} carries {CARRIES[shard.task]} but the evaluation splits carry "
                             f"{CARRIES[self.task]}: give every shard {CARRIES[self.task]}")
        if self.task == "classification" and len(shard.labels) and int(shard.labels.max()) >= self.num_classes:
            bad = np.flatnonzero(shard.labels >= self.num_classes)
            raise ShardError(f"shard {name!r}: labels {sorted(set(shard.labels[bad[:5]].tolist()))} at rows "
                             f"{bad[:5].tolist()} are outside the task's classes [0, {self.num_classes}): "
                             "relabel them, or set settings.num_classes")
        if self.max_abs_pixel > 0:
            peak = shard.max_abs if shard.max_abs is not None else max_abs(shard.images)
            if peak > self.max_abs_pixel:
                raise ShardError(f"shard {name!r}: pixel values reach {peak:.4g}, beyond the {self.max_abs_pixel:g} the "
                                 "model's inputs take (8-bit images not scaled?): import them with skmm shards import, "
                                 "or raise settings.max_abs_pixel if this range is intended")


class ShardHashes:
    """Content hashes of the shards admitted so far, by name, in one JSON file. A shard whose content
    equals an admitted shard's under another name is refused, naming it; the first shard admitted is
    the original, and an entry whose file is gone is dropped. A shard whose content changed under its
    own name (rewritten in place) is refused too, until :meth:`replace` records that the new content
    replaces the old (``skmm shards replace``): sketches and versions were made on the old one."""

    def __init__(self, cache: Path):
        self.cache = Path(cache)

    def _load(self) -> dict:
        try:
            return json.loads(self.cache.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, entries: dict) -> None:
        atomic_write_bytes(self.cache, json.dumps(entries, sort_keys=True).encode())

    def admit(self, name: str, path: Path, sha: str) -> None:
        """Record shard ``name`` (file ``path``, content ``sha``), or raise :class:`ShardError` if an
        admitted shard in the same folder has that content, or if ``name`` was admitted with other content."""
        entries = self._load()
        folder = Path(path).parent
        old = entries.get(name, {}).get("sha256")
        if old is not None and old != sha:
            raise ShardError(f"shard {name!r} was rewritten in place: its content (sha256 {sha[:12]}) is not the one "
                             f"admitted (sha256 {old[:12]}), on which its sketches and subset versions were made: "
                             f"restore the original {Path(path).name}, land the new data under a new name, or run "
                             f"`skmm shards replace {name}` if it replaces the old")
        for other in sorted(set(entries) - {name}):
            other_path = folder / f"{other}.npz"
            if not other_path.is_file():
                del entries[other]
                continue
            signature = file_signature(other_path)
            if entries[other].get("signature") != signature:
                entries[other] = {**entries[other], "signature": signature, "sha256": file_sha256(other_path)}
            if entries[other]["sha256"] == sha:
                raise ShardError(f"shard {name!r} has the same content as shard {other!r} (sha256 {sha[:12]}): "
                                 f"remove the copy {Path(path).name} from {folder}")
        entries[name] = {**entries.get(name, {}), "signature": file_signature(path), "sha256": sha}
        self._save(entries)

    def replace(self, name: str, path: Path) -> tuple[str | None, str]:
        """Record that the content of ``path`` now replaces what shard ``name`` held: the old hash is
        kept in the entry's ``replaced`` list (with the time), so what was made on it can be told.
        Returns (old sha256 or None, new sha256)."""
        if not Path(path).is_file():
            raise ShardError(f"shard {name!r}: no file {path} to replace it with: land the new {Path(path).name} first")
        entries = self._load()
        sha = file_sha256(path)
        entry = entries.get(name, {})
        old = entry.get("sha256")
        if old is not None and old != sha:
            entry["replaced"] = [*entry.get("replaced", []), {"sha256": old, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        entries[name] = {**entry, "signature": file_signature(path), "sha256": sha}
        self._save(entries)
        return old, sha
