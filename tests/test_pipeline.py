"""The whole pipeline on a tiny configuration: real Dagster instance, real git+DVC repo, real MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from conftest import git
from mlflow.tracking import MlflowClient

from skmm_pipeline.core.errors import ConfigError, SketchMismatchError
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.core.sketch_io import read_sketch_shard
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.digits import load_digits_transfer, write_digits_shards
from skmm_pipeline.data.pool import load_sketches, reference_rows
from skmm_pipeline.data.shards import ShardError, read_shard, write_shard
from skmm_pipeline.definitions import COMPOSABLE_ASSETS, build_definitions
from skmm_pipeline.definitions import PIPELINE_ASSETS as ALL_ASSETS
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.defs.sketch import make_sketcher
from skmm_pipeline.demo import SetupError, run_demo
from skmm_pipeline.evaluation import EvalData
from skmm_pipeline.models.backbones import load_backbone
from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersionError

TINY = dict(budget=10, pretrain_epochs=2, log=lambda *_: None)


@pytest.fixture
def versioned_project(project: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The temp project with DVC initialised and a local directory remote."""
    remote = tmp_path / "dvc-remote"
    SubsetStore(str(project), remote_url=str(remote)).ensure_initialized()
    return project, remote


def test_definitions_load_and_selection_parser_works(tmp_path):
    defs = build_definitions(tmp_path)
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"raw_shard", "pretrained_model", "gradient_sketch", "validation_sketch", "skmm_selection",
                    "subset_version", "finetune_eval", "method_benchmark", "shard_moment", "pool_moment",
                    "shard_candidates"}
    for job in ("import_data", "pretrain", "sketch_shard", "reselect", "benchmark"):
        defs.resolve_job_def(job)
    # Regression guard for the antlr4 pin conflict between DVC's hydra and Dagster's parser.
    assert dg.AssetSelection.from_string("key:raw_shard") is not None


def test_cli_materializes_one_asset_by_selection_string(project, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SKMM_PROJECT_ROOT": str(project)}
    config = {"resources": {"settings": {"config": {"pretrain_epochs": 1}}}}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "skmm_pipeline.definitions",
         "--select", "pretrained_model", "--config-json", json.dumps(config)],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.get_latest_materialization_event(dg.AssetKey("pretrained_model")) is not None
    assert list((project / ".skmm" / "artifacts" / "models").glob("small_cnn-*.pt"))


def test_demo_end_to_end_twice(versioned_project, dagster_home):
    project, remote = versioned_project
    head_before = git(project, "rev-parse", "HEAD")

    lines = []
    first = run_demo(project, **{**TINY, "log": lines.append})
    # The long steps report their progress to the demo's log.
    assert any("pretraining the small CNN: 2/2 epochs (100%)" in line for line in lines), lines
    assert any("sketching digits-000:" in line and "(100%)" in line for line in lines), lines
    manifest_v1 = (project / "data" / "manifest.json").read_bytes()
    subset_v1 = (project / "data" / "subset.csv").read_text()
    sketch_files = sorted((project / ".skmm" / "artifacts" / "sketches").rglob("*.rows.npy"))
    assert [p.name for p in sketch_files] == [f"digits-00{k}.rows.npy" for k in range(3)]
    sketches_v1 = [np.load(p) for p in sketch_files]

    second = run_demo(project, **TINY)
    assert (first["dvc_tag"], second["dvc_tag"]) == ("subset-v0001", "subset-v0002")
    # Each version is compared with the one before: the same seed and data give no change.
    assert first["quality"]["vs_previous"] == [] and second["quality"]["previous_tag"] == "subset-v0001"
    assert [(r["change"], r["behind"]) for r in second["quality"]["vs_previous"]] == [(0.0, False)]

    # Same seed, same sketch and same subset; the user's branch never receives a commit.
    assert all(np.array_equal(a, np.load(p)) for a, p in zip(sketches_v1, sketch_files))
    assert (project / "data" / "subset.csv").read_text() == subset_v1
    assert git(project, "rev-parse", "HEAD") == head_before
    assert git(project, "rev-parse", "--abbrev-ref", "HEAD") == "main"

    # The subset is a real DVC version: tag on the history ref, data pushed, old version readable.
    store = SubsetStore(str(project))
    assert [v.tag for v in store.list_versions()] == ["subset-v0001", "subset-v0002"]
    assert store.read_file("subset-v0001", "manifest.json") == manifest_v1
    assert any(p.is_file() for p in remote.rglob("*"))
    subset = subset_v1.splitlines()
    assert subset[0] == "sample_id,shard,row,weight,rank" and len(subset) == 1 + 10
    assert json.loads(manifest_v1)["budget"] == 10

    # MLflow: a FINISHED run with the expected params and metrics, linked to Dagster and DVC.
    run = MlflowClient(second["mlflow_tracking_uri"]).get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["budget"] == "10" and run.data.params["method"] == "skmm"
    assert run.data.tags["dvc.tag"] == "subset-v0002"
    for key in ("acc_skmm", "acc_uniform_mean", "acc_full_pool"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.metrics["acc_full_pool"] > 0.5

    # Every asset was materialized in the DAGSTER_HOME instance, with UI metadata.
    instance = dg.DagsterInstance.get()
    for asset in ALL_ASSETS:
        assert instance.get_latest_materialization_event(asset.key) is not None, asset.key
    meta = instance.get_latest_materialization_event(dg.AssetKey("finetune_eval")).asset_materialization.metadata
    assert "results" in meta and "mlflow_run_id" in meta
    # Both versions on the history plot: as an MLflow artifact, and embedded in the metadata.
    assert "plots/versions.png" in {a.path for a in MlflowClient(second["mlflow_tracking_uri"]).list_artifacts(
        second["mlflow_run_id"], "plots")}
    assert meta["versions_embedded"].value.startswith("![versions](data:image/png;base64,")


def test_bad_budget_and_dagster_home_fail_before_any_work(versioned_project, dagster_home, monkeypatch):
    project, _ = versioned_project
    for budget, msg in ((0, "must be positive"), (-1, "must be positive"), (10_000, "larger than the pool")):
        with pytest.raises(InputError, match=msg):
            run_demo(project, **{**TINY, "budget": budget})
    monkeypatch.setenv("DAGSTER_HOME", "relative/home")
    with pytest.raises(SetupError, match="must be an absolute path"):
        run_demo(project, **TINY)
    monkeypatch.delenv("DAGSTER_HOME")
    with pytest.raises(SetupError, match="not set"):
        run_demo(project, **TINY)
    assert SubsetStore(str(project)).list_versions() == []


def test_missing_or_corrupt_shard_fails_with_clear_error_and_no_version(versioned_project):
    project, _ = versioned_project
    defs = build_definitions(project, settings=SkmmSettings(budget=5, pretrain_epochs=1))
    landing = defs.resources["workspace"].landing
    landing.mkdir(parents=True)
    (landing / "broken.npz").write_bytes(b"not a zip file")
    write_shard(landing / "empty.npz", np.zeros((0, 1, 8, 8)))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, ["gone", "broken", "empty"])
        job = defs.resolve_job_def("sketch_shard")
        for key, msg in (("gone", "not found"), ("broken", "unreadable or corrupt"), ("empty", "is empty")):
            with pytest.raises(ShardError, match=msg):
                job.execute_in_process(instance=instance, partition_key=key)
        # Nothing downstream can run without sketches, and no subset version is written.
        result = defs.resolve_job_def("reselect").execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
    assert SubsetStore(str(project)).list_versions() == []


def test_failed_versioning_keeps_last_good_version(versioned_project, dagster_home):
    project, _ = versioned_project
    run_demo(project, **TINY)
    good = (project / "data" / "subset.csv").read_bytes()
    (project / "data" / "subset.csv").write_text("edited by hand\n")
    with pytest.raises(SubsetVersionError, match="local modifications"):
        run_demo(project, **TINY)
    store = SubsetStore(str(project))
    assert [v.tag for v in store.list_versions()] == ["subset-v0001"]
    assert store.read_file("subset-v0001", "subset.csv") == good


def test_ft2_evaluation_on_eval_splits_from_the_workspace(versioned_project, dagster_home):
    project, _ = versioned_project
    data = load_digits_transfer()
    eval_dir = project / ".skmm" / "eval"
    write_shard(eval_dir / "val.npz", data.val.images, data.val.labels)
    write_shard(eval_dir / "test.npz", data.test.images, data.test.labels)
    record = run_demo(project, **{**TINY, "budget": 20}, finetune_mode="both")
    assert {r["finetune"] for r in record["rows"]} == {"FT-1", "FT-2"}
    metrics = record["metrics"]
    for key in ("acc_skmm", "ft2_acc_skmm", "ft2_acc_uniform_mean", "ft2_acc_full_pool", "ft2_macro_f1_skmm"):
        assert 0.0 <= metrics[key] <= 1.0, key
    client = MlflowClient(record["mlflow_tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.params["eval_splits"] == str(eval_dir) and run.data.params["finetune"] == "both"
    # The selected subset's FT-2 training curves: validation accuracy at each epoch checkpoint, per (lr, wd).
    curves = [k for k in run.data.metrics if k.startswith("ft2_val_accuracy/lr_")]
    assert curves
    steps = [m.step for m in client.get_metric_history(run.info.run_id, curves[0])]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) > 1


def test_torchvision_backbone_on_image_shards(versioned_project):
    """The same graph on a user's data: RGB shards, eval splits in the workspace, a resnet18 from config."""
    project, _ = versioned_project
    rng = np.random.default_rng(0)

    def images(n, k):  # three classes told apart by colour, so the splits are learnable
        labels = np.arange(n) % k
        x = rng.normal(0, 0.3, size=(n, 3, 32, 32)).astype(np.float32)
        x[np.arange(n), labels] += 1.0
        return x, labels

    settings = SkmmSettings(backbone="resnet18", backbone_weights="", budget=6, uniform_repeats=2, sketch_dim=32)
    defs = build_definitions(project, settings=settings)
    ws = defs.resources["workspace"]
    for name in ("photos-a", "photos-b"):
        write_shard(ws.landing / f"{name}.npz", *images(24, 3))
    write_shard(ws.evaluation / "val.npz", *images(15, 3))
    write_shard(ws.evaluation / "test.npz", *images(15, 3))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, ["photos-a", "photos-b"])
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        for name in ("photos-a", "photos-b"):
            assert defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name).success
        result = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
        assert result.success
        record = result.output_for_node("finetune_eval")
    assert record["metrics"]["acc_full_pool"] > 0.5
    model = result.output_for_node("skmm_selection")
    assert model["sketch_identity"]["gradient_dim"] == 513  # resnet18 features + bias (label-free Jacobian rows)


@pytest.mark.parametrize("labels", [dict(label_mode="random", label_draws=2), dict(label_mode="expected", class_probes=2)],
                         ids=["random-labels", "sketched-class-probes"])
def test_ft2_sketch_asset_equals_the_engine_with_balanced_blocks(project, labels):
    """gradient_sketch with the last two layers, random labels or a sketched class space: the rows on disk are
    the engine's, read through the shard reader's threads in odd batches, computed in other blocks."""
    settings = SkmmSettings(pretrain_epochs=1, sketch_layers="ft2", **labels,
                            sketch_kind="tensorsketch", sketch_dim=32, seed=3, calibration_rows=64,
                            batch_size=7, loader_workers=2, sketch_block_rows=48)  # reader threads, odd batches
    defs = build_definitions(project, settings=settings)
    ws = defs.resources["workspace"]
    names = write_digits_shards(ws.landing)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, names)
        pretrain = defs.resolve_job_def("pretrain").execute_in_process(instance=instance)
        assert pretrain.success
        result = defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=names[0])
        assert result.success
        record = result.output_for_node("gradient_sketch")
    model_path = pretrain.output_for_node("pretrained_model")["path"]
    shard = read_sketch_shard(record["path"], expected_identity=record["identity"], verify=True)
    ident = shard.identity
    assert [b["kind"] for b in ident["blocks"]] == ["tensorsketch", "tensorsketch"]
    scales = {b["name"]: b["scale"] for b in ident["blocks"]}
    assert len(scales) == 2 and all(v > 0 for v in scales.values()) and len(set(scales.values())) == 2
    assert ident["label_mode"] == labels["label_mode"] and ident["draws"] == labels.get("label_draws", 1)
    assert ident["seed"] == 3 and ident.get("class_probes") == labels.get("class_probes")
    # The same rows from the library, given the same model, calibration rows and settings.
    model = load_backbone(Path(model_path))
    data = read_shard(ws.landing / f"{names[0]}.npz")
    sk = GradientSketcher(model, 32, kind="tensorsketch", seed=3, layers="ft2", label_mode=labels["label_mode"],
                          draws=labels.get("label_draws", 1), class_probes=labels.get("class_probes"),
                          block_scales=scales, model_id=ident["model_id"], device="cpu")
    assert np.array_equal(sk.sketch(data.images, sample_ids=data.ids), np.asarray(shard.rows))
    assert len(EvalData(ws.evaluation).val.images) >= 64
    with pytest.raises(ConfigError, match="class_probes must be >= 0"):
        make_sketcher(model, SkmmSettings(class_probes=-1), ws, "model", "cpu")


def test_outlier_guard_in_the_pipeline_sets_aside_noise_images(versioned_project):
    """settings.outlier_guard on a pool with planted pure-noise images: the input check, computed by
    raw_shard and cached by content hash, keeps every one of them out of the selection."""
    project, _ = versioned_project
    settings = SkmmSettings(budget=40, pretrain_epochs=2, uniform_repeats=1, sketch_dim=32, outlier_guard=True)
    defs = build_definitions(project, settings=settings)
    ws = defs.resources["workspace"]
    pool = load_digits_transfer().pool
    rng = np.random.default_rng(0)
    images = pool.images[:300].copy()
    noisy = np.arange(0, 300, 20)  # 15 images in each shard's range replaced by uniform noise
    images[noisy] = rng.uniform(size=images[noisy].shape)
    write_shard(ws.landing / "part-a.npz", images[:150], pool.labels[:150])
    write_shard(ws.landing / "part-b.npz", images[150:], pool.labels[150:300])
    planted = {f"part-a/{i}" for i in noisy if i < 150} | {f"part-b/{i - 150}" for i in noisy if i >= 150}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, ["part-a", "part-b"])
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        for name in ("part-a", "part-b"):
            run = defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name)
            assert run.success
            assert run.output_for_node("raw_shard")["rows"] == 150
        cache = sorted((project / ".skmm" / "artifacts" / "input_structure").glob("*.npy"))
        assert len(cache) == 2
        result = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
        assert result.success
        sel = result.output_for_node("skmm_selection")
        assert not planted & set(sel["sample_ids"]) and len(sel["sample_ids"]) == 40
        assert sel["diagnostics"]["rows_excluded"] == len(planted)
        meta = instance.get_latest_materialization_event(dg.AssetKey("skmm_selection")).asset_materialization.metadata
        assert meta["unstructured_excluded"].value == len(planted)
        assert set(meta["unstructured_examples"].value) == planted
        # An unreadable cache entry is recomputed, to the same selection.
        cache[0].write_bytes(b"not a npy file")
        again = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
        assert again.success and again.output_for_node("skmm_selection")["sample_ids"] == sel["sample_ids"]
        np.load(cache[0])


def test_selection_matches_the_validation_moment_unless_told_the_pool(project):
    """By default skmm_selection matches the validation split's sketched moment (validation_sketch, made by
    the pool's sketcher and reused while its identity and content stay); reference='pool' matches the pool's.
    Both equal the library's select on the same rows; a validation sketch of another identity is refused."""
    config = dict(budget=12, pretrain_epochs=1, sketch_dim=24, seed=5)
    defs = build_definitions(project, settings=SkmmSettings(**config))
    names = write_digits_shards(defs.resources["workspace"].landing)
    only = [dg.AssetKey("validation_sketch"), dg.AssetKey("skmm_selection")]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, names)
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        sketches = {}
        for name in names:
            run = defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name)
            sketches[name] = run.output_for_node("gradient_sketch")
        reselect = defs.resolve_job_def("reselect")
        first = reselect.execute_in_process(instance=instance, asset_selection=only)
        val, sel = first.output_for_node("validation_sketch"), first.output_for_node("skmm_selection")
        again = reselect.execute_in_process(instance=instance, asset_selection=only)
        meta = instance.get_latest_materialization_event(dg.AssetKey("validation_sketch")).asset_materialization.metadata
        assert meta["reused"].value is True
        assert again.output_for_node("skmm_selection")["sample_ids"] == sel["sample_ids"]
        pool_defs = build_definitions(project, settings=SkmmSettings(**config, reference="pool"))
        pooled = pool_defs.resolve_job_def("reselect").execute_in_process(instance=instance, asset_selection=only)
        by_pool = pooled.output_for_node("skmm_selection")
        bogus = build_definitions(project, settings=SkmmSettings(**config, reference="pooled"))
        with pytest.raises(ConfigError, match="must be 'validation' or 'pool', got 'pooled'"):
            bogus.resolve_job_def("reselect").execute_in_process(instance=instance, asset_selection=only[:1])
    G, ids, identity = load_sketches(sketches)
    R = np.asarray(read_sketch_shard(val["path"], identity).rows)
    assert val["rows"] == len(R) == len(EvalData(project / ".skmm" / "eval").val.images)
    assert sel["reference"] == "validation" and by_pool["reference"] == "pool"
    assert sel["sample_ids"] == [ids[i] for i in select("skmm", G, 12, seed=5, reference=R).indices]
    assert by_pool["sample_ids"] == [ids[i] for i in select("skmm", G, 12, seed=5).indices]
    assert sel["sample_ids"] != by_pool["sample_ids"]
    assert reference_rows(val, identity, "uniform") is None  # a method without a reference option ignores it
    with pytest.raises(SketchMismatchError, match="validation sketch does not match"):
        reference_rows(val, {**identity, "seed": 99}, "skmm")


def test_a_pool_of_one_shard_runs_every_step(versioned_project):
    """Dagster hands a non-partitioned asset the bare value of a partitioned input that spans one shard (a
    mapping for two or more): selection, checks, versioning, evaluation and the composable moment still run."""
    project, _ = versioned_project
    settings = SkmmSettings(budget=8, pretrain_epochs=1, sketch_dim=16, uniform_repeats=2)
    defs = build_definitions(project, settings=settings)
    name = write_digits_shards(defs.resources["workspace"].landing)[0]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, [name])
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        assert defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name).success
        run = defs.resolve_job_def("reselect").execute_in_process(instance=instance)
        assert all(e.passed for e in run.get_asset_check_evaluations() if e.severity == dg.AssetCheckSeverity.ERROR)
        chosen = run.output_for_node("skmm_selection")
        assert len(chosen["sample_ids"]) == 8 and {s.split("/")[0] for s in chosen["sample_ids"]} == {name}
        assert run.output_for_node("finetune_eval")["summary"]["pool_size"] == chosen["pool_size"]
        assets = [*ALL_ASSETS, *COMPOSABLE_ASSETS]
        dg.materialize(assets, selection=["shard_moment"], partition_key=name, instance=instance, resources=defs.resources)
        pooled = dg.materialize(assets, selection=["pool_moment"], instance=instance, resources=defs.resources)
        assert pooled.output_for_node("pool_moment")["rows"] == chosen["pool_size"]
    assert [v.tag for v in SubsetStore(str(project)).list_versions()] == ["subset-v0001"]
