"""torchvision backbones with weights saved to and loaded from temp files (nothing is downloaded)."""

import pytest
import torch
import torchvision
from torch import nn

from skmm_pipeline.core.gradients import resolve_layers
from skmm_pipeline.models.backbones import (
    Backbone,
    BackboneWeightsError,
    build_backbone,
    default_transform,
    finetune_modules,
    finetune_split,
    gradient_layers,
    load_backbone,
    model_id,
    parameter_set,
    save_backbone,
)
from skmm_pipeline.models.small_cnn import SmallCNN, save_model

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state dict in torchvision's own key layout (as in the hub checkpoints)."""
    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_resnet18_from_a_weights_file(resnet18_file):
    path, saved = resnet18_file
    model = build_backbone("resnet18", 3, weights=path, seed=5)
    assert isinstance(model, Backbone) and model.feature_dim == 512 and model.num_classes == 3
    body = model.body.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(body[key], saved[key])
    assert "fc.weight" not in body  # the 1000-class head was replaced
    assert model(X32).shape == (2, 3) and model.body(X32).shape == (2, 512)
    again = build_backbone("resnet18", 3, weights=path, seed=5)
    assert torch.equal(again.head.weight, model.head.weight)  # the new head comes from the seed
    # A file whose head already fits the task keeps it.
    kept = build_backbone("resnet18", 1000, weights=path)
    assert torch.equal(kept.head.weight, saved["fc.weight"])


def test_save_and_load_round_trip(tmp_path, resnet18_file):
    model = build_backbone("resnet18", 4, weights=resnet18_file[0], seed=1)
    path = tmp_path / "model.pt"
    path.write_bytes(save_backbone(model))
    back = load_backbone(path)
    assert back.arch == "resnet18" and back.num_classes == 4 and model_id(back) == model_id(model)
    with torch.no_grad():
        assert torch.equal(back(X32), model(X32))
    # The same file also works as a weights file for build_backbone (body.*/head.* layout).
    assert model_id(build_backbone("resnet18", 4, weights=path)) == model_id(model)
    # The embedded model's own format loads through the same function.
    cnn = SmallCNN(5)
    (tmp_path / "cnn.pt").write_bytes(save_model(cnn))
    assert model_id(load_backbone(tmp_path / "cnn.pt")) == model_id(cnn)


def test_hub_cache_is_used_never_downloaded(tmp_path, resnet18_file):
    with pytest.raises(BackboneWeightsError, match=r"no resnet18 checkpoint in the torch hub cache .*resnet18-f37072fd.pth"):
        build_backbone("resnet18", 2, weights="hub", hub_dir=tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(resnet18_file[0].read_bytes())
    model = build_backbone("resnet18", 2, weights="hub", hub_dir=tmp_path)
    assert torch.equal(model.body.conv1.weight, resnet18_file[1]["conv1.weight"])


def test_bad_weights_files_are_named(tmp_path, resnet18_file):
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("resnet50", 2, weights=resnet18_file[0])
    msg = str(err.value)
    assert str(resnet18_file[0]) in msg and "'resnet50'" in msg
    assert "missing key(s)" in msg and "layer1.0.conv3.weight" in msg and "shape mismatch" in msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="cannot read weights file .*junk.pt"):
        build_backbone("resnet18", 2, weights=junk)
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(BackboneWeightsError, match="does not hold a state dict"):
        build_backbone("resnet18", 2, weights=tmp_path / "meta.pt")
    with pytest.raises(BackboneWeightsError, match="not found"):
        build_backbone("resnet18", 2, weights=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="unknown architecture 'resnet7'"):
        build_backbone("resnet7", 2, weights=None)


def check_interface(model: nn.Module, x: torch.Tensor, last_block: str):
    """ft1/ft2 sets, the prefix/tail split and BatchNorm staying in eval mode."""
    ft1 = parameter_set(model, "ft1")
    assert [n for n, _ in ft1] == ["head.weight", "head.bias"]
    ft2 = parameter_set(model, "ft2")
    names = [n for n, _ in ft2]
    assert names[-2:] == ["head.weight", "head.bias"] and all(
        n.startswith((last_block, "head.", "body.encoder.ln.")) for n in names
    )
    assert finetune_modules(model, "ft2")[0][0] == last_block
    for which, params in (("ft1", ft1), ("ft2", ft2)):
        prefix, tail = finetune_split(model, which)
        assert {id(p) for p in tail.parameters()} == {id(p) for _, p in params}
        with torch.no_grad():
            torch.testing.assert_close(tail(prefix(x)), model(x))
    assert [n for n, _ in resolve_layers(model, gradient_layers(model, "ft2"))][-1] == "head"
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model.eval()


def test_resnet18_interface(resnet18_file):
    model = build_backbone("resnet18", 3, weights=resnet18_file[0])
    check_interface(model, X32, "body.layer4.1")
    assert gradient_layers(model, "ft2") == ["body.layer4.1.conv2", "head"]
    t = default_transform(model)
    assert t.out_size == (224, 224) and t.resize == 256


def test_resnet50_and_vit_b_16_interfaces():
    r50 = build_backbone("resnet50", 2, weights=None)
    assert r50.feature_dim == 2048
    check_interface(r50, X32, "body.layer4.2")
    del r50
    vit = build_backbone("vit_b_16", 2, weights=None, image_size=32)
    assert vit.feature_dim == 768 and vit.image_size == 32
    check_interface(vit, X32, "body.encoder.layers.encoder_layer_11")
    assert [n for n, _ in finetune_modules(vit, "ft2")] == [
        "body.encoder.layers.encoder_layer_11", "body.encoder.ln", "head"
    ]
    assert default_transform(vit).out_size == (32, 32)


def test_small_cnn_in_the_registry():
    cnn = build_backbone("small_cnn", 5, weights=None, seed=0)
    assert isinstance(cnn, SmallCNN)
    check_interface(cnn, torch.randn(2, 1, 8, 8), "body.6")
    assert gradient_layers(cnn, "ft2") == ["body.6", "head"]
    assert default_transform("small_cnn").mode == "L"


@pytest.mark.parametrize("arch,make,probe", [
    ("resnet50", lambda: torchvision.models.resnet50(weights=None), "layer4.2.bn3.running_mean"),
    ("vit_b_16", lambda: torchvision.models.vit_b_16(weights=None, image_size=32), "encoder.layers.encoder_layer_11.mlp.0.weight"),
])
def test_resnet50_and_vit_b_16_from_weights_files(tmp_path, arch, make, probe):
    """torchvision's own key layout, saved to and loaded from a temp file; the head is replaced."""
    torch.manual_seed(7)
    net = make()
    saved = net.state_dict()
    path = tmp_path / f"{arch}.pth"
    torch.save(saved, path)
    del net
    model = build_backbone(arch, 3, weights=path, seed=2, image_size=32)
    body = model.body.state_dict()
    assert torch.equal(body[probe], saved[probe]) and model.num_classes == 3
    with torch.no_grad():
        assert model(X32).shape == (2, 3)
    if arch == "vit_b_16":  # a checkpoint made for another input size is refused, naming both sizes
        with pytest.raises(BackboneWeightsError, match="5 position tokens.*image_size=224"):
            build_backbone(arch, 3, weights=path, image_size=224)
