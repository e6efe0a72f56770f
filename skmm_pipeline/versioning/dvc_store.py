"""Versioned storage of selected subsets with DVC: the :class:`SubsetStore`.

Every subset version is a DVC-tracked ``data/`` directory. In a git repository (the normal mode) it
is recorded as a commit on a dedicated history ref and an annotated tag ``subset-vNNNN`` carrying the
version's metadata (:mod:`._git_history`); the branch the user has checked out, ``HEAD`` and the
user's git index are never modified. Without git (degraded mode) a version is identified by the
content hash of ``data/`` and recorded as a JSON file under ``.skmm-versions/records/``
(:mod:`._records`). Which of the two histories a store uses is decided once, on first use; the store
itself never branches on it.

The data goes to the DVC cache and is pushed to the default DVC remote after each version. A push
that fails (remote unreachable, no remote) leaves the version recorded and queues it
(:mod:`._push_queue`); queued versions are pushed with the next version or by
:meth:`SubsetStore.push_pending`.

Writers are serialised across processes by a lock file (in the git directory, or under
``.skmm-versions/`` without git). Each step of a write is journalled first (:mod:`._journal`), so
the next writer finishes or rolls back the version of one that was killed part-way. DVC resolves
relative paths against the process working directory, so every path handed to DVC here is absolute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.core.faults import kill_point
from skmm_pipeline.versioning._dvc import Repo, fetch_objects, open_repo, quiet_dvc
from skmm_pipeline.versioning._git_history import GitHistory, in_git_work_tree
from skmm_pipeline.versioning._history import DataLayout, History, SubsetVersion
from skmm_pipeline.versioning._journal import (
    Undo,
    is_plain_name,
    restore_bytes,
    swap_in_data,
    write_lock,
)
from skmm_pipeline.versioning._push_queue import PushQueue
from skmm_pipeline.versioning._records import NOGIT_DIR, RecordsHistory
from skmm_pipeline.versioning.subset_files import check_subset_files

__all__ = ["SubsetStore", "SubsetVersion", "SubsetVersionError", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("auto", "git", "nogit")


class SubsetStore(DataLayout):
    """Write, list, read and check out DVC-versioned subsets in the repository at ``repo_root``.

    Parameters
    ----------
    repo_root:
        Absolute path of the top level of a git work tree (or of a plain directory, see ``mode``).
    data_dir:
        Name of the DVC-tracked directory at the repository root (one path component).
    history_ref:
        Full ref name of the history that version commits are appended to.
    tag_prefix:
        Version tags are ``f"{tag_prefix}v{k:04d}"`` (``f"{tag_prefix}{hash12}"`` without git).
    remote_name, remote_url:
        When ``remote_url`` (absolute path or URL) is given and the repository has no default DVC
        remote, :meth:`ensure_initialized` adds it as the default remote under ``remote_name``.
    mode:
        ``"git"`` requires a git work tree; ``"nogit"`` records versions by content hash; ``"auto"``
        (default) uses git when ``repo_root`` is a git work tree and the degraded mode otherwise.
    lock_timeout:
        Seconds to wait for another process writing a version in the same repository.
    """

    def __init__(
        self,
        repo_root: str | os.PathLike[str],
        data_dir: str = "data",
        history_ref: str = "refs/heads/skmm-subsets",
        tag_prefix: str = "subset-",
        remote_name: str = "local",
        remote_url: str | os.PathLike[str] | None = None,
        mode: str = "auto",
        lock_timeout: float = 600.0,
    ) -> None:
        root = Path(repo_root)
        if not root.is_absolute():
            raise SubsetVersionError(f"repo_root must be absolute, got {str(repo_root)!r}")
        if not is_plain_name(data_dir) or data_dir in (".git", ".dvc", NOGIT_DIR):
            raise SubsetVersionError(
                f"data_dir must be a single directory name at the repository root, got {data_dir!r}"
            )
        if not history_ref.startswith("refs/"):
            raise SubsetVersionError(
                f"history_ref must be a full ref name starting with 'refs/', got {history_ref!r}"
            )
        if not tag_prefix or "/" in tag_prefix or any(c.isspace() for c in tag_prefix):
            raise SubsetVersionError(
                f"tag_prefix must be non-empty without '/' or whitespace, got {tag_prefix!r}"
            )
        if remote_url is not None:
            remote_url = os.fspath(remote_url)
            if "://" not in remote_url and not os.path.isabs(remote_url):
                raise SubsetVersionError(
                    f"remote_url must be an absolute path or a URL, got {remote_url!r}"
                )
        if mode not in MODES:
            raise SubsetVersionError(f"mode must be one of {MODES}, got {mode!r}")
        if not lock_timeout > 0:
            raise SubsetVersionError(f"lock_timeout must be positive, got {lock_timeout!r}")
        self.repo_root = root
        self.data_dir = data_dir
        self.history_ref = history_ref
        self.tag_prefix = tag_prefix
        self.remote_name = remote_name
        self.remote_url = remote_url
        self.mode = mode
        self.lock_timeout = float(lock_timeout)
        self._held = threading.local()
        self._opened: History | None = None

    # ------------------------------------------------------------------ history

    def uses_git(self) -> bool:
        """Whether versions are git tags (True) or content-hash records (degraded mode).

        Decided on first use and kept for the life of this object.
        """
        return self._history.uses_git

    @property
    def _history(self) -> History:
        """Where versions are recorded: chosen on first use, then kept."""
        if self._opened is None:
            self._opened = self._open_history()
        return self._opened

    def _open_history(self) -> History:
        if not self.repo_root.is_dir():
            raise SubsetVersionError(f"repository root {self.repo_root} does not exist")
        if self.mode == "nogit" or (self.mode == "auto" and not in_git_work_tree(self.repo_root)):
            return RecordsHistory(self.repo_root, self.data_dir, self.tag_prefix)
        return GitHistory.open(self.repo_root, self.data_dir, self.tag_prefix, self.history_ref)

    @property
    def _queue(self) -> PushQueue:
        return PushQueue(self._history)

    # ------------------------------------------------------------------ public API

    def ensure_initialized(self) -> None:
        """``dvc init`` the repository if needed and configure the default remote."""
        history = self._history
        if not (self.repo_root / Repo.DVC_DIR).is_dir():
            # `dvc init` stages its files in git; the user's index must stay as it was.
            with history.index_guard(), quiet_dvc():
                try:
                    Repo.init(str(self.repo_root), no_scm=not history.uses_git).close()
                except Exception as exc:
                    raise SubsetVersionError(
                        f"dvc init failed in {self.repo_root}: {exc}"
                    ) from exc
            history.dvc_initialized()
        if self.remote_url is None:
            return
        try:
            with Repo(str(self.repo_root)) as repo:
                if repo.config["core"].get("remote"):
                    return
                with repo.config.edit() as conf:
                    conf["remote"][self.remote_name] = {"url": self.remote_url}
                    conf["core"]["remote"] = self.remote_name
        except Exception as exc:
            raise SubsetVersionError(
                f"could not configure DVC remote {self.remote_name!r} -> {self.remote_url!r} "
                f"in {self.repo_root}: {exc}"
            ) from exc

    def check_clean(self) -> None:
        """Raise if ``data/`` was edited by hand since ``data.dvc`` was last written.

        A missing ``data/`` (fresh clone, not yet pulled) is clean; a non-empty ``data/`` without
        ``data.dvc`` is not a subset version and is refused rather than replaced. The version of a
        writer killed part-way is finished or rolled back first: its half-swapped ``data/`` is no edit.
        """
        with self._locked():
            self._recover()
        self._check_no_foreign_data()
        if not self.dvc_file.exists() or not self.data_path.exists():
            return
        # Compare the workspace with data.dvc directly: `repo.status()` reports "not in cache"
        # first and would hide an edit whenever the cache lacks the recorded objects.
        try:
            with Repo(str(self.repo_root)) as repo:
                stage = repo.stage.load_one(path=str(self.dvc_file))
                states = [out.workspace_status() for out in stage.outs]
        except Exception as exc:
            raise SubsetVersionError(
                f"could not compare {self.data_path} with {self.dvc_file}: {exc}"
            ) from exc
        changes = [
            f"{path}: {state}"
            for status in states
            for path, state in status.items()
            if state != "deleted"  # absent data (fresh clone, not pulled) is not an edit
        ]
        if changes:
            raise SubsetVersionError(
                f"{self.data_path} has local modifications not recorded in {self.dvc_file.name} "
                f"({'; '.join(changes)}); restore it with `dvc checkout {self.dvc_file.name}` "
                "before writing a new subset version"
            )

    def _check_no_foreign_data(self) -> None:
        data = self.data_path
        if self.dvc_file.exists() or not (data.exists() or data.is_symlink()):
            return
        if data.is_dir() and not data.is_symlink() and not any(data.iterdir()):
            return
        raise SubsetVersionError(
            f"{data} exists but is not a subset version ({self.dvc_file.name} is missing), so it "
            "would be replaced: move it away or configure another data_dir. Nothing was written"
        )

    def write_version(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> SubsetVersion:
        """Replace ``data/`` with ``files``, record it as a new tagged version and push it.

        Refuses (nothing written) when ``data/`` was edited by hand, when ``data.dvc`` or ``data/``
        has staged changes in git, when the next tag name is already taken, or when a
        ``manifest.json`` / ``subset.csv`` among ``files`` is corrupt. On failure before the
        version is complete, ``data/``, ``data.dvc``, ``.gitignore``, the history ref and any tag
        or record created here are restored, and :class:`SubsetVersionError` is raised. A failed
        push does not undo the version: it is logged, reported as ``pushed=False`` and retried
        with the next version.
        """
        self._validate_files(files)
        meta = dict(meta)
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise SubsetVersionError(f"meta must be JSON-serialisable: {exc}") from exc

        history = self._history
        with self._locked():
            self._recover()  # a writer killed part-way: finish or roll back its version first
            # Refusals come before `dvc init`, so that a refused write leaves no trace.
            tag = history.claim_tag()
            self._check_no_foreign_data()
            self.ensure_initialized()
            self.check_clean()
            undo = Undo(history)
            try:
                undo.snapshot()
                swap_in_data(self.repo_root, self.data_dir, files, undo)
                kill_point("version_swap")
                data_md5 = self._dvc_add()
                kill_point("version_dvc_add")
                version = history.record_version(tag, data_md5, len(files), meta, meta_json, undo)
                if version is None:
                    raise SubsetVersionError(
                        f"version {undo.version_tag or tag} was recorded but cannot be read back"
                    )
            except BaseException as exc:
                tag = undo.version_tag or tag  # without git, the content hash names the version
                undo.rollback()
                undo.clear()
                if not isinstance(exc, Exception):
                    raise
                cause = exc if isinstance(exc, SubsetVersionError) else f"{type(exc).__name__}: {exc}"
                raise SubsetVersionError(
                    f"writing {tag} failed, {self.data_dir}/, {self.dvc_file.name} and the "
                    f"version history were rolled back: {cause}"
                ) from exc
            kill_point("version_tag")
            self._queue.add(version)
            kill_point("version_queued")
            undo.discard_backup()
            undo.clear()  # the version is complete and its push queued: nothing left to recover
            still_pending, error = self._queue.push()
        if version.tag in still_pending:
            logger.warning(
                "subset version %s is recorded locally but its data is not on the DVC remote "
                "(%s); it will be pushed with the next version or `skmm versions push`",
                version.tag, error,
            )
            return dataclasses.replace(version, pushed=False, push_error=error)
        return version

    def list_versions(self) -> list[SubsetVersion]:
        """All recorded versions, oldest first."""
        versions = self._history.list_versions()
        pending = set(self.pending_pushes())
        return [dataclasses.replace(v, pushed=False) if v.tag in pending else v for v in versions]

    def latest(self) -> SubsetVersion | None:
        """The most recent version, or None when nothing was recorded yet."""
        versions = self.list_versions()
        return versions[-1] if versions else None

    def get(self, tag: str) -> SubsetVersion:
        """The version called ``tag``; a clear error if there is none."""
        version = self._history.find(tag)
        if version is None:
            self._history.raise_if_unreadable(tag)
            known = [v.tag for v in self.list_versions()]
            hint = (f"known: {known[0]} … {known[-1]}" if len(known) > 1
                    else f"known: {known[0]}" if known else "no versions recorded yet")
            raise SubsetVersionError(
                f"unknown subset version {tag!r} in {self.repo_root} ({hint}; see `skmm versions list`)"
            )
        if version.tag in set(self._queue.read()):
            version = dataclasses.replace(version, pushed=False)
        return version

    def read_file(self, tag: str, name: str) -> bytes:
        """Bytes of ``data/<name>`` as of version ``tag``, without checking anything out.

        Data missing from the local DVC cache is fetched from the remote.
        """
        if not is_plain_name(name):
            raise SubsetVersionError(
                f"file name must be a plain name inside {self.data_dir}/, got {name!r}"
            )
        version = self.get(tag)
        return self._history.read_file(version, name)

    def list_files(self, tag: str) -> list[str]:
        """Names of the files under ``data/`` in version ``tag``."""
        version = self.get(tag)
        try:
            return self._history.list_files(version)
        except SubsetVersionError:
            raise
        except Exception as exc:
            raise SubsetVersionError(
                f"cannot list the files of subset version {tag}: {type(exc).__name__}: {exc}"
            ) from exc

    def checkout(self, tag: str, force: bool = False) -> SubsetVersion:
        """Restore ``data/`` and ``data.dvc`` in the work tree to version ``tag``.

        Data missing from the local cache is fetched from the DVC remote first, so a failed fetch
        changes nothing. Hand edits in ``data/`` are refused unless ``force`` (then discarded). In
        git mode the checked-out branch and the index are untouched; only the work tree's
        ``data/`` and ``data.dvc`` change (plus DVC's metadata, restored from the tag when the
        work tree has none, e.g. in a fresh clone).
        """
        history = self._history
        with self._locked():
            version = self.get(tag)
            dvc_text = self._dvc_file_bytes(version)
            if not (self.repo_root / Repo.DVC_DIR).is_dir():
                history.restore_dvc_metadata(version)
            self.ensure_initialized()
            if not force:
                self.check_clean()
            with open_repo(self.repo_root) as repo:
                fetch_objects(repo, version)
            before = self.dvc_file.read_bytes() if self.dvc_file.exists() else None
            try:
                atomic_write_bytes(self.dvc_file, dvc_text)
                self._dvc_checkout()
            except BaseException as exc:
                restore_bytes(self.dvc_file, before)
                if before is not None:
                    with contextlib.suppress(Exception):
                        self._dvc_checkout()
                if not isinstance(exc, Exception):
                    raise
                raise SubsetVersionError(
                    f"checking out subset version {tag} failed; {self.dvc_file.name} was restored: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            history.ensure_data_ignored()
        return version

    def pending_pushes(self) -> list[str]:
        """Tags of versions recorded here whose data has not reached the DVC remote yet (including one
        whose writer was killed before queueing its push; the next write or push finishes it)."""
        queued = self._queue.read()
        interrupted = Undo.load(self._history)
        if interrupted is not None and interrupted.version_tag and interrupted.version_tag not in queued:
            queued.append(interrupted.version_tag)
        return queued

    def push_pending(self) -> list[str]:
        """Push every queued version to the default DVC remote; returns the tags pushed.

        Raises :class:`SubsetVersionError` (and keeps the queue) when some could not be pushed.
        """
        with self._locked():
            self._recover()
            queued = self._queue.read()
            if not queued:
                return []
            still_pending, error = self._queue.push()
        if still_pending:
            raise SubsetVersionError(
                f"could not push {len(still_pending)} subset version(s) "
                f"({', '.join(still_pending)}) from {self.repo_root} to the DVC remote: {error}. "
                "They stay recorded locally and queued for the next push"
            )
        return queued

    # ------------------------------------------------------------------ lock and recovery

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers of this repository across threads and processes (``flock``)."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with write_lock(self._history.state_dir, self.repo_root, self.lock_timeout):
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    def _recover(self) -> None:
        """Finish or roll back the version of a writer that died part-way (its journal is left; the
        write lock, held by the caller, proves that writer is gone). A version whose tag or record
        exists and reads back is complete: its push is queued and its backup removed. Anything less is
        rolled back: ``data/``, ``data.dvc``, ``.gitignore``, the history ref and the tag."""
        undo = Undo.load(self._history)
        if undo is None:
            return
        tag = undo.version_tag
        version = None
        if tag and (undo.tag_created or undo.record_created):
            version = self._history.version(tag)
        if version is not None:
            self._queue.add(version)
            undo.discard_backup()
            logger.warning("finished subset version %s, whose writer died before queueing its push", tag)
        else:
            undo.rollback()
            logger.warning("rolled back a subset version whose writer died part-way in %s", self.repo_root)
        undo.clear()

    # ------------------------------------------------------------------ write steps

    def _validate_files(self, files: Mapping[str, bytes]) -> None:
        if not isinstance(files, Mapping) or not files:
            raise SubsetVersionError("files must be a non-empty mapping of file name -> bytes")
        for name, content in files.items():
            if not is_plain_name(name):
                raise SubsetVersionError(
                    f"file names must be plain names inside {self.data_dir}/ "
                    f"(no '/', '\\\\' or '..'), got {name!r}"
                )
            if not isinstance(content, (bytes, bytearray, memoryview)):
                raise SubsetVersionError(
                    f"content of {name!r} must be bytes, got {type(content).__name__}"
                )
        check_subset_files(files)

    def _dvc_add(self) -> str:
        # Preserve the index in case the user enabled core.autostage.
        with self._history.index_guard(), quiet_dvc(), Repo(str(self.repo_root)) as repo:
            stages = repo.add([str(self.data_path)])
        md5 = self._history.md5_from_dvc_file(self.dvc_file.read_bytes(), "working tree")
        if md5 is None:
            raise SubsetVersionError(
                f"dvc add did not record {self.data_dir} in {self.dvc_file} (stages: {stages})"
            )
        return md5

    def _dvc_checkout(self) -> None:
        with quiet_dvc(), Repo(str(self.repo_root)) as repo:
            repo.checkout(targets=[str(self.dvc_file)], force=True)
        self.check_clean()

    def _dvc_file_bytes(self, version: SubsetVersion) -> bytes:
        blob = self._history.dvc_file_bytes(version)
        if blob is None or self._history.md5_from_dvc_file(blob, version.tag) != version.data_md5:
            raise SubsetVersionError(f"{self.dvc_file.name} of subset version {version.tag} is unreadable")
        return blob

