"""The simulated pool for scale runs: shards written independently, the same whoever writes them."""

import numpy as np
import pytest

from skmm_pipeline.core.sketch_io import read_sketch_shard
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.composable import composable_selection
from skmm_pipeline.data.simulated import CLUSTERS, shard_sizes, simulated_centres, write_simulated_shard


def test_shards_are_reproducible_independent_and_selectable(tmp_path):
    assert shard_sizes(10, 3) == [len(p) for p in np.array_split(np.arange(10), 3)]
    with pytest.raises(InputError, match="shards"):
        shard_sizes(3, 4)
    records = {f"s{i}": write_simulated_shard(tmp_path / f"s{i}", f"s{i}", 700, 16, index=i) for i in range(3)}
    again = write_simulated_shard(tmp_path / "again", "s1", 700, 16, index=1)
    a, b = read_sketch_shard(records["s1"]["path"]), read_sketch_shard(again["path"])
    np.testing.assert_array_equal(a.rows, b.rows)  # the same shard whoever writes it, in any order
    assert a.rows.shape == (700, 16) and a.identity == {"m": 16, "seed": 0} and a.ids[0] == "s1/0"
    assert not np.array_equal(read_sketch_shard(records["s0"]["path"]).rows, a.rows)
    # rows lie around the shared centres: the nearest centre is within the noise
    centres = simulated_centres(16)
    assert centres.shape == (CLUSTERS, 16)
    nearest = np.linalg.norm(a.rows[:, None] - centres[None], axis=2).min(axis=1)
    assert np.median(nearest) < 0.3 * np.sqrt(16) * 1.5
    res = composable_selection(tmp_path / "cache", records, 20, c=2)
    assert len(set(res["sample_ids"])) == 20 and res["pool_size"] == 2100
