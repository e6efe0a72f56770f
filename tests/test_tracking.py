"""MlflowTracker against a real MLflow sqlite store (one migrated database for the module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skmm_pipeline.tracking.mlflow_store import (
    MlflowTracker,
    metric_key,
    project_tracking_uri,
    run_tags,
    sqlite_uri,
    version_tags,
)
from skmm_pipeline.versioning.dvc_store import SubsetVersion


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture(scope="module")
def tracker(store_dir) -> MlflowTracker:
    tracker = MlflowTracker(sqlite_uri(store_dir / "mlflow.db"), store_dir / "artifacts", experiment="tests")
    tracker.experiment_id()
    return tracker


def test_finished_run_with_tags_params_per_method_metrics_and_artifacts(tracker, store_dir):
    version = {"tag": "subset-v0007", "commit": "c0ffee", "data_md5": "abc.dir", "pushed": True}
    tags = run_tags("dagster-1", "finetune_eval", partition="shard-3", version=version)
    with tracker.run("finetune_eval subset-v0007", tags=tags) as run:
        run.log_params({"method": "skmm", "budget": 40, "long": "x" * 10_000})
        run.log_metrics({"moment_ratio": 0.5})
        keys = run.log_eval_metrics([
            {"method": "skmm", "n": 40, "test_accuracy": 0.83, "val_accuracy": 0.8},
            {"method": "uniform (x5)", "n": 40, "test_accuracy": 0.79, "note": "not a number"},
            {"method": "full pool", "n": 537, "test_accuracy": 0.97},
        ])
        run.log_artifact_bytes("accuracy.png", b"\x89PNG fake", "plots")
        run.log_json("results.json", {"rows": [1, 2]})
    assert keys == ["test_accuracy/skmm", "val_accuracy/skmm", "test_accuracy/uniform _x5_",
                    "test_accuracy/full pool"]

    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.end_time is not None
    assert {k: got.data.tags[k] for k in tags} == {
        "dagster.run_id": "dagster-1", "dagster.asset": "finetune_eval", "dagster.partition": "shard-3",
        "dvc.tag": "subset-v0007", "dvc.commit": "c0ffee", "dvc.md5": "abc.dir", "dvc.pushed": "true",
    }
    assert got.data.params["budget"] == "40" and len(got.data.params["long"]) == 6000
    history = tracker.client.get_metric_history(run.run_id, "test_accuracy/full pool")
    assert [(m.step, m.value) for m in history] == [(537, 0.97)]
    assert got.data.metrics["test_accuracy/skmm"] == 0.83
    # Artifacts land under the absolute artifact root, per experiment.
    root = store_dir / "artifacts" / "tests"
    assert (root / run.run_id / "artifacts" / "plots" / "accuracy.png").read_bytes() == b"\x89PNG fake"
    assert (root / run.run_id / "artifacts" / "results.json").is_file()


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt()])
def test_runs_end_failed_on_any_exception_and_reraise(tracker, error):
    with pytest.raises(type(error)):
        with tracker.run("doomed", tags={"dagster.run_id": "dagster-2"}) as run:
            run.log_metrics({"partial": 1.0})
            raise error
    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FAILED" and got.info.end_time is not None
    assert got.data.tags["error"].startswith(type(error).__name__)
    assert got.data.metrics["partial"] == 1.0


def test_version_runs_join_finished_runs_by_dvc_tag_and_md5(tracker):
    def log(tag, md5, metrics, fail=False):
        try:
            with tracker.run(tags={"dvc.tag": tag, "dvc.md5": md5}) as run:
                run.log_metrics(metrics)
                if fail:
                    raise RuntimeError("evaluation crashed")
        except RuntimeError:
            pass
        return run.run_id

    first = log("subset-v0101", "m1.dir", {"acc": 0.5, "loss": 2.0})
    second = log("subset-v0101", "m1.dir", {"acc": 0.6})  # a later re-evaluation wins
    log("subset-v0101", "m1.dir", {"acc": 0.0}, fail=True)  # FAILED runs are ignored
    log("subset-v0101", "other-repo.dir", {"acc": 0.9})  # same tag name, other content
    found = tracker.version_runs([("subset-v0101", "m1.dir"), ("subset-v0102", "m2.dir")])
    assert found["subset-v0101"].run_ids == [first, second]
    assert found["subset-v0101"].metrics == {"acc": 0.6, "loss": 2.0}
    assert found["subset-v0102"].run_ids == [] and found["subset-v0102"].metrics == {}


def test_other_trackers_on_the_same_store_share_the_experiment(tracker, store_dir):
    again = MlflowTracker(tracker.tracking_uri, store_dir / "artifacts", experiment="tests")
    assert again.experiment_id() == tracker.experiment_id()
    # Without an artifact root, a sqlite store keeps artifacts next to the database.
    default = MlflowTracker(tracker.tracking_uri, experiment="tests-default-root")
    assert default.artifact_root == store_dir / "artifacts"
    exp = tracker.client.get_experiment(default.experiment_id())
    assert exp.artifact_location == (store_dir / "artifacts" / "tests-default-root").as_uri()


def test_bad_store_configuration_is_refused_and_reading_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="absolute sqlite path"):
        MlflowTracker("sqlite:///relative/mlflow.db", "/abs/artifacts")
    with pytest.raises(ValueError, match="not supported"):
        MlflowTracker("file:///tmp/mlruns", "/abs/artifacts")
    with pytest.raises(ValueError, match="not supported"):
        MlflowTracker("mlruns", "/abs/artifacts")
    with pytest.raises(ValueError, match="artifact root must be absolute"):
        MlflowTracker(sqlite_uri(tmp_path / "m.db"), "relative/artifacts")
    with pytest.raises(ValueError, match="must be absolute"):
        sqlite_uri(Path("relative.db"))
    # A server URL is accepted without contacting it; the server picks the artifact location.
    assert MlflowTracker("http://127.0.0.1:5000").artifact_root is None

    missing = MlflowTracker(sqlite_uri(tmp_path / "absent" / "mlflow.db"))
    assert missing.version_runs([("subset-v0001", "x.dir")])["subset-v0001"].run_ids == []
    assert not (tmp_path / "absent").exists()
    assert project_tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/.skmm/mlflow/mlflow.db"


def test_tag_helpers():
    version = SubsetVersion(tag="subset-v0003", commit="abc", data_md5="d.dir", created="", meta={}, pushed=False)
    assert version_tags(version) == {
        "dvc.tag": "subset-v0003", "dvc.commit": "abc", "dvc.md5": "d.dir", "dvc.pushed": "false",
    }
    assert version_tags({"tag": "subset-5a5a5a5a5a5a", "commit": ""}) == {"dvc.tag": "subset-5a5a5a5a5a5a"}
    assert run_tags(asset="subset_version") == {"dagster.asset": "subset_version"}
    with pytest.raises(ValueError, match="needs a tag"):
        version_tags({"commit": "abc"})
    assert metric_key("test accuracy", "uniform (x5)") == "test accuracy/uniform _x5_"
