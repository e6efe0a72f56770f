"""Per-sample gradients of the finetuned parameters, in factored form.

For a Linear or Conv2d layer the per-sample gradient of its weight and bias is a sum of outer products,

    g_i = sum_p  delta_{i,p} (x) a_{i,p}        (row-major: index = o * (d_in + 1) + j)

with ``a_{i,p} = [activation patch, 1]`` the layer input at position ``p`` (one position for a plain
Linear layer, the unfolded patches of a convolution, the tokens of a sequence) and ``delta_{i,p}`` the
gradient of the loss with respect to the layer output at that position. :class:`GradientFactorizer`
captures both factors with forward hooks and one backward pass per batch, so ``g_i`` (K * d values for
a head, millions for a conv layer) is never formed; sketches are taken of the factors
(``core.sketch.TensorSketch``). For the layer that produces the logits of a softmax-cross-entropy
model, ``delta`` is closed form (``softmax(z) - onehot(y)``) and no backward pass is needed.

The layout of a layer's gradient is that of ``[W.reshape(d_out, -1) | b]`` flattened row-major, with the
bias last in every row; a parameter set's gradient is its layers' gradients concatenated in the
order the layers are given. :func:`vmap_layer_gradients` builds the same layout with
``torch.func.vmap`` and is the slow, generic oracle the factored path is tested against.

Label modes (the loss whose gradient is taken; ``logits = z``, ``p = softmax(z)``, ``K`` classes):

``expected`` (default: label-free, noise-free)
    The expected second moment of the cross-entropy gradient under a uniformly random label. At a
    near-uniform softmax it is ``J_i^T C J_i`` with ``C = I/K - 11^T/K^2`` and ``J_i`` the Jacobian of
    the logits with respect to the parameters. One row per sample represents it as
    ``vec(P J_i)`` with ``P`` a fixed ``(K-1) x K`` basis of the centred class space scaled so that
    ``P^T P = C * K/(K-1)``: the rows' inner products are ``K/(K-1) tr(J_i^T C J_j)`` and the partial
    trace over classes of their second moment is ``K/(K-1)`` times the expected moment. For the
    logits layer itself ``P J_i = P (x) x~_i`` has a sample-independent class factor of unit norm,
    so its block is represented exactly by the Jacobian row ``x~_i = [h_i, 1]``; a linear head
    (FT-1) therefore sketches ``x~_i`` alone, and then every moment criterion over subsets is exact
    (the moment is ``C (x) sum_i x~_i x~_i^T``). Dropped: the per-sample rank-one term
    ``(p_i - u)(p_i - u)^T`` of a non-uniform softmax (``random`` keeps it).
``random``
    Uniformly random labels, ``draws`` of them per sample, drawn from ``(seed, sample id, draw)``
    alone so that every split of the data into batches or shards draws the same labels. The draws are
    combined into one row per sample with seeded signs: ``g_i = J_i^T sum_k eps_ik (p_i - e_{y_ik}) /
    sqrt(draws)`` (``eps_i0 = +1``, the others Rademacher). Its second moment is unbiased both for the
    average of the ``draws`` per-draw moments (over the signs) and for the exact expected moment
    (over labels and signs), including the ``(p - u)`` term. With one draw it is the classic single
    random-label gradient (noisy: it puts each sample in one class block).
``true``
    The gradient of cross-entropy with the given labels, ``J_i^T (p_i - e_{y_i})``.
``jacobian``
    Regression / linear probing with a squared loss at ``theta = 0``: the Jacobian rows
    ``vec(J_i) / sqrt(K)``; for a linear head these are the features ``x~_i = [h_i, 1]``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.device_blocks import to_device
from skmm_pipeline.core.validation import InputError

LABEL_MODES = ("expected", "random", "true", "jacobian")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise InputError(f"unknown label_mode {label_mode!r}; available: {list(LABEL_MODES)}")


# --------------------------------------------------------------------------------------------------
# Linear softmax head on precomputed features (the embedded pipeline's FT-1 path).


def gradient_dim(feature_dim: int, num_classes: int, label_mode: str) -> int:
    """Length of the per-sample gradient row for a linear head with ``feature_dim`` inputs (plus bias)."""
    check_label_mode(label_mode)
    return feature_dim + 1 if label_mode in ("expected", "jacobian") else num_classes * (feature_dim + 1)


def head_gradient_rows(
    features: torch.Tensor, logits: torch.Tensor, label_mode: str = "expected", labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample head gradient rows for one batch (B x gradient_dim), materialised.

    ``expected``/``jacobian``: the Jacobian rows ``x~ = [h, 1]``; ``true``: ``(softmax(z) - e_y) (x) x~``.
    ``random`` needs sample ids and lives in :class:`GradientFactorizer`.
    """
    check_label_mode(label_mode)
    if features.ndim != 2 or logits.ndim != 2 or features.shape[0] != logits.shape[0]:
        raise InputError(
            f"features (B x d) and logits (B x K) must have the same batch size, got "
            f"{tuple(features.shape)} and {tuple(logits.shape)}"
        )
    if not (torch.isfinite(features).all() and torch.isfinite(logits).all()):
        raise InputError("non-finite activations or logits (NaN or inf) in the batch")
    x_tilde = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    if label_mode in ("expected", "jacobian"):
        return x_tilde
    if label_mode == "random":
        raise InputError(
            "label_mode='random' draws labels per sample id: use core.sketch_engine.GradientSketcher "
            "with sample_ids"
        )
    delta = softmax_ce_delta(logits, _check_labels(labels, logits.shape[0], logits.shape[1], logits.device))
    return (delta[:, :, None] * x_tilde[:, None, :]).reshape(features.shape[0], -1)


def softmax_ce_delta(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of per-sample cross-entropy with respect to the logits, ``softmax(z) - e_y``."""
    onehot = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return label_weighted_delta(logits, onehot, 1.0)


def label_weighted_delta(logits: torch.Tensor, A: torch.Tensor, W) -> torch.Tensor:
    """``W p - A`` for label weights ``A`` (B x K) summing to ``W`` per row, without cancellation.

    Written as ``(W - A) p - A (1 - p)`` with ``1 - p`` of the top class computed as the mass of the
    others, ``t / (1 + t)`` with ``t = sum_{c != top} exp(z_c - z_top)``: a confident sample's gradient
    (``p_y`` within float rounding of 1) keeps its relative accuracy instead of becoming 0 or noise.
    """
    top = logits.argmax(dim=1, keepdim=True)
    e = torch.exp(logits - logits.gather(1, top))
    is_top = torch.zeros_like(e, dtype=torch.bool).scatter_(1, top, True)
    t = e.masked_fill(is_top, 0.0).sum(1, keepdim=True)
    p = e / (1 + t)
    q = torch.where(is_top, t / (1 + t), 1 - p)
    return (W - A) * p - A * q


def _check_labels(labels, B: int, K: int, device) -> torch.Tensor:
    if labels is None:
        raise InputError("label_mode='true' needs labels")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    if labels.shape != (B,) or (B and (labels.min() < 0 or labels.max() >= K)):
        raise InputError(f"labels must be a vector of {B} class indices in [0, {K}), got shape {tuple(labels.shape)}")
    return labels


# --------------------------------------------------------------------------------------------------
# Seeded random labels, a pure function of (seed, sample id, draw).

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def sample_keys(sample_ids) -> np.ndarray:
    """64-bit keys for sample ids (strings, or non-negative integers), stable across processes."""
    arr = np.asarray(sample_ids)
    if arr.ndim != 1:
        raise InputError(f"sample ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.size and arr.min() < 0:
            raise InputError("integer sample ids must be non-negative")
        with np.errstate(over="ignore"):
            return _splitmix64(arr.astype(np.uint64))
    if arr.dtype.kind not in "UO":
        raise InputError(f"sample ids must be strings or integers, got dtype {arr.dtype}")
    digests = b"".join(hashlib.blake2b(str(s).encode(), digest_size=8).digest() for s in arr.tolist())
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def draw_random_labels(keys: np.ndarray, num_classes: int, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N x draws, uniform in [0, K)) and combination signs (N x draws, first column +1)."""
    from skmm_pipeline.core.sketch import derive_seed

    keys = np.asarray(keys, dtype=np.uint64)
    base = np.uint64(derive_seed(seed, "random-labels"))
    with np.errstate(over="ignore"):
        streams = _splitmix64((base + np.arange(draws, dtype=np.uint64)) & _M64)  # one stream per draw
        u = _splitmix64(keys[:, None] ^ streams[None, :])
        v = _splitmix64(u)
    # 53 high bits -> [0, 1) exactly in float64, then K buckets.
    labels = np.floor((u >> np.uint64(11)).astype(np.float64) * 2.0**-53 * num_classes).astype(np.int64)
    signs = np.where((v & np.uint64(1)) == 1, -1.0, 1.0)
    signs[:, 0] = 1.0
    return labels, signs


def class_probes(num_classes: int, label_mode: str) -> torch.Tensor:
    """The fixed class-space basis ``P`` (R x K, unit Frobenius norm) of the label-free modes.

    ``expected``: Helmert rows spanning the centred classes (``P^T P = (I - 11^T/K)/(K-1)``);
    ``jacobian``: ``I/sqrt(K)``.
    """
    K = int(num_classes)
    if label_mode == "jacobian":
        return torch.eye(K, dtype=torch.float64) / math.sqrt(K)
    if K < 2:
        raise InputError(f"label_mode='expected' needs at least 2 classes, the model has {K} output(s)")
    k = torch.arange(1, K, dtype=torch.float64)[:, None]  # row k has k ones, then -k
    col = torch.arange(K, dtype=torch.float64)[None, :]
    H = torch.where(col < k, 1.0, torch.where(col == k, -k, 0.0)) / torch.sqrt(k * (k + 1))
    return H / math.sqrt(K - 1)


# --------------------------------------------------------------------------------------------------
# The finetuned parameter set: named Linear / Conv2d layers.

PRESETS = ("ft1", "ft2")


def _display_name(name: str) -> str:
    return name or "model"


def resolve_layers(model: nn.Module, layers: str | Sequence[str] = "ft1") -> list[tuple[str, nn.Module]]:
    """The finetuned layers as ``(name, module)``.

    ``"ft1"``: the last ``nn.Linear`` (the head); ``"ft2"``: the last two Linear/Conv2d layers in
    registration order (a conv layer + the head for a ResNet, two Linear layers for an MLP head);
    or an explicit list of module names (``"model"`` names a model that is itself one layer).
    """
    named = list(model.named_modules())
    if isinstance(layers, str):
        if layers == "ft1":
            found = [(n, m) for n, m in named if isinstance(m, nn.Linear)][-1:]
            if not found:
                raise InputError("FT-1 needs a model with an nn.Linear head; the model has none")
            return [(_display_name(n), m) for n, m in found]
        if layers == "ft2":
            found = [(n, m) for n, m in named if isinstance(m, SUPPORTED_LAYERS)][-2:]
            if len(found) < 2:
                raise InputError("FT-2 needs a model with at least two nn.Linear/nn.Conv2d layers")
            return [(_display_name(n), m) for n, m in found]
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    names = list(layers)
    if not names:
        raise InputError("the parameter set is empty: name at least one layer")
    if len(set(names)) != len(names):
        raise InputError(f"layer names must be unique, got {names}")
    modules = {_display_name(n): m for n, m in named}
    out = []
    for name in names:
        if name not in modules:
            candidates = [_display_name(n) for n, m in named if isinstance(m, SUPPORTED_LAYERS)]
            raise InputError(f"the model has no layer named {name!r}; its Linear/Conv2d layers are {candidates}")
        mod = modules[name]
        if not isinstance(mod, SUPPORTED_LAYERS):
            raise InputError(f"layer {name!r} is a {type(mod).__name__}; supported finetuned layers: Linear, Conv2d")
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise InputError(f"layer {name!r}: grouped convolutions (groups={mod.groups}) are not supported")
            if mod.padding_mode != "zeros":
                raise InputError(f"layer {name!r}: padding_mode={mod.padding_mode!r} is not supported (only 'zeros')")
        out.append((name, mod))
    return out


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in + bias) of a layer's gradient matrix."""
    bias = int(module.bias is not None)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features + bias
    kh, kw = module.kernel_size
    return module.out_channels, module.in_channels * kh * kw + bias


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (B, positions, C_in * kh * kw), channel-major like ``weight.reshape(out, -1)``."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same" (stride 1): total padding dilation * (k - 1), the extra pixel at the end
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    if any(pads):
        x = nn.functional.pad(x, pads)
    cols = nn.functional.unfold(x, (kh, kw), dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2)


@dataclass
class FactorBlock:
    """One layer's per-sample gradients ``g_i = sum_p left[i, p] (x) right[i, p]`` (B x dL*dR)."""

    name: str
    left: torch.Tensor  # (B, P, dL)
    right: torch.Tensor  # (B, P, dR)

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[2], self.right.shape[2]

    @property
    def dim(self) -> int:
        return self.left.shape[2] * self.right.shape[2]

    def materialize(self) -> torch.Tensor:
        """The gradient rows (B x dL*dR). For small problems, oracles and dense references."""
        return torch.einsum("bpo,bpj->boj", self.left, self.right).reshape(self.left.shape[0], -1)

    def sq_norms(self, max_elements: int = 1 << 24) -> torch.Tensor:
        """``||g_i||^2`` from the factors: ``sum_{p,q} (l_p . l_q)(r_p . r_q)``, without forming g."""
        B, P, _ = self.left.shape
        if P == 1:
            return (self.left[:, 0] ** 2).sum(1) * (self.right[:, 0] ** 2).sum(1)
        step = max(1, max_elements // (P * P))
        parts = []
        for s in range(0, B, step):
            l, r = self.left[s : s + step], self.right[s : s + step]
            parts.append((torch.bmm(l, l.transpose(1, 2)) * torch.bmm(r, r.transpose(1, 2))).sum((1, 2)))
        return torch.cat(parts)


def _affine_batch_norm(module, inputs, output):
    """Forward hook: an eval-mode BatchNorm on the differentiated path recomputed as its per-channel
    affine map (the same function). Its backward is then plain products, which batch over the probes of
    the label-free modes; the fused batch-norm backward has no batching rule and would run once per probe."""
    x = inputs[0]
    if module.training or module.running_var is None or not x.requires_grad:
        return None
    scale = torch.rsqrt(module.running_var + module.eps)
    shift = -module.running_mean * scale
    if module.weight is not None:
        scale, shift = scale * module.weight, shift * module.weight + module.bias
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)


class GradientFactorizer:
    """Per-sample gradient factors of a parameter set, batch by batch.

    The model runs in eval mode (BatchNorm statistics and dropout frozen); inputs of the finetuned
    layers are captured by forward hooks, output gradients by one backward pass from the logits with
    the label mode's cotangent (none for the logits layer: its output gradient is the cotangent).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "ft1",
        label_mode: str = "expected",
        draws: int = 1,
        seed: int = 0,
    ):
        check_label_mode(label_mode)
        if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
            raise InputError(f"draws must be a positive integer, got {draws!r}")
        if label_mode != "random" and draws != 1:
            raise InputError(f"draws={draws} only applies to label_mode='random'")
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.label_mode = label_mode
        self.draws = int(draws)
        self.seed = int(seed)
        self.num_classes: int | None = None
        self.logits_layer: str | None = None  # which finetuned layer (if any) outputs the logits
        self._probes: dict[tuple, torch.Tensor] = {}

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    @property
    def label_free(self) -> bool:
        return self.label_mode in ("expected", "jacobian")

    def block_shapes(self) -> list[tuple[str, tuple[int, int]]]:
        """``(name, (dL, dR))`` of every block; known after the first batch (``num_classes``)."""
        if self.num_classes is None:
            raise RuntimeError("block shapes are known after the first batch has been factorised")
        shapes = []
        for name, mod in self.layers:
            d_out, d_in = layer_dims(mod)
            if name == self.logits_layer and self.label_free:
                shapes.append((name, (1, d_in)))
            elif self.label_free:
                shapes.append((name, (self._n_probes() * d_out, d_in)))
            else:
                shapes.append((name, (d_out, d_in)))
        return shapes

    def _n_probes(self) -> int:
        return self.num_classes - 1 if self.label_mode == "expected" else self.num_classes

    def probes(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._probes:
            self._probes[key] = class_probes(self.num_classes, self.label_mode).to(device=device, dtype=dtype)
        return self._probes[key]

    def cotangent(self, logits: torch.Tensor, labels=None, keys: np.ndarray | None = None,
                  labels_checked: bool = False) -> torch.Tensor:
        """The per-sample gradient of the loss with respect to the logits (true / random modes).
        ``labels_checked``: ``labels`` is already a long tensor of class indices on the logits' device
        (the range check, a device synchronisation, is skipped)."""
        B, K = logits.shape
        if self.label_mode == "true":
            return softmax_ce_delta(logits, labels if labels_checked else _check_labels(labels, B, K, logits.device))
        if keys is None or len(keys) != B:
            raise InputError(
                "label_mode='random' needs one sample id per sample: labels are drawn from (seed, sample id) "
                "so that any split into batches or shards draws the same labels"
            )
        y, eps = draw_random_labels(keys, K, self.draws, self.seed)
        # Through pinned memory to a GPU: the host does not wait for the device's queued work.
        y = to_device(torch.as_tensor(y), logits.device)
        w = to_device(torch.as_tensor(eps / math.sqrt(self.draws), dtype=logits.dtype), logits.device)
        A = torch.zeros(B, K, device=logits.device, dtype=logits.dtype).scatter_add_(1, y, w)
        return label_weighted_delta(logits, A, w.sum(1, keepdim=True))

    def _forward(self, x: torch.Tensor, with_grad: bool):
        captured: dict[str, list] = {name: [] for name, _ in self.layers}

        def hook_for(name):
            def hook(module, inputs, output):
                a = inputs[0].detach()
                if isinstance(module, nn.Conv2d):
                    a = _conv_patches(module, a)
                else:
                    a = a.reshape(a.shape[0], -1, a.shape[-1]).clone()
                if not with_grad:
                    captured[name].append((a, output, output))
                    return None
                if not output.requires_grad:
                    output.requires_grad_(True)
                # Downstream in-place ops (ReLU(inplace=True)) must not alter the tensor whose gradient is taken.
                passed = output.clone()
                captured[name].append((a, output, passed))
                return passed

            return hook

        handles = [mod.register_forward_hook(hook_for(n)) for n, mod in self.layers]
        if with_grad:
            handles += [mod.register_forward_hook(_affine_batch_norm) for mod in self.model.modules()
                        if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        was_training = [m.training for m in self.model.modules()]
        # Parameters never need gradients here: with them frozen, autograd records only the ops after the
        # first finetuned layer's output (marked above), not the whole body.
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.set_grad_enabled(with_grad):
                logits = self.model(x)
        finally:
            for p in params:
                p.requires_grad_(True)
            for h in handles:
                h.remove()
            for m, t in zip(self.model.modules(), was_training):
                m.training = t
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise InputError("the model must return a 2-D tensor of logits / outputs (batch x K)")
        for name in self.layer_names:
            if not captured[name]:
                raise InputError(f"layer {name!r} was not called in the model's forward pass")
        return logits, captured

    def prepare(self, x: torch.Tensor) -> None:
        """Learn the number of outputs and which finetuned layer (if any) returns them, from a batch."""
        if self.num_classes is None:
            self._learn_structure(*self._forward(x, with_grad=True))

    def factors(self, x: torch.Tensor, labels=None, keys: np.ndarray | None = None, row_offset: int = 0,
                valid_rows: int | None = None, check_finite: bool = True, labels_checked: bool = False) -> list[FactorBlock]:
        """Gradient factors of the batch ``x``, one :class:`FactorBlock` per finetuned layer.

        Only the first ``valid_rows`` rows (all by default) are checked for non-finite values; the rest
        is padding. ``row_offset`` numbers the rows in error messages. ``check_finite=False`` leaves the
        check to the caller (:func:`explain_non_finite` on the returned factors).
        """
        valid = x.shape[0] if valid_rows is None else valid_rows
        self.prepare(x)  # once: a dry forward pass learns K and which layer gives the logits
        need_backward = any(n != self.logits_layer for n in self.layer_names)
        logits, captured = self._forward(x, with_grad=need_backward)
        self._learn_structure(logits, captured)
        if check_finite:
            _check_finite(logits[:valid], "model outputs (logits)", row_offset)
            for name in self.layer_names:
                for a, _, _ in captured[name]:
                    _check_finite(a[:valid], f"input activations of layer {name!r}", row_offset)

        deep = [n for n in self.layer_names if n != self.logits_layer]
        # The loss gradient is formed in float32 even when the model runs under half-precision autocast.
        if self.label_free:
            P = self.probes(logits.device, logits.dtype)
            cot = None
        else:
            cot = self.cotangent(logits.detach().float(), labels, keys, labels_checked)
        out_grads: dict[str, list[torch.Tensor]] = {}
        if deep:
            outs = [o for n in deep for _, o, _ in captured[n]]
            if self.label_free:
                R = P.shape[0]
                grads = torch.autograd.grad(logits, outs, grad_outputs=P[:, None, :].expand(R, *logits.shape).contiguous(),
                                            is_grads_batched=True, allow_unused=True)
            else:
                grads = torch.autograd.grad(logits, outs, grad_outputs=cot.to(logits.dtype), allow_unused=True)
            it = iter(grads)
            for n in deep:
                gl = []
                for _, o, _ in captured[n]:
                    g = next(it)
                    if g is None:  # the layer's output does not reach the logits
                        g = torch.zeros((P.shape[0],) + o.shape if self.label_free else o.shape, dtype=o.dtype, device=o.device)
                    gl.append(g)
                out_grads[n] = gl

        blocks = []
        for name, mod in self.layers:
            lefts, rights = [], []
            for call, (a, o, _) in enumerate(captured[name]):
                if mod.bias is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                rights.append(a)
                if name == self.logits_layer:
                    lefts.append(torch.ones_like(a[..., :1]) if self.label_free else cot.detach()[:, None, :])
                    continue
                g = out_grads[name][call].detach()
                if self.label_free:  # (R, B, *out) -> (B, positions, R * d_out)
                    if isinstance(mod, nn.Conv2d):
                        g = g.flatten(3).permute(1, 3, 0, 2)
                    else:
                        g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).permute(1, 2, 0, 3)
                    g = g.reshape(g.shape[0], g.shape[1], -1)
                elif isinstance(mod, nn.Conv2d):
                    g = g.flatten(2).transpose(1, 2)
                else:
                    g = g.reshape(g.shape[0], -1, g.shape[-1])
                if check_finite:
                    _check_finite(g[:valid], f"output gradients of layer {name!r}", row_offset)
                lefts.append(g)
            left = lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)
            right = rights[0] if len(rights) == 1 else torch.cat(rights, dim=1)
            blocks.append(FactorBlock(name, left.contiguous(), right.contiguous()))
        return blocks

    def _learn_structure(self, logits: torch.Tensor, captured: dict) -> None:
        """Number of classes and which finetuned layer (if any) returns the logits, checked every batch."""
        producer = None
        for name in self.layer_names:
            if any(passed is logits for _, _, passed in captured[name]):
                producer = name
                if len(captured[name]) > 1:
                    raise InputError(f"layer {name!r} returns the outputs and is also called elsewhere in the model")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
            self.logits_layer = producer
            if self.label_free:
                self._n_probes()  # validates K
        elif logits.shape[1] != self.num_classes or producer != self.logits_layer:
            raise InputError("the model's output changed between batches (number of outputs or producing layer)")


def explain_non_finite(blocks: Sequence[FactorBlock], label_free: bool, logits_layer: str | None, valid: int,
                       row_offset: int = 0) -> None:
    """Raise the precise :class:`InputError` for factors that contain NaN/inf (no-op if all are finite)."""
    for fb in blocks:
        _check_finite(fb.right[:valid], f"input activations of layer {fb.name!r}", row_offset)
    for fb in blocks:
        what = "model outputs (logits) / their loss gradient" if fb.name == logits_layer else f"output gradients of layer {fb.name!r}"
        _check_finite(fb.left[:valid], what, row_offset)


def _check_finite(t: torch.Tensor, what: str, row_offset: int) -> None:
    if t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().flatten()
        raise InputError(
            f"non-finite {what} (NaN or inf) in {bad.numel()} sample(s), first at sample {row_offset + int(bad[0])}"
        )


# --------------------------------------------------------------------------------------------------
# Generic torch.func oracle: slow, obviously correct, any parameter set.


def vmap_gradients(model: nn.Module, inputs: torch.Tensor, loss_fn: Callable, targets, param_names: Sequence[str]) -> torch.Tensor:
    """Per-sample gradients (B x r) of ``loss_fn(model(x_i), target_i)`` for the named parameters,
    each flattened and concatenated in the given order, with ``torch.func.vmap(grad)``."""
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    missing = [p for p in param_names if p not in params]
    if missing:
        raise InputError(f"the model has no parameter(s) {missing}")
    chosen = {k: params[k].detach() for k in param_names}
    frozen = {k: v.detach() for k, v in params.items() if k not in chosen}
    buffers = dict(model.named_buffers())

    def loss(p, x, t):
        out = functional_call(model, {**frozen, **p, **buffers}, (x[None],))
        return loss_fn(out[0], t)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(chosen, inputs, targets)
    return torch.cat([grads[k].reshape(inputs.shape[0], -1) for k in param_names], dim=1)


def _layer_param_names(model: nn.Module, layers) -> list[tuple[str, str | None]]:
    names = {m: n for n, m in model.named_modules()}
    out = []
    for _, mod in resolve_layers(model, layers):
        prefix = names[mod] + "." if names[mod] else ""
        out.append((prefix + "weight", prefix + "bias" if mod.bias is not None else None))
    return out


def layer_param_names(model: nn.Module, layers) -> list[str]:
    """The parameter names of a parameter set (each layer's weight, then its bias), in layer order."""
    return [n for pair in _layer_param_names(model, layers) for n in pair if n is not None]


def to_layer_layout(model: nn.Module, layers, flat: torch.Tensor) -> torch.Tensor:
    """Rearrange ``[vec W, b]`` per layer (the oracle's order) into the factored ``[W | b]`` row layout."""
    parts, col = [], 0
    for (w_name, b_name), (_, mod) in zip(_layer_param_names(model, layers), resolve_layers(model, layers)):
        d_out, d_in = layer_dims(mod)
        nw = d_out * (d_in - int(b_name is not None))
        W = flat[..., col : col + nw].reshape(*flat.shape[:-1], d_out, -1)
        col += nw
        if b_name is not None:
            W = torch.cat([W, flat[..., col : col + d_out, None]], dim=-1)
            col += d_out
        parts.append(W.reshape(*flat.shape[:-1], -1))
    return torch.cat(parts, dim=-1)


def vmap_layer_gradients(model: nn.Module, inputs: torch.Tensor, layers, loss_fn: Callable, targets) -> torch.Tensor:
    """Oracle per-sample gradients of a parameter set in the factored layout (B x r)."""
    names = layer_param_names(model, layers)
    return to_layer_layout(model, layers, vmap_gradients(model, inputs, loss_fn, targets, names))


def vmap_layer_jacobians(model: nn.Module, inputs: torch.Tensor, layers) -> torch.Tensor:
    """Oracle per-sample Jacobians of the outputs, (B x K x r) in the factored layout."""
    from torch.func import functional_call, jacrev, vmap

    names = layer_param_names(model, layers)
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in chosen}
    buffers = dict(model.named_buffers())

    def out(p, x):
        return functional_call(model, {**frozen, **p, **buffers}, (x[None],))[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))(chosen, inputs)
    B, K = inputs.shape[0], next(iter(jac.values())).shape[1]
    flat = torch.cat([jac[k].reshape(B, K, -1) for k in names], dim=2)
    return to_layer_layout(model, layers, flat)
