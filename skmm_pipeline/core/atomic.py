"""The one atomic-write helper: a reader (or a crash) sees the old file or the new one, never a mix.

The content goes to a temporary file in the destination's directory, is flushed and fsynced, renamed
over the destination with ``os.replace`` and the directory is fsynced, so the rename itself survives a
power loss. A failure at any point removes the temporary file and leaves the destination untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np


def fsync_dir(path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk, where the filesystem allows."""
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


def temp_path(path, tag: str = "") -> Path:
    """A fresh, empty temporary file next to ``path`` (hidden, ``.tmp`` suffix), for writers that need a
    file name rather than a handle (e.g. ``numpy.lib.format.open_memmap``); finish with :func:`commit`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))  # mkstemp makes 0600; the result keeps the usual mode
    finally:
        os.close(fd)
    return Path(tmp)


def _mode_for(path: Path) -> int:
    """The permission bits a replaced file keeps, or a new file gets (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def commit(tmp, path) -> None:
    """fsync ``tmp`` and rename it over ``path`` (then fsync the directory)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_open(path) -> Iterator[BinaryIO]:
    """``with atomic_open(p) as fh: fh.write(...)`` -- ``p`` is replaced only if the block succeeds."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path, **arrays) -> None:
    """Replace ``path`` with an uncompressed ``.npz`` of ``arrays`` atomically."""
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)
