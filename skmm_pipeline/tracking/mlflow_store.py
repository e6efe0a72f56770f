"""A thin layer over ``MlflowClient``: explicit run ids, absolute stores, runs always terminated.

The fluent ``mlflow.start_run`` API keeps a process-global active run, which leaks between Dagster
steps running in one process; the client API does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def sqlite_uri(db_path: Path) -> str:
    db_path = Path(db_path)
    if not db_path.is_absolute():
        raise ValueError(f"MLflow sqlite path must be absolute, got {db_path}")
    return f"sqlite:///{db_path}"


@dataclass
class TrackedRun:
    """Handle on one open MLflow run."""

    client: object
    run_id: str
    experiment_id: str

    def log_params(self, params: dict) -> None:
        for k, v in params.items():
            self.client.log_param(self.run_id, k, v)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, float(v), step=step)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact_bytes(self, name: str, data: bytes, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, name: str, obj) -> None:
        self.log_artifact_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class MlflowTracker:
    """Runs in one experiment of an MLflow store (sqlite file or server URL)."""

    def __init__(self, tracking_uri: str, artifact_root: str | Path, experiment: str = "skmm"):
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            db_path = Path(tracking_uri[len("sqlite:///") :])
            if not db_path.is_absolute():
                raise ValueError(f"MLflow tracking URI must use an absolute sqlite path, got {tracking_uri}")
            db_path.parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        if not self.artifact_root.is_absolute():
            raise ValueError(f"MLflow artifact root must be absolute, got {artifact_root}")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = (self.artifact_root / self.experiment).as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    @contextlib.contextmanager
    def run(self, run_name: str, tags: dict | None = None) -> Iterator[TrackedRun]:
        """Open a run; it ends FINISHED on success and FAILED (then re-raises) on any exception."""
        exp_id = self.experiment_id()
        info = self.client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
        handle = TrackedRun(self.client, info.info.run_id, exp_id)
        try:
            yield handle
        except BaseException:
            self.client.set_terminated(handle.run_id, status="FAILED")
            raise
        self.client.set_terminated(handle.run_id, status="FINISHED")
