"""The versioning package's one gateway to DVC: its imports, its logging, and reading a version's objects.

DVC's analytics are switched off before DVC is imported (they would phone home from every process), so
the other modules of the package take DVC's names from here. DVC resolves relative paths against the
process working directory: every path handed to it is absolute.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import dvc.api as dvc_api  # noqa: E402  (analytics must be off before DVC is imported)
from dvc.repo import Repo  # noqa: E402
from dvc.utils.serialize import parse_yaml  # noqa: E402
from dvc_data.hashfile.hash_info import HashInfo  # noqa: E402
from dvc_data.hashfile.tree import Tree  # noqa: E402

from skmm_pipeline.core.errors import SubsetVersionError  # noqa: E402

if TYPE_CHECKING:  # a version is a value of the history module, which imports this one
    from skmm_pipeline.versioning._history import SubsetVersion

__all__ = [
    "Repo", "capture_dvc_messages", "dvc_api", "fetch_objects", "local_objects",
    "open_repo", "parse_yaml", "quiet_dvc", "read_verified",
]


@contextlib.contextmanager
def quiet_dvc() -> Iterator[None]:
    """Hide DVC's interactive hints ("git add ...", "Initialized DVC repository")."""
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        dvc_logger.setLevel(level)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage().strip())


@contextlib.contextmanager
def capture_dvc_messages() -> Iterator[list[str]]:
    """Collect DVC's warnings and errors instead of printing them: callers report them once."""
    dvc_logger = logging.getLogger("dvc")
    handlers, level = dvc_logger.handlers[:], dvc_logger.level
    messages: list[str] = []
    dvc_logger.handlers = [_ListHandler(messages)]
    dvc_logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        dvc_logger.handlers = handlers
        dvc_logger.setLevel(level)


@contextlib.contextmanager
def open_repo(repo_root: Path) -> Iterator[Repo]:
    """The DVC repository at ``repo_root``, quiet; a clear error when it cannot be opened."""
    try:
        repo = Repo(str(repo_root))
    except Exception as exc:
        raise SubsetVersionError(
            f"cannot open the DVC repository in {repo_root}: {type(exc).__name__}: {exc}"
        ) from exc
    with quiet_dvc(), repo:
        yield repo


def local_objects(repo: Repo, version: SubsetVersion) -> set:
    """Hash infos of a version's directory object and files, all present in the local cache."""
    odb = repo.cache.local
    dir_hash = HashInfo("md5", version.data_md5)
    try:
        tree = Tree.load(odb, dir_hash)
    except Exception as exc:
        raise SubsetVersionError(
            f"the data of subset version {version.tag} is not in the local DVC cache "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    objs = {dir_hash} | {oid for _, _, oid in tree}
    missing = [o.value for o in objs if not odb.exists(o.value)]
    if missing:
        raise SubsetVersionError(
            f"{len(missing)} object(s) of subset version {version.tag} are missing from the "
            "local DVC cache"
        )
    return objs


def fetch_objects(repo: Repo, version: SubsetVersion) -> dict[str, Any]:
    """Make a version's data local (fetching from the remote if needed); name -> hash info."""
    odb = repo.cache.local
    dir_hash = HashInfo("md5", version.data_md5)
    try:
        tree = Tree.load(odb, dir_hash)
    except Exception:
        try:
            tree = Tree.load(repo.cloud.get_remote_odb(None, "pull"), dir_hash)
        except Exception as exc:
            raise SubsetVersionError(
                f"the data of subset version {version.tag} is neither in the local DVC cache "
                f"nor readable from the DVC remote: {type(exc).__name__}: {exc}"
            ) from exc
    entries = {"/".join(key): oid for key, _, oid in tree}
    objs = {dir_hash} | set(entries.values())
    if any(not odb.exists(o.value) for o in objs):
        with capture_dvc_messages() as messages:
            try:
                failed = repo.cloud.pull(objs).failed
            except Exception as exc:
                failed, messages = objs, [f"{type(exc).__name__}: {exc}"]
        if failed:
            raise SubsetVersionError(
                f"could not fetch {len(failed)} object(s) of subset version {version.tag} "
                f"from the DVC remote" + (f": {messages[0]}" if messages else "")
            )
    return entries


def read_verified(repo: Repo, oid: Any, what: str) -> bytes:
    """Bytes of a cached file object, checked against its md5 (a damaged cache is an error)."""
    data = Path(repo.cache.local.oid_to_path(oid.value)).read_bytes()
    if hashlib.md5(data).hexdigest() != oid.value:
        raise SubsetVersionError(
            f"{what} is corrupt in the DVC cache {repo.cache.local.path} (md5 mismatch); remove "
            "that object and read again to fetch it from the remote"
        )
    return data
