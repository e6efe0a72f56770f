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

Modules: :mod:`.sketcher` (:class:`GradientSketcher`'s public API, its identity, block calibration),
:mod:`.streaming` (batches to device blocks to sketch rows, block sizing and out-of-memory back-off).
Import from the package.
"""

from skmm_pipeline.core.sketch_engine.config import SketchConfig
from skmm_pipeline.core.sketch_engine.sketcher import (
    ENGINE_VERSION,
    KINDS,
    GradientSketcher,
    calibrate_block_scales,
    model_fingerprint,
    resolve_device,
    sketch_gradients,
)
from skmm_pipeline.core.sketch_engine.streaming import PRECISIONS

__all__ = [
    "ENGINE_VERSION",
    "KINDS",
    "PRECISIONS",
    "GradientSketcher",
    "SketchConfig",
    "calibrate_block_scales",
    "model_fingerprint",
    "resolve_device",
    "sketch_gradients",
]
