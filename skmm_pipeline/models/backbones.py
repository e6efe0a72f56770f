"""Pretrained backbones behind one interface, with their FT-1 / FT-2 parameter sets.

Every model built here (and the embedded :class:`~skmm_pipeline.models.small_cnn.SmallCNN`) has
``.body(x)`` -> penultimate features, ``.head`` (an ``nn.Linear`` for the target task), ``.feature_dim``
and ``.num_classes``, so feature extraction and head-gradient sketching treat them alike.

Architectures (``ARCHITECTURES``): ``resnet18``, ``resnet50``, ``vit_b_16`` (torchvision) and
``small_cnn``. Weights come from a local file or from the torch hub cache; nothing is downloaded:

- ``weights=<path>``: a state dict saved with ``torch.save`` (torchvision's own key layout as in the
  hub checkpoints, or this module's ``body.*``/``head.*`` layout, optionally wrapped in
  ``{"state_dict": ...}``), read with ``torch.load(weights_only=True)``;
- ``weights="hub"``: the architecture's torchvision checkpoint file in ``<hub dir>/checkpoints/``
  (``torch.hub.get_dir()`` unless ``hub_dir`` is given), e.g. ``resnet18-f37072fd.pth``;
- ``weights=None``: random initialisation from ``seed`` (tests, development).

The classification head is replaced for ``num_classes`` (1 for regression: the pipeline builds a
one-output head when the evaluation splits carry ``targets``): a file's head is kept only when it has
exactly that shape, otherwise a new head is initialised from ``seed``. A file whose body does not
match the architecture raises :class:`BackboneWeightsError` naming the file and the first mismatched
keys.

Parameter sets: ``"ft1"`` is the head (weight + bias); ``"ft2"`` adds the last block: ``layer4[-1]``
of a ResNet, the last encoder layer and the final LayerNorm of a ViT, the fc(1024->128) layer of the
small CNN. :func:`finetune_split` cuts a model into a frozen ``prefix`` and the ``tail`` holding
exactly that set, so the prefix's activations can be computed once and the tail trained on them.
BatchNorm layers stay in eval mode (pretrained running statistics) even in ``train()`` mode: small
subsets would otherwise overwrite them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from skmm_pipeline.core.errors import BackboneWeightsError, ConfigError
from skmm_pipeline.core.sketch_engine import model_fingerprint
from skmm_pipeline.data.vision import SMALL_CNN_TRANSFORM, ImageTransform
from skmm_pipeline.models.small_cnn import BodyHeadModel, SmallCNN

log = logging.getLogger(__name__)

SAVE_FORMAT = "skmm-backbone/1"
PARAMETER_SETS = ("ft1", "ft2")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[..., nn.Module]  # (image_size) -> torchvision model, random init, original head
    head_attr: str  # where the classification head lives in the torchvision model
    hub_files: tuple[str, ...]  # checkpoint file names of the torchvision weights, preferred first
    default_image_size: int  # only ViT depends on it (its position embedding fixes the input size)


def _resnet(fn_name):
    def build(image_size: int):
        import torchvision  # noqa: PLC0415 - about 1 s on top of torch; only torchvision backbones need it

        return getattr(torchvision.models, fn_name)(weights=None)

    return build


def _vit_b_16(image_size: int):
    import torchvision  # noqa: PLC0415 - about 1 s on top of torch; only torchvision backbones need it

    return torchvision.models.vit_b_16(weights=None, image_size=image_size)


ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("resnet18", _resnet("resnet18"), "fc", ("resnet18-f37072fd.pth",), 224),
    "resnet50": ArchSpec("resnet50", _resnet("resnet50"), "fc", ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"), 224),
    "vit_b_16": ArchSpec("vit_b_16", _vit_b_16, "heads.head", ("vit_b_16-c867db91.pth",), 224),
    "small_cnn": ArchSpec("small_cnn", lambda image_size: None, "head", (), 8),
}


class Backbone(BodyHeadModel):
    """A torchvision classifier split into ``body`` (everything up to the pooled features, its own head
    removed) and a new ``head`` for the target task."""

    def __init__(self, arch: str, body: nn.Module, head: nn.Linear, image_size: int):
        super().__init__()
        self.arch = arch
        self.image_size = int(image_size)
        self.body = body
        self.head = head

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def available_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def _spec(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; available: {available_architectures()}")
    return ARCHITECTURES[arch]


def _detach_head(net: nn.Module, head_attr: str) -> nn.Linear:
    parent = net
    *path, last = head_attr.split(".")
    for p in path:
        parent = getattr(parent, p)
    old = getattr(parent, last)
    setattr(parent, last, nn.Identity())
    return old


# ---- weights files -------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"weights file {path} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneWeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise BackboneWeightsError(f"weights file {path} does not hold a state dict (name -> tensor)")
    if all(k.startswith("module.") for k in blob):  # saved from DataParallel
        blob = {k[len("module.") :]: v for k, v in blob.items()}
    return blob


def _split_checkpoint(sd: dict, head_attr: str) -> tuple[dict, dict]:
    """(body state dict, head state dict) from either key layout."""
    if all(k.startswith(("body.", "head.")) for k in sd):
        body = {k[len("body.") :]: v for k, v in sd.items() if k.startswith("body.")}
        head = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
        return body, head
    prefix = head_attr + "."
    body = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    head = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return body, head


def _check_keys(arch: str, path: Path, expected: dict, found: dict, hint: str = "") -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first {shapes[:3]}")
        raise BackboneWeightsError(f"weights file {path} do not match architecture {arch!r}: " + "; ".join(parts) + hint)


def hub_checkpoint(arch: str, hub_dir: str | Path | None = None) -> Path:
    """The architecture's torchvision checkpoint in the torch hub cache (never downloaded)."""
    spec = _spec(arch)
    if not spec.hub_files:
        raise BackboneWeightsError(f"architecture {arch!r} has no torchvision checkpoint; pass a weights file")
    folder = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    folder = folder / "checkpoints"
    for name in spec.hub_files:
        if (folder / name).is_file():
            return folder / name
    raise BackboneWeightsError(
        f"no {arch} checkpoint in the torch hub cache {folder} (looked for {list(spec.hub_files)}); "
        "copy the file there or pass weights=<path>: nothing is downloaded"
    )


# ---- building ------------------------------------------------------------------------------------


def build_backbone(
    arch: str,
    num_classes: int,
    weights: str | Path | None = "hub",
    *,
    seed: int = 0,
    image_size: int | None = None,
    hub_dir: str | Path | None = None,
) -> nn.Module:
    """A model with ``body``/``head`` for ``num_classes`` outputs (1 for regression), in eval mode.

    ``weights``: a file path, ``"hub"`` (the torch hub cache) or ``None`` (random, from ``seed``).
    ``image_size``: the input size (only ViT depends on it; default 224).
    """
    spec = _spec(arch)
    if isinstance(num_classes, bool) or int(num_classes) < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    size = int(image_size or spec.default_image_size)
    path = None
    if isinstance(weights, str) and weights == "hub":
        path = hub_checkpoint(arch, hub_dir)
    elif weights is not None:
        path = Path(weights)
    sd = _read_state_dict(path) if path is not None else None

    # Random initialisation (body and new head) from the seed alone, leaving the global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "small_cnn":
            model = SmallCNN(num_classes)
            body, head = model.body, model.head
        else:
            net = spec.build(size)
            old_head = _detach_head(net, spec.head_attr)
            body = net
            head = nn.Linear(old_head.in_features, num_classes)
            model = Backbone(arch, body, head, size)

    if sd is not None:
        body_sd, head_sd = _split_checkpoint(sd, spec.head_attr)
        hint = ""
        if arch == "vit_b_16" and "encoder.pos_embedding" in body_sd:
            tokens = body_sd["encoder.pos_embedding"].shape[1]
            hint = f" (the file's ViT has {tokens} position tokens; this model was built for image_size={size})"
        _check_keys(arch, path, body.state_dict(), body_sd, hint)
        body.load_state_dict(body_sd)
        shape_ok = (
            set(head_sd) == {"weight", "bias"}
            and tuple(head_sd["weight"].shape) == (num_classes, head.in_features)
            and tuple(head_sd["bias"].shape) == (num_classes,)
        )
        if shape_ok:
            head.load_state_dict(head_sd)
        elif head_sd:
            log.info("%s: the head in %s does not fit %d outputs; a new head was initialised (seed %d)",
                     arch, path, num_classes, seed)
    return model.eval()


def architecture_of(model: nn.Module) -> str:
    if isinstance(model, Backbone):
        return model.arch
    if isinstance(model, SmallCNN):
        return "small_cnn"
    raise TypeError(f"not a backbone of this package: {type(model).__name__}")


def default_transform(model_or_arch, image_size: int | None = None):
    """The input transform the model expects (:class:`skmm_pipeline.data.vision.ImageTransform`):
    ImageNet normalisation at the model's input size for torchvision backbones, 8x8 grey in [0, 1]
    for the small CNN (``image_size`` is ignored for it)."""
    arch = model_or_arch if isinstance(model_or_arch, str) else architecture_of(model_or_arch)
    spec = _spec(arch)
    if arch == "small_cnn":
        return SMALL_CNN_TRANSFORM
    if image_size is None:
        image_size = model_or_arch.image_size if isinstance(model_or_arch, Backbone) else spec.default_image_size
    return ImageTransform.imagenet(int(image_size))


# ---- save / load ---------------------------------------------------------------------------------


def save_backbone(model: nn.Module) -> bytes:
    """Serialise a model built here (readable with :func:`load_backbone`, ``weights_only``)."""
    arch = architecture_of(model)
    blob = {
        "format": SAVE_FORMAT,
        "arch": arch,
        "num_classes": model.num_classes,
        "image_size": getattr(model, "image_size", ARCHITECTURES[arch].default_image_size),
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.getvalue()


def load_backbone(path, device="cpu") -> nn.Module:
    """Load a model saved by :func:`save_backbone` (or by ``small_cnn.save_model``), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"model file {path} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(f"cannot read model file {path}: {exc}") from exc
    if not isinstance(blob, dict) or "state_dict" not in blob or "num_classes" not in blob:
        raise BackboneWeightsError(f"{path} is not a saved model (expected 'arch', 'num_classes', 'state_dict')")
    arch = blob.get("arch", "small_cnn")
    model = build_backbone(arch, int(blob["num_classes"]), weights=None, image_size=blob.get("image_size"))
    _check_keys(arch, path, model.state_dict(), blob["state_dict"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def model_id(model: nn.Module) -> str:
    """Content hash of the weights (the model's identity in lineage and sketch headers)."""
    return model_fingerprint(model)


# ---- parameter sets and the prefix/tail split ------------------------------------------------------


def _check_set(name: str) -> str:
    if name not in PARAMETER_SETS:
        raise ConfigError(f"unknown parameter set {name!r}; available: {list(PARAMETER_SETS)}")
    return name


def finetune_modules(model: nn.Module, name: str = "ft2") -> list[tuple[str, nn.Module]]:
    """The finetuned modules of a parameter set, as ``(qualified name, module)`` in forward order."""
    _check_set(name)
    arch = architecture_of(model)
    if name == "ft1":
        return [("head", model.head)]
    if arch == "small_cnn":
        return [(f"body.{len(model.body) - 2}", model.body[-2]), ("head", model.head)]
    if arch.startswith("resnet"):
        return [(f"body.layer4.{len(model.body.layer4) - 1}", model.body.layer4[-1]), ("head", model.head)]
    layers = model.body.encoder.layers
    last = list(layers.named_children())[-1][0]
    return [(f"body.encoder.layers.{last}", layers[-1]), ("body.encoder.ln", model.body.encoder.ln), ("head", model.head)]


def parameter_set(model: nn.Module, name: str = "ft2") -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of a parameter set: ``ft1`` = head weight + bias, ``ft2`` = the
    last block + head (see the module docstring)."""
    return [(f"{mname}.{pname}", p) for mname, mod in finetune_modules(model, name) for pname, p in mod.named_parameters()]


def gradient_layers(model: nn.Module, name: str = "ft2") -> list[str]:
    """The Linear/Conv2d layers of a parameter set whose per-sample gradients the sketch engine takes
    (``core.sketch_engine.GradientSketcher(layers=...)``): the head, and for ``ft2`` the last
    Linear/Conv2d of the last block."""
    supported = (nn.Linear, nn.Conv2d)
    out = []
    for mname, mod in finetune_modules(model, name):
        if isinstance(mod, supported):
            out.append(mname)
            continue
        inner = [n for n, m in mod.named_modules() if isinstance(m, supported) and n]
        if inner:
            out.append(f"{mname}.{inner[-1]}")
    return out


class _SmallCNNTail(nn.Module):
    def __init__(self, model: SmallCNN):
        super().__init__()
        self.fc = model.body[-2]
        self.act = model.body[-1]
        self.head = model.head

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


class _ResNetPrefix(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        for block in list(n.layer4)[:-1]:
            x = block(x)
        return x


class _ResNetTail(nn.Module):
    def __init__(self, model: Backbone):
        super().__init__()
        self.block = model.body.layer4[-1]
        self.pool = model.body.avgpool
        self.head = model.head

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.block(x)), 1))


class _ViTPrefix(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        x = n._process_input(x)
        x = torch.cat([n.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        enc = n.encoder
        x = enc.dropout(x + enc.pos_embedding)
        for layer in list(enc.layers)[:-1]:
            x = layer(x)
        return x


class _ViTTail(nn.Module):
    def __init__(self, model: Backbone):
        super().__init__()
        self.block = model.body.encoder.layers[-1]
        self.ln = model.body.encoder.ln
        self.head = model.head

    def forward(self, x):
        return self.head(self.ln(self.block(x))[:, 0])


class _HeadTail(nn.Module):
    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)


def finetune_split(model: nn.Module, name: str = "ft2") -> tuple[nn.Module, nn.Module]:
    """``(prefix, tail)`` with ``tail(prefix(x)) == model(x)`` and the tail's parameters exactly the
    parameter set ``name``. Both share the model's modules (copy the tail before training it)."""
    _check_set(name)
    arch = architecture_of(model)
    if name == "ft1":
        return model.body, _HeadTail(model.head)
    if arch == "small_cnn":
        return model.body[:-2], _SmallCNNTail(model)
    if arch.startswith("resnet"):
        return _ResNetPrefix(model.body), _ResNetTail(model)
    return _ViTPrefix(model.body), _ViTTail(model)
