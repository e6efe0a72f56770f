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
    """Content hashes of the shards admitted so far, by name, in one JSON file: a shard whose content
    equals an admitted shard's under another name is refused, naming it. The first shard admitted is
    the original; an entry whose file is gone is dropped, one whose file changed is hashed again."""

    def __init__(self, cache: Path):
        self.cache = Path(cache)

    def _load(self) -> dict:
        try:
            return json.loads(self.cache.read_text())
        except (OSError, ValueError):
            return {}

    def admit(self, name: str, path: Path, sha: str) -> None:
        """Record shard ``name`` (file ``path``, content ``sha``), or raise :class:`ShardError` if an
        admitted shard in the same folder has that content."""
        entries = self._load()
        folder = Path(path).parent
        for other in sorted(set(entries) - {name}):
            other_path = folder / f"{other}.npz"
            if not other_path.is_file():
                del entries[other]
                continue
            signature = file_signature(other_path)
            if entries[other].get("signature") != signature:
                entries[other] = {"signature": signature, "sha256": file_sha256(other_path)}
            if entries[other]["sha256"] == sha:
                raise ShardError(f"shard {name!r} has the same content as shard {other!r} (sha256 {sha[:12]}): "
                                 f"remove the copy {Path(path).name} from {folder}")
        entries[name] = {"signature": file_signature(path), "sha256": sha}
        atomic_write_bytes(self.cache, json.dumps(entries, sort_keys=True).encode())
