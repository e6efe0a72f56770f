"""Subset versions with DVC: write (``SubsetStore``, ``record_subset_version``), browse (``SubsetCatalog``).

Names are imported on first use: importing DVC takes a moment.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SubsetStore": "dvc_store",
    "SubsetVersion": "dvc_store",
    "SubsetVersionError": "dvc_store",
    "SubsetManifest": "subsets",
    "RecordedSubset": "subsets",
    "record_subset_version": "subsets",
    "SubsetCatalog": "catalog",
    "VersionDetails": "catalog",
    "VersionDiff": "catalog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
