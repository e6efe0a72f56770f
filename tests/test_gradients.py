"""Per-sample gradient factors and the sketching engine, against torch.func oracles on small models."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from skmm_pipeline.core.gradients import (
    GradientFactorizer,
    class_probes,
    draw_random_labels,
    gradient_dim,
    head_gradient_rows,
    sample_keys,
    vmap_layer_gradients,
    vmap_layer_jacobians,
)
from skmm_pipeline.core.sketch import make_sketch
from skmm_pipeline.core.sketch_engine import GradientSketcher, SketchConfig, calibrate_block_scales, sketch_gradients
from skmm_pipeline.core.sketch_io import SketchShardWriter, read_sketch_shard
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.models.small_cnn import SmallCNN, sketch_head_gradients

ROOT = Path(__file__).resolve().parents[1]


def ce(out, t):
    return nn.functional.cross_entropy(out[None], t[None], reduction="sum")


def mlp():
    torch.manual_seed(0)
    # ReLU(inplace=True) right after a finetuned layer: its output must still be the pre-activation.
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 5))


def convnet():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),  # 8x8 -> 4x4
        nn.ReLU(),
        nn.Conv2d(4, 5, 2, padding="same", bias=False),  # asymmetric "same" padding, no bias
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(80, 4),
    )


CASES = {
    "ft1-cnn": (lambda: (torch.manual_seed(2), SmallCNN(5))[1], "ft1", (1, 8, 8)),
    "ft2-mlp": (mlp, "ft2", (6,)),
    "convs+head": (convnet, ["0", "2", "5"], (3, 8, 8)),
}


def case(name, n=12, seed=0):
    make, layers, shape = CASES[name]
    model = make().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    return model, layers, x


# --- the FT-1 head helpers of the embedded pipeline --------------------------------------------------


def test_true_label_head_gradient_rows_equal_autograd_per_sample_gradients():
    torch.manual_seed(0)
    B, d, K = 6, 5, 4
    head = torch.nn.Linear(d, K)
    feats = torch.randn(B, d)
    labels = torch.randint(0, K, (B,))
    rows = head_gradient_rows(feats, head(feats).detach(), "true", labels)
    assert rows.shape == (B, gradient_dim(d, K, "true"))
    for i in range(B):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(feats[i : i + 1]), labels[i : i + 1]).backward()
        # Row layout is (class, [features, bias]).
        oracle = torch.cat([head.weight.grad, head.bias.grad[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(rows[i], oracle, rtol=1e-5, atol=1e-6)


def test_expected_mode_rows_are_jacobian_features_and_are_label_free():
    feats = torch.randn(3, 5)
    rows = head_gradient_rows(feats, torch.randn(3, 4), "expected")
    torch.testing.assert_close(rows, torch.cat([feats, torch.ones(3, 1)], dim=1))
    with pytest.raises(InputError, match="needs labels"):
        head_gradient_rows(feats, torch.randn(3, 4), "true")
    with pytest.raises(InputError, match="non-finite"):
        head_gradient_rows(torch.full((3, 5), float("inf")), torch.randn(3, 4))
    with pytest.raises(InputError, match="sample_ids"):
        head_gradient_rows(feats, torch.randn(3, 4), "random")
    with pytest.raises(InputError, match="label_mode"):
        head_gradient_rows(feats, torch.randn(3, 4), "guess")


def test_confident_samples_keep_accurate_gradients():
    # p_y = 1 - 1e-12: softmax(z) - 1 in float32 is 0; the closed form keeps the exact (tiny) value.
    z = torch.tensor([[30.0, 2.4, 0.0]])
    rows = head_gradient_rows(torch.ones(1, 1), z, "true", torch.tensor([0]))
    a, b = math.exp(2.4 - 30.0), math.exp(-30.0)
    exact = torch.tensor([-(a + b), a, b], dtype=torch.float64) / (1 + a + b)
    torch.testing.assert_close(rows[0, ::2].double(), exact, rtol=1e-5, atol=0)


# --- factored gradients against vmap ----------------------------------------------------------------


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", sorted(CASES))
def test_factored_gradients_equal_vmap_gradients(name):
    model, layers, x = case(name)
    K = model(x).shape[1]
    y = torch.arange(len(x)) % K
    sk = GradientSketcher(model, 8, layers=layers, label_mode="true", block_rows=16)
    G = sk.gradients(x, labels=y)
    oracle = vmap_layer_gradients(model, x, layers, ce, y)
    assert G.shape == oracle.shape == (len(x), sk.gradient_dim)
    assert rel(G, oracle) <= 1e-5


def test_ft2_on_a_torchvision_resnet_is_the_last_conv_and_the_head():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()  # random weights, nothing downloaded
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 5])
    sk = GradientSketcher(model, 16, layers="ft2", label_mode="true")
    G = sk.gradients(x, labels=y)
    assert sk.layer_names == ["layer4.1.conv2", "fc"]  # BatchNorm, residual and in-place ReLU in between
    assert rel(G, vmap_layer_gradients(model, x, "ft2", ce, y)) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_label_rows_are_the_signed_combination_of_draws(name):
    model, layers, x = case(name)
    K = model(x).shape[1]
    ids = [f"shard/{i}" for i in range(len(x))]
    sk = GradientSketcher(model, 8, layers=layers, label_mode="random", draws=3, seed=7, block_rows=16)
    G = sk.gradients(x, sample_ids=ids)
    labels, signs = draw_random_labels(sample_keys(ids), K, 3, seed=7)
    assert (signs[:, 0] == 1).all() and set(np.unique(signs)) == {-1.0, 1.0}

    def loss(out, t):
        y, w = t
        return sum(w[k] * ce(out, y[k]) for k in range(3)) / math.sqrt(3)

    oracle = vmap_layer_gradients(model, x, layers, loss, (torch.as_tensor(labels), torch.as_tensor(signs).float()))
    assert rel(G, oracle) <= 1e-5


def test_random_labels_depend_only_on_seed_and_sample_id():
    ids = [f"s{j}/{i}" for j in range(3) for i in range(400)]
    labels, _ = draw_random_labels(sample_keys(ids), 7, 2, seed=1)
    sub, _ = draw_random_labels(sample_keys(ids[500:510][::-1]), 7, 2, seed=1)
    assert np.array_equal(sub, labels[500:510][::-1])
    assert not np.array_equal(draw_random_labels(sample_keys(ids), 7, 2, seed=2)[0], labels)
    counts = np.bincount(labels.ravel(), minlength=7)
    assert labels.min() >= 0 and labels.max() < 7 and counts.min() > 0.8 * counts.mean()  # ~uniform
    assert np.array_equal(sample_keys(np.arange(5)), sample_keys(list(range(5))))


def test_random_label_rows_are_unbiased_for_the_expected_moment():
    # E over labels and signs of g g^T equals the exact expected moment (1/K) sum_y g(y) g(y)^T,
    # including the non-uniform softmax term that 'expected' mode drops.
    model, layers, x = case("ft2-mlp", n=3)
    K = 5
    per_label = [vmap_layer_gradients(model, x, layers, ce, torch.full((3,), y)) for y in range(K)]
    exact = sum(torch.einsum("bi,bj->bij", g, g) for g in per_label).double() / K
    ids = ["a", "b", "c"]
    acc, errors = 0, {}
    for s in range(2400):
        G = GradientFactorizer(model, layers, "random", draws=2, seed=s)
        rows = torch.cat([fb.materialize() for fb in G.factors(x, keys=sample_keys(ids))], dim=1).double()
        acc = acc + torch.einsum("bi,bj->bij", rows, rows)
        if s + 1 in (600, 2400):
            errors[s + 1] = float((acc / (s + 1) - exact).norm() / exact.norm())
    # Monte Carlo error only: it halves when the number of draws is multiplied by 4 (a bias would not).
    assert errors[2400] < 0.05 and errors[2400] < 0.6 * errors[600], errors
    # ... and it is far from the single-label moment of any one draw (the test has power).
    one = per_label[0].double()
    assert float((torch.einsum("bi,bj->bij", one, one) - exact).norm() / exact.norm()) > 0.3


@pytest.mark.parametrize("name", sorted(CASES))
def test_expected_rows_represent_the_expected_moment(name):
    """The rows are vec(P J_i) with the logits layer's constant class factor folded in: their Gram equals
    that of the full representation, and its partial trace over classes is K/(K-1) times the exact
    expected random-label moment at a uniform softmax, (1/K) sum_y J^T (u - e_y)(u - e_y)^T J."""
    model, layers, x = case(name, n=6)
    sk = GradientSketcher(model, 8, layers=layers, label_mode="expected", block_rows=16)
    G = sk.gradients(x).double()
    J = vmap_layer_jacobians(model, x, layers).double()  # (B, K, r)
    K = J.shape[1]
    P = class_probes(K, "expected")
    assert torch.allclose(P @ P.T * (K - 1), torch.eye(K - 1, dtype=torch.float64), atol=1e-12)
    full = torch.einsum("ck,bkr->bcr", P, J)  # (B, K-1, r)
    flat = full.reshape(len(x), -1)
    assert rel(G @ G.T, flat @ flat.T) <= 1e-5
    u = torch.full((K,), 1.0 / K, dtype=torch.float64)
    exact = sum(
        torch.einsum("bi,bj->ij", J.transpose(1, 2) @ (u - torch.eye(K, dtype=torch.float64)[y]),
                     J.transpose(1, 2) @ (u - torch.eye(K, dtype=torch.float64)[y]))
        for y in range(K)
    ) / K
    partial_trace = torch.einsum("bci,bcj->ij", full, full)
    assert rel(partial_trace, exact * K / (K - 1)) <= 1e-10
    # The engine's rows expand back to that representation: blocks of the non-logits layers hold
    # (probe, output, input) factors; the logits layer's block is its Jacobian row.
    blocks = sk.identity["blocks"]
    col, expanded = 0, []
    for blk in blocks:
        dL, dR = blk["shape"]
        part = G[:, col : col + dL * dR]
        col += dL * dR
        if dL == 1:  # logits layer: vec(P (x) x~)
            expanded.append(torch.einsum("ck,bj->bckj", P, part).reshape(len(x), K - 1, -1))
        else:
            expanded.append(part.reshape(len(x), K - 1, -1))
    assert rel(torch.cat(expanded, dim=2), full) <= 1e-5


def test_sketched_class_probes_are_a_seeded_unbiased_sketch_of_the_class_space():
    """With more classes than ``class_probes``, a deep block's rows are vec(Q J_i) for a seeded r x K
    sketch Q of the Helmert basis P: r output gradients per sample instead of K - 1, E[Q^T Q] = P^T P,
    the same Q for the same seed in any batch; the logits layer's exact row is untouched."""
    torch.manual_seed(0)
    K, r = 12, 3
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, K)).eval()
    x = torch.randn(20, 6)
    sk = GradientSketcher(model, 16, layers="ft2", label_mode="expected", seed=4, class_probes=r, block_rows=16)
    G = sk.gradients(x).double()
    assert sk.identity["class_probes"] == r
    assert [b["shape"] for b in sk.identity["blocks"]] == [[r * 8, 7], [1, 9]]
    Q = class_probes(K, "expected", r, seed=4)
    J = vmap_layer_jacobians(model, x, "ft2").double()  # (B, K, r_params); the deep block comes first
    deep = torch.einsum("ck,bkr->bcr", Q, J[:, :, : 8 * 7]).reshape(len(x), -1)
    assert rel(G[:, : r * 8 * 7], deep) <= 1e-5
    exact = GradientSketcher(model, 16, layers="ft2", label_mode="expected", class_probes=None).gradients(x)
    torch.testing.assert_close(G[:, r * 8 * 7 :].float(), exact[:, (K - 1) * 8 * 7 :])  # the head's row
    # A pure function of (seed, K, r): rows bit-identical across block sizes and batches, another seed differs.
    rows = sk.sketch(x.numpy(), batch_size=7)
    again = GradientSketcher(model, 16, layers="ft2", seed=4, class_probes=r, block_rows=32).sketch(x.numpy())
    np.testing.assert_array_equal(rows, again)
    assert torch.equal(Q, class_probes(K, "expected", r, seed=4))
    assert not torch.equal(Q, class_probes(K, "expected", r, seed=5))
    # Unbiased: the mean of Q^T Q over seeds tends to P^T P (error shrinking like 1/sqrt(seeds)).
    P = class_probes(K, "expected")
    errors = {}
    acc = torch.zeros(K, K, dtype=torch.float64)
    for s in range(1600):
        Qs = class_probes(K, "expected", r, seed=s)
        acc += Qs.T @ Qs
        if s + 1 in (100, 1600):
            errors[s + 1] = rel(acc / (s + 1), P.T @ P)
    assert errors[1600] < 0.1 and errors[1600] < 0.45 * errors[100], errors


def test_class_probes_change_nothing_where_the_class_space_is_small_enough():
    """At or above K - 1 probes, and for FT-1 (the logits layer alone), rows and identity are those
    of the exact basis; sketches made before the setting existed keep their identity."""
    model, layers, x = case("ft2-mlp", n=20)  # 5 classes: 4 probes
    base = GradientSketcher(model, 16, layers=layers, class_probes=None)
    rows = base.sketch(x.numpy())
    for r in (4, 16):
        sk = GradientSketcher(model, 16, layers=layers, class_probes=r)
        np.testing.assert_array_equal(sk.sketch(x.numpy()), rows)
        assert sk.identity == base.identity and "class_probes" not in sk.identity
    ft1 = GradientSketcher(model, 16, layers="ft1", class_probes=1)
    np.testing.assert_array_equal(ft1.sketch(x.numpy()), GradientSketcher(model, 16, class_probes=None).sketch(x.numpy()))
    assert "class_probes" not in ft1.identity
    sketched = GradientSketcher(model, 16, layers=layers, class_probes=2)
    sketched.prepare(x)
    config = SketchConfig.from_identity(sketched.identity)
    assert config.class_probes == 2
    assert config.sketcher(model, seed=0).prepare(x).identity == sketched.identity
    assert SketchConfig.from_identity(base.identity).class_probes is None
    with pytest.raises(InputError, match="class_probes"):
        GradientSketcher(model, 8, layers=layers, class_probes=0)


def test_jacobian_mode_gives_features_for_regression():
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(9, 4)
    G = GradientSketcher(reg, 8, label_mode="jacobian").gradients(x)
    feats = torch.tanh(reg[0](x)).detach()
    torch.testing.assert_close(G, torch.cat([feats, torch.ones(9, 1)], 1))
    G2 = GradientSketcher(reg, 8, layers="ft2", label_mode="jacobian").gradients(x).double()
    J = vmap_layer_jacobians(reg, x, "ft2").double().reshape(9, -1)
    assert rel(G2 @ G2.T, J @ J.T) <= 1e-5


# --- the engine: sketches of those gradients ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "countsketch", "tensorsketch", "auto"])
def test_engine_rows_equal_materialised_gradients_times_the_stacked_maps(kind):
    model, layers, x = case("convs+head", n=20)
    sk = GradientSketcher(model, 16, kind=kind, layers=layers, label_mode="true", seed=3, block_rows=16)
    y = torch.arange(20) % 4
    S = torch.as_tensor(sk.sketch(x.numpy(), labels=y.numpy()))
    gamma = torch.cat([op.dense().double() for _, op in sk.sketches])
    assert rel(S, sk.gradients(x, labels=y).double() @ gamma) <= 1e-5
    ident = sk.identity
    assert ident["param_set"] == ["0", "2", "5"] and ident["label_mode"] == "true" and ident["sketch_dim"] == 16
    assert [b["kind"] for b in ident["blocks"]] == [op.kind for _, op in sk.sketches]
    if kind == "auto":  # small gradient blocks: formed and CountSketched
        assert {b["kind"] for b in ident["blocks"]} == {"countsketch"}


def _invariance_setup():
    model, layers, x = case("convs+head", n=150, seed=4)
    ids = [f"shard-{i // 50}/{i % 50}" for i in range(150)]
    return model, layers, x.numpy(), ids


CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads({threads})
    from test_gradients import _invariance_setup
    from skmm_pipeline.core.sketch_engine import GradientSketcher
    model, layers, x, ids = _invariance_setup()
    sk = GradientSketcher(model, 32, kind="tensorsketch", layers=layers, label_mode="random", draws=2, seed=5, block_rows=32)
    np.save({out!r}, sk.sketch(x[::-1].copy(), sample_ids=ids[::-1], batch_size=41)[::-1])
    """
)


def test_rows_are_bit_identical_across_batches_shards_order_and_processes(tmp_path):
    model, layers, x, ids = _invariance_setup()

    def sketcher():
        return GradientSketcher(model, 32, kind="tensorsketch", layers=layers, label_mode="random", draws=2, seed=5,
                                block_rows=32)

    whole = sketcher().sketch(x, sample_ids=ids)
    for batch in (7, 150):
        assert np.array_equal(sketcher().sketch(x, sample_ids=ids, batch_size=batch), whole)
    assert np.array_equal(sketcher().sketch(x[40:45], sample_ids=ids[40:45], batch_size=1), whole[40:45])
    # Shards of uneven size, sketched in reverse order by separate sketchers.
    cuts = [0, 37, 90, 150]
    parts = {s: sketcher().sketch(x[s:e], sample_ids=ids[s:e], batch_size=25) for s, e in zip(cuts, cuts[1:])}
    assert np.array_equal(np.concatenate([parts[s] for s in sorted(parts)]), whole)
    # A streamed iterable of (x, labels, ids) batches gives the same rows.
    stream = sketcher().sketch_stream((x[s : s + 45], None, ids[s : s + 45]) for s in range(0, 150, 45))
    assert np.array_equal(np.concatenate(list(stream)), whole)
    # Another process, samples in reverse order.
    out = tmp_path / "rows.npy"
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), threads=torch.get_num_threads(), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert np.array_equal(np.load(out), whole)
    # A different seed or label mode is a different sketch.
    other = GradientSketcher(model, 32, kind="tensorsketch", layers=layers, label_mode="random", draws=2, seed=6,
                             block_rows=32).sketch(x, sample_ids=ids)
    assert not np.allclose(other, whole)


def test_engine_matches_the_pipeline_head_path_bit_for_bit():
    torch.manual_seed(0)
    model = SmallCNN(5).eval()
    images = torch.randn(300, 1, 8, 8).numpy()
    legacy = sketch_head_gradients(model, images, make_sketch("gaussian", gradient_dim(128, 5, "expected"), 64, 3, "head"))
    assert np.array_equal(legacy, sketch_head_gradients(model, images, make_sketch("gaussian", 129, 64, 3, "head"), batch_size=7))
    rows, ident = sketch_gradients(model, images, 64, kind="gaussian", seed=3, channels_last=False)
    assert np.array_equal(rows, legacy)
    # The default NHWC layout runs other convolution kernels: the same rows up to float rounding.
    nhwc, _ = sketch_gradients(model, images, 64, kind="gaussian", seed=3)
    np.testing.assert_allclose(nhwc, legacy, rtol=0, atol=1e-5 * np.abs(legacy).max())
    assert ident["blocks"] == [{"name": "head", "kind": "gaussian", "shape": [1, 129], "scale": 1.0}]
    assert ident["gradient_dim"] == 129 and len(ident["model_id"]) == 16


def test_block_scales_balance_parameter_blocks():
    model, layers, x = case("ft2-mlp", n=40)
    with torch.no_grad():
        model[0].weight.mul_(30.0)  # make one block dominate
    scales = calibrate_block_scales(model, x, layers=layers, label_mode="expected", block_rows=16)
    energy = GradientSketcher(model, 8, layers=layers, label_mode="expected", block_rows=16).block_energy(x)
    balanced = [energy[n] * scales[n] ** 2 for n in ("0", "2")]
    assert balanced[0] == pytest.approx(balanced[1], rel=1e-4)
    assert sum(balanced) == pytest.approx(sum(energy.values()), rel=1e-4)
    sk = GradientSketcher(model, 8, layers=layers, label_mode="expected", block_scales=scales, block_rows=16)
    G = sk.gradients(x)
    d0 = sk.identity["blocks"][0]["shape"][0] * sk.identity["blocks"][0]["shape"][1]
    assert (G[:, :d0] ** 2).sum(1).mean().item() == pytest.approx(balanced[0], rel=1e-3)
    assert [b["scale"] for b in sk.identity["blocks"]] == [scales["0"], scales["2"]]
    with pytest.raises(InputError, match="outside the parameter set"):
        GradientSketcher(model, 8, layers=layers, block_scales={"head": 2.0})
    with pytest.raises(InputError, match="positive finite"):
        GradientSketcher(model, 8, layers=layers, block_scales={"0": 0.0})


def test_engine_streams_into_a_shard_file(tmp_path):
    model, layers, x = case("ft2-mlp", n=70)
    sk = GradientSketcher(model, 16, layers=layers, block_rows=16).prepare(x)
    ids = [f"s/{i}" for i in range(70)]
    with SketchShardWriter(tmp_path / "s", sk.identity, ids, sketch_dim=16) as w:
        sk.sketch(x, out=w.rows, batch_size=20)
    shard = read_sketch_shard(tmp_path / "s", expected_identity=sk.identity, verify=True)
    assert np.array_equal(shard.rows, sk.sketch(x))


class Scale(nn.Module):
    def __init__(self, factor, at):
        super().__init__()
        self.factor, self.at = factor, at

    def forward(self, x):
        x = x.clone()
        if x.shape[0] > self.at:
            x[self.at] = x[self.at] * self.factor
        return x


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs())


def test_bad_input_gives_clear_errors():
    model, layers, x = case("ft2-mlp", n=20)
    with pytest.raises(InputError, match="sketch_dim"):
        GradientSketcher(model, 0)
    with pytest.raises(InputError, match="sketch_dim"):
        GradientSketcher(model, -4)
    with pytest.raises(InputError, match=r"no layer named 'fc'; its Linear/Conv2d layers are \['0', '2'\]"):
        GradientSketcher(model, 8, layers=["fc"])
    with pytest.raises(InputError, match="is a ReLU"):
        GradientSketcher(model, 8, layers=["1"])
    with pytest.raises(InputError, match="FT-2 needs"):
        GradientSketcher(nn.Linear(3, 2), 8, layers="ft2")
    with pytest.raises(InputError, match="nn.Linear head"):
        GradientSketcher(nn.Conv2d(1, 1, 1), 8)
    with pytest.raises(InputError, match="groups"):
        GradientSketcher(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)), 8, layers=["0"])
    with pytest.raises(InputError, match="unknown sketch kind"):
        GradientSketcher(model, 8, kind="fast")
    with pytest.raises(InputError, match="only available on a CUDA device"):
        GradientSketcher(model, 8, precision="bfloat16", device="cpu")
    with pytest.raises(InputError, match="multiple of 16"):
        GradientSketcher(model, 8, block_rows=20)
    with pytest.raises(InputError, match="draws"):
        GradientSketcher(model, 8, label_mode="expected", draws=3)
    sk = GradientSketcher(model, 8, layers=layers, label_mode="true", block_rows=16)
    with pytest.raises(InputError, match="needs labels"):
        sk.sketch(x)
    with pytest.raises(InputError, match=r"class indices in \[0, 5\)"):
        sk.sketch(x, labels=np.full(20, 5))
    with pytest.raises(InputError, match="got 3 labels for 20 samples"):
        sk.sketch(x, labels=np.zeros(3, int))
    with pytest.raises(InputError, match="needs sample_ids"):
        GradientSketcher(model, 8, label_mode="random").sketch(x)
    # NaN / inf in inputs, activations or gradients: which, and where.
    bad = x.clone()
    bad[13, 2] = float("nan")
    for kind in ("gaussian", "tensorsketch"):
        with pytest.raises(InputError, match=r"non-finite input activations of layer '0' .* first at sample 13"):
            GradientSketcher(model, 8, kind=kind, layers=layers, block_rows=16).sketch(bad.numpy(), batch_size=5)
    blow_up = nn.Sequential(nn.Linear(6, 8), Scale(float("inf"), 17), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(InputError, match=r"non-finite input activations of layer '3' .* first at sample 17"):
        GradientSketcher(blow_up, 8, layers="ft2").sketch(x)
    # Finite forward pass, non-finite backward: sqrt'(0) = inf at sample 4 only.
    grad_nan = nn.Sequential(nn.Linear(6, 8), Scale(0.0, 4), Sqrt(), nn.Linear(8, 5))
    for mode in ("true", "expected"):
        with pytest.raises(InputError, match=r"non-finite output gradients of layer '0' .* first at sample 4"):
            GradientSketcher(grad_nan, 8, layers="ft2", label_mode=mode).sketch(x, labels=np.zeros(20, int))

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(InputError, match="2-D tensor"):
        GradientSketcher(Tuple(), 8).sketch(x)
