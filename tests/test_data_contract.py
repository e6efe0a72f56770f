"""The data contract of pool shards: each bad shard is refused as it lands, in one line naming the shard,
the field and the fix, and nothing downstream of it is computed."""

from __future__ import annotations

import json
import re

import dagster as dg
import numpy as np
import pytest

from skmm_pipeline.data.contract import ShardContract, ShardHashes, max_abs
from skmm_pipeline.data.digits import load_digits_transfer, write_digits_shards
from skmm_pipeline.data.shards import Shard, ShardError, file_sha256, read_shard, write_shard
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings

DIGITS = ShardContract(image_shape=(1, 8, 8), task="classification", num_classes=5, max_abs_pixel=20.0)


def shard(name="s", images=None, labels=None, targets=None):
    images = np.random.default_rng(0).uniform(size=(6, 1, 8, 8)).astype(np.float32) if images is None else images
    labels = np.arange(len(images)) % 5 if labels is None and targets is None else labels
    return Shard(name, images, labels, targets)


def test_files_with_labels_that_are_not_class_indices_are_refused(tmp_path):
    x = np.zeros((4, 1, 8, 8), np.float32)
    for labels, msg in ((np.array([0.0, 1.5, 2.0, 3.0]), "integer class indices, got dtype float64"),
                        (np.array(["a", "b", "c", "d"]), "integer class indices, got dtype <U1"),
                        (np.array([0, -1, 2, 3]), "class indices >= 0, got -1 at row 1")):
        np.savez(tmp_path / "bad.npz", images=x, labels=labels)  # written by hand, as a user's own tool would
        with pytest.raises(ShardError, match=re.escape(msg)):
            read_shard(tmp_path / "bad.npz")
    with pytest.raises(ShardError, match="labels must be integer class indices, got dtype float64"):
        write_shard(tmp_path / "w.npz", x, np.array([0.0, 1.0, 1.0, 0.0]))
    assert not (tmp_path / "w.npz").exists()
    write_shard(tmp_path / "ok.npz", x - 3.5, np.arange(4))
    assert read_shard(tmp_path / "ok.npz").max_abs == 3.5  # measured in the verifying pass


def test_8bit_shards_carry_their_decode_and_are_checked_like_float_ones(tmp_path):
    """uint8 pixels with a per-channel decode: mapped, their CRC checked, the decoded peak measured;
    8-bit pixels without a decode, a decode without 8-bit pixels, or a bad decode are refused."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, size=(6, 2, 8, 8), dtype=np.uint8)
    path = tmp_path / "eight.npz"
    write_shard(path, pixels, np.arange(6) % 5, pixel_scale=[0.5, 0.25], pixel_offset=[-10.0, 1.0])
    s = read_shard(path)
    expected = pixels.astype(np.float32) * np.float32([0.5, 0.25])[:, None, None] + np.float32([-10.0, 1.0])[:, None, None]
    np.testing.assert_array_equal(np.asarray(s.images), expected)
    np.testing.assert_array_equal(s.images[2:4], expected[2:4])
    np.testing.assert_array_equal(s.images[[5, 0]], expected[[5, 0]])
    assert s.images.shape == (6, 2, 8, 8) and len(s.images) == 6 and s.images[1].shape == (2, 8, 8)
    assert s.max_abs == float(np.abs(expected).max()) == max_abs(s.images)
    assert read_shard(path, verify=False).max_abs is None
    with pytest.raises(TypeError, match="rows only"):
        s.images[:, 0]
    # The default decode is u8 / 255 ([0, 1]); the contract's bound applies to the decoded values.
    write_shard(tmp_path / "unit.npz", pixels, np.arange(6) % 5)
    assert read_shard(tmp_path / "unit.npz").max_abs == pytest.approx(int(pixels.max()) / 255)
    contract = ShardContract(image_shape=(2, 8, 8), task="classification", num_classes=5, max_abs_pixel=100.0)
    contract.check(s)
    write_shard(tmp_path / "raw.npz", pixels, np.arange(6) % 5, pixel_scale=[1.0, 1.0], pixel_offset=[0.0, 0.0])
    for verify in (True, False):  # 0..255 values: not scaled for the model
        with pytest.raises(ShardError, match="pixel values reach 199"):
            contract.check(read_shard(tmp_path / "raw.npz", verify=verify))
    # A flipped byte in the pixels fails the CRC, as for float shards.
    raw = bytearray(path.read_bytes())
    raw[raw.index(pixels.tobytes()[:64]) + 10] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="CRC-32"):
        read_shard(tmp_path / "flip.npz")
    for arrays, msg in (
        (dict(images=pixels), "uint8 images need 'pixel_scale' and 'pixel_offset'"),
        (dict(images=pixels.astype(np.float32), pixel_scale=[1.0, 1.0], pixel_offset=[0.0, 0.0]), "decode uint8 images"),
        (dict(images=pixels, pixel_scale=[1.0], pixel_offset=[0.0]), "one value per channel \\(2\\)"),
        (dict(images=pixels, pixel_scale=[1.0, 0.0], pixel_offset=[0.0, 0.0]), "must be positive and finite"),
        (dict(images=pixels, pixel_scale=[1.0, 1.0], pixel_offset=[0.0, np.nan]), "must be positive and finite"),
    ):
        np.savez(tmp_path / "bad.npz", **arrays)  # written by hand, as a user's own tool would
        with pytest.raises(ShardError, match=msg):
            read_shard(tmp_path / "bad.npz")
    with pytest.raises(ShardError, match="decode uint8 images"):
        write_shard(tmp_path / "bad.npz", pixels.astype(np.float32), pixel_scale=[1.0, 1.0])


def test_the_contract_names_the_shard_the_field_and_the_fix():
    DIGITS.check(shard())
    cases = (
        (shard(images=np.zeros((3, 3, 32, 32), np.float32)), "images are (3, 32, 32) per sample but the model takes (1, 8, 8)"),
        (Shard("s", np.zeros((3, 1, 8, 8), np.float32), None),
         "carries neither labels nor targets but the evaluation splits carry class labels: give every shard class labels"),
        (shard(targets=np.ones(6, np.float32), labels=None), "carries regression targets but the evaluation splits carry class"),
        (shard(labels=np.array([0, 1, 99, 2, 5, 1])), r"labels \[5, 99\] at rows \[2, 4\] are outside the task's classes \[0, 5\)"),
        (shard(images=np.full((2, 1, 8, 8), 255.0, np.float32), labels=np.array([0, 1])), "pixel values reach 255, beyond the 20"),
        (shard(images=np.full((2, 1, 8, 8), 1e30, np.float32), labels=np.array([0, 1])), "pixel values reach 1e+30"),
    )
    for bad, msg in cases:
        with pytest.raises(ShardError, match=msg if "[" in msg else re.escape(msg).replace(r"\\+", "+")) as exc:
            DIGITS.check(bad)
        assert len(str(exc.value).splitlines()) == 1 and "'s'" in str(exc.value)
    ShardContract((1, 8, 8), "classification", 5, max_abs_pixel=0).check(
        shard(images=np.full((2, 1, 8, 8), 255.0, np.float32), labels=np.array([0, 1])))  # 0: no bound
    assert max_abs(np.array([[-3.0, 2.0]])) == 3.0


def test_a_copy_of_an_admitted_shard_is_refused_by_name(tmp_path):
    landing = tmp_path / "landing"
    x = np.random.default_rng(1).uniform(size=(5, 1, 8, 8))
    write_shard(landing / "first.npz", x, np.arange(5))
    (landing / "second.npz").write_bytes((landing / "first.npz").read_bytes())
    write_shard(landing / "third.npz", x[::-1], np.arange(5))
    hashes = ShardHashes(tmp_path / "cache.json")
    sha = {p.stem: file_sha256(p) for p in landing.glob("*.npz")}
    hashes.admit("first", landing / "first.npz", sha["first"])
    hashes.admit("first", landing / "first.npz", sha["first"])  # the same shard again: not a copy of itself
    with pytest.raises(ShardError, match="shard 'second' has the same content as shard 'first'.*remove the copy second.npz"):
        hashes.admit("second", landing / "second.npz", sha["second"])
    hashes.admit("third", landing / "third.npz", sha["third"])
    assert set(json.loads((tmp_path / "cache.json").read_text())) == {"first", "third"}
    write_shard(landing / "third.npz", x[::-1] * 0.5, np.arange(5))  # rewritten in place: refused until replaced
    new_sha = file_sha256(landing / "third.npz")
    with pytest.raises(ShardError, match=f"shard 'third' was rewritten in place: its content \\(sha256 {new_sha[:12]}\\) "
                       f"is not the one admitted \\(sha256 {sha['third'][:12]}\\).*skmm shards replace third") as exc:
        hashes.admit("third", landing / "third.npz", new_sha)
    assert len(str(exc.value).splitlines()) == 1
    assert hashes.replace("third", landing / "third.npz") == (sha["third"], new_sha)
    hashes.admit("third", landing / "third.npz", new_sha)
    assert [r["sha256"] for r in json.loads((tmp_path / "cache.json").read_text())["third"]["replaced"]] == [sha["third"]]
    (landing / "first.npz").unlink()  # the original is gone: its copy is no longer one
    hashes.admit("second", landing / "second.npz", sha["second"])
    assert set(json.loads((tmp_path / "cache.json").read_text())) == {"second", "third"}


def test_bad_shards_are_refused_as_they_land_and_nothing_is_sketched(project):
    defs = build_definitions(project, settings=SkmmSettings(pretrain_epochs=1, budget=5))
    ws = defs.resources["workspace"]
    names = write_digits_shards(ws.landing)
    pool = load_digits_transfer().pool
    write_shard(ws.landing / "bytes.npz", pool.images[:20] * 255, pool.labels[:20])
    write_shard(ws.landing / "labels99.npz", pool.images[:20], np.where(np.arange(20) == 3, 99, pool.labels[:20]))
    write_shard(ws.landing / "rgb.npz", np.zeros((4, 3, 8, 8)), np.arange(4) % 5)
    (ws.landing / "copy.npz").write_bytes((ws.landing / f"{names[0]}.npz").read_bytes())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, [*names, "bytes", "labels99", "rgb", "copy"])
        job = defs.resolve_job_def("sketch_shard")
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        assert job.execute_in_process(instance=instance, partition_key=names[0]).success
        for key, msg in (("bytes", "pixel values reach 255"), ("labels99", r"labels \[99\] at rows \[3\]"),
                         ("rgb", r"images are \(3, 8, 8\) per sample"), ("copy", f"same content as shard '{names[0]}'")):
            with pytest.raises(ShardError, match=msg):
                job.execute_in_process(instance=instance, partition_key=key)
        # A sketched shard rewritten in place is refused, and sketched again once it is said to replace the old.
        write_shard(ws.landing / f"{names[0]}.npz", pool.images[:20] * 0.5, pool.labels[:20])
        with pytest.raises(ShardError, match=f"shard '{names[0]}' was rewritten in place"):
            job.execute_in_process(instance=instance, partition_key=names[0])
        ShardHashes(ws.artifacts / "shard_hashes.json").replace(names[0], ws.landing / f"{names[0]}.npz")
        assert job.execute_in_process(instance=instance, partition_key=names[0]).success
    sketched = {p.name.split(".")[0] for p in (ws.artifacts / "sketches").rglob("*.json")}
    assert sketched == {names[0]}
