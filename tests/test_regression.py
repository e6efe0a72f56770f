"""Regression end to end: shards with targets, the FT-1 ridge head, one-output sketches, the pipeline on a
CSV of images with numeric targets (real Dagster instance, git + DVC repo, MLflow store)."""

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from skmm_pipeline.core.sketch_engine import GradientSketcher
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.shards import ShardError, read_shard, write_shard
from skmm_pipeline.data.vision import ImageCSV, write_shards, write_split
from skmm_pipeline.definitions import build_definitions
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.evaluation import DEFAULT_ALPHAS, EvalSplit, ridge_probe
from skmm_pipeline.models.backbones import default_transform
from skmm_pipeline.models.features import Standardizer
from skmm_pipeline.versioning.dvc_store import SubsetStore


@pytest.fixture
def versioned_project(project: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The temp project with DVC initialised and a local directory remote (as in test_pipeline)."""
    remote = tmp_path / "dvc-remote"
    SubsetStore(str(project), remote_url=str(remote)).ensure_initialized()
    return project, remote


# --- FT-1 ridge head -----------------------------------------------------------------------------------


def linear_data(seed=0, d=8, n_pool=200):
    """A pool of pool-standardised features with linear targets, cut into train (a subset), val and test."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(2.0, 3.0, size=(n_pool + 80, d))
    y = 50 + 5 * X @ w + rng.normal(0, 4.0, size=len(X))
    std = Standardizer(X[:n_pool])
    Xs = std(X)

    def split(name, idx):
        return EvalSplit(Xs[idx], y[idx].astype(np.float32), [f"{name}/{i}" for i in idx])

    return split, np.arange(n_pool), np.arange(n_pool, n_pool + 40), np.arange(n_pool + 40, n_pool + 80)


def oracle_ridge(X, y, alpha):
    """Textbook ridge with an unpenalised intercept: solve (A^T A + alpha diag(1..1, 0)) beta = A^T y, A = [X 1]."""
    A = np.hstack([X.astype(np.float64), np.ones((len(X), 1))])
    P = alpha * np.eye(A.shape[1])
    P[-1, -1] = 0.0
    beta = np.linalg.solve(A.T @ A + P, A.T @ y.astype(np.float64))
    return lambda Z: np.hstack([Z.astype(np.float64), np.ones((len(Z), 1))]) @ beta


@pytest.mark.parametrize("n_train", [5, 30])  # fewer samples than features (dual form), and more (primal)
def test_ridge_probe_equals_the_closed_form_oracle_and_selects_on_validation_only(n_train):
    split, pool_idx, val_idx, test_idx = linear_data()
    train = split("pool", pool_idx[:: len(pool_idx) // n_train][:n_train])
    val, test = split("val", val_idx), split("test", test_idx)
    result = ridge_probe(train, val, test, seed=0)

    # The oracle: every alpha of the grid fitted in closed form on the raw targets (ridge with a free
    # intercept does not depend on how the targets are standardised), the best on validation kept.
    val_mae = []
    for alpha in DEFAULT_ALPHAS:
        predict = oracle_ridge(train.inputs, train.targets, alpha)
        val_mae.append(np.mean(np.abs(predict(val.inputs) - val.targets)))
    assert [t["alpha"] for t in result.trials] == list(DEFAULT_ALPHAS)
    np.testing.assert_allclose([t["val_mae"] for t in result.trials], val_mae, rtol=1e-7)
    best = DEFAULT_ALPHAS[int(np.argmin(val_mae))]
    assert result.hyperparameters == {"alpha": best}
    err = oracle_ridge(train.inputs, train.targets, best)(test.inputs) - test.targets
    assert result.test_mae == pytest.approx(np.mean(np.abs(err)), rel=1e-7)
    assert result.test_metrics["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-7)
    assert result.task == "regression" and result.n_train == n_train and result.n_classes_seen is None

    # The ledger: fit on the subset, select on validation, test scored once; test never used to choose.
    assert result.split_ids == {"fit": train.ids, "select": val.ids, "test": test.ids}
    assert not set(result.split_ids["select"]) & set(test.ids)
    scrambled = EvalSplit(test.inputs, test.targets[::-1].copy(), test.ids)
    other = ridge_probe(train, val, scrambled, seed=0)
    assert other.hyperparameters == result.hyperparameters and other.trials == result.trials
    assert other.test_mae != result.test_mae
    # Deterministic.
    assert ridge_probe(train, val, test, seed=0).test_metrics == result.test_metrics


def test_ridge_probe_learns_and_refuses_bad_input():
    split, pool_idx, val_idx, test_idx = linear_data(seed=1)
    train, val, test = split("pool", pool_idx), split("val", val_idx), split("test", test_idx)
    result = ridge_probe(train, val, test)
    baseline = float(np.mean(np.abs(test.targets - train.targets.mean())))
    assert result.test_mae < 0.3 * baseline
    one = ridge_probe(split("pool", pool_idx[:1]), val, test)  # one sample: the constant prediction
    assert one.test_mae == pytest.approx(np.mean(np.abs(test.targets - train.targets[0])), rel=1e-6)
    with pytest.raises(InputError, match="positive finite"):
        ridge_probe(train, val, test, alphas=(1.0, 0.0))
    with pytest.raises(InputError, match="validation and test splits share"):
        ridge_probe(train, val, EvalSplit(val.inputs[:3], val.targets[:3], val.ids[:3]))
    bad = EvalSplit(train.inputs, np.where(np.arange(len(train)) == 3, np.nan, train.targets), train.ids)
    with pytest.raises(InputError, match="finite"):
        ridge_probe(bad, val, test)


# --- shards with targets ---------------------------------------------------------------------------------


def test_read_shard_exposes_regression_targets(tmp_path):
    images = np.zeros((4, 1, 8, 8), np.float32)
    write_shard(tmp_path / "reg.npz", images, targets=np.array([1.5, -2, 3, 1e3]))
    shard = read_shard(tmp_path / "reg.npz")
    assert shard.task == "regression" and shard.labels is None
    assert shard.targets.dtype == np.float32 and shard.targets.tolist() == [1.5, -2.0, 3.0, 1000.0]
    write_shard(tmp_path / "cls.npz", images, np.array([0, 1, 1, 0]))
    cls = read_shard(tmp_path / "cls.npz")
    assert cls.task == "classification" and cls.targets is None and cls.labels.dtype == np.int64
    write_shard(tmp_path / "none.npz", images)
    assert read_shard(tmp_path / "none.npz").task is None


@pytest.mark.parametrize("arrays, message", [
    ({"targets": np.array([1.0, np.nan, 2.0, 3.0])}, "NaN, inf"),
    ({"targets": np.array([1.0, 2.0, np.inf, 3.0], np.float32)}, "NaN, inf"),
    ({"targets": np.array([1e300, 1.0, 2.0, 3.0])}, "beyond float32"),
    ({"labels": np.arange(4), "targets": np.ones(4, np.float32)}, "both 'labels'"),
    ({"targets": np.ones(3, np.float32)}, "targets shape \\(3,\\) does not match 4 images"),
    ({"targets": np.ones((4, 1), np.float32)}, "targets shape \\(4, 1\\)"),
    ({"targets": np.array(["a", "b", "c", "d"])}, "real numbers"),
])
def test_malformed_targets_are_a_clear_shard_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.float32), **arrays)
    with pytest.raises(ShardError, match=message) as exc:
        read_shard(path)
    assert "'bad'" in str(exc.value)


def test_write_shard_refuses_bad_targets(tmp_path):
    images = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(ShardError, match="not both"):
        write_shard(tmp_path / "x.npz", images, np.arange(3), targets=np.ones(3))
    with pytest.raises(ShardError, match="NaN"):
        write_shard(tmp_path / "x.npz", images, targets=np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ShardError, match="does not match 3 images"):
        write_shard(tmp_path / "x.npz", images, targets=np.ones(2))
    assert not (tmp_path / "x.npz").exists()


# --- the task is decided from the data ------------------------------------------------------------------


def test_eval_splits_and_pool_decide_the_task_and_refuse_mixtures(tmp_path):
    from skmm_pipeline.core.atomic import atomic_write_bytes
    from skmm_pipeline.defs.resources import Workspace
    from skmm_pipeline.evaluation import EvalData, load_labelled_pool, load_pool
    from skmm_pipeline.models.backbones import build_backbone, save_backbone

    ws = Workspace(root=str(tmp_path))
    images = np.zeros((5, 1, 8, 8), np.float32)
    write_shard(ws.evaluation / "val.npz", images, targets=np.arange(5.0))
    write_shard(ws.evaluation / "test.npz", images, targets=np.arange(5.0) + 1)
    ev = EvalData(ws.evaluation)
    assert ev.task == "regression" and ev.num_classes == 1 and ev.y("test").tolist() == [1, 2, 3, 4, 5]
    assert ev.ids("val") == [f"val/{i}" for i in range(5)]
    write_shard(ws.evaluation / "test.npz", images, np.arange(5) % 2)
    with pytest.raises(ValueError, match="disagree on the task") as exc:
        EvalData(ws.evaluation)
    assert "val.npz carries regression targets" in str(exc.value) and "test.npz class labels" in str(exc.value)
    write_shard(ws.evaluation / "val.npz", images)
    with pytest.raises(ValueError, match="val.npz has neither"):
        EvalData(ws.evaluation)
    (ws.evaluation / "test.npz").unlink()  # one split alone never falls back to the embedded digits
    with pytest.raises(ValueError, match="holds val.npz but no test.npz"):
        EvalData(ws.evaluation)

    model_path = ws.artifacts / "model.pt"
    atomic_write_bytes(model_path, save_backbone(build_backbone("small_cnn", 5, weights=None)))
    write_shard(ws.landing / "a.npz", images, targets=np.ones(5))
    write_shard(ws.landing / "b.npz", images, targets=np.zeros(5))
    raw = {name: {"path": str(ws.landing / f"{name}.npz")} for name in ("a", "b")}
    pool = load_pool(raw, model_path, "cpu", "unlabelled")
    assert pool.task == "regression" and pool.ids[:2] == ["a/0", "a/1"] and pool.y.tolist() == [1] * 5 + [0] * 5
    with pytest.raises(ValueError, match="benchmark is classification-only: the pool shards carry regression targets"):
        load_labelled_pool(raw, model_path, "cpu", "unlabelled", "benchmark is classification-only")
    write_shard(ws.landing / "b.npz", images, np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="pool shards disagree on the task") as exc:
        load_pool(raw, model_path, "cpu", "unlabelled")
    assert "a.npz" in str(exc.value) and "b.npz" in str(exc.value)


# --- one-output sketches ---------------------------------------------------------------------------------


def test_one_output_model_sketches_label_free_jacobian_rows_and_refuses_label_modes():
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(9, 4)
    for layers in ("ft1", "ft2"):
        sk = GradientSketcher(reg, 8, layers=layers)  # label_mode="expected", the default
        G = sk.gradients(x)
        assert torch.equal(G, GradientSketcher(reg, 8, layers=layers, label_mode="jacobian").gradients(x))
        assert sk.identity["label_mode"] == "jacobian"
    feats = torch.tanh(reg[0](x)).detach()
    torch.testing.assert_close(GradientSketcher(reg, 8).gradients(x), torch.cat([feats, torch.ones(9, 1)], 1))
    for mode in ("true", "random"):
        with pytest.raises(InputError, match="one output \\(regression\\)"):
            GradientSketcher(reg, 8, label_mode=mode).sketch(x.numpy(), labels=np.zeros(9, int),
                                                            sample_ids=[str(i) for i in range(9)])


# --- the pipeline ----------------------------------------------------------------------------------------


def brightness_csv(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` PNG images whose target is their brightness (plus a texture the target does not depend on)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = ["path,target"]
    for i in range(n):
        b = rng.uniform(0.1, 0.9)
        pixels = np.clip(255 * (b + rng.normal(0, 0.05, size=(32, 32, 3))), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{20 + 60 * b:.4f}")
    (folder / "ages.csv").write_text("\n".join(lines) + "\n")
    return folder / "ages.csv"


def run_graph(defs, instance, shards):
    instance.add_dynamic_partitions(shard_partitions.name, shards)
    assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
    for name in shards:
        assert defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name).success
    return defs.resolve_job_def("reselect")


def test_regression_csv_end_to_end_ft1_and_ft2(versioned_project, tmp_path):
    """A CSV of images with numeric targets, landed with ImageCSV/write_shards, through the whole graph
    with a resnet18 from config: MAE for the SkMM subset, uniform subsets and the full pool, FT-1 and FT-2."""
    project, _ = versioned_project
    source = ImageCSV(brightness_csv(tmp_path / "ages", 56), transform=default_transform("resnet18", 32))
    settings = SkmmSettings(backbone="resnet18", backbone_weights="", budget=6, uniform_repeats=2, sketch_dim=32,
                            finetune_mode="both")
    defs = build_definitions(project, settings=settings)
    ws = defs.resources["workspace"]
    written = write_shards(source, ws.landing, "ages", n_shards=2, indices=np.arange(32))
    write_split(source, ws.evaluation / "val.npz", np.arange(32, 44))
    write_split(source, ws.evaluation / "test.npz", np.arange(44, 56))
    assert read_shard(written[0].path).task == "regression"
    with dg.instance_for_test() as instance:
        reselect = run_graph(defs, instance, [w.name for w in written])
        result = reselect.execute_in_process(instance=instance)
        assert result.success
        record = result.output_for_node("finetune_eval")
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["class_coverage"].metadata["note"].value == "regression pool (targets): no class report"
        meta = instance.get_latest_materialization_event(dg.AssetKey("finetune_eval")).asset_materialization.metadata
        model = instance.get_latest_materialization_event(dg.AssetKey("pretrained_model")).asset_materialization.metadata
        assert model["num_classes"].value == 1  # the head of a regression model has one output

        # A classification-only benchmark refuses, before any work.
        with pytest.raises(InputError, match="classification-only"):
            defs.resolve_job_def("benchmark").execute_in_process(instance=instance)

        # Evaluation splits that carry class labels do not fit a regression pool.
        images = read_shard(ws.evaluation / "val.npz").images
        for split in ("val", "test"):
            write_shard(ws.evaluation / f"{split}.npz", images, np.arange(len(images)) % 2)
        with pytest.raises(ValueError, match="disagree on the task") as exc:
            reselect.execute_in_process(instance=instance)
        assert "carry regression targets" in str(exc.value) and "val.npz" in str(exc.value)

    metrics = record["metrics"]
    assert record["task"] == "regression"
    for prefix in ("", "ft2_"):
        for key in ("mae_skmm", "mae_uniform_mean", "mae_full_pool", "val_mae_skmm"):
            assert np.isfinite(metrics[prefix + key]) and metrics[prefix + key] > 0, prefix + key
            assert meta[prefix + key].value == pytest.approx(metrics[prefix + key])
        assert metrics[prefix + "mae_uniform_sem"] >= 0
    assert np.isfinite(metrics["rmse_skmm"]) and metrics["rmse_skmm"] >= metrics["mae_skmm"]
    assert not any(k.startswith(("acc_", "ft2_acc_", "macro_f1")) for k in metrics)
    # Brightness is learnable from frozen random-init features: the full pool beats predicting the mean.
    test_targets = source.targets[44:56]
    baseline = float(np.mean(np.abs(test_targets - source.targets[:32].mean())))
    assert metrics["mae_full_pool"] < 0.5 * baseline
    assert {(r["finetune"], r["method"]) for r in record["rows"]} == {
        (ft, m) for ft in ("FT-1", "FT-2") for m in ("skmm", "uniform (x2)", "full pool")}
    assert all(np.isfinite(r["test_mae"]) for r in record["rows"])
    assert "test_mae" in [c.name for c in meta["results"].schema.columns]
    assert "get-artifact?path=plots/mae.png" in meta["plot"].value
    assert meta["plot_embedded"].value.startswith("![mae.png](data:image/png;base64,")

    run = MlflowClient(record["mlflow_tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "regression"
    for key in ("mae_skmm", "mae_uniform_mean", "mae_full_pool", "ft2_mae_skmm", "ft2_mae_full_pool"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert "test_mae/skmm" in run.data.metrics and "test_mae/ft2_full_pool" in run.data.metrics


def test_regression_eval_splits_with_a_classification_pool_are_refused(versioned_project):
    project, _ = versioned_project
    rng = np.random.default_rng(0)
    settings = SkmmSettings(backbone="resnet18", backbone_weights="", budget=4, uniform_repeats=1, sketch_dim=16)
    defs = build_definitions(project, settings=settings)
    ws = defs.resources["workspace"]
    for name in ("cls-a", "cls-b"):
        write_shard(ws.landing / f"{name}.npz", rng.normal(size=(8, 3, 32, 32)), np.arange(8) % 2)
    for split in ("val", "test"):
        write_shard(ws.evaluation / f"{split}.npz", rng.normal(size=(6, 3, 32, 32)), targets=rng.normal(size=6))
    with dg.instance_for_test() as instance:
        # The data contract refuses the first shard as it lands, before anything is sketched or versioned.
        with pytest.raises(ShardError, match="shard 'cls-a' carries class labels but the evaluation splits carry "
                                             "regression targets: give every shard regression targets"):
            run_graph(defs, instance, ["cls-a", "cls-b"])
    assert SubsetStore(str(project)).list_versions() == []


def test_regression_with_a_multi_output_model_is_refused_before_sketching(project):
    """The embedded small CNN keeps its 5 digit outputs: a regression shard is refused, naming the fix."""
    rng = np.random.default_rng(0)
    defs = build_definitions(project, settings=SkmmSettings(pretrain_epochs=1))
    ws = defs.resources["workspace"]
    write_shard(ws.landing / "ages-000.npz", rng.uniform(size=(12, 1, 8, 8)), targets=rng.normal(size=12))
    for split in ("val", "test"):  # regression splits, so the shard meets the data contract and reaches the model
        write_shard(ws.evaluation / f"{split}.npz", rng.uniform(size=(6, 1, 8, 8)), targets=rng.normal(size=6))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, ["ages-000"])
        assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
        with pytest.raises(ValueError, match="needs a model with one output.*small CNN keeps the 5 outputs.*resnet18"):
            defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key="ages-000")
    assert not (ws.artifacts / "sketches").exists() or not list((ws.artifacts / "sketches").rglob("*.json"))
