"""Composable selection: shard moments sum to the pool's, candidates against the global moment, the merge
against global `select`, reuse after growth; and the Dagster lineage in composable mode."""

import dagster as dg
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
from skmm_pipeline.core.errors import ConfigError, SketchMismatchError
from skmm_pipeline.core.moment_matching import moment_stats
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.sketch_io import save_sketch_shard
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.composable import composable_selection, resolve_mode
from skmm_pipeline.data.digits import write_digits_shards
from skmm_pipeline.definitions import ASSET_CHECKS, COMPOSABLE_ASSETS, PIPELINE_ASSETS, build_definitions
from skmm_pipeline.defs.resources import SkmmSettings
from skmm_pipeline.versioning.subsets import SubsetManifest


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


def _write_shards(root, G, k, identity=None):
    records = {}
    for i, part in enumerate(np.array_split(np.arange(len(G)), k)):
        name = f"s{i:03d}"
        save_sketch_shard(root / name, G[part].astype(np.float32), [f"{name}/{r}" for r in range(part.size)],
                          identity or {"seed": 0})
        records[name] = {"path": str(root / name), "data_version": f"v{i}", "rows": int(part.size)}
    return records


def test_cached_selection_over_files_recomputes_only_the_new_shard(tmp_path):
    G, label = _clusters(3, sizes=(900, 700, 500, 300, 100, 20))
    records = _write_shards(tmp_path / "sk", G, 9)
    new = {"s008": records.pop("s008")}
    first = composable_selection(tmp_path / "cache", records, 25, c=2, seed=1)
    assert first["recomputed"] == sorted(records) and len(first["sample_ids"]) == len(set(first["sample_ids"])) == 25
    again = composable_selection(tmp_path / "cache", records, 25, c=2, seed=1)
    assert again["recomputed"] == [] and again["moments_computed"] == [] and again["sample_ids"] == first["sample_ids"]
    grown = composable_selection(tmp_path / "cache", {**records, **new}, 25, c=2, seed=1)
    assert grown["recomputed"] == ["s008"] and grown["moments_computed"] == ["s008"]
    assert grown["candidate_sets"]["s000"] == first["candidate_sets"]["s000"]
    # a tolerance of zero recomputes every shard whose moment moved
    strict = composable_selection(tmp_path / "cache", {**records, **new}, 25, c=2, seed=1, tolerance=0.0)
    assert strict["recomputed"] == sorted(records)
    rows = {name: np.array_split(np.arange(len(G)), 9)[i] for i, name in enumerate(sorted({**records, **new}))}
    picked = [rows[s][int(r)] for s, r in (sid.split("/") for sid in grown["sample_ids"])]
    assert np.unique(label[picked]).size == 6


def test_a_reference_moment_is_matched_and_never_drifts(tmp_path):
    """With a reference (the validation split), one shard holding every row gives global select with the same
    reference, and a new shard never makes the old shards' candidates stale, even at tolerance zero."""
    G, _ = _clusters(4)
    R = _clusters(5, sizes=(10, 10, 10, 10, 10, 10))[0]
    whole = _write_shards(tmp_path / "one", G, 1)
    res = composable_selection(tmp_path / "c1", whole, 15, c=len(G) / 15, reference=R)
    ids = [f"s000/{i}" for i in select("skmm", G, 15, seed=0, reference=R).indices]
    assert res["sample_ids"] == ids and res["reference"] == "validation" and res["pool_size"] == len(G)
    records = _write_shards(tmp_path / "sk", G, 4)
    new = {"s003": records.pop("s003")}
    composable_selection(tmp_path / "c4", records, 15, c=2, reference=R)
    grown = composable_selection(tmp_path / "c4", {**records, **new}, 15, c=2, reference=R, tolerance=0.0)
    assert grown["recomputed"] == ["s003"]


def test_cached_selection_refuses_mixed_identities(tmp_path):
    G, _ = _clusters(0)
    records = _write_shards(tmp_path / "a", G[:600], 2, {"seed": 0})
    other = _write_shards(tmp_path / "b", G[600:], 1, {"seed": 5})
    with pytest.raises(SketchMismatchError, match="gradient_sketch"):
        composable_selection(tmp_path / "cache", {**records, "zz": other["s000"]}, 10)


def test_dagster_lineage_in_composable_mode_recomputes_only_a_new_shard(project, dagster_home):
    # The default tolerance: the candidates match the validation split's moment, which a new shard does not move.
    settings = SkmmSettings(budget=10, pretrain_epochs=1, selection_mode="composable", composable_c=2.0)
    defs = build_definitions(project, settings=settings)
    instance = dg.DagsterInstance.get()
    names = write_digits_shards(project / ".skmm" / "landing", 4)
    instance.add_dynamic_partitions("shards", names[:3])
    assets = [*PIPELINE_ASSETS, *COMPOSABLE_ASSETS, *ASSET_CHECKS]

    def run(select, partition=None):
        result = dg.materialize(assets, selection=select, partition_key=partition, instance=instance,
                                resources=defs.resources)
        assert result.success
        return result

    def grow(shards):
        for p in shards:
            assert defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=p).success
            run(["shard_moment"], p)
        run(["pool_moment"])
        computed = {p: run(["shard_candidates"], p).asset_materializations_for_node("shard_candidates")[0]
                    .metadata["computed"].value for p in sorted(instance.get_dynamic_partitions("shards"))}
        selection = run(["skmm_selection"])
        checks = {e.check_name: e.passed for e in selection.get_asset_check_evaluations()}
        assert checks["budget_met_with_unique_ids"] and checks["ids_in_registered_shards"]
        assert checks["single_sketch_identity"]
        return computed, selection.output_for_node("skmm_selection")

    assert defs.resolve_job_def("pretrain").execute_in_process(instance=instance).success
    run(["validation_sketch"])  # the moment the candidates are chosen against (settings.reference)
    computed, first = grow(names[:3])
    assert computed == dict.fromkeys(names[:3], True)
    assert first["selection_mode"] == "composable" and first["composable"]["c"] == 2.0
    assert first["reference"] == "validation"
    assert sorted(first["composable"]["candidate_sets"]) == names[:3]
    assert first["composable"]["recomputed"] == []  # the merge found every shard's candidates made by the assets
    assert len(set(first["sample_ids"])) == 10 and {s.split("/")[0] for s in first["sample_ids"]} <= set(names[:3])

    instance.add_dynamic_partitions("shards", names[3:])
    computed, second = grow(names[3:])
    assert computed == {**dict.fromkeys(names[:3], False), names[3]: True}
    assert {k: second["composable"]["candidate_sets"][k] for k in names[:3]} == first["composable"]["candidate_sets"]
    assert second["composable"]["recomputed"] == [] and second["pool_size"] > first["pool_size"]
    manifest = SubsetManifest.from_selection(second)
    assert manifest.extra["selection_mode"] == "composable"
    assert manifest.extra["composable"]["candidate_sets"] == second["composable"]["candidate_sets"]


def test_auto_mode_is_global_below_the_threshold():
    assert resolve_mode("auto", 550, 128) == "global"
    assert resolve_mode("auto", 10**7, 256) == "composable"
    assert resolve_mode("auto", 10**7, 256, outlier_guard=True) == "global"
    assert resolve_mode("global", 10**7, 256) == "global"
    with pytest.raises(ConfigError, match="selection_mode"):
        resolve_mode("sharded", 10, 10)
    with pytest.raises(ConfigError, match="method 'skmm'"):
        resolve_mode("composable", 10, 10, method="uniform")
