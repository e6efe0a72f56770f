"""The small CNN of the embedded scenario, its pretraining, and batched head-gradient sketching
(features: ``models.features``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.errors import BackboneWeightsError, InputError
from skmm_pipeline.core.gradients import gradient_dim, head_gradient_rows
from skmm_pipeline.core.progress import Progress
from skmm_pipeline.core.sketch import Sketch
from skmm_pipeline.core.validation import check_int


class BodyHeadModel(nn.Module):
    """A frozen ``body`` producing features and a linear ``head``: the shape every backbone exposes."""

    body: nn.Module
    head: nn.Linear

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(BodyHeadModel):
    """conv3x3(1->32)-ReLU-conv3x3(32->64)-ReLU-maxpool2-fc(1024->128)-ReLU-head (no BatchNorm)."""

    def __init__(self, num_classes: int = 5, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # +-1 pixel translations, one per batch: cheap augmentation that makes the features less brittle.
    dx, dy = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def pretrain(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 40,
    seed: int = 0,
    lr: float = 1e-3,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> SmallCNN:
    """Train the CNN on the source task; deterministic for a seed, a device and a CPU thread count.
    Reports epochs done (``core.progress``).

    The weights depend on torch's CPU thread count (reductions split differently): ``threads`` fixes it
    for the training and restores the global setting after; ``None`` trains with the current one.
    """
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(check_int(threads, "threads", minimum=1))
        try:
            return pretrain(images, labels, num_classes, epochs, seed, lr, batch_size, device)
        finally:
            torch.set_num_threads(before)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    X = torch.as_tensor(images)
    y = torch.as_tensor(labels)
    model.train()
    progress = Progress("pretraining the small CNN", epochs, "epochs")
    for epoch in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch_size):
            b = perm[start : start + batch_size]
            xb = _random_shift(X[b], gen).to(device)
            loss = nn.functional.cross_entropy(model(xb), y[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        progress.update(epoch + 1)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device="cpu") -> float:
    logits = torch.cat([model(x.to(device)).cpu() for x in torch.as_tensor(images).split(512)])
    return float((logits.argmax(1).numpy() == labels).mean())


def save_model(model: SmallCNN) -> bytes:
    buf = io.BytesIO()
    torch.save({"num_classes": model.num_classes, "state_dict": model.state_dict()}, buf)
    return buf.getvalue()


def load_model(path: Path, device="cpu") -> SmallCNN:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = SmallCNN(int(blob["num_classes"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneWeightsError(f"cannot load model weights from {path}: {exc}") from exc
    return model.to(device).eval()


# Rows of one block are computed together; a fixed block shape keeps each sample's bits independent
# of the batch size and of the shard it lands in (see core.sketch_engine).
HEAD_BLOCK_ROWS = 256


@torch.no_grad()
def sketch_head_gradients(
    model: SmallCNN,
    images: np.ndarray,
    sketch: Sketch,
    label_mode: str = "expected",
    labels: np.ndarray | None = None,
    batch_size: int = 512,
    device="cpu",
) -> np.ndarray:
    """Sketched per-sample head gradients (N x m, float32), streamed block by block.

    Only one block of gradient rows exists at a time; memory is O(block * r + N * m). ``batch_size`` is
    accepted for compatibility: the model always runs on blocks of ``HEAD_BLOCK_ROWS`` samples (the last
    one padded), so the rows do not depend on it. Any model with ``body`` and ``head`` (Linear) works;
    for other parameter sets and label modes use ``core.sketch_engine.GradientSketcher``.
    """
    expected_dim = gradient_dim(model.head.in_features, model.head.out_features, label_mode)
    if sketch.input_dim != expected_dim:
        raise InputError(f"sketch input_dim {sketch.input_dim} != gradient dimension {expected_dim} ({label_mode})")
    model.eval()
    X = torch.as_tensor(images)
    Y = None if labels is None else torch.as_tensor(labels)
    out = np.empty((len(X), sketch.sketch_dim), dtype=np.float32)
    R = HEAD_BLOCK_ROWS
    for start in range(0, len(X), R):
        xb = X[start : start + R]
        valid = len(xb)
        if valid < R:
            xb = torch.cat([xb, xb[-1:].expand(R - valid, *xb.shape[1:])])
        feats = model.body(xb.to(device))
        logits = model.head(feats)
        yb = None if Y is None else Y[start : start + R]
        rows = head_gradient_rows(feats[:valid], logits[:valid], label_mode, yb)
        out[start : start + valid] = sketch.apply(rows).cpu().numpy()
    return out
