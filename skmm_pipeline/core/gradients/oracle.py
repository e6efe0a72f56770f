"""Generic ``torch.func`` oracle of per-sample gradients: slow, obviously correct, any parameter set.

:func:`vmap_layer_gradients` and :func:`vmap_layer_jacobians` give the factored path's row layout
(``[W.reshape(d_out, -1) | b]`` per layer, row-major); the factored gradients are tested against them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from skmm_pipeline.core.gradients.layers import layer_dims, resolve_layers
from skmm_pipeline.core.validation import InputError


def _functional(model: nn.Module, param_names: Sequence[str]) -> tuple[dict, Callable]:
    """The named parameters (detached) and ``call(params, x)``: the model's output for one sample ``x``
    with those parameters, the others and the buffers as they are."""
    params = dict(model.named_parameters())
    missing = [p for p in param_names if p not in params]
    if missing:
        raise InputError(f"the model has no parameter(s) {missing}")
    chosen = {k: params[k].detach() for k in param_names}
    frozen = {k: v.detach() for k, v in params.items() if k not in chosen}
    buffers = dict(model.named_buffers())

    def call(p, x):
        return functional_call(model, {**frozen, **p, **buffers}, (x[None],))[0]

    return chosen, call


def vmap_gradients(model: nn.Module, inputs: torch.Tensor, loss_fn: Callable, targets, param_names: Sequence[str]) -> torch.Tensor:
    """Per-sample gradients (B x r) of ``loss_fn(model(x_i), target_i)`` for the named parameters,
    each flattened and concatenated in the given order, with ``torch.func.vmap(grad)``."""
    chosen, call = _functional(model, param_names)

    def loss(p, x, t):
        return loss_fn(call(p, x), t)

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
    names = layer_param_names(model, layers)
    chosen, call = _functional(model, names)
    jac = vmap(jacrev(call), in_dims=(None, 0))(chosen, inputs)
    B, K = inputs.shape[0], next(iter(jac.values())).shape[1]
    flat = torch.cat([jac[k].reshape(B, K, -1) for k in names], dim=2)
    return to_layer_layout(model, layers, flat)
