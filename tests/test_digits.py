"""The embedded digits scenarios: other class splits, imbalanced pools, jittered deliveries."""

import numpy as np
import pytest

from skmm_pipeline.core.errors import ShardError
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.digits import jittered_copies, load_digits_transfer, write_new_digits_shard
from skmm_pipeline.data.shards import read_shard


def test_class_splits_relabel_in_the_given_order_and_stay_disjoint():
    default = load_digits_transfer()
    explicit = load_digits_transfer((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert np.array_equal(default.pool.images, explicit.pool.images)
    odd = load_digits_transfer(source_classes=(0, 2, 4, 6, 8), target_classes=(9, 7, 5, 3, 1))
    assert odd.num_classes == 5 and set(odd.pool.labels.tolist()) == set(range(5))
    # relabelled in the order given: label 0 is digit 9, which the default task calls 4
    nines = {img.tobytes() for part in (default.pool, default.val, default.test) for img in part.images[part.labels == 4]}
    assert all(img.tobytes() in nines for img in odd.pool.images[odd.pool.labels == 0][:10])
    three_way = load_digits_transfer(source_classes=(0, 1, 2), target_classes=(3, 4, 5, 6))
    assert three_way.num_classes == 4 and three_way.pool.labels.max() == 3


def test_pool_per_class_makes_an_imbalanced_pool_and_refuses_what_the_pool_lacks():
    data = load_digits_transfer(pool_per_class=(80, 40, 20, 10, 5))
    assert np.bincount(data.pool.labels).tolist() == [80, 40, 20, 10, 5]
    assert len(data.test.labels) == len(load_digits_transfer().test.labels)
    for bad, msg in (((500, 1, 1, 1, 1), "the pool has"), ((1, 1), "one count per target class"),
                     ((0, 1, 1, 1, 1), "positive integer")):
        with pytest.raises(InputError, match=msg):
            load_digits_transfer(pool_per_class=bad)
    with pytest.raises(InputError, match="overlap"):
        load_digits_transfer(source_classes=(0, 1, 5), target_classes=(5, 6))


def test_jittered_copies_are_seeded_shifted_and_in_range():
    pool = load_digits_transfer().pool
    a, src_a = jittered_copies(pool.images, np.random.default_rng(4), 60, noise=0.05)
    b, src_b = jittered_copies(pool.images, np.random.default_rng(4), 60, noise=0.05)
    assert np.array_equal(a, b) and np.array_equal(src_a, src_b)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    clean, _ = jittered_copies(pool.images, np.random.default_rng(4), 60, noise=0.0)
    # each copy is its source rolled by at most one pixel per axis (noise 0 leaves the roll visible)
    for img, s in zip(clean, src_a):
        assert any(np.allclose(img, np.roll(pool.images[s], (dy, dx), axis=(-2, -1)))
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_a_delivery_records_its_seed_and_an_identical_delivery_is_refused(tmp_path):
    name = write_new_digits_shard(tmp_path, count=12, seed=5)
    shard = read_shard(tmp_path / f"{name}.npz")
    with np.load(tmp_path / f"{name}.npz") as z:
        assert all(s.endswith("@seed5") and s.startswith("pool/") for s in z["source_ids"].tolist())
    assert len(shard.images) == 12
    with pytest.raises(ShardError, match="same images as shard 'digits-new-000'"):
        write_new_digits_shard(tmp_path, count=12, seed=5)
    assert write_new_digits_shard(tmp_path, count=12, seed=6) == "digits-new-001"
