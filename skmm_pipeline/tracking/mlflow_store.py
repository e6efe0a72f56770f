"""A thin layer over ``MlflowClient``: explicit run ids, absolute stores, runs always terminated.

The fluent ``mlflow.start_run`` API keeps a process-global active run, which leaks between Dagster
steps running in one process; the client API does not. MLflow itself is imported where a run is
opened or read (``import mlflow`` takes about 1.1 s, measured): loading the Dagster definitions, and
``skmm versions checkout``/``push``, do not pay for it.

Conventions shared by the pipeline and the subset-version browser:

* run tags ``dagster.run_id``, ``dagster.asset``, ``dagster.partition`` and, for runs about a
  subset version, ``dvc.tag``, ``dvc.commit``, ``dvc.md5``, ``dvc.pushed`` (see :func:`run_tags`);
* the experiment is created with tag ``mlflow.experimentKind = custom_model_development``
  (:data:`EXPERIMENT_TAGS`), which MLflow 3's UI reads to open it in its model-training view, not the
  GenAI one; where the UI's own view switch overrides the tag (3.17), the links this module makes
  (:func:`experiment_url`, :func:`run_url`) carry ``workflowType=machine_learning``;
  a run's description (``mlflow.note.content``) links the Dagster run (:func:`dagster_note`);
* per-method, per-budget metrics are logged as ``<metric>/<method>`` at ``step = n`` (see
  :meth:`TrackedRun.log_eval_metrics`), so the MLflow UI plots each metric against n and groups
  the methods of one metric in one section.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from skmm_pipeline.core.errors import ConfigError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

logger = logging.getLogger(__name__)

PROJECT_STORE = Path(".skmm") / "mlflow" / "mlflow.db"
"""Where the pipeline's default MLflow store lives, relative to the project root."""

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Experiment tags: MLflow 3's UI reads ``mlflow.experimentKind`` to choose the experiment's view."""
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui --port 5000` (as the demo prints it) serves
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"  # where `dagster dev` serves by default

_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 5000
_METRIC_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :]")


def sqlite_uri(db_path: Path) -> str:
    db_path = Path(db_path)
    if not db_path.is_absolute():
        raise ConfigError(f"MLflow sqlite path must be absolute, got {db_path}")
    return f"sqlite:///{db_path}"


def project_tracking_uri(root: str | os.PathLike[str]) -> str:
    """The sqlite URI of the project's default store (``<root>/.skmm/mlflow/mlflow.db``)."""
    return sqlite_uri(Path(root) / PROJECT_STORE)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):])


def run_tags(
    dagster_run_id: str | None = None,
    asset: str | None = None,
    partition: str | None = None,
    version: Any | None = None,
    **extra: Any,
) -> dict[str, str]:
    """The standard tags of a pipeline run; ``version`` is a subset version (see :func:`version_tags`)."""
    tags = {"dagster.run_id": dagster_run_id, "dagster.asset": asset, "dagster.partition": partition}
    tags = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    if version is not None:
        tags.update(version_tags(version))
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def version_tags(version: Any) -> dict[str, str]:
    """``dvc.*`` tags for a subset version: a ``SubsetVersion`` or a mapping with ``tag``,
    ``commit``, ``data_md5`` and optionally ``pushed`` (the ``subset_version`` asset's record)."""
    get = version.get if isinstance(version, Mapping) else (lambda k, d=None: getattr(version, k, d))
    tag = get("tag")
    if not tag:
        raise ValueError(f"a subset version needs a tag, got {version!r}")
    tags = {"dvc.tag": str(tag)}
    if get("commit"):
        tags["dvc.commit"] = str(get("commit"))
    if get("data_md5"):
        tags["dvc.md5"] = str(get("data_md5"))
    if get("pushed") is not None:
        tags["dvc.pushed"] = str(bool(get("pushed"))).lower()
    return tags


def dagster_note(dagster_run_id: str, dagster_url: str, asset: str | None = None) -> str:
    """A run description (Markdown, the ``mlflow.note.content`` tag) linking the Dagster run."""
    what = f" materializing `{asset}`" if asset else ""
    return f"Dagster run{what}: [{dagster_run_id}]({dagster_url.rstrip('/')}/runs/{dagster_run_id})"


# MLflow 3.17's UI shows a "GenAI | Model training" switch whose choice (browser storage, GenAI by
# default) wins over the experiment's tag; a ``workflowType`` URL parameter wins over both.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment, in its model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run, in the model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def artifact_url(ui_url: str, run_id: str, path: str) -> str:
    """Where the MLflow UI server serves one artifact file of a run (e.g. an image to show elsewhere)."""
    return f"{ui_url.rstrip('/')}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def metric_key(metric: str, method: str) -> str:
    """``<metric>/<method>`` with characters MLflow refuses in metric names replaced by ``_``."""
    return f"{_METRIC_NAME_UNSAFE.sub('_', metric)}/{_METRIC_NAME_UNSAFE.sub('_', method)}"


@dataclass
class TrackedRun:
    """Handle on one open MLflow run."""

    client: Any
    run_id: str
    experiment_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        self._log_batch(params=[Param(str(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()])

    def log_curves(self, curves: Mapping[str, Iterable[tuple[int, float]]]) -> None:
        """Metrics with a history: each key's ``(step, value)`` points (e.g. validation accuracy per epoch),
        drawn by the MLflow UI as a curve."""
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(str(k), float(v), now, int(step)) for k, points in curves.items()
                                 for step, v in points])

    def log_eval_metrics(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """Per-method, per-n metrics: each row has ``method``, ``n`` and numeric fields.

        ``{"method": "skmm", "n": 40, "test_accuracy": 0.83}`` is logged as metric
        ``test_accuracy/skmm`` at step 40. Returns the metric keys logged.
        """
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        batch = []
        for row in rows:
            if "method" not in row or "n" not in row:
                raise ValueError(f"each evaluation row needs 'method' and 'n', got {dict(row)}")
            step = int(row["n"])
            for name, value in row.items():
                if name in ("method", "n") or isinstance(value, bool):
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                batch.append(Metric(metric_key(name, str(row["method"])), number, now, step))
        self._log_batch(metrics=batch)
        return [m.key for m in batch]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag  # noqa: PLC0415

        self._log_batch(tags=[RunTag(str(k), str(v)[:_MAX_TAG_CHARS]) for k, v in tags.items()])

    def log_artifact_bytes(self, name: str, data: bytes, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifact_file(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_json(self, name: str, obj: Any) -> None:
        self.log_artifact_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def _log_batch(self, metrics: list = (), params: list = (), tags: list = ()) -> None:
        # MLflow caps one batch at 1000 metrics, 100 params and 100 tags.
        for kind, items, size in (("metrics", metrics, 1000), ("params", params, 100), ("tags", tags, 100)):
            for start in range(0, len(items), size):
                self.client.log_batch(self.run_id, **{kind: list(items[start:start + size])})


@dataclass
class VersionRuns:
    """The FINISHED MLflow runs about one subset version, and their metrics merged (later runs win)."""

    run_ids: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class MlflowTracker:
    """Runs in one experiment of an MLflow store (sqlite file or server URL).

    ``artifact_root`` must be absolute; by default it is ``artifacts/`` next to a sqlite database,
    and the server's own default for a tracking server.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | os.PathLike[str] | None = None,
        experiment: str = "skmm",
    ):
        db_path = sqlite_path(tracking_uri)
        if db_path is not None and not db_path.is_absolute():
            raise ValueError(
                f"MLflow tracking URI must use an absolute sqlite path (sqlite:////abs/mlflow.db), "
                f"got {tracking_uri}"
            )
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            raise ValueError(
                f"MLflow tracking URI {tracking_uri!r} is not supported: use an absolute sqlite "
                "URI (sqlite:////abs/path/mlflow.db) or a tracking server URL"
            )
        if artifact_root in (None, ""):
            self.artifact_root = db_path.parent / "artifacts" if db_path is not None else None
        else:
            self.artifact_root = Path(artifact_root)
            if not self.artifact_root.is_absolute():
                raise ValueError(f"MLflow artifact root must be absolute, got {artifact_root}")
        if not experiment:
            raise ValueError("MLflow experiment name must not be empty")
        self.tracking_uri = tracking_uri
        self.db_path = db_path
        self.experiment = experiment
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient  # noqa: PLC0415

            if self.db_path is not None:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            for key, value in EXPERIMENT_TAGS.items():
                if key not in exp.tags:  # an experiment made before the tag: the UI would open it as GenAI
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        location = (self.artifact_root / self.experiment).as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            exp = self.client.get_experiment_by_name(self.experiment)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[TrackedRun]:
        """Open a run; it ends FINISHED on success and FAILED (then re-raises) on any exception,
        including interrupts. The error is recorded in the run's ``error`` tag."""
        exp_id = self.experiment_id()
        info = self.client.create_run(
            exp_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
        )
        handle = TrackedRun(self.client, info.info.run_id, exp_id)
        try:
            yield handle
        except BaseException as exc:
            try:
                self.client.set_tag(handle.run_id, "error", f"{type(exc).__name__}: {exc}"[:_MAX_TAG_CHARS])
                self.client.set_terminated(handle.run_id, status="FAILED")
            except Exception:  # the original error matters more than a failed bookkeeping call
                logger.exception("could not mark MLflow run %s FAILED", handle.run_id)
            raise
        self.client.set_terminated(handle.run_id, status="FINISHED")

    def version_runs(self, versions: Iterable[tuple[str, str | None]]) -> dict[str, VersionRuns]:
        """FINISHED runs tagged with each subset version, keyed by DVC tag.

        ``versions`` yields ``(tag, data_md5)``; a run whose ``dvc.md5`` tag differs (another
        repository's version of the same name) is ignored. Reads only: a sqlite store that does
        not exist yet gives no runs and is not created.
        """
        wanted = dict(versions)
        found: dict[str, VersionRuns] = {tag: VersionRuns() for tag in wanted}
        if not wanted or (self.db_path is not None and not self.db_path.is_file()):
            return found
        if self.db_path is not None:
            return _sqlite_version_runs(self.db_path, wanted, found)
        from mlflow.entities import ViewType  # noqa: PLC0415

        exp_ids = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        if not exp_ids:
            return found
        token = None
        while True:
            page = self.client.search_runs(
                exp_ids,
                filter_string="tags.`dvc.tag` LIKE '%' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            for run in page:
                tag = run.data.tags.get("dvc.tag")
                md5 = run.data.tags.get("dvc.md5")
                if tag not in wanted or (md5 and wanted[tag] and md5 != wanted[tag]):
                    continue
                entry = found[tag]
                entry.run_ids.append(run.info.run_id)
                entry.metrics.update(
                    {k: v for k, v in run.data.metrics.items() if isinstance(v, float) and not math.isnan(v)}
                )
            token = page.token
            if not token:
                return found


_VERSION_RUNS_SQL = """
SELECT r.run_uuid, t.value, m.value, lm.key, lm.value
FROM runs r
JOIN experiments e ON e.experiment_id = r.experiment_id AND e.lifecycle_stage = 'active'
JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'dvc.tag'
LEFT JOIN tags m ON m.run_uuid = r.run_uuid AND m.key = 'dvc.md5'
LEFT JOIN latest_metrics lm ON lm.run_uuid = r.run_uuid
WHERE r.status = 'FINISHED' AND r.lifecycle_stage = 'active'
ORDER BY r.start_time ASC, r.run_uuid
"""


def _sqlite_version_runs(db_path: Path, wanted: Mapping[str, str | None],
                         found: dict[str, VersionRuns]) -> dict[str, VersionRuns]:
    """:meth:`MlflowTracker.version_runs` read straight from a sqlite store, read-only: the same query the
    client would run, without importing MLflow and its SQLAlchemy store (about 4 s of `skmm versions
    list` over 20 versions, measured by benchmarks/versions_list_speed.py). A store whose tables differ
    (another MLflow schema) raises :class:`sqlite3.Error`; the caller reports that as unreadable."""
    with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)) as db:
        rows = db.execute(_VERSION_RUNS_SQL).fetchall()
    for run_id, tag, md5, key, value in rows:
        if tag not in wanted or (md5 and wanted[tag] and md5 != wanted[tag]):
            continue
        entry = found[tag]
        if not entry.run_ids or entry.run_ids[-1] != run_id:
            entry.run_ids.append(run_id)
        if key is not None and value is not None and not math.isnan(float(value)):
            entry.metrics[key] = float(value)
    return found
