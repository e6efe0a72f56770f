"""The one atomic-write helper: a reader (or a crash) sees the old file or the new one, never a mix.

The content goes to a temporary file in the destination's directory, is flushed and fsynced, renamed
over the destination with ``os.replace`` and the directory is fsynced, so the rename itself survives a
power loss. A failure at any point removes the temporary file and leaves the destination untouched;
a writer killed outright leaves it, and :func:`remove_orphan_temps` removes it later.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from skmm_pipeline.core.faults import kill_point


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
def atomic_open(path, fault: str = "") -> Iterator[BinaryIO]:
    """``with atomic_open(p) as fh: fh.write(...)`` -- ``p`` is replaced only if the block succeeds.
    ``fault``: the kill point (``core.faults``) between the complete temporary file and its rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            kill_point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes, fault: str = "") -> None:
    """Replace ``path`` with ``data`` atomically (``fault``: see :func:`atomic_open`)."""
    with atomic_open(path, fault) as fh:
        fh.write(data)


def atomic_write_text(path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path, **arrays) -> None:
    """Replace ``path`` with an uncompressed ``.npz`` of ``arrays`` atomically."""
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)


TEMP_NAME = re.compile(r"^\..+\.tmp$")
"""The names :func:`temp_path` gives (``.<name>.<tag><random>.tmp``)."""


def _open_files() -> set[Path] | None:
    """Every file some process of this machine has open or mapped (None where ``/proc`` cannot tell)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    held = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            held.update(Path(os.readlink(fd)) for fd in (proc / "fd").iterdir())
            with open(proc / "maps") as fh:
                held.update(Path(line.split(None, 5)[5].strip()) for line in fh if line.count(" ") >= 5 and "/" in line)
        except (OSError, IndexError):  # a process that ended, or one of another user
            continue
    return held


def remove_orphan_temps(folders, before: float) -> list[Path]:
    """Delete the temporary files (:data:`TEMP_NAME`) under ``folders`` last written before ``before`` (a
    ``time.time()``) that no process has open: the leftovers of writers that died before their rename.
    Returns the files removed."""
    held = _open_files()
    removed = []
    for folder in folders:
        for path in Path(folder).rglob(".*.tmp") if Path(folder).is_dir() else ():
            try:
                if not TEMP_NAME.match(path.name) or not path.is_file() or path.stat().st_mtime >= before:
                    continue
                if held is not None and path.resolve() in held:
                    continue
                path.unlink()
                removed.append(path)
            except OSError:
                continue
    return removed
