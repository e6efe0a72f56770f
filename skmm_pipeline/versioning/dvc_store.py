"""Versioned storage of selected subsets with DVC inside a git repository.

Every subset version is a DVC-tracked ``data/`` directory recorded as

* a commit on a dedicated history ref (``refs/heads/skmm-subsets`` by default) whose tree holds only
  ``data.dvc`` and the DVC/git metadata needed to open DVC at that commit, and
* an annotated tag ``subset-vNNNN`` on that commit whose message carries the version's metadata
  as JSON.

The branch the user has checked out, ``HEAD`` and the user's git index are never modified: history
commits are built with git plumbing and a throw-away index file. The data itself goes to the DVC
cache and, when a default remote is configured, is pushed there after each version.

DVC resolves relative paths against the process working directory, so every path handed to DVC
here is absolute. DVC steps take a repository lock that gives up after a few seconds: callers that
may run concurrently (Dagster steps) must serialise calls on one repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from dvc.repo import Repo  # noqa: E402  (analytics must be off before DVC is imported)
from dvc.utils.serialize import parse_yaml  # noqa: E402

__all__ = ["SubsetStore", "SubsetVersion", "SubsetVersionError"]

logger = logging.getLogger(__name__)

# Files copied from the working tree into every history commit. data.dvc is added separately
# (its name follows data_dir). .dvc/config carries the remote, so that a clone checked out at a
# tag can `dvc pull`; .dvc/.gitignore keeps the cache out of git there.
_METADATA_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")

_FALLBACK_NAME = "skmm-pipeline"
_FALLBACK_EMAIL = "skmm-pipeline@localhost"


class SubsetVersionError(RuntimeError):
    """A subset version could not be written, listed or read; the message names the problem."""


@dataclass(frozen=True)
class SubsetVersion:
    """One recorded subset version.

    ``pushed`` is False only when :meth:`SubsetStore.write_version` could not push the data to a
    DVC remote (push failed, or no default remote); versions from :meth:`SubsetStore.list_versions`
    carry the default because pushing state is not recorded in git.
    """

    tag: str
    commit: str
    data_md5: str
    created: str
    meta: dict = field(hash=False)
    pushed: bool = True


class SubsetStore:
    """Write, list and read DVC-versioned subsets in the git repository at ``repo_root``.

    Parameters
    ----------
    repo_root:
        Absolute path of the top level of a git work tree.
    data_dir:
        Name of the DVC-tracked directory at the repository root (one path component).
    history_ref:
        Full ref name of the history that version commits are appended to.
    tag_prefix:
        Version tags are ``f"{tag_prefix}v{k:04d}"``.
    remote_name, remote_url:
        When ``remote_url`` (absolute path or URL) is given and the repository has no default DVC
        remote, :meth:`ensure_initialized` adds it as the default remote under ``remote_name``.
    """

    def __init__(
        self,
        repo_root: str | os.PathLike[str],
        data_dir: str = "data",
        history_ref: str = "refs/heads/skmm-subsets",
        tag_prefix: str = "subset-",
        remote_name: str = "local",
        remote_url: str | os.PathLike[str] | None = None,
    ) -> None:
        root = Path(repo_root)
        if not root.is_absolute():
            raise SubsetVersionError(f"repo_root must be absolute, got {str(repo_root)!r}")
        if not _is_plain_name(data_dir) or data_dir in (".git", ".dvc"):
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
        self.repo_root = root
        self.data_dir = data_dir
        self.history_ref = history_ref
        self.tag_prefix = tag_prefix
        self.remote_name = remote_name
        self.remote_url = remote_url
        self._tag_re = re.compile(rf"^{re.escape(tag_prefix)}v(\d+)$")

    # ------------------------------------------------------------------ paths

    @property
    def data_path(self) -> Path:
        """Absolute path of the DVC-tracked data directory."""
        return self.repo_root / self.data_dir

    @property
    def dvc_file(self) -> Path:
        """Absolute path of the ``.dvc`` file that records the data directory."""
        return self.repo_root / f"{self.data_dir}.dvc"

    # ------------------------------------------------------------------ public API

    def ensure_initialized(self) -> None:
        """Check the git work tree, ``dvc init`` it if needed and configure the default remote."""
        self._check_git_work_tree()
        if not (self.repo_root / Repo.DVC_DIR).is_dir():
            # `dvc init` always stages its files; the user's index must stay as it was.
            with self._preserve_user_index(), _quiet_dvc():
                try:
                    Repo.init(str(self.repo_root)).close()
                except Exception as exc:
                    raise SubsetVersionError(
                        f"dvc init failed in {self.repo_root}: {exc}"
                    ) from exc
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

        A missing ``data/`` (fresh clone, not yet pulled) or a missing ``data.dvc`` is clean.
        """
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

    def write_version(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> SubsetVersion:
        """Replace ``data/`` with ``files``, record it as a new tagged version and push it.

        On failure before the version is complete, ``data/``, ``data.dvc``, ``.gitignore``, the
        history ref and any tag created here are restored, and :class:`SubsetVersionError` is
        raised. A failed push does not undo the version: it is logged and reported as
        ``pushed=False``.
        """
        self._validate_files(files)
        meta = dict(meta)
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise SubsetVersionError(f"meta must be JSON-serialisable: {exc}") from exc

        self.ensure_initialized()
        self.check_clean()

        tag = f"{self.tag_prefix}v{self._next_index():04d}"
        undo = _Undo(self)
        try:
            undo.snapshot()
            self._swap_in_data(files, undo)
            data_md5 = self._dvc_add()
            commit = self._commit_history(tag, data_md5, undo)
            summary = f"skmm subset {tag}: {len(files)} file(s), {self.data_dir} md5 {data_md5}"
            self._create_tag(tag, commit, f"{summary}\n\n{meta_json}\n")
            undo.tag_created = tag
            version = self._version(tag)
            if version is None:
                raise SubsetVersionError(f"tag {tag} was created but cannot be read back")
        except BaseException as exc:
            undo.rollback()
            if not isinstance(exc, Exception):
                raise
            cause = exc if isinstance(exc, SubsetVersionError) else f"{type(exc).__name__}: {exc}"
            raise SubsetVersionError(
                f"writing subset version {tag} failed, {self.data_dir}/, {self.dvc_file.name} and "
                f"{self.history_ref} were rolled back: {cause}"
            ) from exc
        undo.discard_backup()

        pushed = self._push()
        if not pushed:
            version = dataclasses.replace(version, pushed=False)
        return version

    def list_versions(self) -> list[SubsetVersion]:
        """All recorded versions, oldest (lowest k) first."""
        self._check_git_work_tree()
        versions = self._scan_versions(f"refs/tags/{self.tag_prefix}v*")
        versions.sort(key=lambda v: self._index_of(v.tag))
        return versions

    def latest(self) -> SubsetVersion | None:
        """The most recent version, or None when nothing was recorded yet."""
        versions = self.list_versions()
        return versions[-1] if versions else None

    def read_file(self, tag: str, name: str) -> bytes:
        """Bytes of ``data/<name>`` as of version ``tag``, without checking anything out."""
        if not _is_plain_name(name):
            raise SubsetVersionError(
                f"file name must be a plain name inside {self.data_dir}/, got {name!r}"
            )
        self._check_git_work_tree()
        known = isinstance(tag, str) and self._tag_re.match(tag) is not None
        if not known or self._version(tag) is None:
            raise SubsetVersionError(f"unknown subset version {tag!r} in {self.repo_root}")
        import dvc.api

        try:
            return dvc.api.read(
                f"{self.data_dir}/{name}", repo=str(self.repo_root), rev=tag, mode="rb"
            )
        except Exception as exc:
            raise SubsetVersionError(
                f"cannot read {self.data_dir}/{name} from subset version {tag}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

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

    @contextlib.contextmanager
    def _preserve_user_index(self) -> Iterator[None]:
        """Put the user's index file back byte for byte after DVC staged files into it."""
        index = Path(self._git("rev-parse", "--git-path", "index").stdout.strip())
        if not index.is_absolute():
            index = self.repo_root / index
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

    # ------------------------------------------------------------------ versions

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

    def _version(self, tag: str) -> SubsetVersion | None:
        found = [v for v in self._scan_versions(f"refs/tags/{tag}") if v.tag == tag]
        return found[0] if found else None

    def _scan_versions(self, pattern: str) -> list[SubsetVersion]:
        fields = ("%(refname:strip=2)", "%(objecttype)", "%(*objectname)",
                  "%(taggerdate:iso-strict)", "%(contents)")
        out = self._git("for-each-ref", "--format=" + "%00".join(fields) + "%00", pattern).stdout
        parts = out.split("\0")
        candidates = []
        for i in range(0, len(parts) - len(fields) + 1, len(fields)):
            name, objtype, commit, date, message = parts[i:i + len(fields)]
            name = name.lstrip("\n")
            if objtype != "tag" or not commit or self._tag_re.match(name) is None:
                continue
            meta = _parse_meta(message)
            if meta is None:
                logger.debug("tag %s has no JSON metadata; not a subset version", name)
                continue
            candidates.append((name, commit, date, meta))
        blobs = self._cat_blobs([f"{c[1]}:{self.dvc_file.name}" for c in candidates])
        versions = []
        for (name, commit, date, meta), blob in zip(candidates, blobs):
            md5 = self._md5_from_dvc_file(blob, name) if blob is not None else None
            if md5 is None:
                logger.debug("tag %s has no usable %s; not a subset version",
                             name, self.dvc_file.name)
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

    def _swap_in_data(self, files: Mapping[str, bytes], undo: _Undo) -> None:
        """Write ``files`` into a sibling directory, then rename it over ``data/``.

        Renames within one directory are atomic, so a crash leaves either the old complete
        directory (possibly moved aside to ``.data.previous-*``) or the new complete one.
        """
        token = uuid.uuid4().hex[:12]
        incoming = self.repo_root / f".{self.data_dir}.incoming-{token}"
        undo.incoming = incoming
        incoming.mkdir()
        for name, content in files.items():
            with open(incoming / name, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(incoming)
        if self.data_path.exists() or self.data_path.is_symlink():
            previous = self.repo_root / f".{self.data_dir}.previous-{token}"
            os.rename(self.data_path, previous)
            undo.previous = previous
        undo.data_moved = True
        os.rename(incoming, self.data_path)
        undo.incoming = None
        _fsync_dir(self.repo_root)

    def _dvc_add(self) -> str:
        # Preserve the index in case the user enabled core.autostage.
        with self._preserve_user_index(), _quiet_dvc(), Repo(str(self.repo_root)) as repo:
            stages = repo.add([str(self.data_path)])
        md5 = self._md5_from_dvc_file(self.dvc_file.read_bytes(), "working tree")
        if md5 is None:
            raise SubsetVersionError(
                f"dvc add did not record {self.data_dir} in {self.dvc_file} (stages: {stages})"
            )
        return md5

    def _commit_history(self, tag: str, data_md5: str, undo: _Undo) -> str:
        paths = [self.dvc_file.name] + [
            p for p in _METADATA_FILES if (self.repo_root / p).is_file()
        ]
        env = self._identity_env()
        with tempfile.TemporaryDirectory(prefix="skmm-index-") as tmp:
            # A private index: the user's staged changes are neither used nor disturbed.
            env["GIT_INDEX_FILE"] = os.path.join(tmp, "index")
            self._git("update-index", "--add", "--", *paths, env=env)
            tree = self._git("write-tree", env=env).stdout.strip()
        parent = self._rev(self.history_ref)
        undo.old_ref = parent
        parent_args = ["-p", parent] if parent else []
        message = f"skmm subset {tag}\n\n{self.data_dir} md5 {data_md5}\n"
        # Unattended runs cannot answer a signing prompt, whatever commit.gpgSign says.
        commit = self._git(
            "commit-tree", "--no-gpg-sign", tree, *parent_args, input=message, env=env
        ).stdout.strip()
        # Compare-and-swap against the tip read above; an empty old value means "must not exist".
        self._git("update-ref", "-m", f"skmm subset {tag}", self.history_ref, commit, parent or "")
        undo.ref_updated = True
        return commit

    def _create_tag(self, tag: str, commit: str, message: str) -> None:
        if self._git("check-ref-format", f"refs/tags/{tag}", check=False).returncode != 0:
            raise SubsetVersionError(f"{tag!r} is not a valid tag name")
        # No -f: an existing tag of that name makes git fail instead of moving it.
        self._git(
            "-c", "tag.gpgSign=false", "tag", "-a", "--cleanup=verbatim", "-F", "-", tag, commit,
            input=message, env=self._identity_env(),
        )

    def _push(self) -> bool:
        try:
            with _quiet_dvc(), Repo(str(self.repo_root)) as repo:
                remote = repo.config["core"].get("remote")
                if not remote:
                    logger.info("no default DVC remote in %s; subset data stays in the local cache",
                                self.repo_root)
                    return False
                repo.push(targets=[str(self.dvc_file)])
        except Exception as exc:
            logger.warning(
                "subset version recorded locally but `dvc push` from %s failed: %s",
                self.repo_root, exc,
            )
            return False
        return True


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

    def snapshot(self) -> None:
        store = self.store
        self.dvc_bytes = store.dvc_file.read_bytes() if store.dvc_file.exists() else None
        gitignore = store.repo_root / ".gitignore"
        self.gitignore_bytes = gitignore.read_bytes() if gitignore.exists() else None

    def rollback(self) -> None:
        """Best effort: every step is attempted even if an earlier one fails."""
        store = self.store
        steps = []
        if self.tag_created:
            steps.append(lambda: store._git("tag", "-d", self.tag_created))
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
