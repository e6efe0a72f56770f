"""The selection API: registry, determinism, bad input, class-balanced budgets, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from skmm_pipeline.core.moment_matching import moment_ratio
from skmm_pipeline.core.selection import SELECTORS, class_budgets, duplicate_rows, method_options, select
from skmm_pipeline.core.validation import InputError

ALL = ["skmm", "skmm-relaxation", "skmm-v1-reference", "skmmv2", "uniform", "leverage", "ridge-leverage",
       "adaptive", "herding", "k-center"]
FAST = {"skmm-v1-reference": {"steps": 30}}


def _clusters(seed=0, sizes=(400, 300, 200, 100, 50), spread=0.01):
    rng = np.random.default_rng(seed)
    G = np.concatenate([np.eye(len(sizes))[k] * 3 + spread * rng.normal(size=(s, len(sizes))) for k, s in enumerate(sizes)])
    return G, np.repeat(np.arange(len(sizes)), sizes)


def test_registry_holds_skmm_and_every_baseline():
    assert set(ALL) <= set(SELECTORS)
    assert {"design_dim", "ridge", "exchange"} <= set(method_options("skmm"))
    assert {"c_S", "solver", "rounding", "cuts", "repair"} <= set(method_options("skmm-relaxation"))
    assert method_options("skmm-v1-reference")["c_S"] == 0.999
    assert method_options("skmm-v1-reference")["steps"] == 10_000


@pytest.mark.parametrize("method", ALL)
def test_every_method_returns_n_distinct_indices_deterministically(method):
    X = np.random.default_rng(0).normal(size=(60, 5)) * [3, 2, 1, 0.5, 0.1]
    a = select(method, X, 9, seed=4, **FAST.get(method, {}))
    b = select(method, X, 9, seed=4, **FAST.get(method, {}))
    assert a.method == method and a.indices.dtype == np.int64
    assert a.indices.shape == (9,) and np.unique(a.indices).size == 9
    assert np.array_equal(a.indices, b.indices)
    for key in ("select_seconds", "moment_ratio", "zero_rows", "duplicate_rows"):
        assert key in a.diagnostics


def test_relaxation_returns_capped_simplex_weights_and_subset_diagnostics():
    G, cluster = _clusters()
    res = select("skmm-relaxation", G, 10, seed=0, c_S=0.9)
    s = res.weights
    assert s is not None and abs(s.sum() - 1) < 1e-9 and s.min() >= 0 and s.max() <= 0.1 + 1e-12
    d = res.diagnostics
    for key in ("relaxed_objective", "relaxed_worst_ratio", "iterations", "subset_objective", "rounding"):
        assert key in d
    lp = select("skmm-relaxation", G, 10, seed=0, c_S=0.9, solver="lp", rounding="pipage")
    assert lp.diagnostics["fractional"] <= G.shape[1] + 1
    rep = select("skmm-relaxation", G, 10, seed=0, c_S=0.9, repair=True)
    assert rep.diagnostics["repair"] == "exchange"
    assert sorted(set(cluster[rep.indices].tolist())) == [0, 1, 2, 3, 4]


def test_default_skmm_spreads_the_budget_over_clusters():
    # Tight clusters on orthogonal axes: the design takes one point per cluster before any second
    # point, where a uniform draw of the same size usually misses a cluster.
    G, cluster = _clusters()
    res = select("skmm", G, 5)
    assert sorted(cluster[res.indices].tolist()) == [0, 1, 2, 3, 4]
    assert res.diagnostics["moment_ratio"] > 0.1
    assert moment_ratio(G, np.arange(400)) < 1e-3


def test_bad_input_gives_clear_errors():
    X = np.random.default_rng(0).normal(size=(30, 4))
    bad = X.copy()
    bad[3, 1] = np.nan
    inf = X.copy()
    inf[7, 0] = np.inf
    cases = [
        (dict(X=X, n=0), "must be positive"),
        (dict(X=X, n=-2), "must be positive"),
        (dict(X=X, n=31), "larger than the pool"),
        (dict(X=X, n=2.5), "must be an integer"),
        (dict(X=bad, n=3), "row 3"),
        (dict(X=inf, n=3), "row 7"),
        (dict(X=X[:, :0], n=3), "at least one row and one column"),
        (dict(X=np.zeros((0, 4)), n=1), "at least one row and one column"),
        (dict(X=X[0], n=1), "2-D"),
        (dict(X=np.array([["a", "b"]]), n=1), "numeric"),
    ]
    for method in ("skmm", "uniform", "k-center"):
        for kwargs, msg in cases:
            with pytest.raises(InputError, match=msg):
                select(method, **kwargs)
    with pytest.raises(InputError, match="unknown selection method"):
        select("best", X, 3)
    with pytest.raises(InputError, match="labels must have shape"):
        select("uniform", X, 3, labels=np.zeros(4))
    with pytest.raises(InputError, match="does not take option"):
        select("skmm", X, 3, c_S=0.9)
    for c_S in (0, -0.5, float("nan"), "1"):
        for method in ("skmm-relaxation", "skmm-v1-reference"):
            with pytest.raises(InputError, match="c_S"):
                select(method, X, 3, c_S=c_S)
    with pytest.raises(InputError, match="seed"):
        select("uniform", X, 3, seed=-1)


def test_all_zero_rows():
    with pytest.raises(InputError, match="all rows of X are zero"):
        select("skmm", np.zeros((5, 3)), 2)
    with pytest.raises(ValueError, match="all sketched gradients are zero"):  # the old message still holds
        select("skmm-relaxation", np.zeros((5, 3)), 2)
    # Uniform needs no geometry.
    assert select("uniform", np.zeros((5, 3)), 2).indices.size == 2
    # Some zero rows: counted, eligible, never preferred while informative rows remain.
    G, _ = _clusters(sizes=(40, 30, 20))
    G[:10] = 0.0
    for method in ("skmm", "skmmv2", "skmm-relaxation", "leverage", "ridge-leverage", "adaptive"):
        res = select(method, G, 6, seed=1)
        assert res.diagnostics["zero_rows"] == 10
        assert not set(res.indices.tolist()) & set(range(10)), method
    # More budget than informative rows: zero rows fill the rest, still distinct.
    res = select("skmm", G[:12], 5)
    assert np.unique(res.indices).size == 5 and res.diagnostics["zero_rows"] == 10


def test_duplicated_rows_are_counted_and_stay_distinct_samples():
    G, cluster = _clusters(sizes=(3, 2, 1))
    G = np.concatenate([G, G, G])  # every row three times
    for method in ("skmm", "skmm-relaxation", "uniform", "herding", "k-center", "leverage"):
        res = select(method, G, 7, seed=0)
        assert res.diagnostics["duplicate_rows"] == 12
        assert np.unique(res.indices).size == 7
    # The design still reaches all three directions before doubling up.
    res = select("skmm", G, 3)
    assert sorted(np.concatenate([cluster] * 3)[res.indices].tolist()) == [0, 1, 2]


def test_float32_input_is_accepted_without_changing_the_result():
    G, _ = _clusters(seed=2)
    a = select("skmm", G.astype(np.float32), 12, seed=0).indices
    b = select("skmm", G.astype(np.float32).astype(np.float64), 12, seed=0).indices
    assert np.array_equal(a, b)


def test_class_budgets_follow_proportions_or_are_given():
    labels = np.array([0] * 70 + [1] * 25 + [2] * 5)
    assert class_budgets(labels, 10) == {0: 7, 1: 2, 2: 1}
    assert class_budgets(labels, 3) == {0: 1, 1: 1, 2: 1}  # at least one per class when n allows
    assert class_budgets(labels, 2) == {0: 1, 1: 1, 2: 0}  # largest remainder: 1.4, 0.5, 0.1
    assert sum(class_budgets(labels, 37).values()) == 37
    assert class_budgets(labels, 10, {0: 4, 1: 4, 2: 2}) == {0: 4, 1: 4, 2: 2}
    with pytest.raises(InputError, match="sum to 9"):
        class_budgets(labels, 10, {0: 4, 1: 4, 2: 1})
    with pytest.raises(InputError, match="fewer than its budget"):
        class_budgets(labels, 10, {0: 2, 1: 2, 2: 6})
    with pytest.raises(InputError, match="not in the data"):
        class_budgets(labels, 10, {7: 10})


@pytest.mark.parametrize("method", ["skmm", "uniform", "skmm-relaxation"])
def test_class_balanced_selection_meets_the_budgets(method):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 4))
    labels = np.array(["a"] * 70 + ["b"] * 25 + ["c"] * 5)
    res = select(method, X, 10, seed=2, labels=labels, class_balanced=True)
    picked = labels[res.indices]
    assert (picked == "a").sum() == 7 and (picked == "b").sum() == 2 and (picked == "c").sum() == 1
    assert res.diagnostics["class_budgets"] == {"a": 7, "b": 2, "c": 1}
    res = select(method, X, 10, seed=2, labels=labels, class_budgets={"a": 3, "b": 3, "c": 4})
    picked = labels[res.indices]
    assert [(picked == c).sum() for c in "abc"] == [3, 3, 4]
    assert np.array_equal(res.indices, select(method, X, 10, seed=2, labels=labels, class_budgets={"a": 3, "b": 3, "c": 4}).indices)
    with pytest.raises(InputError, match="needs labels"):
        select(method, X, 10, class_balanced=True)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "skmm_pipeline.cli", "select", *args], capture_output=True, text=True, timeout=300)


def test_cli_select_sketches_a_wide_input_and_writes_a_sidecar(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 300)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", np.repeat([0, 1, 2], 40))
    out = tmp_path / "idx.npy"
    proc = _cli("--input", str(tmp_path / "X.npy"), "--n", "12", "--sketch-dim", "16", "--seed", "3",
                "--labels", str(tmp_path / "y.npy"), "--class-balanced", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    idx = np.load(out)
    assert idx.shape == (12,) and np.unique(idx).size == 12
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["sketch"]["sketch_dim"] == 16 and side["sketch"]["seed"] == 3 and side["input_shape"] == [120, 300]
    assert side["class_budgets"] == {"0": 4, "1": 4, "2": 4}
    out2 = tmp_path / "relax.npy"
    proc = _cli("--input", str(tmp_path / "X.npy"), "--n", "12", "--method", "skmm-relaxation",
                "--option", "c_S=0.9", "--option", "rounding=pipage", "--output", str(out2))
    assert proc.returncode == 0, proc.stderr
    side = json.loads(out2.with_suffix(".json").read_text())
    assert side["rounding"] == "pipage" and side["c_S"] == 0.9
    w = np.load(side["weights_file"])
    assert w.shape == (120,) and abs(w.sum() - 1) < 1e-9


def test_cli_select_bad_input_is_one_line(tmp_path):
    X = np.ones((5, 3))
    np.save(tmp_path / "X.npy", X)
    for extra, msg in ((["--sketch-dim", "0"], "sketch_dim"), (["--option", "c_S=-1", "--method", "skmm-relaxation"], "c_S"),
                       (["--option", "nonsense"], "KEY=VALUE"), (["--method", "nope"], "unknown selection method")):
        proc = _cli("--input", str(tmp_path / "X.npy"), "--n", "2", "--output", str(tmp_path / "o.npy"), *extra)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o.npy").exists()


def test_duplicate_rows_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    for _ in range(30):
        N, d = int(rng.integers(1, 300)), int(rng.integers(1, 6))
        X = rng.integers(0, 3, size=(N, d)).astype(float)  # small alphabet: many exact repeats
        assert duplicate_rows(X) == N - len({tuple(r) for r in X})
    assert duplicate_rows(np.zeros((5000, 3))) == 4999
    X = rng.integers(0, 2, size=(400, 6)).astype(np.float32)  # many chunks of a few rows each
    assert duplicate_rows(X, chunk_elems=20) == duplicate_rows(X) == 400 - len({tuple(r) for r in X})


def test_skmm_reference_matches_another_moment_and_the_pool_itself_changes_nothing():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(400, 8))
    default = select("skmm", G, 25, seed=1).indices
    assert np.array_equal(select("skmm", G, 25, seed=1, reference=G).indices, default)
    # a reference living in the first four directions: the picks carry less energy in the other four
    R = rng.normal(size=(60, 8)) * np.r_[np.ones(4), np.zeros(4)]
    picked = select("skmm", G, 25, seed=1, reference=R).indices
    assert np.abs(G[picked, 4:]).mean() < 0.8 * np.abs(G[default, 4:]).mean()
    for bad, msg in ((rng.normal(size=(10, 5)), "5 columns"), (np.zeros((10, 8)), "all zero"),
                     (np.full((3, 8), np.nan), "non-finite")):
        with pytest.raises(InputError, match=msg):
            select("skmm", G, 25, reference=bad)


def test_greedy_design_spreads_the_budget_over_clusters():
    # Tight clusters on orthogonal axes: the design takes one point per cluster before any second
    # point, where a uniform draw of the same size usually misses a cluster.
    rng = np.random.default_rng(0)
    sizes = [400, 300, 200, 100, 50]
    G = np.concatenate([np.eye(5)[k] * 3 + 0.01 * rng.normal(size=(s, 5)) for k, s in enumerate(sizes)])
    cluster = np.repeat(np.arange(5), sizes)
    idx = select("skmm", G, 5).indices
    assert sorted(cluster[idx].tolist()) == [0, 1, 2, 3, 4]
    assert moment_ratio(G, idx) > 0.1
    assert moment_ratio(G, np.arange(400)) < 1e-3  # one cluster only: the other directions are missed


def test_select_is_deterministic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    for method in ("skmm", "uniform"):
        a, b = select(method, X, 5, seed=1), select(method, X, 5, seed=1)
        assert np.array_equal(a.indices, b.indices)
        assert len(set(a.indices.tolist())) == 5
        assert "moment_ratio" in a.diagnostics
    assert not np.array_equal(select("uniform", X, 5, seed=1).indices, select("uniform", X, 5, seed=2).indices)


def test_equal_class_budgets_share_the_budget_and_give_what_a_small_class_lacks_to_the_others():
    y = np.repeat([0, 1, 2], [50, 10, 3])
    assert class_budgets(y, 9, "equal") == {0: 3, 1: 3, 2: 3}
    assert class_budgets(y, 12, "equal") == {0: 5, 1: 4, 2: 3}
    assert class_budgets(y, 30, "equal") == {0: 17, 1: 10, 2: 3}
    assert class_budgets(y, 9, "proportional") == class_budgets(y, 9) == {0: 7, 1: 1, 2: 1}
    with pytest.raises(InputError, match="one of"):
        class_budgets(y, 9, "fair")
    X = np.random.default_rng(0).normal(size=(63, 4))
    res = select("skmm", X, 12, labels=y, class_budgets="equal")
    assert np.bincount(y[res.indices], minlength=3).tolist() == [5, 4, 3]
