"""The finetuned parameter set (named Linear / Conv2d layers) and how its layers are read.

:func:`resolve_layers` turns a preset (``ft1``, ``ft2``) or module names into layers; each layer's
gradient is a ``d_out x (d_in + bias)`` matrix (:func:`layer_dims`), whose input factor is the layer
input (the unfolded patches of a convolution, :func:`_conv_patches`). An eval-mode BatchNorm on the
differentiated path is recomputed as its affine map (:func:`_affine_batch_norm`), so its backward
batches over the probes of the label-free modes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from skmm_pipeline.core.validation import InputError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

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
