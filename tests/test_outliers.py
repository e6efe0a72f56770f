"""Outlier guard (core.outliers) and the curation variant of the embedded pool."""

import numpy as np
import pytest

from skmm_pipeline.core.outliers import lacks_structure, outlier_guard, spatial_structure
from skmm_pipeline.core.selection import select
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.digits import CORRUPTIONS, curation_pool, load_digits_transfer


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


def _structure_oracle(img: np.ndarray) -> float:
    """Obviously-correct version: every channel centred, pixel pairs listed one by one."""
    C, H, W = img.shape
    vals = []
    for pairs in ([((c, i, j), (c, i, j + 1)) for c in range(C) for i in range(H) for j in range(W - 1)],
                  [((c, i, j), (c, i + 1, j)) for c in range(C) for i in range(H - 1) for j in range(W)]):
        a = np.array([img[p] for p, _ in pairs], dtype=np.float64)
        b = np.array([img[q] for _, q in pairs], dtype=np.float64)
        ch = np.array([p[0] for p, _ in pairs])
        a_c = a - np.array([a[ch == k].mean() for k in range(C)])[ch]
        b_c = b - np.array([b[ch == k].mean() for k in range(C)])[ch]
        den = np.sqrt((a_c ** 2).sum() * (b_c ** 2).sum())
        vals.append(0.0 if den == 0 else float((a_c * b_c).sum() / den))
    return float(np.mean(vals))


def test_spatial_structure_equals_a_pairwise_oracle_and_is_chunk_invariant(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:9, 0:7]
    smooth = np.stack([np.sin(yy / 3 + k) + np.cos(xx / 2 - k) for k in range(3)])
    images = np.stack([smooth, rng.uniform(size=(3, 9, 7)), smooth + 0.3 * rng.normal(size=(3, 9, 7)),
                       np.zeros((3, 9, 7)), smooth * [[[1.0]], [[5.0]], [[0.0]]]]).astype(np.float32)
    scores = spatial_structure(images)
    np.testing.assert_allclose(scores, [_structure_oracle(im) for im in images], atol=1e-12)
    assert scores[0] > 0.8 and abs(scores[1]) < 0.3 and scores[3] == 0.0  # smooth, noise, constant
    np.testing.assert_array_equal(spatial_structure(images, chunk_elems=1), scores)
    np.save(tmp_path / "im.npy", images)
    np.testing.assert_array_equal(spatial_structure(np.load(tmp_path / "im.npy", mmap_mode="r"), chunk_elems=200), scores)
    with pytest.raises(InputError, match="N x C x H x W"):
        spatial_structure(images[0])
    with pytest.raises(InputError, match="no neighbouring"):
        spatial_structure(np.ones((2, 1, 1, 1)))
    bad = images.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        spatial_structure(bad)


def test_input_check_flags_the_unstructured_corruptions_and_no_clean_digit():
    data = load_digits_transfer()
    cur = curation_pool(data.pool, seed=0)
    flagged = lacks_structure(spatial_structure(cur.pool.images))
    assert not flagged[cur.kind < 2].any()  # no clean digit and no near-duplicate
    assert flagged[cur.corruption == CORRUPTIONS.index("noise")].all()
    assert flagged[cur.corruption == CORRUPTIONS.index("salt-pepper")].mean() > 0.5
    # One-sided: over-smooth images (blank stripes) are left to the sketch guard.
    assert not flagged[cur.corruption == CORRUPTIONS.index("blank-stripe")].any()
    assert not lacks_structure(spatial_structure(data.pool.images)).any()
    assert not lacks_structure(np.full(10, 0.4)).any()  # no spread: nothing stands out
    for bad in (0, -1.0, True, "4"):
        with pytest.raises(InputError):
            lacks_structure(np.ones(5), bad)
    with pytest.raises(InputError):
        lacks_structure(np.array([0.1, np.nan]))


def test_excluded_rows_are_never_selected_and_the_rest_is_the_pool():
    X = cloud(200, 6, seed=2)
    exclude = np.zeros(200, dtype=bool)
    exclude[::7] = True
    for method in ("skmm", "k-center", "skmm-relaxation", "uniform"):
        sel = select(method, X, 25, seed=1, exclude=exclude)
        assert not exclude[sel.indices].any() and np.unique(sel.indices).size == 25
        assert sel.diagnostics["rows_excluded"] == exclude.sum()
        # The same as selecting on the remaining rows, mapped back to the pool's indices.
        rest = np.flatnonzero(~exclude)
        np.testing.assert_array_equal(sel.indices, rest[select(method, X[rest], 25, seed=1).indices])
        if sel.weights is not None:
            assert sel.weights.shape == (200,) and sel.weights[exclude].sum() == 0
    none = select("skmm", X, 25, seed=1, exclude=np.zeros(200, dtype=bool))
    np.testing.assert_array_equal(none.indices, select("skmm", X, 25, seed=1).indices)
    assert none.diagnostics["rows_excluded"] == 0
    labels = np.arange(200) % 2
    bal = select("skmm", X, 20, seed=0, labels=labels, class_balanced=True, outlier_guard=True, exclude=exclude)
    assert not exclude[bal.indices].any() and sum(bal.diagnostics["class_budgets"].values()) == 20
    with pytest.raises(InputError, match="booleans"):
        select("skmm", X, 10, exclude=np.flatnonzero(exclude))
    with pytest.raises(InputError, match="booleans"):
        select("skmm", X, 10, exclude=exclude[:-1])
    with pytest.raises(InputError, match="rows left after excluding"):
        select("skmm", X, 190, exclude=exclude)
    Z = X.copy()
    Z[~exclude] = 0  # only excluded rows carry anything
    with pytest.raises(InputError, match="all rows of X are zero"):
        select("skmm", Z, 10, exclude=exclude)
