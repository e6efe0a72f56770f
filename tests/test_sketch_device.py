"""The sketch engine's device layer, on the CPU: block sizes, streaming, out-of-memory back-off, labels and
ids as tensors, the shard reader, and the GPU code paths of the hashed sketches (run here on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from skmm_pipeline.core.device_blocks import Block, BlockStream, smaller_block, tail_rows
from skmm_pipeline.core.sketch import _Hash, make_sketch
from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.loader import shard_batches, sketch_shard
from skmm_pipeline.data.pool import read_unchanged_shard
from skmm_pipeline.data.shards import ShardError, file_signature, read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]


def resnet(classes=10):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=classes).eval()  # random weights, nothing downloaded


@pytest.fixture(scope="module")
def images():
    return torch.randn(70, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()


@pytest.mark.parametrize("layers,mode", [("ft1", "expected"), ("ft2", "expected"), ("ft2", "true")])
def test_rows_are_bit_identical_across_block_sizes_and_layouts_differ_by_rounding(images, layers, mode):
    labels = np.arange(len(images)) % 10
    rows = {R: GradientSketcher(resnet(), 32, layers=layers, label_mode=mode, block_rows=R).sketch(images, labels=labels)
            for R in (16, 48, 64, 128)}
    for R, r in rows.items():
        assert np.array_equal(r, rows[16]), R
    nchw = GradientSketcher(resnet(), 32, layers=layers, label_mode=mode, block_rows=64, channels_last=False)
    other = nchw.sketch(images, labels=labels)
    assert not nchw.channels_last and not np.array_equal(other, rows[16])
    np.testing.assert_allclose(other, rows[16], rtol=0, atol=1e-5 * np.abs(rows[16]).max())


def test_stream_carries_partial_blocks_and_yields_one_array_per_batch(images):
    ids = [f"s/{i}" for i in range(len(images))]
    whole = GradientSketcher(resnet(), 16, layers="ft2", label_mode="random", block_rows=32).sketch(images, sample_ids=ids)
    sk = GradientSketcher(resnet(), 16, layers="ft2", label_mode="random", block_rows=32)
    cuts = [0, 5, 5, 40, 41, 70]
    batches = [(images[a:b], None, ids[a:b]) for a, b in zip(cuts, cuts[1:])] + [(images[:0], None, [])]
    parts = list(sk.sketch_stream(batches))
    assert [len(p) for p in parts] == [5, 0, 35, 1, 29, 0]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(InputError, match="70 samples, 71 were announced"):
        GradientSketcher(resnet(), 16, block_rows=32).sketch_into([(images, None, None)], 71)
    with pytest.raises(InputError, match="more than the 60 samples"):
        GradientSketcher(resnet(), 16, block_rows=32).sketch_into([(images, None, None)], 60)


def test_labels_and_sample_ids_may_be_tensors(images):
    labels = np.arange(len(images)) % 10
    ref = GradientSketcher(resnet(), 16, layers="ft2", label_mode="true", block_rows=32).sketch(images, labels=labels)
    got = GradientSketcher(resnet(), 16, layers="ft2", label_mode="true", block_rows=32).sketch(
        torch.as_tensor(images), labels=torch.as_tensor(labels, dtype=torch.int32))
    assert np.array_equal(ref, got)
    ids = np.arange(len(images)) + 1000
    a = GradientSketcher(resnet(), 16, label_mode="random", block_rows=32).sketch(images, sample_ids=ids)
    b = GradientSketcher(resnet(), 16, label_mode="random", block_rows=32).sketch(images, sample_ids=torch.as_tensor(ids))
    assert np.array_equal(a, b)
    sk = GradientSketcher(resnet(), 16, layers="ft2", label_mode="true", block_rows=32)
    with pytest.raises(InputError, match="integer class indices"):
        sk.sketch(images, labels=torch.zeros(len(images)))
    with pytest.raises(InputError, match=r"class indices in \[0, 10\), got values in \[0, 99\]"):
        sk.sketch(images, labels=np.where(labels == 3, 99, labels))


class SmallMemory(nn.Module):
    """A model on a device that holds at most ``limit`` samples per call: larger batches raise the
    allocator's out-of-memory error, as a GPU does."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.calls = model, limit, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a block of {len(x)} samples")
        return self.model(x)


def test_out_of_memory_halves_the_block_and_keeps_the_rows(images, caplog):
    ref = GradientSketcher(SmallMemory(resnet(), limit=100), 16, layers="ft2", block_rows=16).sketch(images)
    model = SmallMemory(resnet(), limit=20)
    sk = GradientSketcher(model, 16, layers="ft2", block_rows=64)
    model.calls.clear()
    got = sk.sketch(images, batch_size=70)
    assert sk.block_rows == 16 and np.array_equal(got, ref)
    assert max(model.calls) == 64 and model.calls.count(16) >= 4  # tried 64, then 32, then ran on 16
    assert "out of device memory with blocks of 64 rows: continuing with 32" in caplog.text
    with pytest.raises(InputError, match="out of device memory with blocks of 16 rows, the smallest"):
        GradientSketcher(SmallMemory(resnet(), limit=8), 16, block_rows=16).sketch(images)
    assert smaller_block(4096, RuntimeError()) == 2048 and smaller_block(48, RuntimeError()) == 16


def test_block_stream_cuts_fixed_blocks_from_any_batches():
    put = lambda x, labels, keys: (torch.as_tensor(x), labels, keys)  # noqa: E731
    batches = [(np.arange(n, dtype=np.float32)[:, None], None, np.arange(n, dtype=np.uint64)) for n in (3, 30, 0, 40)]
    blocks = list(BlockStream(lambda: 32, put)(batches))
    assert [(len(b.x), b.valid, b.offset) for b in blocks] == [(32, 32, 0), (32, 32, 32), (9, 9, 64)]
    tail = blocks[-1].padded(tail_rows(9, 32))
    assert len(tail.x) == 16 and tail.valid == 9 and torch.equal(tail.x[9:], tail.x[8:9].expand(7, 1))
    assert [tail_rows(n, 256) for n in (1, 16, 17, 33, 100, 200, 256)] == [16, 16, 32, 64, 128, 256, 256]
    assert [len(p.x) for p in Block(torch.zeros(40, 1), None, None, 37, 5).split(16)] == [16, 16, 5]


def test_gpu_hash_paths_equal_the_cpu_scatter():
    """The gather and dense-GEMM CountSketches GPUs run, here on the CPU, against index_add's."""
    h = _Hash(7, "countsketch", "block", "", 3000, 64)
    x = torch.randn(5, 4, 3000, dtype=torch.float64)
    ref = h(x)
    assert torch.allclose(h.gather(x), ref, atol=1e-12) and torch.allclose(h.matmul(x.float()).double(), ref, atol=1e-4)
    half = x.to(torch.bfloat16)
    assert h.gather(half).dtype == torch.float32  # half precision in, float32 sums out
    assert torch.allclose(h.gather(half), h(half.float()), atol=1e-5)
    ts = make_sketch("tensorsketch", 600 * 40, 64, 1, "conv", shape=(600, 40))
    left, right = torch.randn(3, 9, 600), torch.randn(3, 9, 40)
    out = ts.apply_outer(left.to(torch.bfloat16), right.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert torch.allclose(out, ts.apply_outer(left.to(torch.bfloat16).float(), right.to(torch.bfloat16).float()), atol=1e-4)


def test_shard_reader_rows_equal_the_library_rows(tmp_path, images):
    labels = np.arange(len(images)) % 10
    write_shard(tmp_path / "deliv.npz", images, labels)
    shard = read_shard(tmp_path / "deliv.npz")
    assert isinstance(shard.images, np.memmap)
    ref = GradientSketcher(resnet(), 16, layers="ft2", label_mode="true", block_rows=32).sketch(images, labels=labels)
    for workers, batch in ((0, 512), (0, 7), (2, 9), (3, 64)):
        sk = GradientSketcher(resnet(), 16, layers="ft2", label_mode="true", block_rows=32)
        assert np.array_equal(sketch_shard(sk, shard, batch_size=batch, labels=True, workers=workers), ref)
    x, y, ids = next(shard_batches(shard, 8, "cpu", labels=True, workers=2))
    assert x.shape == (8, 3, 32, 32) and list(y) == list(labels[:8]) and ids[-1] == "deliv/7"
    with pytest.raises(InputError, match="loader workers must be an integer >= 0"):
        next(shard_batches(shard, 8, "cpu", workers=-2))
    unlabelled = tmp_path / "nolabels.npz"
    write_shard(unlabelled, images[:4])
    with pytest.raises(InputError, match="has no labels"):
        next(shard_batches(read_shard(unlabelled), 8, "cpu", labels=True))


def test_8bit_shards_decode_on_the_device_to_the_library_rows(tmp_path):
    """A uint8 shard moves its 8-bit pixels to the device and decodes them there (reader threads); the
    rows equal the library's on the host-decoded images, and those of a float32 shard of the same inputs."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    scale, offset = 1 / (255 * np.array([0.229, 0.224, 0.225])), -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    write_shard(tmp_path / "eight.npz", pixels, np.arange(40) % 10, pixel_scale=scale, pixel_offset=offset)
    shard = read_shard(tmp_path / "eight.npz")
    assert isinstance(shard.pixels, np.memmap) and shard.pixels.dtype == np.uint8
    decoded = np.asarray(shard.images)
    assert decoded.dtype == np.float32 and shard.max_abs == pytest.approx(float(np.abs(decoded).max()))
    write_shard(tmp_path / "full.npz", decoded)
    ref = GradientSketcher(resnet(), 16, layers="ft2", block_rows=32).sketch(decoded)
    for workers, batch in ((0, 512), (0, 7), (2, 9)):
        sk = GradientSketcher(resnet(), 16, layers="ft2", block_rows=32)
        assert np.array_equal(sketch_shard(sk, shard, batch_size=batch, workers=workers), ref)
    sk = GradientSketcher(resnet(), 16, layers="ft2", block_rows=32)
    assert np.array_equal(sketch_shard(sk, read_shard(tmp_path / "full.npz"), workers=2), ref)
    x, _, _ = next(shard_batches(shard, 8, "cpu", workers=2))
    assert x.dtype == torch.float32 and torch.equal(x, torch.as_tensor(decoded[:8]))


def test_a_shard_rewritten_after_validation_is_refused(tmp_path, images):
    path = tmp_path / "late.npz"
    write_shard(path, images[:10])
    record = {"name": "late", "path": str(path), "signature": file_signature(path)}
    assert len(read_unchanged_shard(record).images) == 10
    assert len(read_unchanged_shard({**record, "signature": None}).images) == 10  # an old record: verified again
    write_shard(path, images[:12])
    with pytest.raises(ShardError, match="changed after raw_shard validated it"):
        read_unchanged_shard(record)
    path.unlink()
    with pytest.raises(ShardError, match="is gone"):
        read_unchanged_shard(record)


def test_gpu_benchmark_quick_smoke_run_prints_its_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sketch.py"), "--quick", "--json", "--device", "cpu",
                          "--models", "small_cnn", "--m", "64"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"].startswith("CPU") and result["ft1_forward_fraction_small"] > 0
    assert {"ft2_forward_fraction_small", "ft1_vs_vmap_small", "ft2_vs_vmap_small"} <= set(result)
    assert "| FT2 | expected | float32 |" in out.stdout
