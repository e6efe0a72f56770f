"""Seeded sketch operators behind one interface.

A sketch maps per-sample gradient rows ``g in R^r`` to ``g @ Gamma in R^m``. Every operator is a pure
function of its identity ``(kind, seed, name, input_dim, sketch_dim[, shape])``: the same identity gives
the same map in any batch, shard, process or machine, so sketches computed at different times can be
joined. (Redrawing the map per batch, as some research code does, destroys the spectrum of the joined
sketch.) Kinds, chosen by name (:func:`make_sketch`):

``gaussian``
    Dense ``N(0, 1/m)`` entries, generated in blocks of rows from ``(seed, name, block)``, never stored
    whole beyond a small cache. The reference, and the best map for short rows (Jacobian features).
``countsketch``
    Each coordinate goes to one hashed bucket with a hashed sign: O(r) per row, for long generic rows.
``tensorsketch``
    For outer products ``g = sum_p l_p (x) r_p`` (``shape = (dL, dR)``): CountSketch each factor,
    multiply in FFT space, sum over positions. O(P (dL + dR + m log m)) per row instead of O(dL dR m),
    and the rows ``g`` are never formed. Inner products are unbiased, ``E <S g, S g'> = <g, g'>``.

Rows come out bit-for-bit the same whatever the batch they are sketched in: dense products run on
fixed-size row chunks (zero-padded), and the hashed sketches only use per-row operations (index_add on
the CPU, gather-sum on GPUs, where atomic scatter would not be deterministic).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from skmm_pipeline.core.validation import InputError, check_int

# Dense products run on chunks of a fixed number of rows, a multiple of 16: the CPU GEMM kernels give a
# row the same bits wherever it sits in such a chunk, which is not true of odd small chunks.
ROW_ALIGN = 16
ELEMENT_BUDGET = 1 << 22  # elements per intermediate tensor, bounds the memory of one step
DENSE_HASH_BYTES = 1 << 30  # a CountSketch runs as a GEMM on a GPU while its dense sign matrix is at most this


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
    shape: tuple[int, int] | None = None  # the factor shape (dL, dR) of a tensorsketch

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "seed": self.seed, "name": self.name, "input_dim": self.input_dim,
             "sketch_dim": self.sketch_dim}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        return d


class Sketch(ABC):
    """A linear map R^input_dim -> R^sketch_dim determined by its identity."""

    kind: str = ""

    def __init__(self, input_dim: int, sketch_dim: int, seed: int = 0, name: str = "params", shape=None):
        sketch_dim = check_int(sketch_dim, "sketch_dim (m)", minimum=1)
        input_dim = check_int(input_dim, "input_dim", minimum=1)
        if shape is not None:
            shape = tuple(check_int(s, "factor shape entry", minimum=1) for s in shape)
            if len(shape) != 2 or shape[0] * shape[1] != input_dim:
                raise InputError(f"factor shape {shape} does not multiply to input_dim {input_dim}")
        self.identity = SketchIdentity(self.kind, int(seed), str(name), input_dim, sketch_dim, shape)

    @property
    def input_dim(self) -> int:
        return self.identity.input_dim

    @property
    def sketch_dim(self) -> int:
        return self.identity.sketch_dim

    @property
    def row_chunk(self) -> int:
        """Rows per dense step: a fixed multiple of ROW_ALIGN (<= 64) that keeps chunk x input_dim bounded."""
        fit = (1 << 24) // (ROW_ALIGN * self.input_dim)
        return ROW_ALIGN * max(1, min(4, fit))

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        """Sketch a batch of rows ``G`` (B x input_dim) to (B x sketch_dim), in G's dtype and device."""
        if G.ndim != 2 or G.shape[1] != self.input_dim:
            raise InputError(
                f"{self.kind} sketch expects rows of length {self.input_dim}, got shape {tuple(G.shape)}"
            )
        _check_float(G)
        if not torch.isfinite(G).all():
            raise InputError("cannot sketch non-finite gradients (NaN or inf)")
        return self._apply(G)

    def apply_rows(self, X, chunk_rows: int = 4096) -> np.ndarray:
        """Sketch an N x input_dim host array (numpy, memory-mapped is fine) into an N x m float32 array,
        ``chunk_rows`` rows at a time, so memory is the output plus one chunk."""
        if getattr(X, "ndim", 0) != 2 or X.shape[1] != self.input_dim:
            raise InputError(f"{self.kind} sketch expects rows of length {self.input_dim}, got shape "
                             f"{tuple(getattr(X, 'shape', ()))}")
        chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
        out = np.empty((X.shape[0], self.sketch_dim), dtype=np.float32)
        for lo in range(0, X.shape[0], chunk_rows):
            block = torch.as_tensor(np.asarray(X[lo : lo + chunk_rows], dtype=np.float32))
            out[lo : lo + chunk_rows] = self.apply(block).numpy()
        return out

    def apply_outer(self, left: torch.Tensor, right: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """Sketch the rows ``g_i = sum_p left[i, p] (x) right[i, p]`` (row-major flattening), given the factors
        (B x P x dL and B x P x dR, or B x dL and B x dR for one position).

        ``check_finite=False`` skips the scan of the factors; a NaN/inf factor then shows up as a
        non-finite output row, which callers that check their outputs (the engine) rely on.
        """
        if left.ndim == 2 and right.ndim == 2:
            left, right = left[:, None], right[:, None]
        if left.ndim != 3 or right.ndim != 3 or left.shape[:2] != right.shape[:2]:
            raise InputError(
                "factors must be (B x P x dL) and (B x P x dR) with the same B and P, got "
                f"{tuple(left.shape)} and {tuple(right.shape)}"
            )
        dL, dR = left.shape[2], right.shape[2]
        if dL * dR != self.input_dim or (self.identity.shape is not None and (dL, dR) != self.identity.shape):
            want = self.identity.shape or f"dL * dR = {self.input_dim}"
            raise InputError(f"{self.kind} sketch expects factors of shape {want}, got ({dL}, {dR})")
        _check_float(left)
        _check_float(right)
        if check_finite and not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise InputError("cannot sketch non-finite gradient factors (NaN or inf)")
        return self._apply_outer(left, right.to(left.dtype))

    def dense(self) -> torch.Tensor:
        """The whole map (input_dim x sketch_dim). For tests and small problems only."""
        return self.apply(torch.eye(self.input_dim))

    @abstractmethod
    def _apply(self, G: torch.Tensor) -> torch.Tensor: ...

    def _apply_outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        # Generic path: form the gradient rows chunk by chunk (the reference; TensorSketch overrides).
        out = left.new_empty(left.shape[0], self.sketch_dim)
        step = self.row_chunk
        for s in range(0, left.shape[0], step):
            g = torch.einsum("bpo,bpj->boj", left[s : s + step], right[s : s + step])
            out[s : s + step] = self._apply(g.reshape(g.shape[0], -1))
        return out


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sketches sum in: float64 for float64 inputs, float32 for every other (half) precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise InputError(f"sketches take floating-point inputs, got dtype {t.dtype}")


class GaussianSketch(Sketch):
    """Dense Gaussian JL map with entries N(0, 1/m), generated block-wise from the seed.

    Rows of Gamma are produced in fixed blocks of ``block_rows`` from a generator seeded by
    ``(seed, name, block index)``, always on the CPU in float32, so the operator does not depend on
    the device, the batch size or which rows of the data are sketched. Blocks are cached while the
    whole map fits in ``cache_bytes``; beyond that they are regenerated per call and never stored whole.
    """

    kind = "gaussian"

    def __init__(self, input_dim, sketch_dim, seed=0, name="params", shape=None, block_rows=4096, cache_bytes=256 << 20):
        super().__init__(input_dim, sketch_dim, seed, name, shape)
        self.block_rows = check_int(block_rows, "block_rows", minimum=1)
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

    STEP = 4 * ROW_ALIGN  # rows per matmul, fixed (see ROW_ALIGN)

    def _apply(self, G: torch.Tensor) -> torch.Tensor:
        return self._project(lambda lo, hi: G[:, lo:hi], G.shape[0], G.dtype, G.device)

    def _apply_outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        # Columns [lo, hi) of the rows are formed block by block of Gamma, never the whole rows.
        B, dR = left.shape[0], right.shape[2]

        def columns(lo, hi):
            o0, o1 = lo // dR, -(-hi // dR)
            g = torch.einsum("bpo,bpj->boj", left[:, :, o0:o1], right).reshape(B, -1)
            return g[:, lo - o0 * dR : hi - o0 * dR]

        return self._project(columns, B, left.dtype, left.device)

    def _project(self, columns, B: int, dtype, device) -> torch.Tensor:
        step = self.STEP
        out = torch.zeros(B, self.sketch_dim, dtype=dtype, device=device)
        tail = B % step
        for b in range(math.ceil(self.input_dim / self.block_rows)):
            lo = b * self.block_rows
            blk = self.block(b, device).to(dtype)
            cols = columns(lo, lo + blk.shape[0])
            for s in range(0, B - tail, step):
                out[s : s + step] += cols[s : s + step].contiguous() @ blk
            if tail:  # the last partial chunk is zero-padded to the fixed chunk shape
                pad = cols.new_zeros(step, cols.shape[1])
                pad[:tail] = cols[B - tail :]
                out[B - tail :] += (pad @ blk)[:tail]
        return out

    def dense(self) -> torch.Tensor:
        n_blocks = math.ceil(self.input_dim / self.block_rows)
        return torch.cat([self.block(b) for b in range(n_blocks)], dim=0)


class _Hash:
    """A seeded bucket/sign hash of ``dim`` coordinates into ``m`` buckets (one CountSketch)."""

    BLOCK = 1 << 16

    def __init__(self, seed: int, kind: str, name: str, part: str, dim: int, m: int):
        hs, ss = [], []
        for b in range(math.ceil(dim / self.BLOCK)):
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, kind, name, part, b))
            n = min(self.BLOCK, dim - b * self.BLOCK)
            hs.append(torch.randint(0, m, (n,), generator=gen))
            ss.append(torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
        self.bucket = torch.cat(hs)
        self.sign = torch.cat(ss).to(torch.int8)
        self.dim, self.m = dim, m
        self._dev: dict = {}

    @classmethod
    def composite(cls, a: "_Hash", b: "_Hash") -> "_Hash":
        """The hash of coordinate (o, j) of an outer product: bucket (h_a(o) + h_b(j)) mod m, sign s_a s_b."""
        h = cls.__new__(cls)
        h.bucket = ((a.bucket[:, None] + b.bucket[None, :]) % a.m).reshape(-1)
        h.sign = (a.sign[:, None] * b.sign[None, :]).reshape(-1)
        h.dim, h.m, h._dev = a.dim * b.dim, a.m, {}
        return h

    def _tables(self, device, dtype, gather: bool):
        key = (str(device), dtype, gather)
        if key not in self._dev:
            if not gather:
                self._dev[key] = (self.bucket, self.sign.to(dtype))
            else:  # gather table: bucket j lists its coordinates (padded with coordinate 0 and sign 0)
                order = torch.argsort(self.bucket, stable=True)
                counts = torch.bincount(self.bucket, minlength=self.m)
                width = max(1, int(counts.max()))
                starts = torch.cumsum(counts, 0) - counts
                slot = torch.arange(self.dim) - starts[self.bucket[order]]
                idx = torch.zeros((self.m, width), dtype=torch.long)
                sgn = torch.zeros(self.m, width)
                idx[self.bucket[order], slot] = order
                sgn[self.bucket[order], slot] = self.sign[order].float()
                self._dev[key] = (idx.to(device), sgn.to(device=device, dtype=dtype))
        return self._dev[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """CountSketch along the last dimension: (..., dim) -> (..., m), summed in at least float32."""
        if x.device.type != "cpu":
            if x.dtype in (torch.bfloat16, torch.float16) and self.dim * self.m * 2 <= DENSE_HASH_BYTES:
                return self.matmul(x)
            return self.gather(x)
        # index_add_ on the CPU adds in index order: deterministic.
        x = x.to(_sum_dtype(x.dtype))
        first, second = self._tables(x.device, x.dtype, gather=False)
        out = x.new_zeros(*x.shape[:-1], self.m)
        return out.index_add_(x.ndim - 1, first, x * second)

    def rows(self, G: torch.Tensor) -> torch.Tensor:
        """The CountSketch of the rows of ``G`` (B x dim), ``ELEMENT_BUDGET`` elements at a time, in G's dtype."""
        out = G.new_empty(G.shape[0], self.m)
        step = max(1, ELEMENT_BUDGET // self.dim)
        for s in range(0, G.shape[0], step):
            out[s : s + step] = self(G[s : s + step])
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The same CountSketch as a product with its dense (dim x m) matrix of signs: for half-precision
        ``x`` on a GPU, a tensor-core GEMM whose products are exact (a sign times a half value) and whose
        sums are float32 (``out_dtype``), several times faster than a gather. Float32 elsewhere (tests)."""
        key = (str(x.device), x.dtype, "dense")
        if key not in self._dev:
            dense = torch.zeros(self.dim, self.m)
            dense[torch.arange(self.dim), self.bucket] = self.sign.float()
            self._dev[key] = dense.to(device=x.device, dtype=x.dtype)
        dense = self._dev[key]
        flat = x.reshape(-1, self.dim)
        if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            out = torch.mm(flat, dense, out_dtype=torch.float32)
        else:
            out = flat.float() @ dense.float()
        return out.reshape(*x.shape[:-1], self.m)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The same CountSketch as a gather and a sum per bucket, in a fixed order: deterministic on GPUs,
        where an atomic scatter is not. A half-precision ``x`` is gathered as it is (multiplying by a
        sign is exact) and summed in float32. Used on every device but the CPU; tested on the CPU."""
        first, second = self._tables(x.device, x.dtype, gather=True)
        return (x[..., first] * second).sum(-1, dtype=_sum_dtype(x.dtype))


class CountSketch(Sketch):
    """CountSketch: coordinate k goes to bucket h(k) with sign s(k); h, s seeded from (seed, name)."""

    kind = "countsketch"

    def __init__(self, input_dim, sketch_dim, seed=0, name="params", shape=None):
        super().__init__(input_dim, sketch_dim, seed, name, shape)
        self.hash = _Hash(self.identity.seed, self.kind, self.identity.name, "", self.input_dim, self.sketch_dim)

    def _apply(self, G: torch.Tensor) -> torch.Tensor:
        return self.hash.rows(G)


class TensorSketch(Sketch):
    """TensorSketch of outer products ``l (x) r`` (``shape = (dL, dR)``): ``irfft(rfft(CS_l l) * rfft(CS_r r))``.

    Equal to a CountSketch of the flattened product with bucket ``(h_l(o) + h_r(j)) mod m`` and sign
    ``s_l(o) s_r(j)``; :meth:`apply` computes it that way on materialised rows (same map, rounding aside).
    """

    kind = "tensorsketch"

    def __init__(self, input_dim, sketch_dim, seed=0, name="params", shape=None):
        super().__init__(input_dim, sketch_dim, seed, name, shape if shape is not None else (1, input_dim))
        dL, dR = self.identity.shape
        self.left = _Hash(self.identity.seed, self.kind, self.identity.name, "left", dL, self.sketch_dim)
        self.right = _Hash(self.identity.seed, self.kind, self.identity.name, "right", dR, self.sketch_dim)
        self._flat: _Hash | None = None

    def _apply(self, G: torch.Tensor) -> torch.Tensor:
        if self._flat is None:
            self._flat = _Hash.composite(self.left, self.right)
        return self._flat.rows(G)

    def _apply_outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        B, P = left.shape[:2]
        m = self.sketch_dim
        if self.input_dim <= min(8 * P * m, ELEMENT_BUDGET):
            # Small gradient matrix, many positions (a conv layer): forming g = sum_p l_p r_p^T costs less
            # than 2P FFTs, and its composite-hash CountSketch is the same map.
            left, right = left.to(_sum_dtype(left.dtype)), right.to(_sum_dtype(left.dtype))
            step = max(1, ELEMENT_BUDGET // self.input_dim)
            out = left.new_empty(B, m)
            for s in range(0, B, step):
                g = torch.bmm(left[s : s + step].transpose(1, 2), right[s : s + step])
                out[s : s + step] = self._apply(g.reshape(g.shape[0], -1))
            return out
        # Positions per step depend on (P, m) only, so the order of the sum over positions is fixed.
        pc = min(P, max(1, ELEMENT_BUDGET // (64 * m)))
        rows = max(1, ELEMENT_BUDGET // (pc * m))
        # The factors may be half precision (autocast): their CountSketches are summed in float32.
        out = left.new_empty(B, m, dtype=_sum_dtype(left.dtype))
        for s in range(0, B, rows):
            lf, rf = left[s : s + rows], right[s : s + rows]
            acc = None
            for p in range(0, P, pc):
                f = torch.fft.rfft(self.left(lf[:, p : p + pc]), n=m) * torch.fft.rfft(self.right(rf[:, p : p + pc]), n=m)
                f = f[:, 0] if f.shape[1] == 1 else f.sum(1)
                acc = f if acc is None else acc + f
            out[s : s + rows] = torch.fft.irfft(acc, n=m)
        return out


SKETCHES: dict[str, type[Sketch]] = {cls.kind: cls for cls in (GaussianSketch, CountSketch, TensorSketch)}
GAUSSIAN_AUTO_BYTES = 64 << 20  # "auto" uses a dense Gaussian for flat blocks whose map is at most this big
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


def make_sketch(kind: str, input_dim: int, sketch_dim: int, seed: int = 0, name: str = "params", shape=None) -> Sketch:
    """Build a sketch operator by name (see ``SKETCHES``)."""
    try:
        cls = SKETCHES[kind]
    except KeyError:
        raise InputError(f"unknown sketch kind {kind!r}; available: {sorted(SKETCHES)}") from None
    return cls(input_dim, sketch_dim, seed=seed, name=name, shape=shape)
