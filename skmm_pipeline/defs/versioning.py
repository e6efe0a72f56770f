"""Versioning: ``subset_version`` writes the selected subset under data/, adds it to DVC, tags and pushes
it; its check confirms the remote holds the data."""

from pathlib import Path

import dagster as dg
from dvc.repo import Repo

from skmm_pipeline.defs.resources import DvcVersioning, MlflowTracking
from skmm_pipeline.versioning.subsets import SubsetManifest, record_subset_version


@dg.asset(
    group_name="version",
    code_version="1",
    pool="dvc",
    kinds={"dvc", "mlflow"},
    description="The selected subset written under data/, added to DVC, tagged on the subset-history ref and pushed.",
)
def subset_version(
    context: dg.AssetExecutionContext, skmm_selection: dict, dvc: DvcVersioning, mlflow: MlflowTracking
) -> dg.Output[dict]:
    manifest = SubsetManifest.from_selection(skmm_selection, dagster_run_id=context.run_id)
    recorded = record_subset_version(dvc.store(), manifest, mlflow.tracker(), asset="subset_version")
    version = recorded.version
    record = {
        "tag": version.tag,
        "commit": version.commit,
        "data_md5": version.data_md5,
        "pushed": version.pushed,
        "mlflow_run_id": recorded.mlflow_run_id,
    }
    meta = {
        "tag": version.tag,
        "commit": version.commit,
        "data_md5": version.data_md5,
        "pushed": version.pushed,
        "mlflow_run_id": recorded.mlflow_run_id or "",
        "repo": dg.MetadataValue.path(dvc.repo_root),
    }
    if version.push_error:
        meta["push_error"] = version.push_error
    return dg.Output(record, data_version=dg.DataVersion(version.data_md5), metadata=meta)


def _missing_in_remote(repo_root: str) -> list[str]:
    """Outputs of the work tree's ``data.dvc`` whose data the default DVC remote lacks."""
    with Repo(repo_root) as repo:
        status = repo.status(targets=[str(Path(repo_root) / "data.dvc")], cloud=True)
    return sorted(f"{path}: {state}" for path, state in status.items())


@dg.asset_check(asset=subset_version, description="The version's data is present in the DVC remote.")
def dvc_remote_in_sync(subset_version: dict, dvc: DvcVersioning) -> dg.AssetCheckResult:
    missing = _missing_in_remote(dvc.repo_root)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"tag": subset_version["tag"], "missing_in_remote": dg.MetadataValue.json(missing[:20])},
    )
