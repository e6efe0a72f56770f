"""The block machinery of the sketch engine: batches in, fixed-size device blocks, sketch rows out.

:class:`BlockStreaming` is the part of :class:`~skmm_pipeline.core.sketch_engine.GradientSketcher`
that moves data: it checks and normalises batches, re-cuts them into blocks of ``block_rows`` rows on
the device (``core.device_blocks``), computes each block's gradient factors and sketch rows, keeps one
block in flight while the previous one is copied back, backs off to smaller blocks when the device
runs out of memory, and sizes the blocks in the first place.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from skmm_pipeline.core.device_blocks import (
    Block,
    BlockStream,
    cpu_block_rows,
    cuda_block_rows,
    is_out_of_memory,
    pad_rows,
    smaller_block,
    tail_rows,
    to_device,
)
from skmm_pipeline.core.gradients import FactorBlock, explain_non_finite, sample_keys
from skmm_pipeline.core.validation import InputError, check_int

# The package's logger, as before the engine was split into modules.
log = logging.getLogger(__package__)

PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def staged(inputs, labels, sample_ids, stage: int) -> Iterator[tuple]:
    """``(x, labels, sample_ids)`` slices of ``stage`` samples of a whole dataset (labels/ids may be None)."""
    for s in range(0, len(inputs), stage):
        yield (inputs[s : s + stage], None if labels is None else labels[s : s + stage],
               None if sample_ids is None else sample_ids[s : s + stage])


class BlockStreaming:
    """Batches to sketch rows, block by block, for :class:`GradientSketcher`.

    Works on the sketcher's ``model``, ``device``, ``precision``, ``channels_last``, ``factorizer``,
    ``sketches``, ``block_rows``, ``block_scales``, ``sketch_dim``, ``label_mode`` and ``prepare``.
    """

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

    def _stage_rows(self, batch_size) -> int:
        if batch_size is None:
            return 4 * (self.block_rows or 256)
        return check_int(batch_size, "batch_size", minimum=1)

    # ---------------------------------------------------------------------------------------------
    def _factor_stream(self, inputs, labels, sample_ids, batch_size=None) -> Iterator[tuple[Block, list[FactorBlock]]]:
        """Blocks of ``inputs`` with their checked, float32 gradient factors (for the dense references)."""
        self.prepare(inputs)
        self._check_labels_ids(len(inputs), labels, sample_ids, convert=False)
        batches = staged(inputs, labels, sample_ids, self._stage_rows(batch_size))
        f = self.factorizer
        with torch.no_grad():
            for blk in BlockStream(lambda: self.block_rows, self._put)(self._checked(batches)):
                blocks = self._factor_blocks(blk)
                explain_non_finite(blocks, f.label_free, f.logits_layer, blk.valid, blk.offset)
                yield blk, blocks
