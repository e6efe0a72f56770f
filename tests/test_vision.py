"""Image loaders on tiny datasets written in their real on-disk formats, and shard conversion."""

import logging
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skmm_pipeline.data.shards import ShardError, read_shard
from skmm_pipeline.data.vision import (
    CIFAR10,
    CorruptImageError,
    DataError,
    ImageCSV,
    ImageFolder,
    ImageTransform,
    read_shard_sources,
    split_indices,
    write_shards,
    write_split,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, per_batch: int = 4, test_n: int = 3, seed: int = 0) -> dict:
    """The python version's layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, each
    a protocol-2 pickle of a dict; ``data`` is uint8 (N, 3072) with the R, G, B planes of 32x32 row-major."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    # Keys as bytes, as a Python 2 pickle read with encoding="bytes" would show them.
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = test_n if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        batch = {
            "batch_label": f"batch {k}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{k}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = (data, labels)
    return batches


def save_image(path: Path, rng, size=(12, 10), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path, format=fmt)


@pytest.fixture
def folder_tree(tmp_path):
    """cat/ (2 png + nested jpg), dog/ (png, grey jpg, a note.txt), plus one corrupt and one truncated image."""
    rng = np.random.default_rng(1)
    root = tmp_path / "tree"
    save_image(root / "cat" / "a.png", rng)
    save_image(root / "cat" / "z.png", rng)
    save_image(root / "cat" / "more" / "b.jpg", rng, fmt="JPEG")
    save_image(root / "dog" / "c.png", rng)
    save_image(root / "dog" / "d.jpeg", rng, mode="L", fmt="JPEG")
    (root / "dog" / "note.txt").write_text("not an image")
    (root / "dog" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    full = root / "dog" / "e.jpg"
    save_image(full, rng, size=(64, 64), fmt="JPEG")
    data = full.read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    full.unlink()
    return root


# ---- CIFAR-10 -------------------------------------------------------------------------------------


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar(tmp_path)
    train = CIFAR10(tmp_path)
    assert len(train) == 20 and train.classes == tuple(CIFAR_NAMES) and train.task == "classification"
    assert train.ids[:2] == ("data_batch_1/0", "data_batch_1/1") and train.ids[-1] == "data_batch_5/3"
    expected_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(train.targets, expected_labels)
    batch = train.load()
    assert batch.images.shape == (20, 3, 32, 32) and batch.images.dtype == np.float32
    raw = batches["data_batch_3"][0][2].reshape(3, 32, 32)
    np.testing.assert_allclose(batch.images[10], raw / 255.0, atol=1e-6)

    test = CIFAR10(tmp_path / "cifar-10-batches-py", split="test", transform=ImageTransform.imagenet(16))
    part = test.load([2, 0])
    assert part.ids == ("test_batch/2", "test_batch/0")
    assert part.images.shape == (2, 3, 16, 16)
    assert part.targets.tolist() == [batches["test_batch"][1][2], batches["test_batch"][1][0]]


def test_cifar10_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not a CIFAR-10 python folder"):
        CIFAR10(tmp_path)
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        CIFAR10(tmp_path)
    assert len(CIFAR10(tmp_path, split="test")) == 3  # the test split does not need the train batches


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2.*not allowed"):
        CIFAR10(tmp_path)
    assert not marker.exists()


# ---- ImageFolder ----------------------------------------------------------------------------------


def test_imagefolder_matches_torchvision_and_skips_corrupt_images(folder_tree, caplog):
    import torchvision

    src = ImageFolder(folder_tree, transform=ImageTransform(size=8))
    assert src.classes == ("cat", "dog")
    tv = torchvision.datasets.ImageFolder(str(folder_tree))
    assert list(src.ids) == [Path(p).relative_to(folder_tree).as_posix() for p, _ in tv.samples]
    assert src.targets.tolist() == [c for _, c in tv.samples]
    assert "dog/note.txt" not in src.ids

    with caplog.at_level(logging.WARNING, logger="skmm_pipeline.data.vision"):
        batch = src.load()
    assert set(batch.skipped) == {"dog/garbage.png", "dog/truncated.jpg"}
    assert batch.images.shape == (5, 3, 8, 8)
    assert "skipped 2 unreadable image(s) of 7" in caplog.text
    assert list(batch.ids) == [i for i in src.ids if i not in batch.skipped]
    # A grey 12x10 JPEG: converted to RGB, shorter side resized to 8, centre-cropped to 8x8.
    grey = Image.open(folder_tree / "dog" / "d.jpeg").convert("RGB").resize((10, 8), Image.Resampling.BILINEAR)
    grey = np.asarray(grey.crop((1, 0, 9, 8)))
    np.testing.assert_allclose(batch.images[batch.ids.index("dog/d.jpeg")], grey.transpose(2, 0, 1) / 255.0, atol=1e-6)

    with pytest.raises(CorruptImageError, match="garbage.png"):
        src.load(on_corrupt="raise")


def test_imagefolder_layout_errors(folder_tree, tmp_path):
    with pytest.raises(DataError, match=r"missing class folder\(s\) \['bird'\]"):
        ImageFolder(folder_tree, classes=["cat", "bird"])
    only = ImageFolder(folder_tree, classes=["dog"])
    assert set(only.targets.tolist()) == {0} and all(i.startswith("dog/") for i in only.ids)
    (folder_tree / "emu").mkdir()
    with pytest.raises(DataError, match="'emu' has no image files"):
        ImageFolder(folder_tree)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "flat")


def test_images_of_different_sizes_need_a_transform_size(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "t" / "a" / "1.png", rng, size=(8, 8))
    save_image(tmp_path / "t" / "a" / "2.png", rng, size=(9, 8))
    with pytest.raises(DataError, match="ImageTransform\\(size=...\\)"):
        ImageFolder(tmp_path / "t").load()
    assert ImageFolder(tmp_path / "t", transform=ImageTransform(size=(6, 4))).load().images.shape == (2, 3, 6, 4)


# ---- CSV regression ---------------------------------------------------------------------------------


def test_csv_regression_resolves_paths_against_the_csv_folder(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "reg"
    save_image(data / "img" / "0.png", rng)
    save_image(data / "img" / "1.png", rng, mode="L")
    save_image(tmp_path / "elsewhere.png", rng)
    (data / "img" / "bad.png").write_bytes(b"not a png")
    (data / "labels.csv").write_text(
        f"file,age\nimg/0.png,1.5\nimg/1.png,-2\n{tmp_path / 'elsewhere.png'},3.25\nimg/bad.png,4\n"
    )
    src = ImageCSV(data / "labels.csv", transform=ImageTransform(size=4, mode="L"), path_column="file", target_column="age")
    assert src.task == "regression" and src.classes is None
    assert src.ids[:2] == ("img/0.png", "img/1.png")
    np.testing.assert_allclose(src.targets, [1.5, -2.0, 3.25, 4.0])
    batch = src.load()
    assert batch.images.shape == (3, 1, 4, 4) and batch.targets.dtype == np.float32
    assert batch.skipped == ("img/bad.png",)


def test_csv_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(3)
    save_image(tmp_path / "a.png", rng)
    csv = tmp_path / "t.csv"
    csv.write_text("path,target\na.png,1\nmissing.png,2\n")
    with pytest.raises(DataError, match=r"1 listed image\(s\) not found.*missing.png"):
        ImageCSV(csv)
    csv.write_text("path,target\na.png,high\n")
    with pytest.raises(DataError, match="not finite numbers, at lines \\[2\\]"):
        ImageCSV(csv)
    csv.write_text("image,target\na.png,1\n")
    with pytest.raises(DataError, match="no column 'path'"):
        ImageCSV(csv)
    csv.write_text("path,target\na.png,1\na.png,2\n")
    with pytest.raises(DataError, match="unique"):
        ImageCSV(csv)


# ---- splits and shards ------------------------------------------------------------------------------


def test_split_indices_is_stratified_disjoint_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = split_indices(len(labels), (0.6, 0.2, 0.2), seed=4, labels=labels)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [np.bincount(labels[p], minlength=3).tolist() for p in parts] == [[30, 18, 12], [10, 6, 4], [10, 6, 4]]
    again = split_indices(len(labels), (0.6, 0.2, 0.2), seed=4, labels=labels)
    assert all((a == b).all() for a, b in zip(parts, again))
    with pytest.raises(DataError, match="sum to 1"):
        split_indices(10, (0.5, 0.2))


def test_imagefolder_to_shards_round_trip(folder_tree, tmp_path):
    src = ImageFolder(folder_tree, transform=ImageTransform(size=8))
    landing = tmp_path / "landing"
    written = write_shards(src, landing, "pets", rows_per_shard=3, batch_size=2)
    assert [w.name for w in written] == ["pets-000", "pets-001", "pets-002"]
    assert [w.rows for w in written] == [3, 2, 0]
    assert sorted(s for w in written for s in w.skipped) == ["dog/garbage.png", "dog/truncated.jpg"]
    assert not written[2].path.exists()  # its one image is corrupt: no file
    ids, images = [], []
    for w in written[:2]:
        shard = read_shard(w.path)
        extra = read_shard_sources(w.path)
        assert shard.labels.dtype == np.int64 and len(extra.source_ids) == len(shard.images) == w.rows
        assert extra.classes == ("cat", "dog") and extra.targets is None
        assert shard.labels.tolist() == [src.targets[src.ids.index(i)] for i in extra.source_ids]
        ids.extend(extra.source_ids)
        images.append(shard.images)
    loaded = src.load()
    assert ids == list(loaded.ids)
    np.testing.assert_array_equal(np.concatenate(images), loaded.images)
    # Same bytes whatever the batch size; deliveries are immutable unless overwritten on purpose.
    with pytest.raises(ShardError, match="already exist"):
        write_shards(src, landing, "pets", n_shards=3)
    other = write_shards(src, tmp_path / "other", "pets", rows_per_shard=3, batch_size=64)
    for a, b in zip(written[:2], other[:2]):
        assert a.path.read_bytes() == b.path.read_bytes()
    assert [w.rows for w in write_shards(src, landing, "pets", n_shards=2, overwrite=True)] == [4, 1]
    assert not list(landing.glob(".*"))  # no spool files left behind
    # 8-bit pixels by default (a quarter of the bytes); pixels="float32" stores the same inputs as floats.
    as_float = write_shards(src, tmp_path / "float", "pets", rows_per_shard=3, pixels="float32")
    for a, b in zip(other[:2], as_float[:2]):
        eight, full = read_shard(a.path), read_shard(b.path)
        assert eight.pixels.dtype == np.uint8 and full.pixels.dtype == np.float32 and full.decode is None
        np.testing.assert_array_equal(np.asarray(eight.images), full.images)
        assert full.pixels.nbytes == 4 * eight.pixels.nbytes
    with pytest.raises(DataError, match="pixels must be one of"):
        write_shards(src, tmp_path / "bad", "pets", n_shards=1, pixels="float16")
    with pytest.raises(ShardError, match="invalid shard name"):
        write_shards(src, landing, "../evil", n_shards=1)


def test_cifar_to_shards_and_eval_splits(tmp_path):
    write_cifar(tmp_path / "raw", per_batch=6)
    train = CIFAR10(tmp_path / "raw")
    pool, val = split_indices(len(train), (0.8, 0.2), seed=0, labels=None)
    written = write_shards(train, tmp_path / "landing", "cifar", rows_per_shard=10, indices=pool, seed=7)
    assert [w.rows for w in written] == [10, 10, 4]
    got = [i for w in written for i in read_shard_sources(w.path).source_ids]
    assert sorted(got) == sorted(train.ids[i] for i in pool)
    for w in written:  # rows of a shard keep the source order
        rows = [train.ids.index(i) for i in read_shard_sources(w.path).source_ids]
        assert rows == sorted(rows)
    v = write_split(train, tmp_path / "eval" / "val.npz", val)
    shard = read_shard(v.path)
    assert shard.images.shape == (len(val), 3, 32, 32)
    np.testing.assert_array_equal(shard.labels, train.targets[val])


def test_regression_shards_carry_float_targets(tmp_path):
    rng = np.random.default_rng(5)
    lines = ["path,target"]
    for i in range(5):
        save_image(tmp_path / "im" / f"{i}.png", rng)
        lines.append(f"im/{i}.png,{i * 0.5 + 0.25}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    src = ImageCSV(tmp_path / "t.csv", transform=ImageTransform(size=4))
    written = write_shards(src, tmp_path / "landing", "reg", n_shards=2)
    shard = read_shard(written[1].path)
    extra = read_shard_sources(written[1].path)
    assert shard.labels is None  # regression targets are not class labels
    np.testing.assert_allclose(extra.targets, [1.75, 2.25])
    assert extra.source_ids == ("im/3.png", "im/4.png")


def test_nothing_readable(tmp_path, caplog):
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    for i in range(2):
        (root / "a" / f"{i}.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="skmm_pipeline.data.vision"):
        (w,) = write_shards(ImageFolder(root), tmp_path / "landing", "x", n_shards=1)
    assert w.rows == 0 and len(w.skipped) == 2 and "shard x-000 not written" in caplog.text
    assert not list((tmp_path / "landing").iterdir())
    with pytest.raises(DataError, match="none of its 2 images is readable"):
        write_split(ImageFolder(root), tmp_path / "eval" / "val.npz")
    with pytest.raises(DataError, match="no readable images"):
        ImageFolder(root).load()


def test_shard_writing_memory_is_bounded_by_the_batch(tmp_path):
    # 200 images upscaled to 3x128x128 float32: a 39 MB shard, written in batches of 8.
    write_cifar(tmp_path / "raw", per_batch=40, test_n=1)
    src = CIFAR10(tmp_path / "raw", transform=ImageTransform(size=128))
    tracemalloc.start()
    try:
        (w,) = write_shards(src, tmp_path / "landing", "big", n_shards=1, batch_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shard_bytes = w.rows * 3 * 128 * 128 * 4
    assert w.rows == 200 and shard_bytes > 39e6
    assert peak < 0.6 * shard_bytes, f"peak {peak / 1e6:.1f} MB for a {shard_bytes / 1e6:.1f} MB shard"


def test_reading_a_shard_maps_its_pixels_and_still_checks_them(tmp_path):
    """read_shard memory-maps an uncompressed shard's images (memory for labels, not pixels), yet a
    flipped byte (CRC-32) or a NaN deep in the file is refused as when the file is loaded."""
    from skmm_pipeline.data.shards import write_shard

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(1500, 3, 48, 48)).astype(np.float32)  # 41 MB
    write_shard(tmp_path / "big.npz", x, np.arange(1500) % 3)
    tracemalloc.start()
    try:
        shard = read_shard(tmp_path / "big.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(shard.images, np.memmap) and peak < 0.25 * x.nbytes, f"peak {peak / 1e6:.1f} MB"
    assert np.array_equal(shard.images, x) and shard.labels[:4].tolist() == [0, 1, 2, 0]
    shard.images[0, 0, 0, 0] = 7.0  # copy-on-write: the file is never changed through the map
    assert read_shard(tmp_path / "big.npz").images[0, 0, 0, 0] == x[0, 0, 0, 0]

    raw = bytearray((tmp_path / "big.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the middle of the pixels
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="CRC-32"):
        read_shard(tmp_path / "flipped.npz")
    (tmp_path / "cut.npz").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ShardError, match="unreadable or corrupt|truncated"):
        read_shard(tmp_path / "cut.npz")
    np.save(tmp_path / "plain.npy", x[:3])  # a bare .npy under a shard's name
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(ShardError, match="not an .npz"):
        read_shard(tmp_path / "plain.npz")
    y = x[:300].copy()
    y[-1, 2, 47, 47] = np.nan
    write_shard(tmp_path / "nan.npz", y)
    with pytest.raises(ShardError, match="NaN"):
        read_shard(tmp_path / "nan.npz")
    # Compressed or non-float32 shards are loaded instead, and read the same.
    np.savez_compressed(tmp_path / "zipped.npz", images=x[:20], labels=np.zeros(20, np.int64))
    np.savez(tmp_path / "f64.npz", images=x[:20].astype(np.float64))
    for name in ("zipped", "f64"):
        s = read_shard(tmp_path / f"{name}.npz")
        assert not isinstance(s.images, np.memmap) and s.images.dtype == np.float32
        assert np.array_equal(s.images, x[:20])
