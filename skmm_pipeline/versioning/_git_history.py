"""Subset versions as git history: a commit per version on a dedicated ref, and an annotated tag.

Every version is a commit on the history ref (``refs/heads/skmm-subsets`` by default) whose tree holds
only ``data.dvc``, a one-line ``.gitignore`` for ``data/`` and DVC's own metadata needed to open DVC at
that commit, and an annotated tag ``<prefix>vNNNN`` on that commit whose message carries the version's
metadata as JSON.

The branch the user has checked out, ``HEAD`` and the user's git index are never modified: history
commits are built with git plumbing and a throw-away index file, so changes the user staged can neither
leak into a version nor be disturbed by one. Staged changes to ``data.dvc`` or ``data/`` themselves are
refused, because the version written would silently diverge from what is staged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.versioning._dvc import dvc_api, quiet_dvc
from skmm_pipeline.versioning._history import History, SubsetVersion
from skmm_pipeline.versioning._journal import Undo

__all__ = ["GitHistory", "in_git_work_tree", "run_git"]

logger = logging.getLogger(__name__)

# DVC metadata copied from the working tree into every history commit, so that a clone checked out
# at a tag can `dvc pull` (.dvc/config carries the remote; .dvc/.gitignore keeps the cache out of
# git; .dvcignore changes how data/ is hashed). The user's own files are never committed: the
# .gitignore of a history commit is written here and holds only the data directory.
_DVC_METADATA_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")

_FALLBACK_NAME = "skmm-pipeline"
_FALLBACK_EMAIL = "skmm-pipeline@localhost"


def run_git(
    repo_root: Path,
    *args: str,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``git *args`` in ``repo_root``; a failure (with ``check``) or a missing git is a SubsetVersionError."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=repo_root,
            check=check,
            capture_output=True,
            text=True,
            input=input,
            env=dict(env) if env is not None else None,
        )
    except subprocess.CalledProcessError as exc:
        raise SubsetVersionError(
            f"`git {' '.join(args)}` failed in {repo_root}: {exc.stderr.strip() or exc}"
        ) from exc
    except FileNotFoundError as exc:
        raise SubsetVersionError(f"cannot run git in {repo_root}: {exc}") from exc


def in_git_work_tree(repo_root: Path) -> bool:
    """Whether git is installed and ``repo_root`` is inside a git work tree."""
    try:
        proc = run_git(repo_root, "rev-parse", "--show-toplevel", check=False)
    except SubsetVersionError:  # git is not installed
        return False
    return proc.returncode == 0


def _check_git_work_tree(repo_root: Path) -> None:
    if not repo_root.is_dir():
        raise SubsetVersionError(f"repository root {repo_root} does not exist")
    proc = run_git(repo_root, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise SubsetVersionError(f"{repo_root} is not a git work tree")
    top = os.path.realpath(proc.stdout.strip())
    if top != os.path.realpath(repo_root):
        # data.dvc and .dvc/ are committed at the tree root, so a subdirectory would not work.
        raise SubsetVersionError(
            f"{repo_root} is inside the git work tree {top} but is not its top level"
        )


class GitHistory(History):
    """Versions as annotated tags ``<prefix>vNNNN`` on commits of ``history_ref``."""

    uses_git = True

    def __init__(self, repo_root: Path, data_dir: str, tag_prefix: str, history_ref: str) -> None:
        super().__init__(repo_root, data_dir, tag_prefix)
        self.history_ref = history_ref
        self.tag_re = re.compile(rf"^{re.escape(tag_prefix)}v(\d+)$")
        self._state: Path | None = None

    @classmethod
    def open(cls, repo_root: Path, data_dir: str, tag_prefix: str, history_ref: str) -> GitHistory:
        """The history of the git work tree whose top level is ``repo_root`` (else an error)."""
        _check_git_work_tree(repo_root)
        return cls(repo_root, data_dir, tag_prefix, history_ref)

    # ------------------------------------------------------------------ git helpers

    def _git(
        self,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return run_git(self.repo_root, *args, input=input, env=env, check=check)

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

    # ------------------------------------------------------------------ local state

    @property
    def state_dir(self) -> Path:
        if self._state is None:
            self._state = self._git_path("--git-common-dir") / "skmm-subsets"
        return self._state

    @contextlib.contextmanager
    def index_guard(self) -> Iterator[None]:
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
                    atomic_write_bytes(index, before)

    def dvc_initialized(self) -> None:
        pass

    # ------------------------------------------------------------------ writing

    def claim_tag(self) -> str:
        self._check_not_staged()
        return self._free_tag()

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

    def _index_of(self, tag: str) -> int:
        match = self.tag_re.match(tag)
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
            match = self.tag_re.match(name)
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

    def record_version(
        self, tag: str, data_md5: str, n_files: int, meta: dict, meta_json: str, undo: Undo
    ) -> SubsetVersion | None:
        commit = self._commit_history(tag, data_md5, undo)
        summary = f"skmm subset {tag}: {n_files} file(s), {self.data_dir} md5 {data_md5}"
        undo.tag_created = undo.version_tag = tag
        undo.save()  # before the tag: a recovery deletes a tag it finds, or finishes its version
        self._create_tag(tag, commit, f"{summary}\n\n{meta_json}\n")
        return self.version(tag)

    def _commit_history(self, tag: str, data_md5: str, undo: Undo) -> str:
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

    def rollback_steps(self, undo: Undo) -> list[Callable[[], object]]:
        steps: list[Callable[[], object]] = []
        if undo.tag_created:
            steps.append(lambda: self._git("tag", "-d", undo.tag_created)
                         if self._rev(f"refs/tags/{undo.tag_created}") else None)
        if undo.ref_updated:
            if undo.old_ref:
                steps.append(lambda: self._git("update-ref", self.history_ref, undo.old_ref))
            else:
                steps.append(lambda: self._git("update-ref", "-d", self.history_ref))
        return steps

    # ------------------------------------------------------------------ reading

    def list_versions(self) -> list[SubsetVersion]:
        versions = self._scan_versions(f"refs/tags/{self.tag_prefix}v*", warn=True)
        versions.sort(key=lambda v: self._index_of(v.tag))
        return versions

    def version(self, tag: str) -> SubsetVersion | None:
        found = [v for v in self._scan_versions(f"refs/tags/{tag}") if v.tag == tag]
        return found[0] if found else None

    def raise_if_unreadable(self, tag: object) -> None:
        if isinstance(tag, str) and self.tag_re.match(tag) is not None and self._git(
            "for-each-ref", "--format=%(objecttype)", f"refs/tags/{tag}"
        ).stdout.strip():
            raise SubsetVersionError(
                f"tag {tag!r} exists in {self.repo_root} but is not a readable subset version "
                "(lightweight tag, or its message has no valid JSON metadata)"
            )

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
            if objtype != "tag" or not commit or self.tag_re.match(name) is None:
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
            md5 = self.md5_from_dvc_file(blob, name) if blob is not None else None
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

    def read_file(self, version: SubsetVersion, name: str) -> bytes:
        try:
            with quiet_dvc():
                return dvc_api.read(
                    f"{self.data_dir}/{name}", repo=str(self.repo_root), rev=version.tag, mode="rb"
                )
        except Exception as exc:
            try:
                files = self.list_files(version)
            except Exception:
                files = None
            if files is not None and name not in files:
                raise SubsetVersionError(
                    f"subset version {version.tag} has no {self.data_dir}/{name} "
                    f"(it holds: {', '.join(files)})"
                ) from None
            raise SubsetVersionError(
                f"cannot read {self.data_dir}/{name} from subset version {version.tag}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def list_files(self, version: SubsetVersion) -> list[str]:
        with quiet_dvc():
            fs = dvc_api.DVCFileSystem(str(self.repo_root), rev=version.tag)
            try:
                return sorted(Path(p).name for p in fs.ls(self.data_dir, detail=False))
            finally:
                fs.close()

    def dvc_file_bytes(self, version: SubsetVersion) -> bytes | None:
        return self._cat_blobs([f"{version.commit}:{self.dvc_file.name}"])[0]

    # ------------------------------------------------------------------ checkout

    def restore_dvc_metadata(self, version: SubsetVersion) -> None:
        blobs = self._cat_blobs([f"{version.commit}:{p}" for p in _DVC_METADATA_FILES])
        for rel, blob in zip(_DVC_METADATA_FILES, blobs):
            path = self.repo_root / rel
            if blob is not None and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, blob)

    def ensure_data_ignored(self) -> None:
        """Add ``/data`` to the work tree's .gitignore, as ``dvc add`` does, if git sees data/."""
        if self._git("check-ignore", "-q", "--", self.data_dir, check=False).returncode == 0:
            return
        gitignore = self.repo_root / ".gitignore"
        content = gitignore.read_bytes() if gitignore.exists() else b""
        if content and not content.endswith(b"\n"):
            content += b"\n"
        atomic_write_bytes(gitignore, content + f"/{self.data_dir}\n".encode())


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
