"""The registry of selection methods: their selectors, descriptions, groups and inputs.

A selector is called as ``fn(X, n, *, seed, labels, stats, **options)`` and returns a
:class:`SelectorResult`. Each method family collects its selectors in a :class:`Family`; the package
``__init__`` registers the families in a fixed order with :func:`register_family`, so the registry's
order does not depend on which module was imported first. :func:`register` adds a single method.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from skmm_pipeline.core.validation import InputError


@dataclass(frozen=True)
class SelectorResult:
    """What a selector returns: the chosen row indices (in selection order), its diagnostics and, for
    the relaxations, the relaxed capped-simplex weights ``s`` (inclusion probabilities ``n s``)."""

    indices: np.ndarray
    diagnostics: dict = field(default_factory=dict)
    weights: np.ndarray | None = None


Selector = Callable[..., SelectorResult]
SELECTORS: dict[str, Selector] = {}
DESCRIPTIONS: dict[str, str] = {}
# Per method: ``group`` "label-free" (never looks at labels) or "label-using"; ``input`` "any" (any N x d
# matrix, e.g. a gradient sketch) or "features" (frozen penultimate features, together with labels).
METHOD_INFO: dict[str, dict[str, str]] = {}
GROUPS = ("label-free", "label-using")
INPUTS = ("any", "features")


def register(
    name: str, description: str = "", *, group: str = "label-free", input: str = "any"
) -> Callable[[Selector], Selector]:
    if group not in GROUPS or input not in INPUTS:
        raise ValueError(f"register({name!r}): group must be one of {GROUPS} and input one of {INPUTS}")

    def deco(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        METHOD_INFO[name] = {"group": group, "input": input}
        return fn

    return deco


class Family:
    """The selectors of one method family, in definition order, waiting for :func:`register_family`."""

    def __init__(self, name: str):
        self.name = name
        self.methods: list[tuple[str, str, str, str, Selector]] = []

    def method(
        self, name: str, description: str = "", *, group: str = "label-free", input: str = "any"
    ) -> Callable[[Selector], Selector]:
        def deco(fn: Selector) -> Selector:
            self.methods.append((name, description, group, input, fn))
            return fn

        return deco


def register_family(family: Family) -> None:
    """Register every method of ``family`` in the order it defines them."""
    for name, description, group, input, fn in family.methods:
        register(name, description, group=group, input=input)(fn)


def method_info(name: str) -> dict:
    """``{"group": "label-free" | "label-using", "input": "any" | "features"}`` for a registered method."""
    if name not in METHOD_INFO:
        raise InputError(f"unknown selection method {name!r}; available: {sorted(SELECTORS)}")
    return dict(METHOD_INFO[name])


def method_options(method: str) -> dict[str, object]:
    """The options a method accepts, with their defaults."""
    sig = inspect.signature(SELECTORS[method])
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in ("seed", "labels", "stats")
    }
