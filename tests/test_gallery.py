"""What people look at: the subset image grid, shard thumbnails, the result and history plots, and the
CLI's `versions list --plot` / `versions show --grid` on a real git + DVC repository."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.digits import TARGET_NAMES, write_digits_shards
from skmm_pipeline.data.shards import ShardError, shard_class_names, write_shard
from skmm_pipeline.evaluation import accuracy_plot, class_names, history_plot, shard_grid, subset_grid
from skmm_pipeline.evaluation._gallery import load_samples
from skmm_pipeline.tracking.mlflow_store import project_tracking_uri
from skmm_pipeline.versioning.catalog import SubsetCatalog
from skmm_pipeline.versioning.dvc_store import SubsetStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from versions_list_speed import build_repo  # noqa: E402


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(io.BytesIO(png))
    return image.shape[1], image.shape[0]


@pytest.fixture
def digits(tmp_path) -> dict[str, Path]:
    names = write_digits_shards(tmp_path / "landing", 3)
    return {name: tmp_path / "landing" / f"{name}.npz" for name in names}


def test_digits_shards_carry_the_task_class_names(digits):
    assert shard_class_names(next(iter(digits.values()))) == TARGET_NAMES == ("5", "6", "7", "8", "9")
    assert class_names(digits) == dict(enumerate(TARGET_NAMES))


def test_class_names_need_labels_and_cover_them(tmp_path):
    images = np.zeros((3, 1, 4, 4), np.float32)
    with pytest.raises(ShardError, match="need labels"):
        write_shard(tmp_path / "a.npz", images, classes=["x"])
    with pytest.raises(ShardError, match="has no name"):
        write_shard(tmp_path / "b.npz", images, np.array([0, 1, 2]), classes=["x", "y"])
    write_shard(tmp_path / "c.npz", images, np.array([0, 1, 0]))
    assert shard_class_names(tmp_path / "c.npz") is None


def test_samples_load_in_the_order_asked(digits):
    ids = ["digits-002/5", "digits-000/7", "digits-002/1"]
    images, labels, shards = load_samples(ids, digits)
    assert shards == ["digits-002", "digits-000", "digits-002"]
    z = np.load(digits["digits-002"])
    assert np.array_equal(images[0], z["images"][5]) and labels[2] == z["labels"][1]
    with pytest.raises(DataError, match="not <shard>/<row>"):
        load_samples(["nope/1"], digits)
    with pytest.raises(DataError, match="row 9999"):
        load_samples(["digits-000/9999"], digits)


def test_subset_grid_grows_with_classes_and_tiles(digits):
    few = png_size(subset_grid([f"digits-000/{i}" for i in range(3)], digits))
    many = png_size(subset_grid([f"digits-00{k}/{i}" for k in range(3) for i in range(20)], digits))
    assert many[0] > few[0] and many[1] > few[1]


def test_shard_thumbnails_mark_rows_set_aside(digits):
    path = digits["digits-000"]
    rows = len(np.load(path)["labels"])
    marked = np.zeros(rows, bool)
    marked[[4, 9]] = True
    assert png_size(shard_grid(path, marked=marked))[0] > 500
    with pytest.raises(DataError, match="marked rows"):
        shard_grid(path, marked=marked[:-1])


def test_result_plots_render():
    rows = [{"finetune": "FT-1", "method": "skmm", "n": 10, "test_accuracy": 0.81, "sem": 0.0},
            {"finetune": "FT-1", "method": "uniform (x5)", "n": 10, "test_accuracy": 0.77, "sem": 0.014},
            {"finetune": "FT-1", "method": "full pool", "n": 537, "test_accuracy": 0.94, "sem": 0.0}]
    assert png_size(accuracy_plot(rows))[0] >= 450
    history = [{"tag": "subset-v0001", "method": "skmm", "n": 10, "pool_size": 537, "selected": 0.8,
                "uniform": 0.78, "uniform_sem": 0.01},
               {"tag": "subset-v0002", "method": "skmm", "n": 12, "pool_size": 600, "selected": None,
                "uniform": None, "uniform_sem": None}]
    assert png_size(history_plot(history))[0] >= 600


def test_cli_history_plot_and_subset_grid(tmp_path):
    repo = tmp_path / "repo"
    build_repo(repo, 2)
    landing = repo / ".skmm" / "landing"
    rng = np.random.default_rng(0)
    for name in ("s0", "s1", "s2"):
        write_shard(landing / f"{name}.npz", rng.random((12, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 12))

    def skmm(*args):
        proc = subprocess.run([sys.executable, "-m", "skmm_pipeline.cli", "versions", *args], cwd=repo,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    skmm("list", "--plot", str(tmp_path / "history.png"))
    assert png_size((tmp_path / "history.png").read_bytes())[0] >= 600
    out = skmm("show", "subset-v0002", "--grid", str(tmp_path / "grid.png"))
    assert "subset grid written" in out.stderr and png_size((tmp_path / "grid.png").read_bytes())[0] > 300
    catalog = SubsetCatalog(SubsetStore(repo), tracking_uri=project_tracking_uri(repo))
    rows = catalog.history()
    assert [r["tag"] for r in rows] == ["subset-v0001", "subset-v0002"]
    assert rows[1]["selected"] == pytest.approx(0.802) and rows[1]["uniform"] == pytest.approx(0.78)
    assert rows[1]["pool_size"] == 510 and rows[1]["n"] == 11
