"""Stage 1 of SkMM: per-sample gradients of the finetuned parameters, streamed into one seeded sketch.

:class:`GradientSketcher` runs a model over a dataset in fixed-size row blocks, takes each block's
per-sample gradient factors (``core.gradients``) and adds up one sketch per parameter block, so that a
sample's row is

    g~_i = sum_b  S_b(scale_b * g_{i,b})          (one m-vector per sample)

with ``S_b`` the operator of block ``b`` (seeded by ``(seed, block name, m)``). Stacking the ``S_b`` is a
JL map of the concatenated gradient, so inner products of rows estimate those of whole gradients.

Guarantees:
- **Invariance.** A row depends on its sample alone: every model/sketch step runs on blocks of exactly
  ``block_rows`` rows (the last one padded by repeating its last sample), random labels are drawn from
  ``(seed, sample id)``, and the operators from their identity. Any batch size, split into shards,
  order or process gives the same rows, bit for bit on the same device type and dtype.
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
import math
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.gradients import FactorBlock, GradientFactorizer, explain_non_finite, sample_keys
from skmm_pipeline.core.sketch import SKETCHES, ROW_ALIGN, Sketch, make_sketch
from skmm_pipeline.core.validation import InputError

ENGINE_VERSION = 1
KINDS = ("auto", *SKETCHES)
PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Default rows per compute step: as many as fit an activation budget, between 64 and a cap. Large
# steps mean few, large tensor ops (fast, and robust to a busy CPU); the budget bounds memory.
BLOCK_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
BLOCK_ROWS_CAP = {"cpu": 1024, "cuda": 4096}
GAUSSIAN_AUTO_BYTES = 64 << 20  # "auto" uses a dense Gaussian for flat blocks whose map is at most this big


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


SMALL_BLOCK = 1 << 16  # "auto": gradient blocks up to this size are formed and CountSketched


def resolve_kind(kind: str, shape: tuple[int, int], sketch_dim: int) -> str:
    """The operator for one block. ``auto``: flat rows (Jacobian features) get a dense Gaussian when its
    map is small, else CountSketch; outer products get TensorSketch, except small gradient blocks
    (<= 65,536 entries, e.g. a small conv layer), which are cheap to form and get a CountSketch of the
    formed rows (fully independent hashing: lower variance than TensorSketch's composite hash)."""
    if kind != "auto":
        return kind
    dL, dR = shape
    if dL == 1:
        return "gaussian" if dR * sketch_dim * 4 <= GAUSSIAN_AUTO_BYTES else "countsketch"
    return "countsketch" if dL * dR <= SMALL_BLOCK else "tensorsketch"


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
    precision: ``float32``, or ``float16``/``bfloat16`` autocast of the model on a GPU (factors and
        sketches stay float32).
    block_rows: rows per compute step, a multiple of 16. By default it is derived from the model's
        activation size per sample (measured once on 16 example rows; a 256 MiB budget on cpu, 2 GiB on
        cuda; 64 to 1024/4096 rows), so it is the same for every shard of a dataset.
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
        self.model = model.to(self.device)
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
        """Learn the model's output structure from a few example inputs and build the operators."""
        if self.sketches is None:
            if self.block_rows is None:
                self.block_rows = self._auto_block_rows(example)
            x = self._to_device(example[: self.block_rows])
            with self._autocast():
                self.factorizer.prepare(self._pad(x, self.block_rows))
            self._single_output_mode()
            self.sketches = []
            for name, shape in self.factorizer.block_shapes():
                kind = resolve_kind(self.kind, shape, self.sketch_dim)
                op = make_sketch(kind, shape[0] * shape[1], self.sketch_dim, self.seed, name,
                                 shape=shape if kind == "tensorsketch" else None)
                self.sketches.append((name, op))
                self.block_shapes.append(tuple(shape))
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

    def _auto_block_rows(self, example) -> int:
        """Rows per step from the bytes of all module outputs per sample (16 padded example rows)."""
        x = self._pad(self._to_device(example[:ROW_ALIGN]), ROW_ALIGN)
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
        per_sample = max(1, total[0] // ROW_ALIGN + x[0].numel() * x.element_size())
        kind = self.device.type if self.device.type in BLOCK_BUDGET_BYTES else "cpu"
        rows = BLOCK_BUDGET_BYTES[kind] // (4 * per_sample)  # activations, their gradients and factors
        return int(min(BLOCK_ROWS_CAP[kind], max(64, rows // ROW_ALIGN * ROW_ALIGN)))

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

    def _to_device(self, x) -> torch.Tensor:
        t = torch.as_tensor(x)
        param = next(self.model.parameters(), None)
        if t.dtype.is_floating_point and param is not None and t.dtype != param.dtype:
            t = t.to(param.dtype)
        return t.to(self.device)

    @staticmethod
    def _pad(t, rows: int):
        if t is None or len(t) == rows:
            return t
        if isinstance(t, np.ndarray):
            return np.concatenate([t, np.repeat(t[-1:], rows - len(t), axis=0)])
        return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])

    def _blocks(self, x, labels, keys, offset):
        """Yield (valid rows, factor blocks) for fixed-size row blocks of one staged batch."""
        R = self.block_rows
        for t in range(0, len(x), R):
            xb = x[t : t + R]
            valid = len(xb)
            lb = None if labels is None else self._pad(labels[t : t + R], R)
            kb = None if keys is None else self._pad(keys[t : t + R], R)
            with self._autocast():
                blocks = self.factorizer.factors(self._pad(xb, R), lb, kb, row_offset=offset + t, valid_rows=valid,
                                                 check_finite=False)
            yield valid, offset + t, [FactorBlock(fb.name, fb.left.float(), fb.right.float()) for fb in blocks]

    def _non_finite(self, blocks, valid, offset):
        f = self.factorizer
        explain_non_finite(blocks, f.label_free, f.logits_layer, valid, offset)
        raise InputError(f"non-finite gradient sketch rows in samples {offset}..{offset + valid - 1} "
                         "(overflow of finite gradients?)")

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
            keys = sample_keys(sample_ids) if convert else None
        if not convert or labels is None or self.label_mode != "true":
            return None, keys
        lab = torch.as_tensor(np.asarray(labels)).to(self.device)
        return lab, keys

    def sketch_stream(self, batches: Iterable) -> Iterator[np.ndarray]:
        """Sketch an iterable of batches ``x`` or ``(x, labels, sample_ids)``; yields one float32 array of
        rows per batch. Memory does not depend on how many batches there are."""
        offset = 0
        for batch in batches:
            x, labels, ids = (batch, None, None) if not isinstance(batch, (tuple, list)) else (tuple(batch) + (None, None))[:3]
            if len(x) == 0:
                yield np.empty((0, self.sketch_dim), np.float32)
                continue
            self.prepare(x)
            lab, keys = self._check_labels_ids(len(x), labels, ids)
            xt = self._to_device(x)
            rows = []
            with torch.no_grad():
                for valid, start, blocks in self._blocks(xt, lab, keys, offset):
                    acc = None
                    for fb, (_, op) in zip(blocks, self.sketches):
                        scale = self.block_scales.get(fb.name)
                        left = fb.left if scale is None else fb.left * scale
                        y = op.apply_outer(left, fb.right, check_finite=False)
                        acc = y if acc is None else acc + y
                    acc = acc[:valid]
                    # One cheap scan of the output: a NaN/inf anywhere in a sample's factors reaches its row.
                    if not torch.isfinite(acc).all():
                        self._non_finite(blocks, valid, start)
                    rows.append(acc.float().cpu().numpy())
            offset += len(x)
            yield np.concatenate(rows) if len(rows) > 1 else rows[0]

    def sketch(self, inputs, labels=None, sample_ids=None, batch_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Sketch a whole dataset (N x ...): returns ``out`` (N x m float32; allocated when not given,
        e.g. a memory map from ``core.sketch_io.SketchShardWriter``). ``batch_size`` only sets how many
        samples are staged on the device at a time; it never changes the rows."""
        N = len(inputs)
        if N == 0:
            raise InputError("no samples to sketch")
        self._check_labels_ids(N, labels, sample_ids, convert=False)
        self.prepare(inputs)
        if out is None:
            out = np.empty((N, self.sketch_dim), dtype=np.float32)
        elif out.shape != (N, self.sketch_dim) or out.dtype != np.float32:
            raise InputError(f"out must be a float32 array of shape {(N, self.sketch_dim)}, got {out.dtype} {out.shape}")
        stage = self._stage_rows(batch_size)
        spans = [(s, min(N, s + stage)) for s in range(0, N, stage)]

        def batches():
            for s, e in spans:
                yield (inputs[s:e], None if labels is None else labels[s:e], None if sample_ids is None else sample_ids[s:e])

        for (s, e), rows in zip(spans, self.sketch_stream(batches())):
            out[s:e] = rows
        return out

    def _stage_rows(self, batch_size) -> int:
        if batch_size is None:
            return 4 * (self.block_rows or 256)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)

    # ---------------------------------------------------------------------------------------------
    def gradients(self, inputs, labels=None, sample_ids=None) -> torch.Tensor:
        """The per-sample gradient rows (N x r, block scales applied, float32 on the CPU), materialised.
        For small data, tests and dense references only."""
        self.prepare(inputs)
        lab, keys = self._check_labels_ids(len(inputs), labels, sample_ids)
        parts = []
        with torch.no_grad():
            for valid, start, blocks in self._blocks(self._to_device(inputs), lab, keys, 0):
                explain_non_finite(blocks, self.factorizer.label_free, self.factorizer.logits_layer, valid, start)
                cols = []
                for fb in blocks:
                    g = torch.einsum("bpo,bpj->boj", fb.left[:valid], fb.right[:valid]).reshape(valid, -1)
                    cols.append(g * self.block_scales.get(fb.name, 1.0))
                parts.append(torch.cat(cols, dim=1).cpu())
        return torch.cat(parts)

    def block_energy(self, inputs, labels=None, sample_ids=None, batch_size: int | None = None) -> dict[str, float]:
        """Mean squared gradient norm of each (unscaled) parameter block over ``inputs``."""
        self.prepare(inputs)
        lab, keys = self._check_labels_ids(len(inputs), labels, sample_ids)
        totals: dict[str, float] = {n: 0.0 for n in self.layer_names}
        stage = self._stage_rows(batch_size)
        with torch.no_grad():
            for s in range(0, len(inputs), stage):
                x = self._to_device(inputs[s : s + stage])
                lb = None if lab is None else lab[s : s + stage]
                kb = None if keys is None else keys[s : s + stage]
                for valid, start, blocks in self._blocks(x, lb, kb, s):
                    explain_non_finite(blocks, self.factorizer.label_free, self.factorizer.logits_layer, valid, start)
                    for fb in blocks:
                        sq = FactorBlock(fb.name, fb.left[:valid].double(), fb.right[:valid].double()).sq_norms()
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
