"""Composable selection: shard moments sum to the pool's, candidates against the global moment, the merge
against global `select`, reuse after growth; and the Dagster lineage in composable mode."""

import numpy as np
import pytest

from skmm_pipeline.core.composable import (
    ShardMoment,
    composable_select,
    merge_candidates,
    moment_drift,
    pool_moment,
    shard_candidates,
    shard_moment,
    shard_moment_from_file,
)
from skmm_pipeline.core.errors import SketchMismatchError
from skmm_pipeline.core.moment_matching import moment_stats
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_io import save_sketch_shard
from skmm_pipeline.core.validation import InputError


def _clusters(seed=0, sizes=(400, 300, 200, 100, 50, 8), d=12, spread=0.05):
    rng = np.random.default_rng(seed)
    k = len(sizes)
    G = np.concatenate([np.eye(d)[i] * (2 + i) + spread * rng.normal(size=(s, d)) for i, s in enumerate(sizes)])
    label = np.repeat(np.arange(k), sizes)
    perm = rng.permutation(len(G))
    return G[perm], label[perm]


@pytest.mark.parametrize("seed", range(5))
def test_shard_moments_sum_to_the_pools_moment(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(int(rng.integers(50, 400)), 7)).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, len(G)), size=int(rng.integers(1, 6)), replace=False))
    total = pool_moment(shard_moment(p) for p in np.split(G, cuts))
    assert total.count == len(G)
    np.testing.assert_allclose(total.sigma, moment_stats(G).sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(total.mean, G.astype(np.float64).mean(axis=0), rtol=1e-10, atol=1e-12)


def test_moment_from_a_sketch_file_and_mixed_identities_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 5)).astype(np.float32), rng.normal(size=(20, 5)).astype(np.float32)
    save_sketch_shard(tmp_path / "a", a, [f"a/{i}" for i in range(30)], {"seed": 0, "m": 5})
    save_sketch_shard(tmp_path / "b", b, [f"b/{i}" for i in range(20)], {"seed": 1, "m": 5})
    ma = shard_moment_from_file(tmp_path / "a")
    np.testing.assert_allclose(ma.total, a.astype(np.float64).T @ a, rtol=1e-12)
    assert ma.identity == {"m": 5, "seed": 0}
    with pytest.raises(SketchMismatchError, match="seed"):
        pool_moment([ma, shard_moment_from_file(tmp_path / "b")])
    with pytest.raises(SketchMismatchError):
        shard_moment_from_file(tmp_path / "b", expected_identity={"seed": 0, "m": 5})
    with pytest.raises(SketchMismatchError, match="widths"):
        pool_moment([shard_moment(a), shard_moment(a[:, :4])])
    with pytest.raises(InputError):
        pool_moment([])


def test_one_shard_holding_every_row_is_global_select():
    G, _ = _clusters()
    idx, diag = composable_select([G], 20, c=len(G) / 20)
    np.testing.assert_array_equal(idx, select("skmm", G, 20, seed=0).indices)
    assert diag["candidates"] == len(G)


@pytest.mark.parametrize("seed", range(4))
def test_composable_selection_is_valid_and_covers_like_global(seed):
    G, label = _clusters(seed)
    n, shards = 30, np.array_split(np.arange(len(G)), 8)
    idx, diag = composable_select([G[s] for s in shards], n, c=2, seed=seed)
    assert idx.shape == (n,) and np.unique(idx).size == n and idx.min() >= 0 and idx.max() < len(G)
    # every cluster, the 8-row one included, is covered, as the global selection covers it
    assert np.unique(label[idx]).size == np.unique(label[select("skmm", G, n, seed=seed).indices]).size == 6
    assert diag["candidates"] <= 8 * 2 * n
    assert diag["moment_ratio"] > 0


def test_candidates_are_chosen_against_the_global_moment():
    G, label = _clusters(1)
    target = shard_moment(G)
    rare = np.flatnonzero(label == 5)
    shard = np.concatenate([rare, np.flatnonzero(label == 0)[:200]])
    cands = shard_candidates(G[shard], target, 5, c=2, seed=0)
    assert cands.rows.size == 10 and np.unique(cands.rows).size == 10
    # against the pool's moment the shard's rare rows are worth more than against its own
    assert np.isin(shard[cands.rows], rare).sum() >= 1
    assert cands.scores.shape == (10,) and (cands.scores > 0).all()
    few = shard_candidates(G[:7], target, 5, c=2)
    np.testing.assert_array_equal(few.rows, np.arange(7))
    with pytest.raises(InputError, match="rule"):
        shard_candidates(G, target, 5, rule="nope")
    with pytest.raises(InputError, match="moment is 12"):
        shard_candidates(G[:, :3], target, 5)
    with pytest.raises(InputError, match="larger than"):
        merge_candidates(G[:4], target, 5)


def test_reuse_only_within_the_tolerance():
    G, _ = _clusters(2)
    first = shard_moment(G[:600])
    cands = shard_candidates(G[:200], first, 10, c=2, seed=3)
    near = pool_moment([first, shard_moment(G[600:620])])
    far = ShardMoment(first.count, first.total * 1.5, first.row_sum)
    assert moment_drift(first.sigma, near.sigma) < 0.05
    assert cands.reusable(near, n=10, c=2, rule="design", seed=3)
    assert not cands.reusable(far, n=10, c=2, rule="design", seed=3)
    assert not cands.reusable(near, n=11, c=2, rule="design", seed=3)
    assert cands.key != shard_candidates(G[:200], far, 10, c=2, seed=3).key
