"""The files of a subset version and how a selection becomes one.

A version's ``data/`` holds two files:

``subset.csv``
    one row per selected sample: ``sample_id, shard, row, weight, rank`` (``weight`` is the
    inclusion weight, ``rank`` the selection order; ``shard``/``row`` are parsed from ids of the
    form ``<shard>/<row>`` and empty otherwise).
``manifest.json``
    everything needed to reproduce and judge the subset: method, n, budget, seed, ``c_S``, the
    selection metrics, the sketch and model identities, every shard with its data version, the
    Dagster and MLflow run ids, and the SHA-256 of ``subset.csv``.

:func:`record_subset_version` writes both as a DVC version inside an MLflow run that ends FINISHED,
or FAILED when versioning fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.tracking.mlflow_store import run_tags, version_tags
from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersion
from skmm_pipeline.versioning.subset_files import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SUBSET_COLUMNS,
    SUBSET_FILE,
    check_subset_files,
    read_manifest,
    read_subset_table,
)

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "SUBSET_COLUMNS",
    "SUBSET_FILE",
    "RecordedSubset",
    "SubsetManifest",
    "check_subset_files",
    "read_manifest",
    "read_subset_table",
    "record_subset_version",
]

_SHARD_ROW = re.compile(r"^(?P<shard>.+)/(?P<row>\d+)$")


@dataclass(frozen=True)
class SubsetManifest:
    """A selected subset and its provenance, ready to be written as ``data/``.

    ``shards`` maps every shard of the pool to its data version (e.g. the shard file's SHA-256).
    ``metrics`` holds the selection's numeric diagnostics; ``c_S`` is the moment-matching constant
    reached: given explicitly, or ``1 / moment_ratio`` (the smallest ``c`` such that the subset's
    sketched second moment covers ``1/c`` of the pool's along every principal direction).
    """

    sample_ids: tuple[str, ...]
    weights: tuple[float, ...]
    method: str
    seed: int
    shards: Mapping[str, str]
    sketch_identity: Mapping[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    budget: int | None = None
    pool_size: int | None = None
    c_S: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    dagster_run_id: str | None = None
    mlflow_run_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = tuple(self.sample_ids)
        weights = tuple(float(w) for w in self.weights)
        if not ids:
            raise SubsetVersionError("a subset needs at least one sample id")
        bad = [i for i in ids if not isinstance(i, str) or not i or any(c in i for c in "\r\n")]
        if bad:
            raise SubsetVersionError(f"sample ids must be non-empty one-line strings, got {bad[:3]!r}")
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise SubsetVersionError(f"sample ids must be unique, repeated: {dupes[:5]}")
        if len(weights) != len(ids):
            raise SubsetVersionError(
                f"expected one weight per sample id ({len(ids)}), got {len(weights)}"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise SubsetVersionError("inclusion weights must be finite and non-negative")
        if not isinstance(self.method, str) or not self.method:
            raise SubsetVersionError(f"method must be a non-empty string, got {self.method!r}")
        if not isinstance(self.shards, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.shards.items()
        ):
            raise SubsetVersionError("shards must map shard names to data versions (strings)")
        c_s = self.c_S
        if c_s is None:
            ratio = _finite(self.metrics.get("moment_ratio", self.diagnostics.get("moment_ratio")))
            c_s = 1.0 / ratio if ratio is not None and ratio > 0 else None
        object.__setattr__(self, "sample_ids", ids)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "c_S", _finite(c_s))
        object.__setattr__(self, "shards", dict(sorted(self.shards.items())))
        if self.model_id is None and isinstance(self.sketch_identity.get("model_id"), str):
            object.__setattr__(self, "model_id", self.sketch_identity["model_id"])

    @classmethod
    def from_selection(
        cls,
        selection: Mapping[str, Any],
        *,
        dagster_run_id: str | None = None,
        mlflow_run_id: str | None = None,
    ) -> SubsetManifest:
        """From the ``skmm_selection`` asset's record (sample_ids, weights, method, budget, seed,
        pool_size, sketch_identity, shards, diagnostics); other keys are kept under ``extra``."""
        known = {"sample_ids", "weights", "method", "budget", "seed", "pool_size",
                 "sketch_identity", "shards", "diagnostics", "model_id", "c_S"}
        missing = [k for k in ("sample_ids", "weights", "method", "seed", "shards")
                   if k not in selection]
        if missing:
            raise SubsetVersionError(f"the selection record lacks {missing}")
        diagnostics = dict(selection.get("diagnostics") or {})
        return cls(
            sample_ids=tuple(selection["sample_ids"]),
            weights=tuple(selection["weights"]),
            method=selection["method"],
            seed=int(selection["seed"]),
            shards=dict(selection["shards"]),
            sketch_identity=dict(selection.get("sketch_identity") or {}),
            model_id=selection.get("model_id"),
            budget=selection.get("budget"),
            pool_size=selection.get("pool_size"),
            c_S=selection.get("c_S", diagnostics.get("c_S")),
            metrics={k: float(v) for k, v in diagnostics.items() if _finite(v) is not None},
            diagnostics=diagnostics,
            dagster_run_id=dagster_run_id,
            mlflow_run_id=mlflow_run_id,
            extra={k: v for k, v in selection.items() if k not in known},
        )

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    def with_mlflow_run_id(self, run_id: str) -> SubsetManifest:
        return dataclasses.replace(self, mlflow_run_id=run_id)

    def subset_csv(self) -> bytes:
        lines = [",".join(SUBSET_COLUMNS)]
        for rank, (sid, weight) in enumerate(zip(self.sample_ids, self.weights)):
            match = _SHARD_ROW.match(sid)
            shard, row = (match["shard"], match["row"]) if match else ("", "")
            lines.append(",".join([_csv_field(sid), _csv_field(shard), row, repr(weight), str(rank)]))
        return ("\n".join(lines) + "\n").encode()

    def manifest(self, subset_csv: bytes | None = None) -> dict[str, Any]:
        subset_csv = self.subset_csv() if subset_csv is None else subset_csv
        return _jsonable({
            **self._summary(),
            "metrics": dict(self.metrics),
            "diagnostics": dict(self.diagnostics),
            "sketch_identity": dict(self.sketch_identity),
            "shards": dict(self.shards),
            "subset_file": {
                "name": SUBSET_FILE,
                "rows": self.n,
                "sha256": hashlib.sha256(subset_csv).hexdigest(),
            },
            "extra": dict(self.extra),
        })

    def files(self) -> dict[str, bytes]:
        """``{"subset.csv": ..., "manifest.json": ...}`` for :meth:`SubsetStore.write_version`."""
        csv = self.subset_csv()
        manifest = json.dumps(self.manifest(csv), indent=2, sort_keys=True, allow_nan=False)
        return {SUBSET_FILE: csv, MANIFEST_FILE: (manifest + "\n").encode()}

    def tag_meta(self) -> dict[str, Any]:
        """The small summary stored in the version's tag (what ``versions list`` shows)."""
        return _jsonable({**self._summary(), "shards": sorted(self.shards)})

    def _summary(self) -> dict[str, Any]:
        """What the manifest and the tag both record about the selection and its runs."""
        return {
            "format": MANIFEST_FORMAT,
            "method": self.method,
            "n": self.n,
            "budget": self.budget if self.budget is not None else self.n,
            "seed": self.seed,
            "pool_size": self.pool_size,
            "c_S": self.c_S,
            "model_id": self.model_id,
            "dagster_run_id": self.dagster_run_id,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def params(self) -> dict[str, Any]:
        """Flat MLflow params describing the selection."""
        params = {
            "method": self.method, "n": self.n, "seed": self.seed, "pool_size": self.pool_size,
            "budget": self.budget if self.budget is not None else self.n,
            "model_id": self.model_id, "n_shards": len(self.shards),
        }
        params.update({f"sketch.{k}": v for k, v in self.sketch_identity.items()
                       if isinstance(v, (str, int, float, bool))})
        return {k: v for k, v in params.items() if v is not None}


@dataclass(frozen=True)
class RecordedSubset:
    """What :func:`record_subset_version` wrote: the DVC version and its MLflow run."""

    version: SubsetVersion
    manifest: SubsetManifest
    mlflow_run_id: str | None


def record_subset_version(
    store: SubsetStore,
    manifest: SubsetManifest,
    tracker: Any | None = None,
    *,
    asset: str = "subset_version",
    partition: str | None = None,
    run_name: str | None = None,
) -> RecordedSubset:
    """Write ``manifest`` as a new DVC version, inside an MLflow run when ``tracker`` is given.

    The run (tagged with the Dagster run id, asset, partition and, once written, the DVC tag,
    commit and md5) gets the selection params, the selection metrics and ``c_S``, and the two
    files as artifacts; its id is recorded in the manifest. It ends FINISHED, or FAILED when
    versioning fails (the error is re-raised; the previous version is left intact).
    """
    if tracker is None:
        version = store.write_version(manifest.files(), manifest.tag_meta())
        return RecordedSubset(version, manifest, None)
    tags = run_tags(dagster_run_id=manifest.dagster_run_id, asset=asset, partition=partition)
    name = run_name or f"{asset} {manifest.method} n={manifest.n}"
    with tracker.run(name, tags=tags) as run:
        manifest = manifest.with_mlflow_run_id(run.run_id)
        files = manifest.files()
        run.log_params(manifest.params())
        metrics = dict(manifest.metrics)
        if manifest.c_S is not None:
            metrics["c_S"] = manifest.c_S
        run.log_metrics(metrics)
        for name_, content in files.items():
            run.log_artifact_bytes(name_, content, "subset")
        version = store.write_version(files, manifest.tag_meta())
        kill_point("version_mlflow")
        run.set_tags(version_tags(version))
        if version.push_error:
            run.set_tags({"dvc.push_error": version.push_error})
    return RecordedSubset(version, manifest, run.run_id)


def _csv_field(value: str) -> str:
    if any(c in value for c in ',"'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _finite(value: Any) -> float | None:
    """``value`` as a finite float if it is a number (numpy included), else None."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars become numbers, non-finite floats None, the rest str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Sequence):
        return [_jsonable(v) for v in obj]
    return str(obj)
