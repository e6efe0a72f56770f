"""The undo journal of a version being written, the filesystem steps it guards, and the write lock.

:class:`Undo` records what ``SubsetStore.write_version`` changed so far. It is saved to
``<state dir>/journal.json`` before each step it can undo, so that the next writer can finish or roll
back the version of a writer that was killed part-way (``SubsetStore._recover``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from skmm_pipeline.core.atomic import atomic_write_bytes, fsync_dir
from skmm_pipeline.core.errors import SubsetVersionError
from skmm_pipeline.core.waiting import WaitReport

if TYPE_CHECKING:  # a history uses the journal; the journal only calls it back
    from skmm_pipeline.versioning._history import History

__all__ = ["Undo", "is_plain_name", "remove_path", "restore_bytes", "swap_in_data", "write_lock"]

logger = logging.getLogger(__name__)


class Undo:
    """What write_version changed so far, and how to put it back."""

    def __init__(self, history: History) -> None:
        self.history = history
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

    # The journal: this state on disk, written before each step it undoes.
    _PATHS = ("incoming", "previous", "record_created")
    _BYTES = ("dvc_bytes", "gitignore_bytes")
    _PLAIN = ("data_moved", "old_ref", "ref_updated", "tag_created", "version_tag")

    @staticmethod
    def journal_path(history: History) -> Path:
        return history.state_dir / "journal.json"

    def save(self) -> None:
        state = {k: getattr(self, k) for k in self._PLAIN}
        state.update({k: None if getattr(self, k) is None else str(getattr(self, k)) for k in self._PATHS})
        state.update({k: None if getattr(self, k) is None else base64.b64encode(getattr(self, k)).decode()
                      for k in self._BYTES})
        path = self.journal_path(self.history)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(state).encode())

    @classmethod
    def load(cls, history: History) -> Undo | None:
        path = cls.journal_path(history)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("ignoring the unreadable subset-version journal %s", path)
            return None
        undo = cls(history)
        for k in cls._PLAIN:
            setattr(undo, k, state.get(k))
        for k in cls._PATHS:
            setattr(undo, k, None if state.get(k) is None else Path(state[k]))
        for k in cls._BYTES:
            setattr(undo, k, None if state.get(k) is None else base64.b64decode(state[k]))
        return undo

    def clear(self) -> None:
        self.journal_path(self.history).unlink(missing_ok=True)

    def snapshot(self) -> None:
        history = self.history
        self.dvc_bytes = history.dvc_file.read_bytes() if history.dvc_file.exists() else None
        gitignore = history.repo_root / ".gitignore"
        self.gitignore_bytes = gitignore.read_bytes() if gitignore.exists() else None
        self.save()

    def rollback(self) -> None:
        """Best effort: every step is attempted even if an earlier one fails."""
        history = self.history
        steps = history.rollback_steps(self)
        steps.append(self._restore_data)
        steps.append(lambda: restore_bytes(history.dvc_file, self.dvc_bytes))
        steps.append(lambda: restore_bytes(history.repo_root / ".gitignore", self.gitignore_bytes))
        for step in steps:
            try:
                step()
            except Exception:
                logger.exception("rollback step failed in %s", history.repo_root)

    def _restore_data(self) -> None:
        if self.incoming is not None and self.incoming.exists():
            shutil.rmtree(self.incoming)
        if not self.data_moved:
            return
        data = self.history.data_path
        if self.previous is not None and not self.previous.exists():
            return  # killed before the old data/ was moved aside: it is still data/
        if data.exists() or data.is_symlink():
            remove_path(data)
        if self.previous is not None:
            os.rename(self.previous, data)

    def discard_backup(self) -> None:
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)


def swap_in_data(repo_root: Path, data_dir: str, files: Mapping[str, bytes], undo: Undo) -> None:
    """Write ``files`` into a sibling directory of ``<repo_root>/<data_dir>``, then rename it over it.

    Renames within one directory are atomic, so a crash leaves either the old complete
    directory (possibly moved aside to ``.data.previous-*``) or the new complete one.
    """
    data_path = repo_root / data_dir
    token = uuid.uuid4().hex[:12]
    incoming = repo_root / f".{data_dir}.incoming-{token}"
    undo.incoming = incoming
    undo.save()
    incoming.mkdir()
    for name, content in files.items():
        with open(incoming / name, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    fsync_dir(incoming)
    if data_path.exists() or data_path.is_symlink():
        previous = repo_root / f".{data_dir}.previous-{token}"
        undo.previous, undo.data_moved = previous, True
        undo.save()
        os.rename(data_path, previous)
    undo.data_moved = True
    undo.save()
    os.rename(incoming, data_path)
    undo.incoming = None
    fsync_dir(repo_root)


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one path component: no separator, no ``..``, not empty."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and ".." not in name
        and not any(c in name for c in "/\\\0")
    )


def restore_bytes(path: Path, content: bytes | None) -> None:
    """Put ``path`` back to ``content`` (None: absent), rewriting it only if it differs."""
    if content is None:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_bytes() != content:
        atomic_write_bytes(path, content)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def write_lock(state_dir: Path, repo_root: Path, timeout: float) -> Iterator[None]:
    """Hold ``<state_dir>/write.lock``, the lock of the writers of ``repo_root``, exclusively
    (``flock``), waiting at most ``timeout`` seconds for another process, saying so every
    ``core.waiting.report_interval()`` seconds."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "write.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        report = WaitReport()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if report.due():
                    logger.warning("waiting %.0f s for the lock %s: another process is writing a subset version "
                                   "in %s (gives up after %.0f s; Ctrl-C stops)", report.waited, path, repo_root, timeout)
                if time.monotonic() > deadline:
                    raise SubsetVersionError(
                        f"another process has been writing a subset version in "
                        f"{repo_root} for over {timeout:.0f} s (lock {path}); try again later"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
