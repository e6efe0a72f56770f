"""Sketch operators and sketch shards, against naive constructions of the same maps."""

import json
import math

import numpy as np
import pytest
import torch

from skmm_pipeline.core.sketch import (
    SKETCHES,
    CountSketch,
    GaussianSketch,
    TensorSketch,
    derive_seed,
    make_sketch,
)
from skmm_pipeline.core.sketch_io import (
    SketchMismatchError,
    SketchShardWriter,
    load_sketch_shards,
    read_sketch_shard,
    save_sketch_shard,
)
from skmm_pipeline.core.validation import InputError


def naive_gaussian(r, m, seed, name, block_rows):
    # Gamma straight from its definition: N(0, 1/m) rows, one generator per block of rows.
    blocks = []
    for b in range(math.ceil(r / block_rows)):
        gen = torch.Generator().manual_seed(derive_seed(seed, "gaussian", name, b))
        blocks.append(torch.randn(min(block_rows, r - b * block_rows), m, generator=gen) / math.sqrt(m))
    return torch.cat(blocks)


def naive_countsketch_matrix(bucket, sign, m):
    gamma = torch.zeros(len(bucket), m, dtype=torch.float64)
    for k in range(len(bucket)):
        gamma[k, int(bucket[k])] = float(sign[k])
    return gamma


def test_gaussian_sketch_equals_naive_product_and_has_jl_scale():
    rng = np.random.default_rng(0)
    G = torch.as_tensor(rng.normal(size=(7, 300)), dtype=torch.float32)
    sk = GaussianSketch(300, 16, seed=3, name="head", block_rows=64)
    gamma = naive_gaussian(300, 16, 3, "head", 64)
    assert torch.equal(sk.dense(), gamma)
    torch.testing.assert_close(sk.apply(G), G @ gamma, rtol=1e-5, atol=1e-5)
    # Factored input: rows sum_p l_p (x) r_p, formed column block by column block.
    left, right = torch.randn(9, 4, 12), torch.randn(9, 4, 25)
    rows = torch.einsum("bpo,bpj->boj", left, right).reshape(9, -1)
    torch.testing.assert_close(sk.apply_outer(left, right), rows @ gamma, rtol=1e-4, atol=1e-4)
    # Entries ~ N(0, 1/m): E||x Gamma||^2 = ||x||^2.
    big = GaussianSketch(2000, 400, seed=1).dense()
    assert abs(big.var().item() * 400 - 1.0) < 0.02


def test_countsketch_is_one_signed_entry_per_coordinate():
    sk = CountSketch(500, 32, seed=2, name="blk")
    gamma = sk.dense().double()
    assert torch.equal(gamma, naive_countsketch_matrix(sk.hash.bucket, sk.hash.sign, 32))
    assert ((gamma != 0).sum(1) == 1).all() and set(gamma[gamma != 0].tolist()) <= {-1.0, 1.0}
    G = torch.randn(11, 500, dtype=torch.float64)
    torch.testing.assert_close(sk.apply(G), G @ gamma)


@pytest.mark.parametrize("P", [1, 3, 40])  # P=1, 3: FFT path; P=40: small matrix formed, composite hash
def test_tensorsketch_is_the_composite_countsketch_of_the_outer_product(P):
    dL, dR, m = 6, 35, 16
    sk = TensorSketch(dL * dR, m, seed=5, name="layer", shape=(dL, dR))
    hl, sl, hr, sr = sk.left.bucket, sk.left.sign, sk.right.bucket, sk.right.sign
    bucket = ((hl[:, None] + hr[None, :]) % m).reshape(-1)
    sign = (sl[:, None].long() * sr[None, :].long()).reshape(-1)
    gamma = naive_countsketch_matrix(bucket, sign, m)
    assert torch.equal(sk.dense().double(), gamma)
    left, right = torch.randn(13, P, dL, dtype=torch.float64), torch.randn(13, P, dR, dtype=torch.float64)
    rows = torch.einsum("bpo,bpj->boj", left, right).reshape(13, -1)
    torch.testing.assert_close(sk.apply_outer(left, right), rows @ gamma, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sk.apply(rows), rows @ gamma, rtol=1e-10, atol=1e-10)


def test_tensorsketch_inner_products_are_unbiased():
    # Over independent hash seeds, <TS(a(x)b), TS(c(x)d)> averages to <a,c><b,d> (and norms likewise).
    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(20, dtype=torch.float64, generator=gen), torch.randn(20, dtype=torch.float64, generator=gen)
    b, d = torch.randn(30, dtype=torch.float64, generator=gen), torch.randn(30, dtype=torch.float64, generator=gen)
    c = c + a  # correlated pair, so the target is far from 0
    d = d + b
    left, right = torch.stack([a, c])[:, None], torch.stack([b, d])[:, None]
    est_ip, est_sq = [], []
    for seed in range(400):
        s = TensorSketch(600, 32, seed=seed, name="t", shape=(20, 30)).apply_outer(left, right)
        est_ip.append(float(s[0] @ s[1]))
        est_sq.append(float(s[0] @ s[0]))
    for est, target in ((est_ip, float(a @ c) * float(b @ d)), (est_sq, float(a @ a) * float(b @ b))):
        est = np.array(est)
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert abs(est.mean() - target) < 4 * se, (est.mean(), target, se)
        assert est.std() > 0  # a real random map, not an identity


def test_sketch_is_a_function_of_its_identity_only():
    for kind in SKETCHES:
        a = make_sketch(kind, 300, 16, seed=3, name="head")
        b = make_sketch(kind, 300, 16, seed=3, name="head")
        assert torch.equal(a.dense(), b.dense())
        assert not torch.equal(a.dense(), make_sketch(kind, 300, 16, seed=4, name="head").dense())
        assert not torch.equal(a.dense(), make_sketch(kind, 300, 16, seed=3, name="body").dense())
    a = GaussianSketch(300, 16, seed=3, name="head", block_rows=64, cache_bytes=0)
    assert torch.equal(a.dense(), GaussianSketch(300, 16, seed=3, name="head", block_rows=64).dense())
    assert derive_seed(0, "x") == derive_seed(0, "x") != derive_seed(0, "y")
    assert make_sketch("tensorsketch", 300, 16, shape=(10, 30)).identity.as_dict()["shape"] == [10, 30]


@pytest.mark.parametrize("kind", sorted(SKETCHES))
def test_rows_are_bit_identical_in_any_batch_split_and_order(kind):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(150, 6 * 50, generator=gen)
    left, right = torch.randn(150, 4, 6, generator=gen), torch.randn(150, 4, 50, generator=gen)
    sk = make_sketch(kind, 300, 24, seed=1, name="x", shape=(6, 50) if kind == "tensorsketch" else None)
    whole, whole_outer = sk.apply(G), sk.apply_outer(left, right)
    assert torch.equal(torch.cat([sk.apply(G[i : i + 1]) for i in range(5)]), whole[:5])
    assert torch.equal(torch.cat([sk.apply_outer(left[i : i + 1], right[i : i + 1]) for i in range(5)]), whole_outer[:5])
    for size in (7, 33, 149):
        starts = list(range(0, 150, size))[::-1]  # processed in reverse order
        parts = {s: sk.apply(G[s : s + size]) for s in starts}
        outer = {s: sk.apply_outer(left[s : s + size], right[s : s + size]) for s in starts}
        assert torch.equal(torch.cat([parts[s] for s in sorted(parts)]), whole)
        assert torch.equal(torch.cat([outer[s] for s in sorted(outer)]), whole_outer)


def test_sketch_rejects_bad_input():
    for m in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="sketch_dim"):
            make_sketch("gaussian", 10, m)
    with pytest.raises(InputError, match="unknown sketch kind"):
        make_sketch("nope", 10, 4)
    with pytest.raises(InputError, match="does not multiply"):
        make_sketch("tensorsketch", 10, 4, shape=(3, 4))
    for kind in SKETCHES:
        sk = make_sketch(kind, 10, 4, shape=(2, 5) if kind == "tensorsketch" else None)
        with pytest.raises(InputError, match="rows of length 10"):
            sk.apply(torch.zeros(3, 11))
        with pytest.raises(InputError, match="non-finite"):
            sk.apply(torch.tensor([[float("nan")] * 10]))
        with pytest.raises(InputError, match="non-finite"):
            sk.apply_outer(torch.full((2, 1, 2), float("inf")), torch.ones(2, 1, 5))
        with pytest.raises(InputError, match="floating-point"):
            sk.apply(torch.zeros(3, 10, dtype=torch.long))
        with pytest.raises(InputError, match="same B and P"):
            sk.apply_outer(torch.ones(2, 1, 2), torch.ones(3, 1, 5))
    with pytest.raises(InputError, match=r"factors of shape \(2, 5\)"):
        make_sketch("tensorsketch", 10, 4, shape=(2, 5)).apply_outer(torch.ones(2, 5), torch.ones(2, 2))


# --- sketch shards on disk ------------------------------------------------------------------------

IDENT = {"kind": "tensorsketch", "seed": 0, "sketch_dim": 4, "param_set": ["head"], "label_mode": "expected",
         "model_id": "abc", "blocks": [{"name": "head", "shape": [1, 9]}]}


def test_shards_round_trip_and_stream(tmp_path):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    manifest = save_sketch_shard(tmp_path / "s" / "a", rows, [f"a/{i}" for i in range(6)], IDENT)
    assert manifest.name == "a.json"
    shard = read_sketch_shard(manifest, expected_identity=IDENT, verify=True)
    assert isinstance(shard.rows, np.memmap) and np.array_equal(shard.rows, rows)
    assert shard.ids.tolist() == [f"a/{i}" for i in range(6)] and shard.identity == json.loads(json.dumps(IDENT))
    # Streaming: rows written block by block into the memory map, committed with the manifest last.
    with SketchShardWriter(tmp_path / "s" / "b", IDENT, ["b/0", "b/1", "b/2"], sketch_dim=4) as w:
        assert not (tmp_path / "s" / "b.json").exists()
        w.rows[:2] = 1.0
        w.rows[2:] = 2.0
    G, ids, ident = load_sketch_shards([tmp_path / "s" / "a", tmp_path / "s" / "b.json"], expected_identity=IDENT)
    assert G.shape == (9, 4) and G[-1].tolist() == [2.0] * 4 and ids[-1] == "b/2" and ident["model_id"] == "abc"
    # A failed write leaves nothing behind.
    with pytest.raises(RuntimeError):
        with SketchShardWriter(tmp_path / "s" / "c", IDENT, ["c/0"], sketch_dim=4):
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        ["a.json", "a.rows.npy", "a.ids.npy", "b.json", "b.rows.npy", "b.ids.npy"])


def test_mismatched_incomplete_or_corrupt_shards_are_refused(tmp_path):
    rows = np.ones((2, 4), np.float32)
    save_sketch_shard(tmp_path / "a", rows, ["a/0", "a/1"], IDENT)
    other = {**IDENT, "seed": 1, "label_mode": "random"}
    save_sketch_shard(tmp_path / "b", rows, ["b/0", "b/1"], other)
    with pytest.raises(SketchMismatchError, match=r"label_mode: 'random' != expected 'expected'.*seed: 1 != expected 0"):
        load_sketch_shards([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SketchMismatchError, match="model_id"):
        read_sketch_shard(tmp_path / "a", expected_identity={**IDENT, "model_id": "new"})
    save_sketch_shard(tmp_path / "c", rows, ["a/0", "c/1"], IDENT)
    with pytest.raises(InputError, match="more than one sketch shard"):
        load_sketch_shards([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(InputError, match="manifest d.json missing"):
        read_sketch_shard(tmp_path / "d")
    np.save(tmp_path / "a.rows.npy", np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match="does not match its manifest"):
        read_sketch_shard(tmp_path / "a")
    np.save(tmp_path / "a.rows.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="checksum"):
        read_sketch_shard(tmp_path / "a", verify=True)
    with pytest.raises(InputError, match="non-finite"):
        save_sketch_shard(tmp_path / "e", np.full((1, 4), np.nan, np.float32), ["e/0"], IDENT)
    assert not list(tmp_path.glob("e*")) and not list(tmp_path.glob(".e*"))
    with pytest.raises(InputError, match="unique"):
        save_sketch_shard(tmp_path / "f", rows, ["f/0", "f/0"], IDENT)
    with pytest.raises(InputError, match="no sketch shards"):
        load_sketch_shards([])
