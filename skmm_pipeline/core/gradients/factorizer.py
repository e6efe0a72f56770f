"""Per-sample gradient factors of a parameter set, batch by batch (:class:`GradientFactorizer`).

Forward hooks capture each finetuned layer's input and output; one backward pass from the logits with
the label mode's cotangent (none for the logits layer itself) gives the output gradients. A layer's
gradients come out as a :class:`FactorBlock` of the two factors, never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.device_blocks import to_device
from skmm_pipeline.core.gradients.labels import (
    _check_labels,
    check_label_mode,
    class_probes,
    draw_random_labels,
    label_weighted_delta,
    probe_count,
    softmax_ce_delta,
)
from skmm_pipeline.core.gradients.layers import (
    _affine_batch_norm,
    _conv_patches,
    layer_dims,
    resolve_layers,
)
from skmm_pipeline.core.validation import InputError, check_int


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
            lf, rf = self.left[s : s + step], self.right[s : s + step]
            parts.append((torch.bmm(lf, lf.transpose(1, 2)) * torch.bmm(rf, rf.transpose(1, 2))).sum((1, 2)))
        return torch.cat(parts)


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
        class_probes: int | None = None,
    ):
        check_label_mode(label_mode)
        draws = check_int(draws, "draws", minimum=1)
        # Label-free modes only: how many class-space directions a deep block's gradient is taken along
        # (None: all of them, exact; fewer: a seeded sketch of the class space, labels.class_probes).
        self.class_probes = check_int(class_probes, "class_probes", minimum=1, optional=True)
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
        return probe_count(self.num_classes, self.label_mode, self.class_probes)

    @property
    def probes_sketched(self) -> bool:
        """True when a deep block's class space is sketched (fewer probes than the exact basis has rows)."""
        if self.num_classes is None:
            raise RuntimeError("known after the first batch has been factorised")
        deep = any(n != self.logits_layer for n in self.layer_names)
        return self.label_free and deep and self._n_probes() < probe_count(self.num_classes, self.label_mode)

    def probes(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._probes:
            P = class_probes(self.num_classes, self.label_mode, self.class_probes, self.seed)
            self._probes[key] = P.to(device=device, dtype=dtype)
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
