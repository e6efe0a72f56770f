"""Importing a local dataset by run configuration: the ``import_data`` job and ``skmm shards import``."""

import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image
from test_cli import skmm
from test_regression import brightness_csv
from test_vision import write_cifar

from skmm_pipeline.data.contract import ShardHashes
from skmm_pipeline.data.ingest import ImportRequest, import_dataset
from skmm_pipeline.data.shards import file_sha256, read_shard
from skmm_pipeline.data.vision import DataError, read_shard_sources
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.ingest import shard_partitions


def photo_tree(root: Path, per_class: int = 10) -> Path:
    """ImageFolder layout: root/<class>/<image>.png, three classes told apart by colour."""
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("red", "green", "blue")):
        for i in range(per_class):
            x = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
            x[..., k] += 150
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x, "RGB").save(root / cls / f"{i:03d}.png")
    return root


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.npz"))}


def run_import(defs, instance, **config):
    return defs.resolve_job_def("import_data").execute_in_process(
        run_config={"ops": {"import_dataset_op": {"config": config}}}, instance=instance, raise_on_error=False)


def test_import_job_lands_shards_and_eval_splits_from_config(project, tmp_path):
    photos = photo_tree(tmp_path / "photos")
    defs = build_definitions(project)  # settings: the small CNN, so images become 8x8 grey
    ws = defs.resources["workspace"]
    with dg.instance_for_test() as instance:
        res = run_import(defs, instance, source="imagefolder", path=str(photos), shards=2, val_fraction=0.2,
                         test_fraction=0.2, seed=1)
        assert res.success
        out = res.output_for_node("import_dataset_op")
        assert out["shards"] == ["photos-000", "photos-001"] and out["task"] == "classification"
        assert set(instance.get_dynamic_partitions(shard_partitions.name)) == {"photos-000", "photos-001"}
        pool = [read_shard(ws.landing / f"{s}.npz") for s in out["shards"]]
        val, test = read_shard(ws.evaluation / "val.npz"), read_shard(ws.evaluation / "test.npz")
        assert pool[0].images.shape[1:] == (1, 8, 8)
        assert pool[0].pixels.dtype == np.uint8 and val.decode is not None  # 8-bit pixels and their decode
        assert sum(len(p.images) for p in pool) == 18 and len(val.images) == 6 and len(test.images) == 6
        assert np.bincount(val.labels).tolist() == [2, 2, 2]  # stratified
        ids = [set(read_shard_sources(ws.landing / f"{s}.npz").source_ids) for s in out["shards"]]
        ids += [set(read_shard_sources(ws.evaluation / f"{s}.npz").source_ids) for s in ("val", "test")]
        assert sum(map(len, ids)) == 30 and len(set().union(*ids)) == 30  # disjoint, nothing lost
        before = digests(ws.landing) | {f"eval/{k}": v for k, v in digests(ws.evaluation).items()}
        # The same import again is refused before anything is written: deliveries are immutable.
        again = run_import(defs, instance, source="imagefolder", path=str(photos), shards=2, val_fraction=0.2)
        assert not again.success
        assert "already exist" in str(again.failure_data_for_node("import_dataset_op").error)
        assert digests(ws.landing) | {f"eval/{k}": v for k, v in digests(ws.evaluation).items()} == before
        # A test split from another source replaces test.npz only when asked to.
        cifar = tmp_path / "cifar"
        write_cifar(cifar)
        refused = run_import(defs, instance, source="cifar10", path=str(cifar), split="test", role="test")
        assert not refused.success and "overwrite_eval" in str(refused.failure_data_for_node("import_dataset_op").error)
        replaced = run_import(defs, instance, source="cifar10", path=str(cifar), split="test", role="test",
                              overwrite_eval=True)
        assert replaced.success
        assert len(read_shard(ws.evaluation / "test.npz").images) == 3
        assert digests(ws.landing) == {k: v for k, v in before.items() if not k.startswith("eval/")}


def test_import_refuses_bad_requests_before_writing(tmp_path):
    photos = photo_tree(tmp_path / "photos", per_class=2)
    landing, ev = tmp_path / "landing", tmp_path / "eval"
    bad = [
        (dict(source="parquet", path=str(photos)), "source must be one of"),
        (dict(source="imagefolder", path=str(photos), role="train"), "role must be one of"),
        (dict(source="imagefolder", path=str(photos), shards=0), "shards must be a positive"),
        (dict(source="imagefolder", path=str(photos), val_fraction=0.6, test_fraction=0.5), "leave some rows"),
        (dict(source="imagefolder", path=str(photos), role="val", val_fraction=0.2), "only apply to role 'pool'"),
        (dict(source="imagefolder", path=str(photos), shards=7), "use fewer shards"),
        (dict(source="imagefolder", path=str(tmp_path / "missing")), "not a directory"),
        (dict(source="imagefolder", path=str(photos), name="bad name!"), "shard name"),
        (dict(source="imagefolder", path=str(photos), pixels="float16"), "pixels must be one of"),
    ]
    for req, message in bad:
        with pytest.raises((DataError, ValueError), match=message):
            import_dataset(ImportRequest(**req), landing, ev)
    with pytest.raises(DataError, match="must differ"):
        import_dataset(ImportRequest(source="imagefolder", path=str(photos)), landing, landing)
    assert not landing.exists() and not ev.exists()


def test_cli_imports_a_regression_csv(tmp_path):
    csv = brightness_csv(tmp_path / "ages", 12)
    root = tmp_path / "project"
    root.mkdir()
    proc = skmm("shards", "import", "--root", str(root), "--source", "csv", "--path", str(csv),
                "--shards", "2", "--val-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "ages-000" in proc.stdout and "regression" in proc.stdout
    src = read_shard_sources(root / ".skmm" / "landing" / "ages-000.npz")
    assert src.targets is not None and len(src.source_ids) == 5
    assert (root / ".skmm" / "eval" / "val.npz").is_file()
    proc = skmm("shards", "import", "--root", str(root), "--source", "csv", "--path", str(csv))
    assert proc.returncode == 2 and "already exist" in proc.stderr and "--replace" in proc.stderr
    # New data under the same names replaces the old only when asked, and the replacement is recorded.
    landed = root / ".skmm" / "landing" / "ages-000.npz"
    registry = ShardHashes(root / ".skmm" / "artifacts" / "shard_hashes.json")
    old_sha = file_sha256(landed)
    registry.admit("ages-000", landed, old_sha)
    proc = skmm("shards", "import", "--root", str(root), "--source", "csv", "--path", str(csv), "--shards", "2",
                "--val-fraction", "0.25", "--seed", "1", "--overwrite-eval", "--replace", "--pixels", "float32")
    assert proc.returncode == 0 and "ages-000.npz (5 images), replacing the shard of that name" in proc.stdout, proc.stderr
    assert read_shard(landed).pixels.dtype == np.float32 and read_shard(landed).decode is None
    registry.admit("ages-000", landed, file_sha256(landed))  # admitted: it replaces the old content
    entry = json.loads(registry.cache.read_text())["ages-000"]
    assert file_sha256(landed) != old_sha and [r["sha256"] for r in entry["replaced"]] == [old_sha]


def test_a_failed_import_leaves_nothing_behind_and_can_be_rerun(tmp_path):
    photos = photo_tree(tmp_path / "photos", per_class=4)
    (photos / "red" / "zzz.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    landing, ev = tmp_path / "landing", tmp_path / "eval"
    req = dict(source="imagefolder", path=str(photos), shards=3, val_fraction=0.25)
    with pytest.raises(DataError, match="zzz.png"):
        import_dataset(ImportRequest(**req, on_corrupt="raise"), landing, ev)
    assert list(landing.rglob("*")) == [] and not list(ev.rglob("*"))
    # Staging folders of killed imports are cleared once stale; a recent one may be another import's.
    for name, age in (("stale", 2 * 24 * 3600), ("live", 0)):
        folder = landing / f".import-{name}"
        folder.mkdir()
        (folder / "photos-000.npz").write_bytes(b"half a file")
        os.utime(folder, (time.time() - age, time.time() - age))
    res = import_dataset(ImportRequest(**req), landing, ev)  # skips the unreadable image, counted
    assert res.skipped == 1 and sum(res.rows[s] for s in res.shards) + res.rows["val"] == 12
    assert sorted(p.name for p in landing.iterdir()) == [".import-live", "photos-000.npz", "photos-001.npz",
                                                         "photos-002.npz"]
    assert sorted(p.name for p in ev.iterdir()) == ["val.npz"]
    # A requested split that rounds to no row is an error, not a silently missing test.npz.
    with pytest.raises(DataError, match="test_fraction 0.01 of 13 rows leaves no test row"):
        import_dataset(ImportRequest(**{**req, "name": "other"}, test_fraction=0.01), landing, ev)


def test_imported_images_run_through_the_whole_graph(project, tmp_path):
    """From a folder of images to a versioned, evaluated subset by configuration alone."""
    from skmm_pipeline.defs.resources import SkmmSettings
    from skmm_pipeline.versioning.dvc_store import SubsetStore

    SubsetStore(str(project), remote_url=str(tmp_path / "remote")).ensure_initialized()
    photos = photo_tree(tmp_path / "photos", per_class=12)
    defs = build_definitions(project, remote_url=str(tmp_path / "remote"),
                             settings=SkmmSettings(pretrain_epochs=2, budget=9, uniform_repeats=2, sketch_dim=16))
    with dg.instance_for_test() as instance:
        res = run_import(defs, instance, source="imagefolder", path=str(photos), shards=2, val_fraction=0.25,
                         test_fraction=0.25)
        assert res.success
        shards = res.output_for_node("import_dataset_op")["shards"]
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        for name in shards:
            assert defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name).success
        result = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
        assert result.success
    sel = result.output_for_node("skmm_selection")
    assert len(sel["sample_ids"]) == 9 and {s.split("/")[0] for s in sel["sample_ids"]} <= set(shards)
    record = result.output_for_node("finetune_eval")
    assert record["metrics"]["acc_full_pool"] > 0.5  # three colours, told apart from 8x8 grey levels
    assert result.output_for_node("subset_version")["tag"].startswith("subset-v")
