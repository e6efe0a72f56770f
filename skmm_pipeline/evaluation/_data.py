"""What an evaluation reads: the validation and test splits, and the registered pool with its model.

:class:`EvalData` opens ``val.npz``/``test.npz`` of an evaluation folder (or the embedded digits splits
when the folder has none); :func:`load_pool` reads the pool shards in shard-name order and the
pretrained model onto the run's device, as a :class:`Pool`. Both decide the task from what the data
carries (labels: classification, targets: regression) and refuse mixtures, naming the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.device_blocks import resolve_device
from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.contract import CARRIES
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.data.shards import Shard, file_sha256, read_shard
from skmm_pipeline.models.backbones import load_backbone


class EvalData:
    """Validation and test splits: ``val.npz``/``test.npz`` in the evaluation ``folder``, or the embedded
    digits splits when that folder has none.

    ``task`` is what both splits carry: ``"classification"`` (``labels``) or ``"regression"``
    (``targets``); a split with neither, or splits that disagree, are refused naming the files.
    ``num_classes`` is 1 for regression (the model's one output). ``verify=False`` opens the splits
    without a pass over their pixels (for their shape, task and classes alone)."""

    def __init__(self, folder: Path, verify: bool = True):
        folder = Path(folder)
        present = [name for name in ("val.npz", "test.npz") if (folder / name).is_file()]
        if len(present) == 1:
            missing = "test.npz" if present == ["val.npz"] else "val.npz"
            raise DataError(f"{folder} holds {present[0]} but no {missing}: put both evaluation splits there (e.g. "
                             "the import_data job with role val / test), or neither to use the embedded digits splits")
        if present:
            self.files = {"val": folder / "val.npz", "test": folder / "test.npz"}
            # Evaluation splits are used whole (features, accuracy): 8-bit ones are decoded once here.
            val, test = (_decoded(read_shard(self.files[k], verify)) for k in ("val", "test"))
            for split, path in ((val, self.files["val"]), (test, self.files["test"])):
                if split.task is None:
                    raise DataError(f"validation and test splits in {folder} need labels (classification) or targets "
                                     f"(regression); {path} has neither")
            if val.task != test.task:
                raise DataError(f"the validation and test splits disagree on the task: {self.files['val']} carries "
                                 f"{CARRIES[val.task]}, {self.files['test']} {CARRIES[test.task]}; both need labels "
                                 "(classification) or both targets (regression)")
            self.val, self.test, self.source, self.task = val, test, str(folder), val.task
        else:
            data = load_digits_transfer()
            self.val, self.test, self.source, self.task = data.val, data.test, "embedded digits", "classification"
            self.files = {}
        if self.task == "regression":
            self.num_classes = 1
        else:
            self.num_classes = int(max(self.val.labels.max(), self.test.labels.max())) + 1

    def ids(self, split: str) -> list[str]:
        n = len(getattr(self, split).images)
        return [f"{split}/{i}" for i in range(n)]

    def as_shard(self, split: str) -> Shard:
        """The split as a :class:`Shard` named ``split`` (ids ``split/i``), e.g. to sketch it like a pool shard."""
        s = getattr(self, split)
        return Shard(split, s.images, getattr(s, "labels", None), getattr(s, "targets", None))

    def content_id(self, split: str) -> str:
        """The split's content hash: its file's sha256, or the embedded arrays' for the embedded splits."""
        if split in self.files:
            return file_sha256(self.files[split])
        s, h = getattr(self, split), hashlib.sha256()
        for arr in (s.images, s.labels):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def y(self, split: str) -> np.ndarray:
        """The split's labels (classification) or targets (regression)."""
        s = getattr(self, split)
        return s.targets if self.task == "regression" else s.labels

    def describe(self) -> str:
        files = ", ".join(str(p) for p in self.files.values()) or self.source
        return f"the evaluation splits ({files}) carry {CARRIES[self.task]}"


def _decoded(shard: Shard) -> Shard:
    """The shard with its images as one float32 array (decoded when the shard stores 8-bit pixels)."""
    return shard if shard.decode is None else dataclasses.replace(shard, images=np.asarray(shard.images))


@dataclass(frozen=True)
class Pool:
    """The registered pool in shard-name order, with the pretrained model on the run's device.

    ``y``: the labels (classification) or targets (regression) as the shards carry them; ``files``:
    the shard files, in the same order."""

    device: torch.device
    model: nn.Module
    ids: list[str]
    y: np.ndarray
    images: np.ndarray
    task: str
    files: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def _read_pool(shards: Mapping[str, Mapping], unlabelled_error: str):
    """The registered shards in shard-name order and their task (what every shard carries); unlabelled
    shards raise ``ValueError(unlabelled_error)``, shards that disagree on the task are refused naming them."""
    paths = [Path(shards[name]["path"]) for name in sorted(shards)]
    read = [read_shard(p) for p in paths]
    if any(s.task is None for s in read):
        raise DataError(unlabelled_error)
    by_task: dict[str, list[str]] = {}
    for s, p in zip(read, paths):
        by_task.setdefault(s.task, []).append(str(p))
    if len(by_task) > 1:
        raise DataError("the pool shards disagree on the task: " + "; ".join(
            f"{CARRIES[t]} in {files[:5]}" for t, files in sorted(by_task.items()))
            + ". Every shard needs labels (classification) or every shard targets (regression)")
    task = read[0].task
    return read, task, [str(p) for p in paths]


def load_pool(shards: Mapping[str, Mapping], model_path, device: str, unlabelled_error: str) -> Pool:
    """The run's device (``device``: a preference, ``"auto"`` for cuda when available), the pretrained
    model at ``model_path`` on it, and the pool of ``shards`` (shard name -> ``raw_shard`` record with its
    ``path``) in shard-name order; raises ``ValueError(unlabelled_error)`` for unlabelled shards."""
    dev = resolve_device(device)
    model = load_backbone(Path(model_path), dev)
    read, task, files = _read_pool(shards, unlabelled_error)
    ids = [i for s in read for i in s.ids]
    y = np.concatenate([s.targets if task == "regression" else s.labels for s in read])
    return Pool(dev, model, ids, y, np.concatenate([s.images for s in read]), task, files)


def load_labelled_pool(shards: Mapping[str, Mapping], model_path, device: str, unlabelled_error: str,
                       regression_error: str = "this step needs class labels (classification only)") -> Pool:
    """:func:`load_pool` for a step that needs class labels: also raises ``ValueError`` with
    ``regression_error`` for shards with regression targets."""
    pool = load_pool(shards, model_path, device, unlabelled_error)
    if pool.task != "classification":
        raise DataError(f"{regression_error}: the pool shards carry regression targets ({pool.files[:5]})")
    return pool


def check_same_task(pool: Pool, ev: EvalData) -> str:
    """The run's task: the pool and the evaluation splits must carry the same kind of targets."""
    if pool.task != ev.task:
        raise DataError(f"the pool and the evaluation splits disagree on the task: the pool shards ({pool.files[:5]}) "
                         f"carry {CARRIES[pool.task]} but {ev.describe()}; use labels everywhere (classification) "
                         "or targets everywhere (regression)")
    return pool.task


def check_regression_model(model, backbone: str) -> None:
    """A regression pool is sketched and finetuned through a one-output head; refuse any other model
    (``backbone``: the setting that built it, named in the message)."""
    if model.num_classes != 1:
        hint = ("the embedded small CNN keeps the 5 outputs of its digits pretraining" if backbone == "small_cnn"
                else "settings.num_classes must be 0 (one output when the evaluation splits carry targets) or 1")
        raise DataError(f"a regression pool (targets) needs a model with one output; the pretrained model "
                         f"({backbone}) has {model.num_classes} ({hint}): use a torchvision backbone, "
                         "e.g. backbone='resnet18', and re-materialize pretrained_model")


def check_regression_setup(model, label_mode: str, backbone: str) -> None:
    """Refuse, before any training, what a regression run cannot do."""
    if label_mode in ("random", "true"):
        raise DataError(f"label_mode={label_mode!r} takes gradients of a classification loss; a regression "
                         "pool (targets) needs label_mode='expected' (label-free): re-sketch with it")
    check_regression_model(model, backbone)
