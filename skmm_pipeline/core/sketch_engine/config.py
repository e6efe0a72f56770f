"""The sketch configuration: everything but the model, the seed and the device that fixes a run's rows.

One dataclass, made from the settings resource by the ``gradient_sketch`` asset, rebuilt from a stored
sketch's identity by the method comparison (to sketch other seeds the same way), and turned into a
:class:`GradientSketcher` by :meth:`SketchConfig.sketcher`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from skmm_pipeline.core import defaults
from skmm_pipeline.core.sketch_engine.sketcher import GradientSketcher
from skmm_pipeline.core.validation import InputError


@dataclass(frozen=True)
class SketchConfig:
    sketch_dim: int = defaults.SKETCH_DIM
    kind: str = "auto"
    layers: str | Sequence[str] = "ft1"
    label_mode: str = "expected"
    draws: int = 1
    block_scales: Mapping[str, float] | None = None
    model_id: str | None = None
    precision: str = "float32"
    block_rows: int | None = None  # compute blocks: memory only, never the rows (not in the identity)
    class_probes: int | None = defaults.CLASS_PROBES

    @classmethod
    def from_identity(cls, identity: Mapping) -> "SketchConfig":
        """The configuration a stored sketch was made with (its manifest's identity)."""
        ident = dict(identity)
        if "engine" not in ident:
            raise InputError(f"not a sketch-engine identity (no 'engine' field): {ident}; re-materialize gradient_sketch")
        blocks = ident.get("blocks") or []
        return cls(sketch_dim=int(ident["sketch_dim"]), kind=ident["kind"], layers=tuple(ident["param_set"]),
                   label_mode=ident["label_mode"], draws=int(ident.get("draws", 1)),
                   block_scales={b["name"]: float(b["scale"]) for b in blocks} or None,
                   model_id=ident.get("model_id"), precision=ident.get("precision", "float32"),
                   class_probes=ident.get("class_probes"))

    def kwargs(self) -> dict:
        """The :class:`GradientSketcher` keyword arguments (all but the model, the seed and the device)."""
        out = asdict(self)
        out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return out

    def sketcher(self, model, seed: int, device=None) -> GradientSketcher:
        return GradientSketcher(model, seed=int(seed), device=device, **self.kwargs())
