"""The two files of a subset version's ``data/`` and how to read them back.

``subset.csv``
    one row per selected sample: ``sample_id, shard, row, weight, rank`` (``weight`` is the
    inclusion weight, ``rank`` the selection order; ``shard``/``row`` are parsed from ids of the
    form ``<shard>/<row>`` and empty otherwise).
``manifest.json``
    everything needed to reproduce and judge the subset, including the SHA-256 of ``subset.csv``.

The store checks files with :func:`check_subset_files` before it versions them, and the catalog reads
them with :func:`read_manifest` and :func:`read_subset_table`; this module depends on neither.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

from skmm_pipeline.core.errors import SubsetVersionError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "SUBSET_COLUMNS",
    "SUBSET_FILE",
    "check_subset_files",
    "read_manifest",
    "read_subset_table",
]

SUBSET_FILE = "subset.csv"
MANIFEST_FILE = "manifest.json"
SUBSET_COLUMNS = ("sample_id", "shard", "row", "weight", "rank")
MANIFEST_FORMAT = "skmm-subset-manifest/1"


def read_manifest(content: bytes, where: str = MANIFEST_FILE) -> dict[str, Any]:
    """Parse a ``manifest.json``; a clear :class:`SubsetVersionError` when it is corrupt."""
    try:
        manifest = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SubsetVersionError(f"{where} is corrupt (not valid JSON: {exc})") from exc
    if not isinstance(manifest, dict):
        raise SubsetVersionError(
            f"{where} is corrupt (expected a JSON object, got {type(manifest).__name__})"
        )
    return manifest


def read_subset_table(content: bytes, where: str = SUBSET_FILE):
    """Parse a ``subset.csv`` into a DataFrame; a clear error when it is corrupt."""
    import pandas as pd  # here, not at the top: pandas takes ~0.4 s to import  # noqa: PLC0415

    try:
        table = pd.read_csv(
            io.BytesIO(content), dtype={"sample_id": str, "shard": str}, keep_default_na=False
        )
    except Exception as exc:
        raise SubsetVersionError(f"{where} is corrupt (unreadable CSV: {exc})") from exc
    if "sample_id" not in table.columns:
        raise SubsetVersionError(
            f"{where} is corrupt (no sample_id column; columns: {list(table.columns)})"
        )
    if (table["sample_id"] == "").any() or table["sample_id"].duplicated().any():
        raise SubsetVersionError(f"{where} is corrupt (empty or repeated sample ids)")
    for column, kind in (("row", "Int64"), ("weight", "float64"), ("rank", "Int64")):
        if column not in table.columns:
            continue
        values = table[column].mask(table[column].astype(str) == "")
        numeric = pd.to_numeric(values, errors="coerce")
        if (numeric.isna() & values.notna()).any():
            raise SubsetVersionError(f"{where} is corrupt (non-numeric values in {column})")
        table[column] = numeric.astype(kind)
    return table


def check_subset_files(files: Mapping[str, bytes]) -> None:
    """Refuse files that the browsing API could not read back (corrupt manifest or subset)."""
    manifest = table = None
    if MANIFEST_FILE in files:
        manifest = read_manifest(bytes(files[MANIFEST_FILE]), f"{MANIFEST_FILE} to be versioned")
    if SUBSET_FILE in files:
        table = read_subset_table(bytes(files[SUBSET_FILE]), f"{SUBSET_FILE} to be versioned")
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return
    declared = manifest.get("subset_file") or {}
    if SUBSET_FILE not in files:
        raise SubsetVersionError(f"{MANIFEST_FILE} describes {SUBSET_FILE}, which is missing")
    if declared.get("sha256") != hashlib.sha256(bytes(files[SUBSET_FILE])).hexdigest() or (
        declared.get("rows") != len(table)
    ):
        raise SubsetVersionError(
            f"{MANIFEST_FILE} does not match {SUBSET_FILE} (sha256 or row count differs)"
        )
