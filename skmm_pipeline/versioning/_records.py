"""Subset versions without git (degraded mode): JSON records named by content hash.

A version is identified by the content hash of ``data/``: its tag is ``<prefix><first 12 hex digits of
the DVC md5>`` and its record (metadata and the ``data.dvc`` it was written with) is a JSON file under
``.skmm-versions/records/``. Writing identical content again returns the existing version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.versioning._dvc import (
    Repo,
    fetch_objects,
    open_repo,
    quiet_dvc,
    read_verified,
)
from skmm_pipeline.versioning._history import History, SubsetVersion
from skmm_pipeline.versioning._journal import Undo

__all__ = ["NOGIT_DIR", "RecordsHistory"]

logger = logging.getLogger(__name__)

# Degraded mode (no git): version records and local state live here, at the repository root.
NOGIT_DIR = ".skmm-versions"


class RecordsHistory(History):
    """Versions as records ``.skmm-versions/records/<prefix><hash12>.json``, in the order written."""

    uses_git = False

    def __init__(self, repo_root: Path, data_dir: str, tag_prefix: str) -> None:
        super().__init__(repo_root, data_dir, tag_prefix)
        self.tag_re = re.compile(rf"^{re.escape(tag_prefix)}([0-9a-f]{{12}})$")

    # ------------------------------------------------------------------ local state

    @property
    def state_dir(self) -> Path:
        return self.repo_root / NOGIT_DIR

    def index_guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def dvc_initialized(self) -> None:
        logger.warning(
            "%s is not a git work tree: subset versions are recorded by content hash "
            "under %s/ (degraded mode)", self.repo_root, NOGIT_DIR,
        )

    # ------------------------------------------------------------------ writing

    def claim_tag(self) -> str:
        return "a new subset version"  # named by its content hash, once the data is added

    def record_version(
        self, tag: str, data_md5: str, n_files: int, meta: dict, meta_json: str, undo: Undo
    ) -> SubsetVersion | None:
        tag = undo.version_tag = self._hash_tag(data_md5)
        existing = self._read_record(tag)
        if existing is not None:
            version = self.version(tag)
            if version is not None and version.data_md5 == data_md5:
                logger.info("%s holds the same content as %s; no new version recorded",
                            self.data_dir, tag)
                return version
            raise SubsetVersionError(
                f"content-hash tag {tag} is already taken by a different version; "
                "configure another tag_prefix"
            )
        seq = max((seq for seq, _ in self._scan_records()), default=0) + 1
        record = {
            "tag": tag,
            "seq": seq,
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "data_md5": data_md5,
            "meta": meta,
            "dvc_file": self.dvc_file.read_text(),
        }
        path = self._record_path(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        undo.record_created = path
        undo.save()
        atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())
        return self.version(tag)

    def rollback_steps(self, undo: Undo) -> list[Callable[[], object]]:
        if not undo.record_created:
            return []
        return [lambda: undo.record_created.unlink(missing_ok=True)]

    # ------------------------------------------------------------------ records

    def _hash_tag(self, data_md5: str) -> str:
        return f"{self.tag_prefix}{data_md5.split('.')[0][:12]}"

    def _record_path(self, tag: str) -> Path:
        return self.repo_root / NOGIT_DIR / "records" / f"{tag}.json"

    def _read_record(self, tag: str) -> dict | None:
        path = self._record_path(tag)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not (isinstance(record, dict) and record.get("tag") == tag
                    and isinstance(record.get("meta"), dict)
                    and isinstance(record.get("dvc_file"), str)
                    and isinstance(record.get("seq"), int)):
                raise ValueError("missing or mistyped fields")
        except ValueError as exc:
            logger.warning("version record %s is corrupt (%s); it is not listed", path, exc)
            return None
        return record

    def _record_entry(self, tag: str) -> tuple[int, SubsetVersion] | None:
        """(sequence number, version) of a record, None if absent or corrupt."""
        record = self._read_record(tag)
        if record is None:
            return None
        md5 = self.md5_from_dvc_file(record["dvc_file"].encode(), str(self._record_path(tag)))
        if md5 is None or self._hash_tag(md5) != tag:
            logger.warning("version record %s does not match its tag; it is not listed",
                           self._record_path(tag))
            return None
        version = SubsetVersion(tag=tag, commit="", data_md5=md5,
                                created=str(record.get("created", "")), meta=record["meta"])
        return record["seq"], version

    def _scan_records(self) -> list[tuple[int, SubsetVersion]]:
        """Every readable record, in the order they were written."""
        folder = self.repo_root / NOGIT_DIR / "records"
        entries = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            tag = path.name[: -len(".json")]
            entry = self._record_entry(tag) if self.tag_re.match(tag) else None
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda entry: entry[0])

    # ------------------------------------------------------------------ reading

    def list_versions(self) -> list[SubsetVersion]:
        return [version for _, version in self._scan_records()]

    def version(self, tag: str) -> SubsetVersion | None:
        entry = self._record_entry(tag)
        return entry[1] if entry else None

    def raise_if_unreadable(self, tag: object) -> None:
        pass  # a corrupt record is reported (logged) where it is read

    def read_file(self, version: SubsetVersion, name: str) -> bytes:
        with open_repo(self.repo_root) as repo:
            entries = fetch_objects(repo, version)
            if name not in entries:
                raise SubsetVersionError(
                    f"subset version {version.tag} has no {self.data_dir}/{name} "
                    f"(it holds: {', '.join(sorted(entries))})"
                )
            return read_verified(repo, entries[name], f"{self.data_dir}/{name} of {version.tag}")

    def list_files(self, version: SubsetVersion) -> list[str]:
        with quiet_dvc(), Repo(str(self.repo_root)) as repo:
            return sorted(fetch_objects(repo, version))

    def dvc_file_bytes(self, version: SubsetVersion) -> bytes | None:
        record = self._read_record(version.tag)
        return record["dvc_file"].encode() if record else None

    # ------------------------------------------------------------------ checkout

    def restore_dvc_metadata(self, version: SubsetVersion) -> None:
        pass  # records keep no copy of DVC's metadata: `dvc init` recreates it

    def ensure_data_ignored(self) -> None:
        pass  # no git: nothing to ignore data/ for
