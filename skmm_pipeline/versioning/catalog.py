"""Browse subset versions as pandas DataFrames: list, show, diff, check out.

Versions come from :class:`SubsetStore` (git tags or, without git, content-hash records); the
subset and manifest of any version are read without a checkout. Evaluation metrics are not stored
in the version (they are computed after it is written): they are joined from the MLflow runs
tagged ``dvc.tag``/``dvc.md5`` with the version when a tracking store is given, so a metric logged
later appears without re-tagging anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skmm_pipeline.core.errors import MetricsUnavailable
from skmm_pipeline.tracking.mlflow_store import (
    PROJECT_STORE,
    MlflowTracker,
    metric_key,
    project_tracking_uri,
)
from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersion
from skmm_pipeline.versioning.subset_files import (
    MANIFEST_FILE,
    SUBSET_FILE,
    read_manifest,
    read_subset_table,
)

__all__ = [
    "MetricsUnavailable", "SubsetCatalog", "VersionDetails", "VersionDiff", "default_tracking_uri",
]

LIST_COLUMNS = ("tag", "date", "method", "n", "seed", "c_S", "shards", "pushed",
                "commit", "data_md5", "dagster_run_id", "mlflow_run_id")
_COMPARED_META = ("method", "n", "budget", "seed", "pool_size", "c_S", "model_id")


def default_tracking_uri(repo_root: str | os.PathLike[str]) -> str | None:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's sqlite store if it exists, else None."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return project_tracking_uri(repo_root) if (Path(repo_root) / PROJECT_STORE).is_file() else None


@dataclass(frozen=True)
class VersionDetails:
    """One version: its record, manifest, subset table and metrics (metric, value, source)."""

    version: SubsetVersion
    manifest: dict
    subset: Any  # pandas.DataFrame
    metrics: Any  # pandas.DataFrame
    mlflow_run_ids: list[str]


@dataclass(frozen=True)
class VersionDiff:
    """How version ``b`` differs from version ``a``.

    ``added``/``removed`` are the rows of ``b``/``a`` whose sample ids the other lacks; ``metrics``
    has one row per metric with its value in ``a`` and ``b`` (columns ``a``, ``b``) and
    ``delta = b - a`` (NaN where a version lacks the metric); ``changes``
    maps each differing summary field (method, n, seed, shards, ...) to ``(a, b)``.
    """

    a: str
    b: str
    added: Any  # pandas.DataFrame
    removed: Any  # pandas.DataFrame
    overlap: int
    n_a: int
    n_b: int
    metrics: Any  # pandas.DataFrame
    changes: dict

    @property
    def jaccard(self) -> float:
        union = self.n_a + self.n_b - self.overlap
        return self.overlap / union if union else 1.0


class SubsetCatalog:
    """Read-mostly view of the subset versions of one repository.

    Parameters
    ----------
    store:
        A :class:`SubsetStore`, or the absolute path of the repository.
    tracking_uri:
        MLflow store to join evaluation metrics from (None: none; ``"auto"``: see
        :func:`default_tracking_uri`).
    key_metric:
        The metric ``versions()`` shows: ``"<metric>"`` means ``<metric>/<method of the version>``
        (e.g. ``test_accuracy/skmm``); a name with ``/`` is taken as is.
    """

    def __init__(
        self,
        store: SubsetStore | str | os.PathLike[str],
        tracking_uri: str | None = None,
        key_metric: str = "test_accuracy",
    ) -> None:
        self.store = store if isinstance(store, SubsetStore) else SubsetStore(Path(store))
        if tracking_uri == "auto":
            tracking_uri = default_tracking_uri(self.store.repo_root)
        self.tracking_uri = tracking_uri
        self.key_metric = key_metric
        self._tracker = None

    # ------------------------------------------------------------------ listing

    def versions(self) -> Any:
        """One row per version, oldest first: tag, date, method, n, seed, c_S, the key metric,
        shards (comma-separated), pushed, commit, data_md5, Dagster and MLflow run ids."""
        import pandas as pd  # here, not at the top: pandas takes ~0.4 s to import  # noqa: PLC0415

        versions = self.store.list_versions()
        runs = self._runs(versions)
        rows = []
        for v in versions:
            meta = v.meta
            shards = meta.get("shards") or []
            if isinstance(shards, dict):
                shards = sorted(shards)
            key = self._key_metric_name(meta.get("method"))
            rows.append({
                "tag": v.tag,
                "date": pd.Timestamp(v.created) if v.created else pd.NaT,
                "method": meta.get("method"),
                "n": meta.get("n"),
                "seed": meta.get("seed"),
                "c_S": meta.get("c_S"),
                self.key_metric: runs[v.tag].metrics.get(key, math.nan) if v.tag in runs else math.nan,
                "shards": ",".join(map(str, shards)),
                "pushed": v.pushed,
                "commit": v.commit,
                "data_md5": v.data_md5,
                "dagster_run_id": meta.get("dagster_run_id"),
                "mlflow_run_id": meta.get("mlflow_run_id"),
            })
        columns = list(LIST_COLUMNS)
        columns.insert(columns.index("shards"), self.key_metric)
        table = pd.DataFrame(rows, columns=columns)
        table["n"] = table["n"].astype("Int64")
        table["seed"] = table["seed"].astype("Int64")
        table[self.key_metric] = table[self.key_metric].astype(float)
        table["c_S"] = pd.to_numeric(table["c_S"], errors="coerce")
        return table

    def history(self) -> list[dict]:
        """Per version, oldest first: ``tag``, ``method``, ``n``, ``pool_size``, ``selected`` (the key
        metric of the selection), ``uniform`` and ``uniform_sem`` (of the uniform subsets of its size, as
        ``finetune_eval`` logs them); ``None`` where a version has no such run."""
        versions = self.store.list_versions()
        runs = self._runs(versions)
        base = self.key_metric.split("/")[0]
        out = []
        for v in versions:
            metrics = runs[v.tag].metrics if v.tag in runs else {}
            out.append({
                "tag": v.tag, "method": v.meta.get("method"), "n": v.meta.get("n"),
                "pool_size": v.meta.get("pool_size"),
                "selected": metrics.get(self._key_metric_name(v.meta.get("method"))),
                "uniform": metrics.get(metric_key(base, "uniform")),
                "uniform_sem": metrics.get(metric_key(f"{base}_sem", "uniform")),
            })
        return out

    # ------------------------------------------------------------------ one version

    def subset(self, tag: str) -> Any:
        """The version's ``subset.csv`` as a DataFrame (sample_id, shard, row, weight, rank)."""
        return read_subset_table(self._read(tag, SUBSET_FILE), f"{SUBSET_FILE} of {tag}")

    def manifest(self, tag: str) -> dict:
        """The version's ``manifest.json``."""
        return read_manifest(self._read(tag, MANIFEST_FILE), f"{MANIFEST_FILE} of {tag}")

    def metrics(self, tag: str) -> Any:
        """metric, value, source: the selection metrics of the manifest (source ``manifest``)
        and the metrics of MLflow runs tagged with the version (source ``mlflow``)."""
        return self._metrics(self.store.get(tag), self.manifest(tag))[0]

    def show(self, tag: str) -> VersionDetails:
        version = self.store.get(tag)
        manifest = self.manifest(tag)
        metrics, run_ids = self._metrics(version, manifest)
        return VersionDetails(version, manifest, self.subset(tag), metrics, run_ids)

    def diff(self, a: str, b: str) -> VersionDiff:
        """Sample ids added and removed from ``a`` to ``b``, their overlap and metric deltas."""
        import pandas as pd  # here, not at the top: pandas takes ~0.4 s to import  # noqa: PLC0415

        va, vb = self.store.get(a), self.store.get(b)
        sa, sb = self.subset(a), self.subset(b)
        ma, mb = self.manifest(a), self.manifest(b)
        ids_a, ids_b = set(sa["sample_id"]), set(sb["sample_id"])
        added = sb[~sb["sample_id"].isin(ids_a)].reset_index(drop=True)
        removed = sa[~sa["sample_id"].isin(ids_b)].reset_index(drop=True)
        runs = self._runs([va, vb])
        metrics_a = self._metric_values(ma, runs.get(a))
        metrics_b = self._metric_values(mb, runs.get(b))
        names = sorted(set(metrics_a) | set(metrics_b))
        table = pd.DataFrame(
            {
                "metric": names,
                "a": [float(metrics_a.get(k, math.nan)) for k in names],
                "b": [float(metrics_b.get(k, math.nan)) for k in names],
            },
            columns=["metric", "a", "b"],
        )
        table["delta"] = table["b"] - table["a"]
        changes = {}
        for key in _COMPARED_META:
            if ma.get(key) != mb.get(key):
                changes[key] = (ma.get(key), mb.get(key))
        shards_a, shards_b = ma.get("shards") or {}, mb.get("shards") or {}
        if shards_a != shards_b:
            changes["shards"] = (shards_a, shards_b)
        return VersionDiff(
            a=a, b=b, added=added, removed=removed, overlap=len(ids_a & ids_b),
            n_a=len(ids_a), n_b=len(ids_b), metrics=table, changes=changes,
        )

    def checkout(self, tag: str, force: bool = False) -> SubsetVersion:
        """Restore ``data/`` (and ``data.dvc``) to version ``tag``; see :meth:`SubsetStore.checkout`."""
        return self.store.checkout(tag, force=force)

    # ------------------------------------------------------------------ helpers

    def _read(self, tag: str, name: str) -> bytes:
        return self.store.read_file(tag, name)

    def _key_metric_name(self, method: Any) -> str:
        if "/" in self.key_metric:
            return self.key_metric
        return metric_key(self.key_metric, str(method))

    def _tracker_or_none(self):
        if self.tracking_uri is None:
            return None
        if self._tracker is None:
            try:
                self._tracker = MlflowTracker(self.tracking_uri)
            except ValueError as exc:
                raise MetricsUnavailable(f"cannot read MLflow store: {exc}") from exc
        return self._tracker

    def _runs(self, versions: list[SubsetVersion]) -> dict:
        tracker = self._tracker_or_none()
        if tracker is None or not versions:
            return {}
        try:
            return tracker.version_runs((v.tag, v.data_md5) for v in versions)
        except Exception as exc:
            raise MetricsUnavailable(
                f"cannot read evaluation metrics from MLflow store {self.tracking_uri}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _metric_values(manifest: dict, runs: Any) -> dict[str, float]:
        values = {}
        if manifest.get("c_S") is not None:
            values["c_S"] = manifest["c_S"]
        for key, value in (manifest.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
        if runs is not None:
            values.update(runs.metrics)
        return values

    def _metrics(self, version: SubsetVersion, manifest: dict) -> tuple[Any, list[str]]:
        import pandas as pd  # here, not at the top: pandas takes ~0.4 s to import  # noqa: PLC0415

        runs = self._runs([version]).get(version.tag)
        from_manifest = self._metric_values(manifest, None)
        from_mlflow = runs.metrics if runs is not None else {}
        rows = [{"metric": k, "value": float(v), "source": "manifest"}
                for k, v in sorted(from_manifest.items()) if k not in from_mlflow]
        rows += [{"metric": k, "value": float(v), "source": "mlflow"} for k, v in sorted(from_mlflow.items())]
        table = pd.DataFrame(rows, columns=["metric", "value", "source"])
        return table, (runs.run_ids if runs is not None else [])
