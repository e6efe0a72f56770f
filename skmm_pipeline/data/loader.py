"""Feeding a shard to the sketch engine without stalling the device.

Shards hold images already transformed for the model (``data.vision``), usually memory-mapped
(``data.shards.read_shard``), so a batch is a slice of the file: there is nothing to decode, only
bytes to move (8-bit shards move a quarter of them; the device applies their per-channel decode).
:func:`shard_batches` moves them with reader threads that copy each slice straight from the page
cache into pinned host memory (numpy's copy releases the GIL, so the threads run in parallel),
several batches ahead of the engine, which sends them to the device without blocking.

Reader processes (a ``torch.utils.data.DataLoader`` with workers) were measured first on an H200
(``benchmarks/gpu_sketch.py``): their start per shard and the extra copies through shared memory and
the pinning thread held shard-to-sketch at 2,000 samples/s at 224 px, 0.05 of the forward pass.
Decoding formats (JPEG folders) are converted once at import, not per sketch.

On the CPU the engine reads the memory map directly (no copy, no threads): its cores compute.
The rows do not depend on the batch size or the readers: the engine re-cuts the stream into its own
fixed blocks (``core.device_blocks``).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from skmm_pipeline.core.progress import Progress
from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.core.validation import InputError, check_int
from skmm_pipeline.data.shards import PixelDecode, Shard

MAX_AUTO_WORKERS = 8
PREFETCH_BYTES = 2 << 30  # pinned host memory held by batches read ahead


def auto_workers(device: torch.device) -> int:
    """Reader threads for a device: none on the CPU, otherwise half the cores, at most 8."""
    if device.type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) // 2))


def _check_count(value, what: str, minimum: int) -> int:
    """:func:`check_int`, refused with the loader's one message for a wrong type and a value too small."""
    try:
        return check_int(value, what, minimum=minimum)
    except InputError:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}") from None


def shard_batches(shard: Shard, batch_size: int, device, *, labels: bool = False,
                  workers: int | None = None) -> Iterator[tuple]:
    """``(images, labels or None, sample ids)`` batches of a shard, in order, for
    :meth:`GradientSketcher.sketch_into`. ``workers``: reader threads (``None``: :func:`auto_workers`;
    0 reads in the caller's thread, without copying on the CPU)."""
    batch = _check_count(batch_size, "batch_size", 1)
    device = torch.device(device)
    workers = auto_workers(device) if workers is None else _check_count(workers, "loader workers", 0)
    if labels and shard.labels is None:
        raise InputError(f"shard {shard.name!r} has no labels, and label_mode='true' needs them")
    pixels, decode, ids = shard.pixels, shard.decode, shard.ids
    starts = range(0, len(pixels), batch)
    pin = device.type == "cuda" and torch.cuda.is_available()
    on_device = device_decode(decode, device) if decode is not None else None

    def read(s: int) -> torch.Tensor:  # the stored bytes (8-bit pixels stay 8-bit until the device)
        part = pixels[s : s + batch]
        out = torch.empty(part.shape, dtype=torch.uint8 if decode is not None else torch.float32, pin_memory=pin)
        np.copyto(out.numpy(), part, casting="no")
        return out

    def emit(s: int, x):
        if on_device is not None and isinstance(x, torch.Tensor):
            x = on_device(x)
        return x, (shard.labels[s : s + batch] if labels else None), ids[s : s + batch]

    if workers == 0:
        for s in starts:
            yield emit(s, read(s) if pin else shard.images[s : s + batch])
        return
    row_bytes = int(np.prod(pixels.shape[1:])) * pixels.dtype.itemsize
    ahead = max(2, min(4 * workers, PREFETCH_BYTES // max(1, batch * row_bytes)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-reader") as pool:
        pending: deque = deque()
        it = iter(starts)
        for s in it:
            pending.append((s, pool.submit(read, s)))
            if len(pending) >= ahead:
                break
        while pending:
            s, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield emit(s, fut.result())


def device_decode(decode: PixelDecode, device: torch.device):
    """8-bit pixel batches -> the model's inputs on ``device`` (a non-blocking copy from pinned memory,
    then :class:`PixelDecode`'s multiply and add there: the bits the host decode gives)."""
    scale = torch.as_tensor(decode.scale).reshape(-1, 1, 1).to(device)
    offset = torch.as_tensor(decode.offset).reshape(-1, 1, 1).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=x.is_pinned())
        return x.to(torch.float32) * scale + offset

    return run


def sketch_shard(sketcher: GradientSketcher, shard: Shard, out: np.ndarray | None = None, *, batch_size: int = 512,
                 labels: bool = False, workers: int | None = None) -> np.ndarray:
    """The shard's sketch rows (N x m float32), written into ``out`` (e.g. a ``SketchShardWriter``'s
    memory map) as each block completes; equal to ``sketcher.sketch(shard.images, ...)``."""
    sketcher.prepare(shard.images)
    batches = shard_batches(shard, batch_size, sketcher.device, labels=labels, workers=workers)
    return sketcher.sketch_into(_counted(batches, Progress(f"sketching {shard.name}", len(shard.images), "rows")),
                                len(shard.images), out)


def _counted(batches, progress: Progress):
    """The batches unchanged, reporting the rows handed to the sketcher."""
    for batch in batches:
        yield batch
        progress.advance(len(batch[2]))
