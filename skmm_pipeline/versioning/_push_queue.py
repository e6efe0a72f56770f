"""The queue of versions recorded here whose data has not reached the DVC remote yet.

A push that fails (remote unreachable, no remote) leaves the version recorded and its tag in
``<state dir>/unpushed.json``; queued versions are pushed with the next version or by
``SubsetStore.push_pending``. The caller holds the store's write lock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.versioning._dvc import Repo, capture_dvc_messages, local_objects
from skmm_pipeline.versioning._history import History, SubsetVersion

__all__ = ["PushQueue"]

logger = logging.getLogger(__name__)


class PushQueue:
    """The tags of unpushed versions of ``history``, oldest first."""

    def __init__(self, history: History) -> None:
        self.history = history

    @property
    def path(self) -> Path:
        return self.history.state_dir / "unpushed.json"

    def read(self) -> list[str]:
        path = self.path
        if not path.exists():
            return []
        try:
            queued = json.loads(path.read_text())
            if isinstance(queued, list) and all(isinstance(t, str) for t in queued):
                return queued
        except (OSError, ValueError):
            pass
        logger.warning("ignoring the unreadable push queue %s", path)
        return []

    def write(self, tags: list[str]) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(tags).encode())

    def add(self, version: SubsetVersion) -> None:
        queued = self.read()
        if version.tag not in queued:
            self.write(queued + [version.tag])

    def push(self) -> tuple[list[str], str]:
        """Push the data of every queued version; returns (tags still queued, why)."""
        queued = self.read()
        if not queued:
            return [], ""
        errors: list[str] = []
        remaining: list[str] = []
        where = ""
        try:
            with capture_dvc_messages() as messages, Repo(str(self.history.repo_root)) as repo:
                name = repo.config["core"].get("remote")
                if not name:
                    return queued, (
                        "no default DVC remote is configured (add one with "
                        "`dvc remote add -d NAME URL`)"
                    )
                where = f"remote {name!r} ({repo.config['remote'].get(name, {}).get('url', '?')})"
                per_tag: dict[str, set] = {}
                for tag in queued:
                    version = self.history.version(tag)
                    if version is None:
                        logger.warning("queued subset version %s no longer exists; not pushed", tag)
                        continue
                    try:
                        per_tag[tag] = local_objects(repo, version)
                    except SubsetVersionError as exc:
                        errors.append(str(exc))
                        remaining.append(tag)
                objs = set().union(*per_tag.values()) if per_tag else set()
                failed = set(repo.cloud.push(objs).failed) if objs else set()
                kill_point("version_push")
                remaining += [t for t, o in per_tag.items() if o & failed]
                if failed:
                    errors.append(
                        f"{len(failed)} object(s) failed to upload to {where}"
                        + (f": {messages[0]}" if messages else "")
                    )
        except Exception as exc:
            remaining = queued
            errors.append(f"{where}: {type(exc).__name__}: {exc}" if where else
                          f"{type(exc).__name__}: {exc}")
        remaining = [t for t in queued if t in set(remaining)]
        self.write(remaining)
        return remaining, "; ".join(errors)
