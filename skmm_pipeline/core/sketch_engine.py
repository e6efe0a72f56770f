"""Stage 1 of SkMM: per-sample gradients of the finetuned parameters, streamed into one seeded sketch.

:class:`GradientSketcher` runs a model over a dataset in fixed-size row blocks, takes each block's
per-sample gradient factors (``core.gradients``) and adds up one sketch per parameter block, so that a
sample's row is

    g~_i = sum_b  S_b(scale_b * g_{i,b})          (one m-vector per sample)

with ``S_b`` the operator of block ``b`` (seeded by ``(seed, block name, m)``). Stacking the ``S_b`` is a
JL map of the concatenated gradient, so inner products of rows estimate those of whole gradients.

Guarantees:
- **Invariance.** A row depends on its sample alone: every model/sketch step runs on blocks of
  ``block_rows`` rows (the last one of a stream padded by repeating its last sample to 16, 32, 64, ...
  rows), random labels are drawn from ``(seed, sample id)``, and the operators from their identity.
  Any batch size, split into shards, order or process gives the same rows, bit for bit on the CPU
  (tested across block sizes too); on a GPU bit for bit for samples in blocks of the same size, and
  within float rounding across sizes (cuDNN's TF32 kernels differ per shape: up to 3.5e-3 relative
  at 224 px in the H200 check of ``benchmarks/gpu_sketch.py``).
- **Throughput.** The device never waits for the host: inputs arrive through pinned memory without
  blocking, rows go back the same way while the next block computes, the finiteness check is a
  device-side flag read one block later, and nothing else synchronises per block. FT-1 with the
  label-free modes runs no backward pass. Blocks are sized from the device's free memory and halved
  when one still runs out of it (``core.device_blocks``).
- **Memory.** Bounded by ``block_rows``, the factor sizes and m; independent of the number of samples
  (beyond the N x m output, which can be a memory map on disk, see ``core.sketch_io``).
- **Identity.** :attr:`GradientSketcher.identity` records everything the rows depend on (operators,
  seed, m, parameter set, label mode and draws, block scales, model fingerprint, precision); sketches
  with different identities are never joined.

Block scales (FT-2): parameter blocks can differ in gradient energy by orders of magnitude (a head
block next to a conv block), and the larger one then decides every moment criterion alone.
:func:`calibrate_block_scales` measures the mean squared gradient norm of each block on a calibration
set and returns scales that give every block the same share of the total. Scales are part of the
identity: compute them once (e.g. on the first shard or a fixed calibration split) and reuse them for
every shard. The default (``None``) leaves blocks unscaled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import deque
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.device_blocks import (
    Block, BlockStream, cpu_block_rows, cuda_block_rows, is_out_of_memory, out_of_memory, pad_rows, smaller_block,
    tail_rows, to_device,
)
from skmm_pipeline.core.gradients import FactorBlock, GradientFactorizer, explain_non_finite, sample_keys
from skmm_pipeline.core.sketch import SKETCHES, ROW_ALIGN, Sketch, make_sketch, resolve_kind
from skmm_pipeline.core.validation import InputError

log = logging.getLogger(__name__)

# 2: convolutions in channels_last layout and eval-mode BatchNorm as its affine map on the differentiated
# path (rows differ from version 1 by float rounding only; sketches of different versions are never joined).
ENGINE_VERSION = 2
KINDS = ("auto", *SKETCHES)
PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    """The one device of a run: cuda when available (``None``/``"auto"``), else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(dev)!r} was requested but no CUDA device is available")
    return dev


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the weights: the model's identity in sketch identities and lineage
    (``models.backbones.model_id``)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GradientSketcher:
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
    ):
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, (int, np.integer)) or sketch_dim <= 0:
            raise InputError(f"sketch_dim (m) must be a positive integer, got {sketch_dim!r}")
        if kind not in KINDS:
            raise InputError(f"unknown sketch kind {kind!r}; available: {list(KINDS)}")
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; available: {list(PRECISIONS)}")
        self.device = resolve_device(device)
        if precision != "float32" and self.device.type != "cuda":
            raise InputError(f"precision={precision!r} (autocast) is only available on a CUDA device")
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer))
                                       or block_rows <= 0 or block_rows % ROW_ALIGN):
            raise InputError(f"block_rows must be a positive multiple of {ROW_ALIGN}, got {block_rows!r}")
        has_conv = any(isinstance(mod, nn.Conv2d) for mod in model.modules())
        # NHWC convolutions: the fast layout of CUDA's tensor-core kernels and of oneDNN on the CPU.
        self.channels_last = bool(has_conv and (channels_last is None or channels_last))
        self.model = model.to(self.device, memory_format=torch.channels_last) if self.channels_last else model.to(self.device)
        self.factorizer = GradientFactorizer(model, layers, label_mode, draws, seed)
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

    def _auto_block_rows(self, x: torch.Tensor) -> int:
        """CPU: from the bytes of all module outputs per sample (a function of the model alone). CUDA:
        from the measured peak memory of a small block and the device's free memory."""
        if self.device.type == "cuda":
            def probe(rows: int) -> None:
                xb = pad_rows(x, rows)[:rows]
                lab = torch.zeros(rows, dtype=torch.long, device=self.device) if self.label_mode == "true" else None
                keys = np.arange(rows, dtype=np.uint64) if self.label_mode == "random" else None
                with torch.no_grad():
                    self._compute(Block(xb, lab, keys, rows, 0), rows)

            return cuda_block_rows(self.device, probe)
        total = [0]

        def count(module, inputs, output):
            if isinstance(output, torch.Tensor) and not list(module.children()):
                total[0] += output.numel() * output.element_size()

        handles = [m.register_forward_hook(count) for m in self.model.modules()]
        try:
            with torch.no_grad(), self._autocast():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return cpu_block_rows(total[0] // len(x) + x[0].numel() * x.element_size())

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
        """Everything the rows depend on, as a JSON-ready dict (store it with the sketch)."""
        self._require_prepared()
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
        }

    # ---------------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _put_x(self, x) -> torch.Tensor:
        param = next(self.model.parameters(), None)
        return to_device(x, self.device, None if param is None else param.dtype, self.channels_last)

    def _factor_blocks(self, blk: Block, rows: int | None = None, native: bool = False) -> list[FactorBlock]:
        """The gradient factors of one block (labels already checked), computed on exactly ``rows``
        (default ``block_rows``) rows: a short block is padded, so every block runs the same kernels.
        Factors are float32, except that with ``native`` those of TensorSketch blocks keep the autocast
        dtype (the sketch sums them in float32; converting first would only move more bytes)."""
        blk = blk.padded(tail_rows(len(blk.x), rows or self.block_rows))
        with self._autocast():
            blocks = self.factorizer.factors(blk.x, blk.labels, blk.keys, row_offset=blk.offset, valid_rows=blk.valid,
                                             check_finite=False, labels_checked=True)
        out = []
        for fb, (_, op) in zip(blocks, self.sketches):
            keep = native and op.kind == "tensorsketch"
            out.append(fb if keep else FactorBlock(fb.name, fb.left.float(), fb.right.float()))
        return out

    def _compute(self, blk: Block, rows: int | None = None) -> torch.Tensor:
        """The sketch rows of one block (valid rows only), left on the device; nothing waits for them."""
        blocks = self._factor_blocks(blk, rows, native=True)
        acc = None
        for fb, (_, op) in zip(blocks, self.sketches):
            y = op.apply_outer(fb.left, fb.right, check_finite=False)
            scale = self.block_scales.get(fb.name)
            y = y if scale is None else y * scale  # the sketch is linear: scale its m values, not the factors
            acc = y if acc is None else acc + y
        return acc[: blk.valid]

    def _launch(self, blk: Block) -> list[tuple]:
        """Queue one block: its rows, a device-side finiteness flag and their copy to pinned host memory.
        A block that runs out of device memory is redone as halves, and later blocks are cut smaller."""
        if blk.valid > self.block_rows:  # cut before a back-off
            return [p for part in blk.split(self.block_rows) for p in self._launch(part)]
        try:
            with torch.no_grad():
                rows = self._compute(blk)
                finite = torch.isfinite(rows).all()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = self.block_rows
            self.block_rows = smaller_block(failed, exc)
            log.warning("out of device memory with blocks of %d rows: continuing with %d", failed, self.block_rows)
            rows = None
        if rows is None:  # retried here, once the failed attempt's tensors (held by the exception) are freed
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [p for part in blk.split(self.block_rows) for p in self._launch(part)]
        if self.device.type != "cuda":
            return [(blk, rows, finite, None)]
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return [(blk, host, finite, done)]

    def _finish(self, launched: tuple) -> tuple[int, np.ndarray]:
        blk, host, finite, done = launched
        if done is not None:
            done.synchronize()
        if not bool(finite):  # one cheap scan of the output: a NaN/inf anywhere in a sample's factors reaches its row
            f = self.factorizer
            with torch.no_grad():
                explain_non_finite(self._factor_blocks(blk), f.label_free, f.logits_layer, blk.valid, blk.offset)
            raise InputError(f"non-finite gradient sketch rows in samples {blk.offset}..{blk.offset + blk.valid - 1} "
                             "(overflow of finite gradients?)")
        return blk.offset, host.numpy()

    def _rows(self, batches: Iterable) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, rows)`` of every block of a stream of checked ``(x, labels, keys)`` batches, in order.
        One block stays in flight while the previous one is handed out, so the device never waits."""
        in_flight: list[tuple] = []
        for blk in BlockStream(lambda: self.block_rows, self._put)(batches):
            in_flight.extend(self._launch(blk))
            while len(in_flight) > 1:
                yield self._finish(in_flight.pop(0))
        while in_flight:
            yield self._finish(in_flight.pop(0))

    def _put(self, x, labels, keys):
        return self._put_x(x), labels, keys

    def _labels(self, labels, n: int) -> torch.Tensor:
        """True labels (array, list or tensor on any device) as a long tensor on the device, range-checked."""
        t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"labels must be integer class indices, got dtype {t.dtype}")
        if t.shape != (n,):
            raise InputError(f"labels must be a vector of {n} class indices, got shape {tuple(t.shape)}")
        K = self.factorizer.num_classes
        if n and (int(t.min()) < 0 or int(t.max()) >= K):  # host labels: no device sync
            raise InputError(f"labels must be class indices in [0, {K}), got values in [{int(t.min())}, {int(t.max())}]")
        return to_device(t.long(), self.device)

    def _checked(self, batches: Iterable, sizes: deque | None = None) -> Iterator[tuple]:
        """Normalise batches ``x`` or ``(x, labels, sample_ids)`` to checked ``(x, labels, keys)``."""
        for batch in batches:
            x, labels, ids = (batch, None, None) if not isinstance(batch, (tuple, list)) else (tuple(batch) + (None, None))[:3]
            if sizes is not None:
                sizes.append(len(x))
            if len(x) == 0:
                yield x, None, None
                continue
            self.prepare(x)
            lab, keys = self._check_labels_ids(len(x), labels, ids)
            yield x, lab, keys

    def _check_labels_ids(self, n: int, labels, sample_ids, convert: bool = True):
        if self.label_mode == "true":
            if labels is None:
                raise InputError("label_mode='true' needs labels")
            if len(labels) != n:
                raise InputError(f"got {len(labels)} labels for {n} samples")
        keys = None
        if self.label_mode == "random":
            if sample_ids is None:
                raise InputError(
                    "label_mode='random' needs sample_ids: labels are drawn from (seed, sample id) so that any "
                    "split into batches or shards draws the same labels"
                )
            if len(sample_ids) != n:
                raise InputError(f"got {len(sample_ids)} sample ids for {n} samples")
            if isinstance(sample_ids, torch.Tensor):
                sample_ids = sample_ids.detach().cpu().numpy()
            keys = sample_keys(sample_ids) if convert else None
        if not convert or labels is None or self.label_mode != "true":
            return None, keys
        return self._labels(labels, n), keys

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
        stage = self._stage_rows(batch_size)

        def batches():
            for s in range(0, N, stage):
                yield (inputs[s : s + stage], None if labels is None else labels[s : s + stage],
                       None if sample_ids is None else sample_ids[s : s + stage])

        return self.sketch_into(batches(), N, out)

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

    def _stage_rows(self, batch_size) -> int:
        if batch_size is None:
            return 4 * (self.block_rows or 256)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)

    # ---------------------------------------------------------------------------------------------
    def _factor_stream(self, inputs, labels, sample_ids, batch_size=None) -> Iterator[tuple[Block, list[FactorBlock]]]:
        """Blocks of ``inputs`` with their checked, float32 gradient factors (for the dense references)."""
        self.prepare(inputs)
        self._check_labels_ids(len(inputs), labels, sample_ids, convert=False)
        stage = self._stage_rows(batch_size)
        batches = ((inputs[s : s + stage], None if labels is None else labels[s : s + stage],
                    None if sample_ids is None else sample_ids[s : s + stage]) for s in range(0, len(inputs), stage))
        f = self.factorizer
        with torch.no_grad():
            for blk in BlockStream(lambda: self.block_rows, self._put)(self._checked(batches)):
                blocks = self._factor_blocks(blk)
                explain_non_finite(blocks, f.label_free, f.logits_layer, blk.valid, blk.offset)
                yield blk, blocks

    def gradients(self, inputs, labels=None, sample_ids=None) -> torch.Tensor:
        """The per-sample gradient rows (N x r, block scales applied, float32 on the CPU), materialised.
        For small data, tests and dense references only."""
        parts = []
        for blk, blocks in self._factor_stream(inputs, labels, sample_ids):
            cols = []
            for fb in blocks:
                g = torch.einsum("bpo,bpj->boj", fb.left[: blk.valid], fb.right[: blk.valid]).reshape(blk.valid, -1)
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
