"""Seeded sketch operators.

A sketch maps per-sample gradient rows ``g in R^r`` to ``g @ Gamma in R^m``. The operator is a pure
function of ``(kind, seed, name, input_dim, sketch_dim)``: the same identity gives the same map in any
batch, shard, process or machine, so sketches computed at different times can be joined. (Redrawing
the map per batch, as some research code does, destroys the spectrum of the joined sketch.)
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from skmm_pipeline.core.validation import InputError


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and any labels, stable across platforms and processes."""
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class SketchIdentity:
    """Everything that determines a sketch operator. Two sketches can be joined iff identities are equal."""

    kind: str
    seed: int
    name: str
    input_dim: int
    sketch_dim: int

    def as_dict(self) -> dict:
        return asdict(self)


class Sketch(ABC):
    """A linear map R^input_dim -> R^sketch_dim determined by its identity."""

    kind: str = ""

    def __init__(self, input_dim: int, sketch_dim: int, seed: int = 0, name: str = "params"):
        if int(sketch_dim) <= 0:
            raise InputError(f"sketch_dim must be positive, got {sketch_dim}")
        if int(input_dim) <= 0:
            raise InputError(f"input_dim must be positive, got {input_dim}")
        self.identity = SketchIdentity(self.kind, int(seed), str(name), int(input_dim), int(sketch_dim))

    @property
    def input_dim(self) -> int:
        return self.identity.input_dim

    @property
    def sketch_dim(self) -> int:
        return self.identity.sketch_dim

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        """Sketch a batch of rows ``G`` (B x input_dim) to (B x sketch_dim), in G's dtype and device."""
        if G.ndim != 2 or G.shape[1] != self.input_dim:
            raise InputError(
                f"{self.kind} sketch expects rows of length {self.input_dim}, got shape {tuple(G.shape)}"
            )
        if not torch.isfinite(G).all():
            raise InputError("cannot sketch non-finite gradients (NaN or inf)")
        return self._apply(G)

    @abstractmethod
    def _apply(self, G: torch.Tensor) -> torch.Tensor: ...


class GaussianSketch(Sketch):
    """Dense Gaussian JL map with entries N(0, 1/m), generated block-wise from the seed.

    Rows of Gamma are produced in fixed blocks of ``block_rows`` from a generator seeded by
    ``(seed, name, block index)``, always on the CPU in float32, so the operator does not depend on
    the device, the batch size or which rows of the data are sketched. Blocks are cached while the
    whole map fits in ``cache_bytes``; beyond that they are regenerated per batch and never stored whole.
    """

    kind = "gaussian"

    def __init__(self, input_dim, sketch_dim, seed=0, name="params", block_rows=4096, cache_bytes=256 << 20):
        super().__init__(input_dim, sketch_dim, seed, name)
        self.block_rows = int(block_rows)
        self._cache: dict[tuple[int, str], torch.Tensor] | None = (
            {} if self.input_dim * self.sketch_dim * 4 <= cache_bytes else None
        )

    def block(self, b: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``[b*block_rows, min((b+1)*block_rows, input_dim))`` of Gamma."""
        key = (b, str(device))
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        lo = b * self.block_rows
        rows = min(self.block_rows, self.input_dim - lo)
        gen = torch.Generator(device="cpu").manual_seed(
            derive_seed(self.identity.seed, self.kind, self.identity.name, b)
        )
        blk = torch.randn(rows, self.sketch_dim, generator=gen, dtype=torch.float32)
        blk = (blk / math.sqrt(self.sketch_dim)).to(device)
        if self._cache is not None:
            self._cache[key] = blk
        return blk

    def _apply(self, G: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(G.shape[0], self.sketch_dim, dtype=G.dtype, device=G.device)
        n_blocks = math.ceil(self.input_dim / self.block_rows)
        for b in range(n_blocks):
            lo = b * self.block_rows
            blk = self.block(b, G.device).to(G.dtype)
            out += G[:, lo : lo + blk.shape[0]] @ blk
        return out

    def dense(self) -> torch.Tensor:
        """The whole map (input_dim x sketch_dim). For tests and small problems only."""
        n_blocks = math.ceil(self.input_dim / self.block_rows)
        return torch.cat([self.block(b) for b in range(n_blocks)], dim=0)


SKETCHES: dict[str, type[Sketch]] = {GaussianSketch.kind: GaussianSketch}


def make_sketch(kind: str, input_dim: int, sketch_dim: int, seed: int = 0, name: str = "params") -> Sketch:
    """Build a sketch operator by name (see ``SKETCHES``)."""
    try:
        cls = SKETCHES[kind]
    except KeyError:
        raise InputError(f"unknown sketch kind {kind!r}; available: {sorted(SKETCHES)}") from None
    return cls(input_dim, sketch_dim, seed=seed, name=name)
