"""The public face of the sketch engine: :class:`GradientSketcher` (operators, identity, whole
datasets and streams of batches), :func:`calibrate_block_scales` and :func:`sketch_gradients`."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core import defaults
from skmm_pipeline.core.device_blocks import is_out_of_memory, out_of_memory, pad_rows, resolve_device
from skmm_pipeline.core.gradients import FactorBlock, GradientFactorizer
from skmm_pipeline.core.sketch import (
    ROW_ALIGN,
    SKETCHES,
    Sketch,
    make_sketch,
    resolve_kind,
)
from skmm_pipeline.core.sketch_engine.streaming import (
    PRECISIONS,
    BlockStreaming,
    staged,
)
from skmm_pipeline.core.validation import InputError, check_int

# 2: convolutions in channels_last layout and eval-mode BatchNorm as its affine map on the differentiated
# path (rows differ from version 1 by float rounding only; sketches of different versions are never joined).
ENGINE_VERSION = 2
KINDS = ("auto", *SKETCHES)


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the weights: the model's identity in sketch identities and lineage
    (``models.backbones.model_id``)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GradientSketcher(BlockStreaming):
    """Sketches of per-sample gradients of a model's finetuned parameters, one m-row per sample.

    Parameters
    ----------
    model: any ``nn.Module`` returning ``(batch x K)`` outputs; moved to ``device`` and run in eval mode.
    sketch_dim: m > 0.
    kind: ``auto`` (TensorSketch for large outer-product blocks, see :func:`resolve_kind`), ``gaussian``
        (the dense reference), ``countsketch`` or ``tensorsketch``; see ``core.sketch``.
    seed: fixes the operators and the random labels.
    layers: ``"ft1"`` (last Linear), ``"ft2"`` (last two Linear/Conv2d) or module names.
    label_mode, draws: see ``core.gradients`` (``expected`` is label-free and noise-free). For a model
        with one output (regression) ``expected`` gives the Jacobian rows (mode ``jacobian``) and
        ``random``/``true`` are refused, see :meth:`prepare`.
    block_scales: ``{layer name: scale}`` for multi-block parameter sets, from :func:`calibrate_block_scales`.
    model_id: recorded in the identity; by default a content hash of the weights.
    device: ``None``/``"auto"`` (cuda when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision: ``float32``, or ``float16``/``bfloat16`` autocast of the model on a GPU (sketch sums
        stay float32).
    block_rows: rows per compute step, a multiple of 16. By default, on the CPU it is derived from the
        model's activation size per sample (16 example rows, a 256 MiB budget, 64 to 1,024 rows), so it
        is the same for every shard and machine; on a CUDA device it is measured (the peak memory of a
        32-row block against half the free memory and 16 GiB, a power of two from 64 to 16,384 rows).
        The last block of a stream runs on 16, 32, 64, ... rows (padded). A block that runs out of
        device memory is redone in halves and later blocks are cut smaller. Rows are bit-identical
        across block sizes on the CPU (tested); on CUDA, kernels chosen per shape round differently
        (within float rounding), so pin ``block_rows`` there for rows bit-identical across runs.
    channels_last: run a convolutional model in NHWC layout (``None``: yes; faster with CUDA's and
        oneDNN's kernels). The layout changes rows by float rounding only.
    class_probes: label-free modes with a block below the logits layer (FT-2): the most class-space
        directions its gradient is taken along, one backward probe each (default 16). A model with more
        classes gets a seeded sketch of its class space (unbiased inner products, see
        ``core.gradients``); ``None`` takes all K - 1. Recorded in the identity when it applies.
    """

    def __init__(
        self,
        model: nn.Module,
        sketch_dim: int = 128,
        *,
        kind: str = "auto",
        seed: int = 0,
        layers: str | Sequence[str] = "ft1",
        label_mode: str = "expected",
        draws: int = 1,
        block_scales: Mapping[str, float] | None = None,
        model_id: str | None = None,
        device=None,
        precision: str = "float32",
        block_rows: int | None = None,
        channels_last: bool | None = None,
        class_probes: int | None = defaults.CLASS_PROBES,
    ):
        sketch_dim = check_int(sketch_dim, "sketch_dim (m)", minimum=1)
        if kind not in KINDS:
            raise InputError(f"unknown sketch kind {kind!r}; available: {list(KINDS)}")
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; available: {list(PRECISIONS)}")
        self.device = resolve_device(device)
        if precision != "float32" and self.device.type != "cuda":
            raise InputError(f"precision={precision!r} (autocast) is only available on a CUDA device")
        block_rows = check_int(block_rows, "block_rows", minimum=1, optional=True)
        if block_rows is not None and block_rows % ROW_ALIGN:
            raise InputError(f"block_rows must be a positive multiple of {ROW_ALIGN}, got {block_rows!r}")
        has_conv = any(isinstance(mod, nn.Conv2d) for mod in model.modules())
        # NHWC convolutions: the fast layout of CUDA's tensor-core kernels and of oneDNN on the CPU.
        self.channels_last = bool(has_conv and (channels_last is None or channels_last))
        self.model = model.to(self.device, memory_format=torch.channels_last) if self.channels_last else model.to(self.device)
        self.factorizer = GradientFactorizer(model, layers, label_mode, draws, seed, class_probes)
        self.sketch_dim, self.kind, self.seed = int(sketch_dim), kind, int(seed)
        self.precision = precision
        self.block_rows: int | None = None if block_rows is None else int(block_rows)
        self.block_scales = self._check_scales(block_scales)
        self.model_id = model_fingerprint(model) if model_id is None else str(model_id)
        self.sketches: list[tuple[str, Sketch]] | None = None  # (block name, operator), in block order
        self.block_shapes: list[tuple[int, int]] = []  # (dL, dR) of each block's factors

    # ---------------------------------------------------------------------------------------------
    @property
    def label_mode(self) -> str:
        return self.factorizer.label_mode

    @property
    def layer_names(self) -> list[str]:
        return self.factorizer.layer_names

    def _check_scales(self, scales) -> dict[str, float]:
        if scales is None:
            return {}
        unknown = set(scales) - set(self.layer_names)
        if unknown:
            raise InputError(f"block_scales name layers {sorted(unknown)} outside the parameter set {self.layer_names}")
        out = {}
        for k, v in scales.items():
            v = float(v)
            if not math.isfinite(v) or v <= 0:
                raise InputError(f"block scale for {k!r} must be a positive finite number, got {v!r}")
            out[k] = v
        return out

    def prepare(self, example) -> "GradientSketcher":
        """Learn the model's output structure from a few example inputs, build the operators and size
        the compute blocks (measured on the device for CUDA, see ``core.device_blocks``)."""
        if self.sketches is None:
            x = pad_rows(self._put_x(example[:ROW_ALIGN]), ROW_ALIGN)
            try:
                with self._autocast():
                    self.factorizer.prepare(x)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory(ROW_ALIGN, exc) from exc
                raise
            self._single_output_mode()
            self.sketches = []
            for name, shape in self.factorizer.block_shapes():
                kind = resolve_kind(self.kind, shape, self.sketch_dim)
                op = make_sketch(kind, shape[0] * shape[1], self.sketch_dim, self.seed, name,
                                 shape=shape if kind == "tensorsketch" else None)
                self.sketches.append((name, op))
                self.block_shapes.append(tuple(shape))
            if self.block_rows is None:
                self.block_rows = self._auto_block_rows(x)
        return self

    def _single_output_mode(self) -> None:
        """A model with one output is a regression model (squared loss): there is no class to draw or
        to take, so ``random`` and ``true`` are refused, and ``expected`` is the squared loss's
        label-free moment ``J_i^T J_i`` (up to the residual variance), i.e. the Jacobian rows: the
        label mode becomes ``jacobian`` (and the identity says so)."""
        f = self.factorizer
        if f.num_classes != 1:
            return
        if f.label_mode in ("random", "true"):
            raise InputError(
                f"label_mode={f.label_mode!r} takes gradients of a cross-entropy loss over classes, but the model "
                "has one output (regression): use label_mode='expected' (label-free Jacobian rows)"
            )
        if f.label_mode == "expected":
            f.label_mode = "jacobian"

    def _require_prepared(self):
        if self.sketches is None:
            raise RuntimeError("call prepare(example_inputs) or sketch(...) first: the operators depend on the model's outputs")

    @property
    def gradient_dim(self) -> int:
        """r: length of the (never materialised) per-sample gradient row."""
        self._require_prepared()
        return sum(op.input_dim for _, op in self.sketches)

    @property
    def identity(self) -> dict:
        """Everything the rows depend on, as a JSON-ready dict (store it with the sketch). ``class_probes``
        is there only when a deep block's class space is sketched (identities of exact rows are unchanged)."""
        self._require_prepared()
        extra = {"class_probes": self.factorizer.class_probes} if self.factorizer.probes_sketched else {}
        return {
            "engine": ENGINE_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "sketch_dim": self.sketch_dim,
            "param_set": list(self.layer_names),
            "label_mode": self.label_mode,
            "draws": self.factorizer.draws,
            "model_id": self.model_id,
            "precision": self.precision,
            "gradient_dim": self.gradient_dim,
            "blocks": [
                {"name": name, "kind": op.kind, "shape": list(shape), "scale": self.block_scales.get(name, 1.0)}
                for (name, op), shape in zip(self.sketches, self.block_shapes)
            ],
            **extra,
        }

    # ---------------------------------------------------------------------------------------------
    def sketch_stream(self, batches: Iterable) -> Iterator[np.ndarray]:
        """Sketch an iterable of batches ``x`` or ``(x, labels, sample_ids)``; yields one float32 array of
        rows per batch (once the block holding its last row is done). Memory does not depend on how many
        batches there are; inputs and labels may be arrays or tensors on any device."""
        sizes: deque = deque()
        parts: list[np.ndarray] = []
        have = 0
        for _, rows in self._rows(self._checked(batches, sizes)):
            parts.append(rows)
            have += len(rows)
            while sizes and have >= sizes[0]:
                n = sizes.popleft()
                if n == 0:
                    yield np.empty((0, self.sketch_dim), np.float32)
                    continue
                joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
                parts = [joined[n:]] if n < len(joined) else []
                have -= n
                yield np.array(joined[:n], dtype=np.float32)
        while sizes:  # trailing empty batches
            sizes.popleft()
            yield np.empty((0, self.sketch_dim), np.float32)

    def sketch(self, inputs, labels=None, sample_ids=None, batch_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Sketch a whole dataset (N x ...): returns ``out`` (N x m float32; allocated when not given,
        e.g. a memory map from ``core.sketch_io.SketchShardWriter``). ``batch_size`` only sets how many
        samples are staged on the device at a time; it never changes the rows."""
        N = len(inputs)
        if N == 0:
            raise InputError("no samples to sketch")
        self._check_labels_ids(N, labels, sample_ids, convert=False)
        self.prepare(inputs)
        return self.sketch_into(staged(inputs, labels, sample_ids, self._stage_rows(batch_size)), N, out)

    def sketch_into(self, batches: Iterable, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Write the rows of ``n`` samples given as batches ``(x, labels, sample_ids)`` (e.g. from a
        ``torch.utils.data.DataLoader``) into ``out`` (n x m float32, allocated when not given) as each
        block completes."""
        if out is None:
            out = np.empty((n, self.sketch_dim), dtype=np.float32)
        elif out.shape != (n, self.sketch_dim) or out.dtype != np.float32:
            raise InputError(f"out must be a float32 array of shape {(n, self.sketch_dim)}, got {out.dtype} {out.shape}")
        done = 0
        for offset, rows in self._rows(self._checked(batches)):
            if offset + len(rows) > n:
                raise InputError(f"the batches hold more than the {n} samples announced")
            out[offset : offset + len(rows)] = rows
            done = offset + len(rows)
        if done != n:
            raise InputError(f"the batches held {done} samples, {n} were announced")
        return out

    def gradients(self, inputs, labels=None, sample_ids=None) -> torch.Tensor:
        """The per-sample gradient rows (N x r, block scales applied, float32 on the CPU), materialised.
        For small data, tests and dense references only."""
        parts = []
        for blk, blocks in self._factor_stream(inputs, labels, sample_ids):
            cols = []
            for fb in blocks:
                g = FactorBlock(fb.name, fb.left[: blk.valid], fb.right[: blk.valid]).materialize()
                cols.append(g * self.block_scales.get(fb.name, 1.0))
            parts.append(torch.cat(cols, dim=1).cpu())
        return torch.cat(parts)

    def block_energy(self, inputs, labels=None, sample_ids=None, batch_size: int | None = None) -> dict[str, float]:
        """Mean squared gradient norm of each (unscaled) parameter block over ``inputs``."""
        totals: dict[str, float] = {n: 0.0 for n in self.layer_names}
        for blk, blocks in self._factor_stream(inputs, labels, sample_ids, batch_size):
            for fb in blocks:
                sq = FactorBlock(fb.name, fb.left[: blk.valid].double(), fb.right[: blk.valid].double()).sq_norms()
                totals[fb.name] += float(sq.sum())
        return {n: v / len(inputs) for n, v in totals.items()}


def calibrate_block_scales(model: nn.Module, inputs, *, labels=None, sample_ids=None, batch_size=None, **sketcher_kwargs) -> dict[str, float]:
    """Scales that give every parameter block the same mean squared gradient norm (the total is kept).

    ``sketcher_kwargs`` are those of :class:`GradientSketcher` (layers, label_mode, draws, seed, device);
    pass the result as ``block_scales`` to every sketcher of the run.
    """
    sketcher_kwargs.pop("block_scales", None)
    energy = GradientSketcher(model, **sketcher_kwargs).block_energy(inputs, labels, sample_ids, batch_size)
    if any(v <= 0 or not math.isfinite(v) for v in energy.values()):
        raise InputError(f"cannot balance parameter blocks with zero or non-finite gradient energy: {energy}")
    total = sum(energy.values())
    return {n: float(f"{math.sqrt(total / (len(energy) * e)):.6g}") for n, e in energy.items()}


def sketch_gradients(model: nn.Module, inputs, sketch_dim: int = 128, *, labels=None, sample_ids=None,
                     batch_size: int | None = None, **sketcher_kwargs) -> tuple[np.ndarray, dict]:
    """One call: the N x m float32 sketch of ``inputs`` and its identity dict (see :class:`GradientSketcher`)."""
    sk = GradientSketcher(model, sketch_dim, **sketcher_kwargs)
    rows = sk.sketch(inputs, labels=labels, sample_ids=sample_ids, batch_size=batch_size)
    return rows, sk.identity
