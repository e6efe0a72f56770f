"""The ``skmm`` command line, run as a user would (real subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from skmm_pipeline.core.errors import ShardError
from skmm_pipeline.core.sketch_io import save_sketch_shard
from skmm_pipeline.data.contract import ShardHashes
from skmm_pipeline.data.pool import load_sketches
from skmm_pipeline.data.shards import file_sha256, write_shard


def skmm(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "skmm_pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_select_writes_indices_and_diagnostics(tmp_path):
    X = np.random.default_rng(0).normal(size=(50, 6))
    np.save(tmp_path / "X.npy", X)
    out = tmp_path / "idx.npy"
    proc = skmm("select", "--input", str(tmp_path / "X.npy"), "--n", "7", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    idx = np.load(out)
    assert idx.shape == (7,) and len(set(idx.tolist())) == 7
    diag = json.loads(out.with_suffix(".json").read_text())
    assert diag["method"] == "skmm" and diag["n"] == 7 and "moment_ratio" in diag
    again = tmp_path / "again.npy"
    skmm("select", "--input", str(tmp_path / "X.npy"), "--n", "7", "--output", str(again))
    assert np.array_equal(np.load(again), idx)


def test_select_with_the_outlier_guard_skips_planted_outliers(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    X[:6] *= 10
    np.save(tmp_path / "X.npy", X)
    out = tmp_path / "idx.npy"
    proc = skmm("select", "--input", str(tmp_path / "X.npy"), "--n", "20", "--outlier-guard", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not np.isin(np.load(out), np.arange(6)).any()
    diag = json.loads(out.with_suffix(".json").read_text())
    assert diag["outliers_excluded"] >= 6 and diag["options"] == {"outlier_guard": True}


def test_select_with_images_sets_aside_noise_images(tmp_path):
    from skmm_pipeline.data.digits import load_digits_transfer

    rng = np.random.default_rng(1)
    images = load_digits_transfer().pool.images[:200].copy()
    images[:8] = rng.uniform(size=images[:8].shape)  # pure noise: no spatial structure
    X = rng.normal(size=(200, 8))
    X[:8] = X[8:16] * 1.01  # and nothing odd about them in X, so only the input check can tell
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "idx.npy"
    args = ("select", "--input", str(tmp_path / "X.npy"), "--n", "60", "--outlier-guard", "--output", str(out))
    proc = skmm(*args, "--images", str(tmp_path / "images.npy"))
    assert proc.returncode == 0, proc.stderr
    assert not np.isin(np.load(out), np.arange(8)).any()
    diag = json.loads(out.with_suffix(".json").read_text())
    assert diag["rows_excluded"] == 8 and diag["images"] == str(tmp_path / "images.npy")
    np.save(tmp_path / "short.npy", images[:10])
    args = (*args, "--force")  # the same output again
    proc = skmm(*args, "--images", str(tmp_path / "short.npy"))
    assert proc.returncode == 2 and "one image per input row" in proc.stderr
    np.savez(tmp_path / "images.npz", images=images)
    proc = skmm(*args, "--images", str(tmp_path / "images.npz"))
    assert proc.returncode == 2 and "a .npy array" in proc.stderr
    proc = skmm(*[a for a in args if a != "--outlier-guard"], "--images", str(tmp_path / "images.npy"))
    assert proc.returncode == 2 and "pass --outlier-guard" in proc.stderr


def test_select_bad_input_gives_one_clear_line(tmp_path):
    X = np.ones((5, 3))
    X[2, 0] = np.inf
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Y.npy", np.ones((5, 3)))
    for name, n, msg in (("X", "3", "non-finite"), ("Y", "0", "must be positive"), ("Y", "9", "larger than the pool")):
        proc = skmm("select", "--input", str(tmp_path / f"{name}.npy"), "--n", n, "--output", str(tmp_path / "o.npy"))
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_select_never_destroys_a_file_and_refuses_bad_files_in_one_line(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 5))
    np.save(tmp_path / "X.npy", X)
    before = (tmp_path / "X.npy").read_bytes()
    base = ("select", "--input", str(tmp_path / "X.npy"), "--n", "5")

    def refused(*args, msg):
        proc = skmm(*base, *args) if args and args[0] == "--output" else skmm(*args)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        return proc

    refused("--output", str(tmp_path / "X.npy"), msg="would replace the input")
    assert (tmp_path / "X.npy").read_bytes() == before
    refused("--output", str(tmp_path / "idx.json"), msg="--output must name a .npy file")
    refused("--output", str(tmp_path / "missing" / "idx.npy"), msg="does not exist")
    np.save(tmp_path / "labels.npy", np.arange(40) % 3)
    refused("--output", str(tmp_path / "labels.npy"), "--labels", str(tmp_path / "labels.npy"), msg="would replace the input")
    out = tmp_path / "idx.npy"
    assert skmm(*base, "--output", str(out)).returncode == 0
    first = out.read_bytes()
    refused("--output", str(out), "--seed", "3", msg="exists: pass --force")
    assert out.read_bytes() == first
    out.unlink()
    refused("--output", str(out), "--seed", "3", msg="idx.json exists: pass --force")  # the sidecar alone counts too
    proc = skmm(*base, "--output", str(out), "--seed", "3", "--force")
    assert proc.returncode == 0 and json.loads(out.with_suffix(".json").read_text())["seed"] == 3
    # Inputs that are not what they should be: one line each, nothing written.
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "complex.npy", X.astype(np.complex64))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}] * 40, dtype=object), allow_pickle=True)
    np.save(tmp_path / "float_labels.npy", np.arange(40) / 2)
    out2 = tmp_path / "o.npy"
    for args, msg in (
        (("--input", str(tmp_path / "folder")), "is a directory"),
        (("--input", str(tmp_path / "complex.npy")), "complex64 values: real numbers expected"),
        (("--input", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "pickled.npy"), "--class-balanced"),
         "cannot read --labels"),
        (("--input", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "float_labels.npy"), "--class-balanced"),
         "float64 values: integers expected"),
        (("--input", str(tmp_path / "X.npy"), "--sketch-dim", "4000000000"), "GiB of memory and"),
    ):
        refused("select", "--n", "5", "--output", str(out2), *args, msg=msg)
    assert not out2.exists() and not out2.with_suffix(".json").exists()


def test_versions_list_on_a_repo_without_versions(project):
    proc = skmm("versions", "list", "--repo", str(project))
    assert proc.returncode == 0 and "no subset versions" in proc.stdout


def test_demo_refuses_relative_dagster_home(project):
    proc = skmm("demo", "--root", str(project), env={**os.environ, "DAGSTER_HOME": "dagster_home"})
    assert proc.returncode == 2 and "DAGSTER_HOME must be an absolute path" in proc.stderr


def test_sketches_with_different_identities_are_never_joined(tmp_path):
    def shard(name, seed):
        ident = {"kind": "gaussian", "seed": seed, "sketch_dim": 4}
        save_sketch_shard(tmp_path / name, np.ones((2, 4), np.float32), [f"{name}/0", f"{name}/1"], ident)
        return {"path": str(tmp_path / name)}

    G, ids, ident = load_sketches({"b": shard("b", 0), "a": shard("a", 0)})
    assert G.shape == (4, 4) and ids == ["a/0", "a/1", "b/0", "b/1"] and ident["seed"] == 0
    with pytest.raises(ValueError, match="seed: 1 != expected 0.*re-materialize gradient_sketch"):
        load_sketches({"a": shard("a", 0), "c": shard("c", 1)})
    with pytest.raises(ValueError, match="no complete sketch shard.*re-materialize gradient_sketch"):
        load_sketches({"a": shard("a", 0), "old": {"path": str(tmp_path / "old.npz")}})
    with pytest.raises(ValueError, match="no shard sketches"):
        load_sketches({})


def test_methods_lists_the_registry_and_select_runs_a_model_based_one(tmp_path):
    from skmm_pipeline.core.selection import METHOD_INFO

    proc = skmm("methods")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert listed == list(METHOD_INFO)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "F.npy", rng.normal(size=(60, 5)))
    np.save(tmp_path / "y.npy", np.repeat(np.arange(3), 20))
    proc = skmm("select", "--input", str(tmp_path / "F.npy"), "--labels", str(tmp_path / "y.npy"), "--n", "9",
                "--method", "margin", "--output", str(tmp_path / "idx.npy"))
    assert proc.returncode == 0, proc.stderr
    assert len(set(np.load(tmp_path / "idx.npy").tolist())) == 9
    proc = skmm("select", "--input", str(tmp_path / "F.npy"), "--n", "9", "--method", "margin",
                "--output", str(tmp_path / "idx2.npy"))
    assert proc.returncode == 2 and "labels" in proc.stderr and "Traceback" not in proc.stderr


def test_shards_add_draws_a_fresh_seed_per_delivery_and_prints_it(tmp_path):
    first = skmm("shards", "add", "--root", str(tmp_path), "--count", "10")
    second = skmm("shards", "add", "--root", str(tmp_path), "--count", "10")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    seeds = [p.stdout.split("seed ")[1].split(",")[0] for p in (first, second)]
    assert seeds[0] != seeds[1]
    again = skmm("shards", "add", "--root", str(tmp_path), "--count", "10", "--seed", seeds[0])
    assert again.returncode == 2 and "same images as shard 'digits-new-000'" in again.stderr


def test_select_with_a_reference_matches_its_moment_and_refuses_a_misshapen_one(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", rng.normal(size=(200, 12)))
    np.save(tmp_path / "R.npy", rng.normal(size=(30, 12)) * np.r_[np.ones(6), np.zeros(6)])
    np.save(tmp_path / "bad.npy", rng.normal(size=(30, 5)))
    proc = skmm("select", "--input", str(tmp_path / "X.npy"), "--n", "10", "--reference", str(tmp_path / "R.npy"),
                "--sketch-dim", "8", "--output", str(tmp_path / "idx.npy"))
    assert proc.returncode == 0, proc.stderr
    diag = json.loads((tmp_path / "idx.json").read_text())
    assert diag["reference"].endswith("R.npy") and len(np.load(tmp_path / "idx.npy")) == 10
    proc = skmm("select", "--input", str(tmp_path / "X.npy"), "--n", "10", "--reference", str(tmp_path / "bad.npy"),
                "--output", str(tmp_path / "idx2.npy"))
    assert proc.returncode == 2 and "12 columns" in proc.stderr


def test_shards_replace_accepts_a_shard_rewritten_in_place(tmp_path):
    landing = tmp_path / ".skmm" / "landing"
    write_shard(landing / "s.npz", np.zeros((3, 1, 8, 8)), np.arange(3))
    hashes = ShardHashes(tmp_path / ".skmm" / "artifacts" / "shard_hashes.json")
    hashes.admit("s", landing / "s.npz", file_sha256(landing / "s.npz"))
    write_shard(landing / "s.npz", np.ones((3, 1, 8, 8)) * 0.5, np.arange(3))
    with pytest.raises(ShardError, match="rewritten in place"):
        hashes.admit("s", landing / "s.npz", file_sha256(landing / "s.npz"))
    ok = skmm("shards", "replace", "s", "--root", str(tmp_path))
    assert ok.returncode == 0 and "now replaces" in ok.stdout, ok.stderr
    hashes.admit("s", landing / "s.npz", file_sha256(landing / "s.npz"))
    missing = skmm("shards", "replace", "gone", "--root", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "shard 'gone'" in missing.stderr
