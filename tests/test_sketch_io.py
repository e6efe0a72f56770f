"""core.sketch_io: a writer killed mid-shard leaves nothing the next writer trips on."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from skmm_pipeline.core.sketch_io import SketchShardWriter, read_sketch_shard
from skmm_pipeline.core.validation import InputError

IDENTITY = {"kind": "gaussian", "seed": 0, "sketch_dim": 4}


def test_the_next_writer_removes_what_a_killed_one_left_and_two_writers_exclude_each_other(tmp_path):
    stem = tmp_path / "sketches" / "shard-a"
    killed = textwrap.dedent(f"""
        import os, signal
        from skmm_pipeline.core.sketch_io import SketchShardWriter
        w = SketchShardWriter({str(stem)!r}, {IDENTITY!r}, [str(i) for i in range(1000)], 4)
        w.rows[:500] = 1.0
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(list(stem.parent.glob(".shard-a.*.tmp"))) == 1  # the half-written rows

    with SketchShardWriter(stem, IDENTITY, ["x", "y"], 4) as w:
        assert w.orphans_removed == 1
        with pytest.raises(InputError, match="being written by another process"):
            SketchShardWriter(stem, IDENTITY, ["x", "y"], 4)
        w.rows[:] = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert not list(stem.parent.glob("*.tmp")) and not list(stem.parent.glob(".*.tmp"))
    assert read_sketch_shard(stem).rows.shape == (2, 4)
    with SketchShardWriter(stem, IDENTITY, ["z"], 4) as again:  # the lock went with the committed writer
        again.rows[:] = 1.0
