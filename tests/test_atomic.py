"""core.atomic: the one atomic-write helper."""

import os
import stat
import time

import pytest

from skmm_pipeline.core.atomic import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    remove_orphan_temps,
    temp_path,
)


def test_atomic_writes_keep_the_file_mode_and_leave_no_temp_files(tmp_path):
    new = tmp_path / "new.txt"
    atomic_write_text(new, "a")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    atomic_write_bytes(kept, b"new")
    assert kept.read_bytes() == b"new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin", "new.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_remove_orphan_temps_removes_only_old_unheld_temporary_files(tmp_path):
    old, held, new = (temp_path(tmp_path / "sub" / name) for name in ("a.npy", "b.npy", "c.npy"))
    (tmp_path / "sub" / "a.npy").write_bytes(b"published")  # not a temporary file: never touched
    for p in (old, held):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    with open(held, "rb"):  # a live writer has it open
        removed = remove_orphan_temps([tmp_path], before=time.time() - 60)
    assert removed == [old] and held.exists() and new.exists() and (tmp_path / "sub" / "a.npy").exists()
