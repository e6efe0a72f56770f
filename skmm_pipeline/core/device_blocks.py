"""Fixed-size row blocks on the compute device, from any stream of batches.

The sketch engine computes every row inside a block of exactly ``rows`` samples (the last block of a
stream padded by repeating its last sample), so that a row never depends on how the data arrived:
batches of any size, from numpy arrays, memory maps, pinned host tensors or tensors already on the
device. :class:`BlockStream` re-chunks such a stream into device blocks without host
synchronisation (pinned host tensors are copied with ``non_blocking=True``), carrying a partial
block over to the next batch instead of padding every batch.

Block sizes (:func:`cpu_block_rows`, :func:`cuda_block_rows`): on the CPU the size is a fixed
function of the model (its activation bytes per sample), so every machine and shard uses the same
blocks; on a CUDA device it is measured: the peak memory of one block of a few rows, scaled to a share
of the device's free memory and rounded down to a power of two (stable when free memory fluctuates a
little) and capped at 16 GiB. The engine halves it when a block still runs out of memory
(:func:`is_out_of_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from skmm_pipeline.core.errors import SetupError
from skmm_pipeline.core.sketch import ROW_ALIGN
from skmm_pipeline.core.validation import InputError

CPU_BLOCK_BUDGET = 256 << 20  # activation bytes of one CPU block
CPU_ROWS = (64, 1024)  # bounds of a CPU block
CUDA_ROWS = (64, 16384)  # bounds of a CUDA block
CUDA_MEMORY_SHARE = 0.5  # of the free device memory, for one block's working set
CUDA_BLOCK_BYTES = 16 << 30  # and at most this much: larger blocks run no faster and crowd other work
PROBE_ROWS = 32  # rows of the block whose peak memory is measured


def resolve_device(device=None) -> torch.device:
    """The one device of a run: cuda when available (``None``/``"auto"``), else cpu; a device that is not
    there is a :class:`SetupError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {str(dev)!r} was requested but no CUDA device is available")
    return dev


@dataclass
class Block:
    """``rows`` samples on the device; the first ``valid`` are real, the rest repeat the last one."""

    x: torch.Tensor
    labels: torch.Tensor | None
    keys: np.ndarray | None
    valid: int
    offset: int  # stream position of the first row

    def split(self, rows: int) -> list["Block"]:
        """The same samples as blocks of at most ``rows``."""
        out = []
        for s in range(0, self.valid, rows):
            part = lambda t: None if t is None else t[s : min(s + rows, self.valid)]  # noqa: E731
            out.append(Block(part(self.x), part(self.labels), part(self.keys), min(rows, self.valid - s), self.offset + s))
        return out

    def padded(self, rows: int) -> "Block":
        """This block extended to ``rows`` rows by repeating its last sample (the padding is never read)."""
        if len(self.x) == rows:
            return self
        return Block(pad_rows(self.x, rows), pad_rows(self.labels, rows), pad_rows(self.keys, rows), self.valid, self.offset)


def tail_rows(n: int, rows: int) -> int:
    """Rows a short last block of ``n`` samples runs on: the next of 16, 32, 64, ... (at most ``rows``).
    A few fixed shapes, and at most twice the work of the samples, however large the blocks are."""
    size = ROW_ALIGN
    while size < n:
        size *= 2
    return min(rows, size)


def pad_rows(t, rows: int):
    """``t`` (array or tensor) extended to ``rows`` rows by repeating its last row."""
    if t is None or len(t) == rows:
        return t
    if isinstance(t, np.ndarray):
        return np.concatenate([t, np.repeat(t[-1:], rows - len(t), axis=0)])
    return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])


def to_device(x, device: torch.device, dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """``x`` (numpy array / memory map, or a tensor on any device) as a tensor on ``device``.

    Floating inputs are cast to ``dtype``. Host data bound for a CUDA device is copied through pinned
    memory without blocking (a copy from pageable memory would wait for all queued device work).
    """
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype:
        t = t.to(dtype)
    if t.device != device:
        if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())
    if channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


class BlockStream:
    """Re-chunk ``(x, labels, keys)`` batches into :class:`Block` s of ``rows()`` samples on ``device``;
    the last one may be shorter (the engine pads it to :func:`tail_rows`, see :meth:`Block.padded`).

    ``rows`` is read each time a block is cut, so an engine that backs off after running out of memory
    gets smaller blocks from then on. ``put`` converts one batch (inputs, device labels, host keys).
    """

    def __init__(self, rows: Callable[[], int], put: Callable):
        self.rows = rows
        self.put = put

    def __call__(self, batches: Iterable) -> Iterator[Block]:
        pieces: list[tuple] = []
        have = offset = 0

        def cut(rows: int) -> Block:
            """The next ``rows`` carried samples as a block."""
            nonlocal pieces, have, offset
            block, pieces = _take(pieces, rows)
            out = Block(*block, rows, offset)
            offset += rows
            have -= rows
            return out

        for batch in batches:
            x, labels, keys = batch
            if len(x) == 0:
                continue
            pieces.append(self.put(x, labels, keys))
            have += len(x)
            while have >= self.rows():
                yield cut(self.rows())
        if have:
            R = self.rows()
            while have > R:  # only after a back-off: the carried rows exceed the new block size
                yield cut(R)
            yield cut(have)


def _take(pieces: list[tuple], n: int) -> tuple[tuple, list[tuple]]:
    """The first ``n`` rows of the pieces (joined) and the pieces left."""
    taken, rest, need = [], [], n
    for piece in pieces:
        if need == 0:
            rest.append(piece)
            continue
        k = min(need, len(piece[0]))
        taken.append(tuple(None if t is None else t[:k] for t in piece))
        if k < len(piece[0]):
            rest.append(tuple(None if t is None else t[k:] for t in piece))
        need -= k
    joined = []
    for i in range(3):
        parts = [p[i] for p in taken]
        if parts[0] is None:
            joined.append(None)
        elif len(parts) == 1:
            joined.append(parts[0])
        elif isinstance(parts[0], np.ndarray):
            joined.append(np.concatenate(parts))
        else:
            joined.append(torch.cat(parts))
    return tuple(joined), rest


def cpu_block_rows(activation_bytes_per_row: int) -> int:
    """The CPU block: ``CPU_BLOCK_BUDGET`` over four times the activations (their gradients and factors)."""
    rows = CPU_BLOCK_BUDGET // (4 * max(1, activation_bytes_per_row))
    return int(min(CPU_ROWS[1], max(CPU_ROWS[0], rows // ROW_ALIGN * ROW_ALIGN)))


def cuda_block_rows(device: torch.device, run_probe: Callable[[int], None]) -> int:
    """The CUDA block: the peak memory of ``run_probe(PROBE_ROWS)`` (a whole block: model, factors,
    sketches) per row, fitted into ``CUDA_MEMORY_SHARE`` of the free memory, as a power of two."""
    run_probe(PROBE_ROWS)  # first run: kernels chosen, operator tables built and cached
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_probe(PROBE_ROWS)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - base) // PROBE_ROWS)
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(min(free * CUDA_MEMORY_SHARE, CUDA_BLOCK_BYTES) // per_row)
    rows = 1 << max(0, fit.bit_length() - 1)
    return int(min(CUDA_ROWS[1], max(CUDA_ROWS[0], rows)))


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (``torch.OutOfMemoryError``), which a smaller block can avoid."""
    return isinstance(exc, torch.OutOfMemoryError)


def smaller_block(rows: int, exc: BaseException) -> int:
    """Half the block after ``exc`` (an out-of-memory error), or an :class:`InputError` at the minimum."""
    if rows <= ROW_ALIGN:
        raise out_of_memory(rows, exc) from exc
    return max(ROW_ALIGN, rows // 2 // ROW_ALIGN * ROW_ALIGN)


def out_of_memory(rows: int, exc: BaseException) -> InputError:
    """The error for a device that cannot hold even the smallest block."""
    return InputError(f"out of device memory with blocks of {rows} rows, the smallest: free device memory "
                      f"or sketch on another device ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
