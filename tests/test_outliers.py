"""Outlier guard (core.outliers) and the curation variant of the embedded pool."""

import numpy as np
import pytest

from skmm_pipeline.core.outliers import outlier_guard
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.digits import curation_pool, load_digits_transfer


def cloud(N=400, m=12, seed=0, outliers=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, m)) * np.linspace(3, 0.5, m)
    if outliers:
        X[:outliers] = rng.normal(size=(outliers, m)) * 8  # far out in every direction
    return X


def test_scores_equal_a_brute_force_ridge_mahalanobis():
    X = cloud(60, 5)
    res = outlier_guard(X, threshold=1e9, ridge=0.05, iterations=1)
    mu = X.mean(0)
    C = (X - mu).T @ (X - mu) / len(X)
    P = np.linalg.inv(C + 0.05 * np.linalg.eigvalsh(C).max() * np.eye(5))
    brute = np.array([(x - mu) @ P @ (x - mu) for x in X])
    np.testing.assert_allclose(res.scores, brute, rtol=1e-9)
    assert res.keep.all() and res.excluded == 0


def test_planted_outliers_are_excluded_and_a_clean_cloud_is_left_alone():
    res = outlier_guard(cloud(outliers=12))
    assert not res.keep[:12].any()
    assert res.keep[12:].mean() > 0.97
    assert outlier_guard(cloud(seed=1)).keep.mean() > 0.97
    # Deterministic, and equal rows (nothing sticks out) exclude nothing.
    assert np.array_equal(outlier_guard(cloud(outliers=12)).keep, res.keep)
    assert outlier_guard(np.ones((30, 4))).excluded == 0


def test_at_least_n_rows_are_kept():
    X = cloud(50, 4, outliers=30)
    res = outlier_guard(X, 45)
    assert res.keep.sum() >= 45


def test_select_with_the_guard_never_picks_excluded_rows():
    X = cloud(outliers=12)
    for method in ("skmm", "k-center", "leverage"):
        plain = select(method, X, 30, seed=0)
        guarded = select(method, X, 30, seed=0, outlier_guard=True)
        assert guarded.diagnostics["outliers_excluded"] >= 12
        assert not np.isin(guarded.indices, np.arange(12)).any()
        assert np.unique(guarded.indices).size == 30
        if method != "leverage":
            assert np.isin(plain.indices, np.arange(12)).any()  # unguarded, these methods pick them
    relaxed = select("skmm-relaxation", X, 30, seed=0, outlier_guard={"threshold": 4.0})
    assert relaxed.weights.shape == (len(X),) and relaxed.weights[:12].sum() == 0
    labels = np.arange(len(X)) % 3
    bal = select("skmm", X, 30, seed=0, labels=labels, class_balanced=True, outlier_guard=True)
    assert not np.isin(bal.indices, np.arange(12)).any() and bal.diagnostics["class_balanced"]


def test_class_balanced_guard_catches_rows_that_only_stick_out_of_their_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 150)
    X = rng.normal(size=(300, 6)) * 0.3
    X[labels == 1, 0] += 4.0
    X[:5, 0] += 4.0  # class-0 rows sitting in the middle of class 1 (a wrong label): typical of the pool
    assert outlier_guard(X).keep[:5].all()
    sel = select("skmm", X, 40, seed=0, labels=labels, class_balanced=True, outlier_guard=True)
    assert not np.isin(sel.indices, np.arange(5)).any()
    assert sel.diagnostics["outliers_excluded"] >= 5 and set(sel.diagnostics["outlier_cutoff"]) == {"0", "1"}
    assert sel.diagnostics["class_budgets"] == {"0": 20, "1": 20}
    # Given budgets are met even where the guard would keep fewer rows (class 1 has 10 rows here).
    sel = select("skmm", X[:160], 12, seed=0, labels=labels[:160], class_budgets={0: 2, 1: 10}, outlier_guard=True)
    assert np.bincount(labels[:160][sel.indices]).tolist() == [2, 10]


@pytest.mark.parametrize("bad", [True, 1.0, 0.5, "x"])
def test_bad_guard_options_are_refused(bad):
    X = cloud()
    with pytest.raises(InputError):
        if bad is True:
            select("skmm", X, 10, outlier_guard="yes")
        else:
            select("skmm", X, 10, outlier_guard={"threshold": bad})
    with pytest.raises(InputError):
        outlier_guard(X, ridge=0)
    with pytest.raises(InputError):
        outlier_guard(X, iterations=0)


def test_curation_pool_has_the_requested_pollution():
    pool = load_digits_transfer().pool
    a, b = curation_pool(pool, seed=3), curation_pool(pool, seed=3)
    assert np.array_equal(a.pool.images, b.pool.images) and np.array_equal(a.kind, b.kind)
    N = len(a.pool.labels)
    assert N == round(len(pool.labels) / 0.75)
    assert abs((a.kind == 1).mean() - 0.2) < 0.005 and abs(a.corrupted.mean() - 0.05) < 0.005
    assert (a.kind == 0).sum() == len(pool.labels) and (a.source[a.kind == 2] == -1).all()
    dup = np.flatnonzero(a.kind == 1)
    assert np.array_equal(a.pool.labels[dup], pool.labels[a.source[dup]])
    assert a.pool.images.dtype == np.float32 and a.pool.images.min() >= 0 and a.pool.images.max() <= 1
    with pytest.raises(ValueError):
        curation_pool(pool, duplicate_frac=0.7, corrupt_frac=0.4)
