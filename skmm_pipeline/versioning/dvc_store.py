"""Versioned storage of selected subsets with DVC.

In a git repository (the normal mode) every subset version is a DVC-tracked ``data/`` directory
recorded as

* a commit on a dedicated history ref (``refs/heads/skmm-subsets`` by default) whose tree holds only
  ``data.dvc``, a one-line ``.gitignore`` for ``data/`` and DVC's own metadata (``.dvc/config``,
  ``.dvc/.gitignore``, ``.dvcignore``) needed to open DVC at that commit, and
* an annotated tag ``subset-vNNNN`` on that commit whose message carries the version's metadata
  as JSON.

The branch the user has checked out, ``HEAD`` and the user's git index are never modified: history
commits are built with git plumbing and a throw-away index file, so changes the user staged can
neither leak into a version nor be disturbed by one. Staged changes to ``data.dvc`` or ``data/``
themselves are refused, because the version written would silently diverge from what is staged.

Without git (degraded mode) a version is identified by the content hash of ``data/``: the tag is
``subset-<first 12 hex digits of the DVC md5>`` and its record (metadata and the ``data.dvc`` it
was written with) is a JSON file under ``.skmm-versions/records/``. Writing identical content again
returns the existing version.

The data goes to the DVC cache and is pushed to the default DVC remote after each version. A push
that fails (remote unreachable, no remote) leaves the version recorded and queues it; queued
versions are pushed with the next version or by :meth:`SubsetStore.push_pending`.

Writers are serialised across processes by a lock file (in the git directory, or under
``.skmm-versions/`` without git). DVC resolves relative paths against the process working directory,
so every path handed to DVC here is absolute.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from dvc.repo import Repo  # noqa: E402  (analytics must be off before DVC is imported)
from dvc.utils.serialize import parse_yaml  # noqa: E402

from skmm_pipeline.faults import kill_point  # noqa: E402
from skmm_pipeline.core.errors import SubsetVersionError  # noqa: E402
from skmm_pipeline.versioning.subset_files import check_subset_files  # noqa: E402

__all__ = ["SubsetStore", "SubsetVersion", "SubsetVersionError", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("auto", "git", "nogit")

# DVC metadata copied from the working tree into every history commit, so that a clone checked out
# at a tag can `dvc pull` (.dvc/config carries the remote; .dvc/.gitignore keeps the cache out of
# git; .dvcignore changes how data/ is hashed). The user's own files are never committed: the
# .gitignore of a history commit is written here and holds only the data directory.
_DVC_METADATA_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")

# Degraded mode (no git): version records and local state live here, at the repository root.
_NOGIT_DIR = ".skmm-versions"

_FALLBACK_NAME = "skmm-pipeline"
_FALLBACK_EMAIL = "skmm-pipeline@localhost"


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


class SubsetStore:
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
        if not _is_plain_name(data_dir) or data_dir in (".git", ".dvc", _NOGIT_DIR):
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
        self._tag_re = re.compile(rf"^{re.escape(tag_prefix)}v(\d+)$")
        self._hash_tag_re = re.compile(rf"^{re.escape(tag_prefix)}([0-9a-f]{{12}})$")
        self._held = threading.local()
        self._uses_git: bool | None = None
        self._state: Path | None = None

    # ------------------------------------------------------------------ paths

    @property
    def data_path(self) -> Path:
        """Absolute path of the DVC-tracked data directory."""
        return self.repo_root / self.data_dir

    @property
    def dvc_file(self) -> Path:
        """Absolute path of the ``.dvc`` file that records the data directory."""
        return self.repo_root / f"{self.data_dir}.dvc"

    def uses_git(self) -> bool:
        """Whether versions are git tags (True) or content-hash records (degraded mode).

        Decided on first use and kept for the life of this object.
        """
        if self._uses_git is None:
            self._uses_git = self._detect_git()
        return self._uses_git

    def _detect_git(self) -> bool:
        if not self.repo_root.is_dir():
            raise SubsetVersionError(f"repository root {self.repo_root} does not exist")
        if self.mode == "git":
            self._check_git_work_tree()
            return True
        if self.mode == "nogit":
            return False
        try:
            proc = self._git("rev-parse", "--show-toplevel", check=False)
        except SubsetVersionError:  # git is not installed
            return False
        if proc.returncode != 0:
            return False
        self._check_git_work_tree()
        return True

    # ------------------------------------------------------------------ public API

    def ensure_initialized(self) -> None:
        """``dvc init`` the repository if needed and configure the default remote."""
        git = self.uses_git()
        if not (self.repo_root / Repo.DVC_DIR).is_dir():
            # `dvc init` stages its files in git; the user's index must stay as it was.
            guard = self._preserve_user_index() if git else contextlib.nullcontext()
            with guard, _quiet_dvc():
                try:
                    Repo.init(str(self.repo_root), no_scm=not git).close()
                except Exception as exc:
                    raise SubsetVersionError(
                        f"dvc init failed in {self.repo_root}: {exc}"
                    ) from exc
            if not git:
                logger.warning(
                    "%s is not a git work tree: subset versions are recorded by content hash "
                    "under %s/ (degraded mode)", self.repo_root, _NOGIT_DIR,
                )
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

        git = self.uses_git()
        with self._locked():
            self._recover()  # a writer killed part-way: finish or roll back its version first
            # Refusals come before `dvc init`, so that a refused write leaves no trace.
            tag = "a new subset version"
            if git:
                self._check_not_staged()
                tag = self._free_tag()
            self._check_no_foreign_data()
            self.ensure_initialized()
            self.check_clean()
            undo = _Undo(self)
            try:
                undo.snapshot()
                self._swap_in_data(files, undo)
                kill_point("version_swap")
                data_md5 = self._dvc_add()
                kill_point("version_dvc_add")
                if git:
                    commit = self._commit_history(tag, data_md5, undo)
                    summary = (
                        f"skmm subset {tag}: {len(files)} file(s), {self.data_dir} md5 {data_md5}"
                    )
                    undo.tag_created = undo.version_tag = tag
                    undo.save()  # before the tag: a recovery deletes a tag it finds, or finishes its version
                    self._create_tag(tag, commit, f"{summary}\n\n{meta_json}\n")
                    version = self._version(tag)
                else:
                    tag = undo.version_tag = self._hash_tag(data_md5)
                    version = self._record_content_version(tag, data_md5, meta, undo)
                if version is None:
                    raise SubsetVersionError(f"version {tag} was recorded but cannot be read back")
            except BaseException as exc:
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
            self._queue_push(version)
            undo.discard_backup()
            undo.clear()  # the version is complete and its push queued: nothing left to recover
            still_pending, error = self._push_queued()
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
        if self.uses_git():
            versions = self._scan_versions(f"refs/tags/{self.tag_prefix}v*", warn=True)
            versions.sort(key=lambda v: self._index_of(v.tag))
        else:
            versions = [version for _, version in self._scan_records()]
        pending = set(self.pending_pushes())
        return [dataclasses.replace(v, pushed=False) if v.tag in pending else v for v in versions]

    def latest(self) -> SubsetVersion | None:
        """The most recent version, or None when nothing was recorded yet."""
        versions = self.list_versions()
        return versions[-1] if versions else None

    def get(self, tag: str) -> SubsetVersion:
        """The version called ``tag``; a clear error if there is none."""
        git = self.uses_git()
        name_ok = isinstance(tag, str) and (
            (self._tag_re if git else self._hash_tag_re).match(tag) is not None
        )
        version = (self._version(tag) if git else self._record(tag)) if name_ok else None
        if version is None:
            if name_ok and git and self._git(
                "for-each-ref", "--format=%(objecttype)", f"refs/tags/{tag}"
            ).stdout.strip():
                raise SubsetVersionError(
                    f"tag {tag!r} exists in {self.repo_root} but is not a readable subset version "
                    "(lightweight tag, or its message has no valid JSON metadata)"
                )
            known = [v.tag for v in self.list_versions()]
            hint = (f"known: {known[0]} … {known[-1]}" if len(known) > 1
                    else f"known: {known[0]}" if known else "no versions recorded yet")
            raise SubsetVersionError(
                f"unknown subset version {tag!r} in {self.repo_root} ({hint}; see `skmm versions list`)"
            )
        if version.tag in set(self._read_queue()):
            version = dataclasses.replace(version, pushed=False)
        return version

    def read_file(self, tag: str, name: str) -> bytes:
        """Bytes of ``data/<name>`` as of version ``tag``, without checking anything out.

        Data missing from the local DVC cache is fetched from the remote.
        """
        if not _is_plain_name(name):
            raise SubsetVersionError(
                f"file name must be a plain name inside {self.data_dir}/, got {name!r}"
            )
        version = self.get(tag)
        if self.uses_git():
            import dvc.api

            try:
                with _quiet_dvc():
                    return dvc.api.read(
                        f"{self.data_dir}/{name}", repo=str(self.repo_root), rev=tag, mode="rb"
                    )
            except Exception as exc:
                try:
                    files = self.list_files(tag)
                except SubsetVersionError:
                    files = None
                if files is not None and name not in files:
                    raise SubsetVersionError(
                        f"subset version {tag} has no {self.data_dir}/{name} "
                        f"(it holds: {', '.join(files)})"
                    ) from None
                raise SubsetVersionError(
                    f"cannot read {self.data_dir}/{name} from subset version {tag}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        with self._dvc_repo() as repo:
            entries = self._fetch_objects(repo, version)
            if name not in entries:
                raise SubsetVersionError(
                    f"subset version {tag} has no {self.data_dir}/{name} "
                    f"(it holds: {', '.join(sorted(entries))})"
                )
            return _read_verified(repo, entries[name], f"{self.data_dir}/{name} of {tag}")

    def list_files(self, tag: str) -> list[str]:
        """Names of the files under ``data/`` in version ``tag``."""
        version = self.get(tag)
        try:
            if self.uses_git():
                from dvc.api import DVCFileSystem

                with _quiet_dvc():
                    fs = DVCFileSystem(str(self.repo_root), rev=tag)
                    try:
                        return sorted(Path(p).name for p in fs.ls(self.data_dir, detail=False))
                    finally:
                        fs.close()
            with _quiet_dvc(), Repo(str(self.repo_root)) as repo:
                return sorted(self._fetch_objects(repo, version))
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
        git = self.uses_git()
        with self._locked():
            version = self.get(tag)
            dvc_text = self._dvc_file_bytes(version)
            if git and not (self.repo_root / Repo.DVC_DIR).is_dir():
                self._restore_dvc_metadata(version)
            self.ensure_initialized()
            if not force:
                self.check_clean()
            with self._dvc_repo() as repo:
                self._fetch_objects(repo, version)
            before = self.dvc_file.read_bytes() if self.dvc_file.exists() else None
            try:
                _atomic_write(self.dvc_file, dvc_text)
                self._dvc_checkout()
            except BaseException as exc:
                _restore_bytes(self.dvc_file, before)
                if before is not None:
                    with contextlib.suppress(Exception):
                        self._dvc_checkout()
                if not isinstance(exc, Exception):
                    raise
                raise SubsetVersionError(
                    f"checking out subset version {tag} failed; {self.dvc_file.name} was restored: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if git:
                self._ensure_data_ignored()
        return version

    def pending_pushes(self) -> list[str]:
        """Tags of versions recorded here whose data has not reached the DVC remote yet (including one
        whose writer was killed before queueing its push; the next write or push finishes it)."""
        self.uses_git()
        queued = self._read_queue()
        interrupted = _Undo.load(self)
        if interrupted is not None and interrupted.version_tag and interrupted.version_tag not in queued:
            queued.append(interrupted.version_tag)
        return queued

    def push_pending(self) -> list[str]:
        """Push every queued version to the default DVC remote; returns the tags pushed.

        Raises :class:`SubsetVersionError` (and keeps the queue) when some could not be pushed.
        """
        with self._locked():
            self._recover()
            queued = self._read_queue()
            if not queued:
                return []
            still_pending, error = self._push_queued()
        if still_pending:
            raise SubsetVersionError(
                f"could not push {len(still_pending)} subset version(s) "
                f"({', '.join(still_pending)}) from {self.repo_root} to the DVC remote: {error}. "
                "They stay recorded locally and queued for the next push"
            )
        return queued

    @contextlib.contextmanager
    def _dvc_repo(self) -> Iterator[Repo]:
        try:
            repo = Repo(str(self.repo_root))
        except Exception as exc:
            raise SubsetVersionError(
                f"cannot open the DVC repository in {self.repo_root}: {type(exc).__name__}: {exc}"
            ) from exc
        with _quiet_dvc(), repo:
            yield repo

    # ------------------------------------------------------------------ git helpers

    def _git(
        self,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["git", *args],
                cwd=self.repo_root,
                check=check,
                capture_output=True,
                text=True,
                input=input,
                env=dict(env) if env is not None else None,
            )
        except subprocess.CalledProcessError as exc:
            raise SubsetVersionError(
                f"`git {' '.join(args)}` failed in {self.repo_root}: {exc.stderr.strip() or exc}"
            ) from exc
        except FileNotFoundError as exc:
            raise SubsetVersionError(f"cannot run git in {self.repo_root}: {exc}") from exc

    def _check_git_work_tree(self) -> None:
        if not self.repo_root.is_dir():
            raise SubsetVersionError(f"repository root {self.repo_root} does not exist")
        proc = self._git("rev-parse", "--show-toplevel", check=False)
        if proc.returncode != 0:
            raise SubsetVersionError(f"{self.repo_root} is not a git work tree")
        top = os.path.realpath(proc.stdout.strip())
        if top != os.path.realpath(self.repo_root):
            # data.dvc and .dvc/ are committed at the tree root, so a subdirectory would not work.
            raise SubsetVersionError(
                f"{self.repo_root} is inside the git work tree {top} but is not its top level"
            )

    def _rev(self, ref: str) -> str | None:
        proc = self._git("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def _identity_env(self) -> dict[str, str]:
        """Process environment plus a fallback identity when git has none configured."""
        env = dict(os.environ)
        for key, role in (("name", "NAME"), ("email", "EMAIL")):
            configured = self._git("config", f"user.{key}", check=False).stdout.strip()
            if configured:
                continue
            fallback = _FALLBACK_NAME if key == "name" else _FALLBACK_EMAIL
            for who in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{who}_{role}", fallback)
        return env

    def _git_path(self, *args: str) -> Path:
        path = Path(self._git("rev-parse", *args).stdout.strip())
        return path if path.is_absolute() else self.repo_root / path

    @contextlib.contextmanager
    def _preserve_user_index(self) -> Iterator[None]:
        """Put the user's index file back byte for byte after DVC staged files into it."""
        index = self._git_path("--git-path", "index")
        before = index.read_bytes() if index.exists() else None
        try:
            yield
        finally:
            now = index.read_bytes() if index.exists() else None
            if now != before:
                if before is None:
                    index.unlink(missing_ok=True)
                else:
                    _atomic_write(index, before)

    def _ensure_data_ignored(self) -> None:
        """Add ``/data`` to the work tree's .gitignore, as ``dvc add`` does, if git sees data/."""
        if self._git("check-ignore", "-q", "--", self.data_dir, check=False).returncode == 0:
            return
        gitignore = self.repo_root / ".gitignore"
        content = gitignore.read_bytes() if gitignore.exists() else b""
        if content and not content.endswith(b"\n"):
            content += b"\n"
        _atomic_write(gitignore, content + f"/{self.data_dir}\n".encode())

    def _check_not_staged(self) -> None:
        """Refuse when the user staged changes to the paths a version writes.

        Other staged changes are harmless: history commits are built from a private index.
        """
        staged = self._git(
            "diff", "--cached", "--name-only", "--", self.dvc_file.name, self.data_dir
        ).stdout.split()
        if staged:
            raise SubsetVersionError(
                f"the git index in {self.repo_root} has staged changes to {', '.join(staged)}, "
                "which a new subset version would contradict; commit or unstage them "
                f"(`git restore --staged {' '.join(staged)}`) first. Nothing was written"
            )

    # ------------------------------------------------------------------ state and lock

    def _state_dir(self) -> Path:
        """Local, unversioned state: the write lock and the queue of unpushed versions."""
        if self._state is None:
            self._state = (
                self._git_path("--git-common-dir") / "skmm-subsets" if self.uses_git()
                else self.repo_root / _NOGIT_DIR
            )
        return self._state

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
        import fcntl

        state = self._state_dir()
        state.mkdir(parents=True, exist_ok=True)
        path = state / "write.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SubsetVersionError(
                            f"another process has been writing a subset version in "
                            f"{self.repo_root} for over {self.lock_timeout:.0f} s (lock {path}); "
                            "try again later"
                        ) from None
                    time.sleep(0.05)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _recover(self) -> None:
        """Finish or roll back the version of a writer that died part-way (its journal is left; the
        write lock, held by the caller, proves that writer is gone). A version whose tag or record
        exists and reads back is complete: its push is queued and its backup removed. Anything less is
        rolled back: ``data/``, ``data.dvc``, ``.gitignore``, the history ref and the tag."""
        undo = _Undo.load(self)
        if undo is None:
            return
        tag = undo.version_tag
        version = None
        if tag and (undo.tag_created or undo.record_created):
            version = self._version(tag) if self.uses_git() else self._record(tag)
        if version is not None:
            self._queue_push(version)
            undo.discard_backup()
            logger.warning("finished subset version %s, whose writer died before queueing its push", tag)
        else:
            undo.rollback()
            logger.warning("rolled back a subset version whose writer died part-way in %s", self.repo_root)
        undo.clear()

    def _queue_file(self) -> Path:
        return self._state_dir() / "unpushed.json"

    def _read_queue(self) -> list[str]:
        path = self._queue_file()
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

    def _write_queue(self, tags: list[str]) -> None:
        path = self._queue_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(tags).encode())

    def _queue_push(self, version: SubsetVersion) -> None:
        queued = self._read_queue()
        if version.tag not in queued:
            self._write_queue(queued + [version.tag])

    def _push_queued(self) -> tuple[list[str], str]:
        """Push the data of every queued version; returns (tags still queued, why)."""
        queued = self._read_queue()
        if not queued:
            return [], ""
        errors: list[str] = []
        remaining: list[str] = []
        where = ""
        try:
            with _capture_dvc_messages() as messages, Repo(str(self.repo_root)) as repo:
                name = repo.config["core"].get("remote")
                if not name:
                    return queued, (
                        "no default DVC remote is configured (add one with "
                        "`dvc remote add -d NAME URL`)"
                    )
                where = f"remote {name!r} ({repo.config['remote'].get(name, {}).get('url', '?')})"
                git = self.uses_git()
                per_tag: dict[str, set] = {}
                for tag in queued:
                    version = self._version(tag) if git else self._record(tag)
                    if version is None:
                        logger.warning("queued subset version %s no longer exists; not pushed", tag)
                        continue
                    try:
                        per_tag[tag] = self._local_objects(repo, version)
                    except SubsetVersionError as exc:
                        errors.append(str(exc))
                        remaining.append(tag)
                objs = set().union(*per_tag.values()) if per_tag else set()
                failed = set(repo.cloud.push(objs).failed) if objs else set()
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
        self._write_queue(remaining)
        return remaining, "; ".join(errors)

    # ------------------------------------------------------------------ versions (git)

    def _index_of(self, tag: str) -> int:
        match = self._tag_re.match(tag)
        assert match is not None
        return int(match.group(1))

    def _next_index(self) -> int:
        # Only annotated tags count: a stray lightweight tag of the same name is a collision to
        # report, not a version to skip over.
        out = self._git(
            "for-each-ref", "--format=%(refname:strip=2) %(objecttype)",
            f"refs/tags/{self.tag_prefix}v*",
        ).stdout
        taken = [0]
        for line in out.splitlines():
            name, _, objtype = line.rpartition(" ")
            match = self._tag_re.match(name)
            if match and objtype == "tag":
                taken.append(int(match.group(1)))
        return max(taken) + 1

    def _free_tag(self) -> str:
        tag = f"{self.tag_prefix}v{self._next_index():04d}"
        if self._git("check-ref-format", f"refs/tags/{tag}", check=False).returncode != 0:
            raise SubsetVersionError(f"{tag!r} is not a valid tag name; choose another tag_prefix")
        kind = self._git("for-each-ref", "--format=%(objecttype)", f"refs/tags/{tag}").stdout.strip()
        if kind:
            raise SubsetVersionError(
                f"the next subset version tag {tag} is already taken in {self.repo_root} by a "
                f"lightweight tag ({kind}) that is not a subset version; delete or rename it "
                f"(`git tag -d {tag}`) or configure another tag_prefix. Nothing was written"
            )
        return tag

    def _version(self, tag: str) -> SubsetVersion | None:
        found = [v for v in self._scan_versions(f"refs/tags/{tag}") if v.tag == tag]
        return found[0] if found else None

    def _scan_versions(self, pattern: str, warn: bool = False) -> list[SubsetVersion]:
        fields = ("%(refname:strip=2)", "%(objecttype)", "%(*objectname)",
                  "%(taggerdate:iso-strict)", "%(contents)")
        out = self._git("for-each-ref", "--format=" + "%00".join(fields) + "%00", pattern).stdout
        parts = out.split("\0")
        candidates = []
        report = logger.warning if warn else logger.debug
        for i in range(0, len(parts) - len(fields) + 1, len(fields)):
            name, objtype, commit, date, message = parts[i:i + len(fields)]
            name = name.lstrip("\n")
            if objtype != "tag" or not commit or self._tag_re.match(name) is None:
                continue
            meta = _parse_meta(message)
            if meta is None:
                report("tag %s matches the subset version scheme but its message has no valid "
                       "JSON metadata; it is not listed", name)
                continue
            candidates.append((name, commit, date, meta))
        blobs = self._cat_blobs([f"{c[1]}:{self.dvc_file.name}" for c in candidates])
        versions = []
        for (name, commit, date, meta), blob in zip(candidates, blobs):
            md5 = self._md5_from_dvc_file(blob, name) if blob is not None else None
            if md5 is None:
                report("tag %s has no usable %s; it is not listed", name, self.dvc_file.name)
                continue
            versions.append(SubsetVersion(
                tag=name, commit=commit, data_md5=md5, created=_to_utc_iso(date), meta=meta,
            ))
        return versions

    def _cat_blobs(self, specs: list[str]) -> list[bytes | None]:
        """Contents of ``rev:path`` objects in one git process (None when missing)."""
        if not specs:
            return []
        try:
            proc = subprocess.run(
                ["git", "cat-file", "--batch"], cwd=self.repo_root, check=True,
                capture_output=True, input="".join(f"{s}\n" for s in specs).encode(),
            )
        except subprocess.CalledProcessError as exc:
            raise SubsetVersionError(
                f"`git cat-file --batch` failed in {self.repo_root}: "
                f"{exc.stderr.decode(errors='replace').strip()}"
            ) from exc
        out, pos, blobs = proc.stdout, 0, []
        for _ in specs:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            pos = end + 1
            if len(header) == 3 and header[1] == b"blob":
                size = int(header[2])
                blobs.append(out[pos:pos + size])
                pos += size + 1
            else:
                blobs.append(None)
        return blobs

    def _md5_from_dvc_file(self, content: bytes, where: str) -> str | None:
        try:
            doc = parse_yaml(content.decode("utf-8"), f"{where}:{self.dvc_file.name}")
            for out in doc.get("outs", []):
                if out.get("path") == self.data_dir:
                    return str(out["md5"])
        except Exception:  # a malformed file is not a version; the caller says so
            logger.debug("cannot parse %s at %s", self.dvc_file.name, where, exc_info=True)
        return None

    def _dvc_file_bytes(self, version: SubsetVersion) -> bytes:
        if version.commit:
            blob = self._cat_blobs([f"{version.commit}:{self.dvc_file.name}"])[0]
        else:
            record = self._read_record(version.tag)
            blob = record["dvc_file"].encode() if record else None
        if blob is None or self._md5_from_dvc_file(blob, version.tag) != version.data_md5:
            raise SubsetVersionError(f"{self.dvc_file.name} of subset version {version.tag} is unreadable")
        return blob

    def _restore_dvc_metadata(self, version: SubsetVersion) -> None:
        """Write DVC's metadata recorded with ``version`` into a work tree that has none."""
        blobs = self._cat_blobs([f"{version.commit}:{p}" for p in _DVC_METADATA_FILES])
        for rel, blob in zip(_DVC_METADATA_FILES, blobs):
            path = self.repo_root / rel
            if blob is not None and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, blob)

    # ------------------------------------------------------------------ versions (no git)

    def _hash_tag(self, data_md5: str) -> str:
        return f"{self.tag_prefix}{data_md5.split('.')[0][:12]}"

    def _record_path(self, tag: str) -> Path:
        return self.repo_root / _NOGIT_DIR / "records" / f"{tag}.json"

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
        """(sequence number, version) of a degraded-mode record, None if absent or corrupt."""
        record = self._read_record(tag)
        if record is None:
            return None
        md5 = self._md5_from_dvc_file(record["dvc_file"].encode(), str(self._record_path(tag)))
        if md5 is None or self._hash_tag(md5) != tag:
            logger.warning("version record %s does not match its tag; it is not listed",
                           self._record_path(tag))
            return None
        version = SubsetVersion(tag=tag, commit="", data_md5=md5,
                                created=str(record.get("created", "")), meta=record["meta"])
        return record["seq"], version

    def _record(self, tag: str) -> SubsetVersion | None:
        entry = self._record_entry(tag)
        return entry[1] if entry else None

    def _scan_records(self) -> list[tuple[int, SubsetVersion]]:
        """Every readable degraded-mode record, in the order they were written."""
        folder = self.repo_root / _NOGIT_DIR / "records"
        entries = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            tag = path.name[: -len(".json")]
            entry = self._record_entry(tag) if self._hash_tag_re.match(tag) else None
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda entry: entry[0])

    def _record_content_version(
        self, tag: str, data_md5: str, meta: dict, undo: _Undo
    ) -> SubsetVersion | None:
        existing = self._read_record(tag)
        if existing is not None:
            version = self._record(tag)
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
        _atomic_write(path, json.dumps(record, indent=2, sort_keys=True).encode())
        return self._record(tag)

    # ------------------------------------------------------------------ DVC objects

    def _local_objects(self, repo: Repo, version: SubsetVersion) -> set:
        """Hash infos of a version's directory object and files, all present in the local cache."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

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

    def _fetch_objects(self, repo: Repo, version: SubsetVersion) -> dict[str, Any]:
        """Make a version's data local (fetching from the remote if needed); name -> hash info."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

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
            with _capture_dvc_messages() as messages:
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

    # ------------------------------------------------------------------ write steps

    def _validate_files(self, files: Mapping[str, bytes]) -> None:
        if not isinstance(files, Mapping) or not files:
            raise SubsetVersionError("files must be a non-empty mapping of file name -> bytes")
        for name, content in files.items():
            if not _is_plain_name(name):
                raise SubsetVersionError(
                    f"file names must be plain names inside {self.data_dir}/ "
                    f"(no '/', '\\\\' or '..'), got {name!r}"
                )
            if not isinstance(content, (bytes, bytearray, memoryview)):
                raise SubsetVersionError(
                    f"content of {name!r} must be bytes, got {type(content).__name__}"
                )
        check_subset_files(files)

    def _swap_in_data(self, files: Mapping[str, bytes], undo: _Undo) -> None:
        """Write ``files`` into a sibling directory, then rename it over ``data/``.

        Renames within one directory are atomic, so a crash leaves either the old complete
        directory (possibly moved aside to ``.data.previous-*``) or the new complete one.
        """
        token = uuid.uuid4().hex[:12]
        incoming = self.repo_root / f".{self.data_dir}.incoming-{token}"
        undo.incoming = incoming
        undo.save()
        incoming.mkdir()
        for name, content in files.items():
            with open(incoming / name, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(incoming)
        if self.data_path.exists() or self.data_path.is_symlink():
            previous = self.repo_root / f".{self.data_dir}.previous-{token}"
            undo.previous, undo.data_moved = previous, True
            undo.save()
            os.rename(self.data_path, previous)
        undo.data_moved = True
        undo.save()
        os.rename(incoming, self.data_path)
        undo.incoming = None
        _fsync_dir(self.repo_root)

    def _dvc_add(self) -> str:
        # Preserve the index in case the user enabled core.autostage.
        guard = self._preserve_user_index() if self.uses_git() else contextlib.nullcontext()
        with guard, _quiet_dvc(), Repo(str(self.repo_root)) as repo:
            stages = repo.add([str(self.data_path)])
        md5 = self._md5_from_dvc_file(self.dvc_file.read_bytes(), "working tree")
        if md5 is None:
            raise SubsetVersionError(
                f"dvc add did not record {self.data_dir} in {self.dvc_file} (stages: {stages})"
            )
        return md5

    def _dvc_checkout(self) -> None:
        with _quiet_dvc(), Repo(str(self.repo_root)) as repo:
            repo.checkout(targets=[str(self.dvc_file)], force=True)
        self.check_clean()

    def _commit_history(self, tag: str, data_md5: str, undo: _Undo) -> str:
        paths = [self.dvc_file.name] + [
            p for p in _DVC_METADATA_FILES if (self.repo_root / p).is_file()
        ]
        env = self._identity_env()
        gitignore = self._git(
            "hash-object", "-w", "--stdin", input=f"/{self.data_dir}\n"
        ).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="skmm-index-") as tmp:
            # A private index: the user's staged changes are neither used nor disturbed.
            env["GIT_INDEX_FILE"] = os.path.join(tmp, "index")
            self._git("update-index", "--add", "--", *paths, env=env)
            self._git("update-index", "--add", "--cacheinfo", f"100644,{gitignore},.gitignore",
                      env=env)
            tree = self._git("write-tree", env=env).stdout.strip()
        parent = self._rev(self.history_ref)
        undo.old_ref, undo.ref_updated = parent, True
        undo.save()  # before the update: restoring the old tip is harmless if it never moved
        parent_args = ["-p", parent] if parent else []
        message = f"skmm subset {tag}\n\n{self.data_dir} md5 {data_md5}\n"
        # Unattended runs cannot answer a signing prompt, whatever commit.gpgSign says.
        commit = self._git(
            "commit-tree", "--no-gpg-sign", tree, *parent_args, input=message, env=env
        ).stdout.strip()
        # Compare-and-swap against the tip read above; an empty old value means "must not exist".
        self._git("update-ref", "-m", f"skmm subset {tag}", self.history_ref, commit, parent or "")
        return commit

    def _create_tag(self, tag: str, commit: str, message: str) -> None:
        # No -f: an existing tag of that name makes git fail instead of moving it.
        self._git(
            "-c", "tag.gpgSign=false", "tag", "-a", "--cleanup=verbatim", "-F", "-", tag, commit,
            input=message, env=self._identity_env(),
        )


class _Undo:
    """What write_version changed so far, and how to put it back."""

    def __init__(self, store: SubsetStore) -> None:
        self.store = store
        self.dvc_bytes: bytes | None = None
        self.gitignore_bytes: bytes | None = None
        self.incoming: Path | None = None
        self.previous: Path | None = None
        self.data_moved = False
        self.old_ref: str | None = None
        self.ref_updated = False
        self.tag_created: str | None = None
        self.record_created: Path | None = None
        self.version_tag: str | None = None

    # The journal: this state on disk, written before each step it undoes, so that the next writer
    # can finish or roll back the version of a writer that was killed (``SubsetStore._recover``).
    _PATHS = ("incoming", "previous", "record_created")
    _BYTES = ("dvc_bytes", "gitignore_bytes")
    _PLAIN = ("data_moved", "old_ref", "ref_updated", "tag_created", "version_tag")

    @staticmethod
    def journal_path(store: SubsetStore) -> Path:
        return store._state_dir() / "journal.json"

    def save(self) -> None:
        state = {k: getattr(self, k) for k in self._PLAIN}
        state.update({k: None if getattr(self, k) is None else str(getattr(self, k)) for k in self._PATHS})
        state.update({k: None if getattr(self, k) is None else base64.b64encode(getattr(self, k)).decode()
                      for k in self._BYTES})
        path = self.journal_path(self.store)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(state).encode())

    @classmethod
    def load(cls, store: SubsetStore) -> "_Undo | None":
        path = cls.journal_path(store)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("ignoring the unreadable subset-version journal %s", path)
            return None
        undo = cls(store)
        for k in cls._PLAIN:
            setattr(undo, k, state.get(k))
        for k in cls._PATHS:
            setattr(undo, k, None if state.get(k) is None else Path(state[k]))
        for k in cls._BYTES:
            setattr(undo, k, None if state.get(k) is None else base64.b64decode(state[k]))
        return undo

    def clear(self) -> None:
        self.journal_path(self.store).unlink(missing_ok=True)

    def snapshot(self) -> None:
        store = self.store
        self.dvc_bytes = store.dvc_file.read_bytes() if store.dvc_file.exists() else None
        gitignore = store.repo_root / ".gitignore"
        self.gitignore_bytes = gitignore.read_bytes() if gitignore.exists() else None
        self.save()

    def rollback(self) -> None:
        """Best effort: every step is attempted even if an earlier one fails."""
        store = self.store
        steps = []
        if self.tag_created:
            steps.append(lambda: store._git("tag", "-d", self.tag_created) if store._rev(f"refs/tags/{self.tag_created}")
                         else None)
        if self.record_created:
            steps.append(lambda: self.record_created.unlink(missing_ok=True))
        if self.ref_updated:
            if self.old_ref:
                steps.append(lambda: store._git("update-ref", store.history_ref, self.old_ref))
            else:
                steps.append(lambda: store._git("update-ref", "-d", store.history_ref))
        steps.append(self._restore_data)
        steps.append(lambda: _restore_bytes(store.dvc_file, self.dvc_bytes))
        steps.append(lambda: _restore_bytes(store.repo_root / ".gitignore", self.gitignore_bytes))
        for step in steps:
            try:
                step()
            except Exception:
                logger.exception("rollback step failed in %s", store.repo_root)

    def _restore_data(self) -> None:
        if self.incoming is not None and self.incoming.exists():
            shutil.rmtree(self.incoming)
        if not self.data_moved:
            return
        data = self.store.data_path
        if self.previous is not None and not self.previous.exists():
            return  # killed before the old data/ was moved aside: it is still data/
        if data.exists() or data.is_symlink():
            _remove_path(data)
        if self.previous is not None:
            os.rename(self.previous, data)

    def discard_backup(self) -> None:
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)


# ---------------------------------------------------------------------- helpers


def _is_plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and ".." not in name
        and not any(c in name for c in "/\\\0")
    )


def _parse_meta(message: str) -> dict | None:
    _, _, body = message.partition("\n")
    try:
        meta = json.loads(body.strip())
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _to_utc_iso(date: str) -> str:
    try:
        return datetime.fromisoformat(date).astimezone(timezone.utc).isoformat()
    except ValueError:
        return date


def _read_verified(repo: Repo, oid: Any, what: str) -> bytes:
    """Bytes of a cached file object, checked against its md5 (a damaged cache is an error)."""
    data = Path(repo.cache.local.oid_to_path(oid.value)).read_bytes()
    if hashlib.md5(data).hexdigest() != oid.value:
        raise SubsetVersionError(
            f"{what} is corrupt in the DVC cache {repo.cache.local.path} (md5 mismatch); remove "
            "that object and read again to fetch it from the remote"
        )
    return data


def _atomic_write(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _restore_bytes(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_bytes() != content:
        _atomic_write(path, content)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
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
def _capture_dvc_messages() -> Iterator[list[str]]:
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
