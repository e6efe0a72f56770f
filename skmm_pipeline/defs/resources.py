"""Dagster resources: run-wide settings, the on-disk workspace, DVC versioning and MLflow tracking.

Every path a resource hands out is absolute: DVC and MLflow resolve relative paths against the
process's working directory, which differs between ``dagster dev``, its run workers and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from skmm_pipeline.core import defaults
from skmm_pipeline.core.errors import ConfigError
from skmm_pipeline.data.shards import check_shard_name
from skmm_pipeline.tracking.mlflow_store import DEFAULT_DAGSTER_URL, DEFAULT_UI_URL, MlflowTracker, sqlite_uri
from skmm_pipeline.versioning.dvc_store import SubsetStore


def _absolute(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_absolute():
        raise ConfigError(f"{what} must be an absolute path, got {path!r}")
    return p


def default_project_root() -> Path:
    """``SKMM_PROJECT_ROOT`` if set, else the current directory (``dagster dev`` runs from the project)."""
    return Path(os.environ.get("SKMM_PROJECT_ROOT") or os.getcwd()).resolve()


class SkmmSettings(dg.ConfigurableResource):
    """What to select and how. A seed fixes the sketch, the selection and the evaluation."""

    seed: int = defaults.SEED
    budget: int = defaults.BUDGET
    method: str = "skmm"
    # Stage 1 (core.sketch_engine.GradientSketcher). sketch_kind: "auto" (TensorSketch for large
    # outer-product blocks, CountSketch for small ones, a dense Gaussian for Jacobian rows),
    # "tensorsketch", "countsketch" or "gaussian". sketch_layers: "ft1" (the head) or "ft2" (the last
    # two finetuned layers; their blocks are balanced by calibrate_block_scales on the first
    # calibration_rows validation images). label_mode: "expected" (label-free), "random"
    # (label_draws seeded draws per sample) or "true". class_probes: with "expected", the most class-space
    # directions a deep (FT-2) block's gradient is taken along; a model with more classes gets a seeded
    # sketch of its class space (0: all classes, exact). precision: float16/bfloat16 autocast on CUDA.
    sketch_kind: str = "auto"
    sketch_dim: int = defaults.SKETCH_DIM
    sketch_layers: str = "ft1"
    label_mode: str = "expected"
    label_draws: int = 1
    class_probes: int = defaults.CLASS_PROBES
    balance_blocks: bool = True
    calibration_rows: int = 512
    precision: str = "float32"
    device: str = "auto"
    # Images read per batch from a shard, by loader_workers threads (-1: none on the CPU, half the
    # cores up to 8 on a GPU). The engine computes in its own blocks of sketch_block_rows rows
    # (0: sized from the model on the CPU, from free memory on a GPU); neither changes the rows on the CPU.
    batch_size: int = 512
    loader_workers: int = -1
    sketch_block_rows: int = 0
    pretrain_epochs: int = 40
    # The second moment the selection matches: "validation" (the validation split sketched like the pool,
    # validation_sketch: the data the model is evaluated on; measured on benchmarks/scenarios.py) or
    # "pool" (the pool's own, the paper's default). Methods without a reference option ignore it.
    reference: str = "validation"
    uniform_repeats: int = 5
    min_moment_ratio: float = 0.1
    # Set aside samples that stick out of the pool in the sketch (core.outliers) before selecting, and
    # images whose spatial-structure score lies more than structure_threshold robust standard
    # deviations below the pool's median (noise, salt-and-pepper, blank frames; 0 turns that check off).
    outlier_guard: bool = False
    # "global" joins every shard's sketch and selects once; "composable" has each shard propose
    # ceil(composable_c * budget) candidates against the pool's moment (shard_candidates) and selects
    # from their union (skmm only, no outlier guard); "auto" is composable once the joined sketch would
    # exceed core.defaults.COMPOSABLE_ABOVE_BYTES (2 GiB), global below. A shard's candidates are reused
    # while the pool's moment moved by at most composable_tolerance (core.composable.moment_drift).
    selection_mode: str = "auto"
    composable_c: float = 4.0
    composable_tolerance: float = 0.05
    structure_threshold: float = 4.0
    # Data contract (raw_shard): pixel values of a pool shard stay within +-max_abs_pixel (the model's
    # inputs: [0, 1] or normalised images; 8-bit values are refused); 0 turns the bound off.
    max_abs_pixel: float = 20.0
    # The model: "small_cnn" (the embedded scenario, pretrained on digits 0-4), or a torchvision
    # backbone ("resnet18", "resnet50", "vit_b_16") with weights from a local file or "hub" (the torch
    # hub cache; never downloaded) or "" (random init, for smoke tests only).
    backbone: str = "small_cnn"
    backbone_weights: str = "hub"
    num_classes: int = 0  # 0: the number of classes in the validation split (one output for regression targets)
    image_size: int = 224
    # Evaluation: "ft1" (logistic head on frozen features; a ridge head for regression), "ft2" (last
    # block + head), or "both". The task is what the splits carry: labels (classification, accuracy and
    # macro-F1) or targets (regression, MAE).
    finetune_mode: str = "ft1"


class Workspace(dg.ConfigurableResource):
    """Where shards land and where models and sketches are written (all under ``root`` by default)."""

    root: str
    landing_dir: str = ""
    eval_dir: str = ""  # holds val.npz and test.npz; the embedded digits splits when absent

    def _root(self) -> Path:
        return _absolute(self.root, "workspace root")

    @property
    def landing(self) -> Path:
        return _absolute(self.landing_dir, "landing_dir") if self.landing_dir else self._root() / ".skmm" / "landing"

    @property
    def evaluation(self) -> Path:
        return _absolute(self.eval_dir, "eval_dir") if self.eval_dir else self._root() / ".skmm" / "eval"

    @property
    def artifacts(self) -> Path:
        return self._root() / ".skmm" / "artifacts"

    def shard_path(self, name: str) -> Path:
        return self.landing / f"{check_shard_name(name)}.npz"


class DvcVersioning(dg.ConfigurableResource):
    """Subset versions in a git + DVC repository (``data/`` + ``data.dvc``), pushed to a DVC remote."""

    repo_root: str
    remote_url: str = ""

    def store(self):
        return SubsetStore(str(_absolute(self.repo_root, "DVC repo_root")), remote_url=self.remote_url or None)


class MlflowTracking(dg.ConfigurableResource):
    """An MLflow store: a sqlite file at an absolute path by default, or a server URL."""

    tracking_uri: str
    artifact_root: str
    experiment: str = "skmm"
    ui_url: str = DEFAULT_UI_URL  # the MLflow UI the Dagster metadata links to (and shows images from)
    dagster_url: str = DEFAULT_DAGSTER_URL  # the Dagster UI an MLflow run's description links to

    def tracker(self):
        return MlflowTracker(self.tracking_uri, self.artifact_root, self.experiment)


def default_resources(root: Path | None = None, remote_url: str = "") -> dict:
    root = Path(root) if root is not None else default_project_root()
    _absolute(str(root), "project root")
    state = root / ".skmm"
    return {
        "settings": SkmmSettings(),
        "workspace": Workspace(root=str(root)),
        # A remote already configured in the repository wins; otherwise versions go to a local one.
        "dvc": DvcVersioning(repo_root=str(root), remote_url=remote_url or str(state / "dvc-remote")),
        "mlflow": MlflowTracking(
            tracking_uri=sqlite_uri(state / "mlflow" / "mlflow.db"),
            artifact_root=str(state / "mlflow" / "artifacts"),
            ui_url=os.environ.get("SKMM_MLFLOW_UI_URL") or DEFAULT_UI_URL,
            dagster_url=os.environ.get("SKMM_DAGSTER_UI_URL") or DEFAULT_DAGSTER_URL,
        ),
    }
