"""A subset version, and the interface of the two histories that record them.

A :class:`History` is chosen once, when a :class:`~skmm_pipeline.versioning.dvc_store.SubsetStore` is
first used: :class:`~skmm_pipeline.versioning._git_history.GitHistory` (annotated tags on a dedicated
history ref) in a git work tree, :class:`~skmm_pipeline.versioning._records.RecordsHistory` (JSON records
named by content hash) without git. The store calls it for everything that differs between the two, and
never asks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skmm_pipeline.versioning._dvc import parse_yaml
from skmm_pipeline.versioning._journal import Undo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubsetVersion:
    """One recorded subset version.

    ``pushed`` is False when this checkout knows the version's data is not on the DVC remote yet
    (the push failed or no remote is configured; it is retried with the next version or
    :meth:`SubsetStore.push_pending`). ``push_error`` says why, for the version just written.
    ``commit`` is empty in degraded mode (no git).
    """

    tag: str
    commit: str
    data_md5: str
    created: str
    meta: dict = field(hash=False)
    pushed: bool = True
    push_error: str = field(default="", compare=False)


class DataLayout:
    """The DVC-tracked directory ``<repo_root>/<data_dir>`` and its ``.dvc`` file."""

    repo_root: Path
    data_dir: str

    @property
    def data_path(self) -> Path:
        """Absolute path of the DVC-tracked data directory."""
        return self.repo_root / self.data_dir

    @property
    def dvc_file(self) -> Path:
        """Absolute path of the ``.dvc`` file that records the data directory."""
        return self.repo_root / f"{self.data_dir}.dvc"


class History(DataLayout, ABC):
    """Where versions of ``<repo_root>/<data_dir>`` are recorded, and the local state kept with them."""

    #: Whether versions are git tags (the store's ``uses_git()``); DVC is initialised without an SCM
    #: otherwise.
    uses_git: bool
    #: The names of this history's version tags.
    tag_re: re.Pattern[str]

    def __init__(self, repo_root: Path, data_dir: str, tag_prefix: str) -> None:
        self.repo_root = repo_root
        self.data_dir = data_dir
        self.tag_prefix = tag_prefix

    def md5_from_dvc_file(self, content: bytes, where: str) -> str | None:
        """The md5 that a ``data.dvc`` records for the data directory; None when it records none."""
        try:
            doc = parse_yaml(content.decode("utf-8"), f"{where}:{self.dvc_file.name}")
            for out in doc.get("outs", []):
                if out.get("path") == self.data_dir:
                    return str(out["md5"])
        except Exception:  # a malformed file is not a version; the caller says so
            logger.debug("cannot parse %s at %s", self.dvc_file.name, where, exc_info=True)
        return None

    # ------------------------------------------------------------------ local state

    @property
    @abstractmethod
    def state_dir(self) -> Path:
        """Local, unversioned state: the write lock, the journal and the queue of unpushed versions."""

    @abstractmethod
    def index_guard(self) -> contextlib.AbstractContextManager[None]:
        """Around DVC calls that may stage files: the user's git index is left as it was."""

    @abstractmethod
    def dvc_initialized(self) -> None:
        """Called once ``dvc init`` created DVC's metadata in the repository."""

    # ------------------------------------------------------------------ writing

    @abstractmethod
    def claim_tag(self) -> str:
        """Refuse a write this history cannot record, before anything is written; returns the tag
        the version will get, or a description when it is known only once the data is hashed."""

    @abstractmethod
    def record_version(
        self, tag: str, data_md5: str, n_files: int, meta: dict, meta_json: str, undo: Undo
    ) -> SubsetVersion | None:
        """Record the version whose ``data.dvc`` is in the work tree (``undo`` journals each step);
        returns it as read back, None when it cannot be read back."""

    @abstractmethod
    def rollback_steps(self, undo: Undo) -> list[Callable[[], object]]:
        """How to take back what :meth:`record_version` recorded so far, in order."""

    # ------------------------------------------------------------------ reading

    @abstractmethod
    def list_versions(self) -> list[SubsetVersion]:
        """All readable versions, oldest first."""

    @abstractmethod
    def version(self, tag: str) -> SubsetVersion | None:
        """The version recorded as ``tag`` (a tag from the journal or the push queue)."""

    def find(self, tag: object) -> SubsetVersion | None:
        """The version a user asked for; None also when ``tag`` is not a name of this scheme."""
        if not isinstance(tag, str) or self.tag_re.match(tag) is None:
            return None
        return self.version(tag)

    @abstractmethod
    def raise_if_unreadable(self, tag: object) -> None:
        """Raise when ``tag`` (not found) exists but is not a readable version."""

    @abstractmethod
    def read_file(self, version: SubsetVersion, name: str) -> bytes:
        """Bytes of ``data/<name>`` in ``version``; its data is fetched from the remote if needed."""

    @abstractmethod
    def list_files(self, version: SubsetVersion) -> list[str]:
        """Names of the files under ``data/`` in ``version``."""

    @abstractmethod
    def dvc_file_bytes(self, version: SubsetVersion) -> bytes | None:
        """The ``data.dvc`` that ``version`` was recorded with, None when it cannot be read."""

    # ------------------------------------------------------------------ checkout

    @abstractmethod
    def restore_dvc_metadata(self, version: SubsetVersion) -> None:
        """Write DVC's metadata recorded with ``version`` into a work tree that has none."""

    @abstractmethod
    def ensure_data_ignored(self) -> None:
        """After a checkout: keep the checked-out ``data/`` out of the user's version control."""
