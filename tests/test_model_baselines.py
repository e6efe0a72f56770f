"""Model-based baselines (proxy head on frozen features) against direct recomputations and properties."""

import numpy as np
import pytest
import torch

from skmm_pipeline.core import model_baselines as mb
from skmm_pipeline.core.selection import (
    DESCRIPTIONS,
    METHOD_INFO,
    SELECTORS,
    class_budgets,
    method_info,
    method_options,
    register,
    select,
)
from skmm_pipeline.core.validation import InputError

MODEL = ["entropy", "margin", "least-confidence", "grand", "el2n", "forgetting", "glister", "deepfool",
         "contextual-diversity"]
LABEL_FREE = ["skmm", "skmmv2", "skmm-relaxation", "skmm-v1-reference", "uniform", "leverage", "ridge-leverage",
              "adaptive", "herding", "k-center"]
FAST = {"epochs": 4}
FAST_REPEATS = {"epochs": 4, "repeats": 2}


def _blobs(seed=0, N=150, d=4, K=3, spread=1.0, scale=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d)) * scale
    y = rng.integers(0, K, N)
    return centres[y] + spread * rng.normal(size=(N, d)), y


def _numpy_probs(head, X):
    Z = X @ head.W.T + head.b
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_metadata_groups_and_inputs():
    for name in LABEL_FREE:
        assert method_info(name) == {"group": "label-free", "input": "any"}
    for name in MODEL:
        assert name in SELECTORS
        assert method_info(name) == {"group": "label-using", "input": "features"}
        assert {"epochs", "lr", "weight_decay", "batch_size", "balance"} <= set(method_options(name))
    assert method_options("grand")["repeats"] == mb.DEFAULT_REPEATS
    assert method_options("forgetting")["epochs"] == mb.DEFAULT_FORGETTING_EPOCHS
    assert {"val_X", "val_labels", "eta"} <= set(method_options("glister"))
    with pytest.raises(InputError, match="unknown selection method"):
        method_info("nope")


def test_register_stays_backward_compatible():
    try:
        @register("tmp-method", "a temporary method")
        def _tmp(X, n, *, seed, labels=None, stats=None):
            return np.arange(n), {}

        assert method_info("tmp-method") == {"group": "label-free", "input": "any"}
        assert select("tmp-method", np.eye(5), 2).indices.tolist() == [0, 1]
        with pytest.raises(ValueError):
            register("tmp-bad", group="label-maybe")
    finally:
        for table in (SELECTORS, DESCRIPTIONS, METHOD_INFO):
            table.pop("tmp-method", None)


# --------------------------------------------------------------------------------------------------
# Every method
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", MODEL)
def test_every_method_returns_n_distinct_indices_deterministically(method):
    X, y = _blobs(1, N=120)
    opts = FAST_REPEATS if method in ("grand", "el2n") else FAST
    a = select(method, X, 17, seed=3, labels=y, **opts)
    b = select(method, X, 17, seed=3, labels=y, **opts)
    assert a.indices.shape == (17,) and np.unique(a.indices).size == 17
    assert np.array_equal(a.indices, b.indices)
    d = a.diagnostics
    assert 0.0 <= d["train_accuracy"] <= 1.0 and d["epochs"] == 4
    if method not in ("contextual-diversity", "glister", "forgetting"):  # forgetting: never-learned = inf, left out
        assert d["score_min"] <= d["selected_score_min"] <= d["selected_score_max"] <= d["score_max"]
    # string labels work the same (classes are the sorted distinct values)
    c = select(method, X, 17, seed=3, labels=np.array(["a", "b", "c"])[y], **opts)
    assert np.array_equal(a.indices, c.indices)


@pytest.mark.parametrize("method", ["entropy", "forgetting", "glister", "contextual-diversity"])
def test_balance_splits_the_budget_over_classes(method):
    X, y = _blobs(2, N=120)
    res = select(method, X, 20, seed=0, labels=y, balance=True, **FAST)
    assert np.unique(res.indices).size == 20
    counts = np.bincount(y[res.indices], minlength=3)
    assert dict(enumerate(counts.tolist())) == class_budgets(y, 20)
    # Balanced is the registered default (as in DeepCore).
    assert np.array_equal(select(method, X, 20, seed=0, labels=y, **FAST).indices, res.indices)


# --------------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------------


def test_uncertainty_scores_match_a_numpy_recomputation_and_the_most_uncertain_are_kept():
    X, y = _blobs(3, N=160, spread=1.6)
    head = mb.fit_proxy_head(X, y, seed=5, epochs=6)
    P = _numpy_probs(head, X)
    np.testing.assert_allclose(head.probs(X), P, atol=1e-12)
    srt = np.sort(P, axis=1)
    direct = {
        "entropy": -np.sum(P * np.log(P), axis=1),
        "least-confidence": 1.0 - srt[:, -1],
        "margin": srt[:, -1] - srt[:, -2],
    }
    for kind, expected in direct.items():
        scores = mb.uncertainty_scores(P, kind)
        np.testing.assert_allclose(scores, expected, atol=1e-12)
        res = select(kind, X, 25, seed=5, labels=y, balance=False, epochs=6)
        chosen = np.zeros(len(y), dtype=bool)
        chosen[res.indices] = True
        if kind == "margin":  # smallest margins
            assert scores[chosen].max() <= scores[~chosen].min()
        else:  # largest entropy / 1 - max p
            assert scores[chosen].min() >= scores[~chosen].max()
        assert res.diagnostics["train_accuracy"] == pytest.approx(head.train_accuracy)


def test_uncertainty_ties_are_broken_by_the_seed():
    X = np.repeat(np.array([[1.0, 0.0], [-1.0, 0.0]]), 20, axis=0)  # 2 distinct rows: scores tie in blocks
    y = np.repeat([0, 1], 20)
    picks = {tuple(sorted(select("entropy", X, 5, seed=s, labels=y, balance=False, epochs=2).indices)) for s in range(6)}
    assert len(picks) > 1


# --------------------------------------------------------------------------------------------------
# GraNd / EL2N
# --------------------------------------------------------------------------------------------------


def _autograd_gradient_norms(head, X, y):
    """Per-sample gradient norms of the cross-entropy w.r.t. (W, b), one autograd call per row."""
    W = torch.tensor(head.W, requires_grad=True)
    b = torch.tensor(head.b, requires_grad=True)
    norms = []
    for x, t in zip(torch.tensor(X), torch.tensor(y)):
        loss = torch.nn.functional.cross_entropy((x @ W.T + b)[None], t[None])
        gW, gb = torch.autograd.grad(loss, (W, b))
        norms.append(float(torch.sqrt(gW.pow(2).sum() + gb.pow(2).sum())))
    return np.array(norms)


def test_grand_closed_form_equals_autograd_per_sample_gradient_norms():
    X, y = _blobs(4, N=90, d=5)
    seed, repeats = 7, 3
    out = mb.gradient_norm_scores(X, y, seed=seed, repeats=repeats, epochs=3)
    rows = np.array([0, 3, 11, 42, 89])
    norms = np.mean(
        [_autograd_gradient_norms(mb.fit_proxy_head(X, y, seed=mb.repeat_seed(seed, r), epochs=3), X[rows], y[rows])
         for r in range(repeats)],
        axis=0,
    )
    np.testing.assert_allclose(out["grand"][rows], norms, rtol=1e-10)
    res = select("grand", X, 15, seed=seed, labels=y, balance=False, repeats=repeats, epochs=3)
    assert set(res.indices.tolist()) == set(np.argsort(-out["grand"])[:15].tolist())


def test_el2n_equals_the_direct_error_norm_average():
    X, y = _blobs(5, N=100)
    seed, repeats = 2, 3
    out = mb.gradient_norm_scores(X, y, seed=seed, repeats=repeats, epochs=3)
    direct = np.zeros(len(y))
    for r in range(repeats):
        P = _numpy_probs(mb.fit_proxy_head(X, y, seed=mb.repeat_seed(seed, r), epochs=3), X)
        direct += np.linalg.norm(P - np.eye(3)[y], axis=1) / repeats
    np.testing.assert_allclose(out["el2n"], direct, atol=1e-12)
    np.testing.assert_allclose(out["grand"], direct * np.sqrt((X**2).sum(axis=1) + 1), atol=1e-12)
    res = select("el2n", X, 12, seed=seed, labels=y, balance=False, repeats=repeats, epochs=3)
    chosen = np.zeros(len(y), dtype=bool)
    chosen[res.indices] = True
    assert direct[chosen].min() >= direct[~chosen].max()


# --------------------------------------------------------------------------------------------------
# Forgetting
# --------------------------------------------------------------------------------------------------


def test_forgetting_counts_on_hand_built_correctness_sequences():
    flags = np.array(
        [
            # presentations ->
            [1, 0, 1, 0, 1],  # learned, forgotten twice
            [0, 0, 0, 0, 0],  # never learned
            [1, 1, 1, 1, 1],  # never forgotten
            [0, 1, 0, 0, 1],  # forgotten once (0 -> 0 is not an event)
            [1, 1, 1, 1, 0],  # forgotten at the last presentation
        ],
        dtype=bool,
    ).T
    counts = mb.forgetting_counts(flags)
    assert counts.tolist() == [2.0, np.inf, 0.0, 1.0, 1.0]
    # minibatch-style updates: only the presented samples change
    tr = mb.ForgettingTracker(3)
    tr.update(np.array([0, 2]), np.array([True, True]))
    tr.update(np.array([1]), np.array([True]))
    tr.update(np.array([0, 1]), np.array([False, True]))
    assert tr.counts().tolist() == [1.0, 0.0, 0.0]
    assert tr.presentations.tolist() == [2, 2, 1]


def test_forgetting_keeps_the_most_forgotten_never_learned_first():
    X, y = _blobs(6, N=150, spread=2.5)  # overlapping classes: events and never-learned samples
    counts, head = mb.forgetting_scores(X, y, seed=1, epochs=8, batch_size=32)
    assert np.isinf(counts).any() and (counts[np.isfinite(counts)] > 0).any()
    n = int(np.isinf(counts).sum()) + 5
    res = select("forgetting", X, n, seed=1, labels=y, balance=False, epochs=8, batch_size=32)
    chosen = np.zeros(len(y), dtype=bool)
    chosen[res.indices] = True
    assert counts[chosen].min() >= counts[~chosen].max()
    assert np.isinf(counts[res.indices[: int(np.isinf(counts).sum())]]).all()
    assert res.diagnostics["never_learned"] == int(np.isinf(counts).sum())
    assert res.diagnostics["train_accuracy"] == pytest.approx(head.train_accuracy)


# --------------------------------------------------------------------------------------------------
# DeepFool
# --------------------------------------------------------------------------------------------------


def _brute_force_boundary_distance(head, x, angles=720, t_max=12.0, steps=600):
    """Smallest step along any of ``angles`` directions that changes the head's prediction."""
    def pred(pts):
        return np.argmax(pts @ head.W.T + head.b, axis=-1)

    p0 = pred(x[None])[0]
    th = np.linspace(0, 2 * np.pi, angles, endpoint=False)
    U = np.stack([np.cos(th), np.sin(th)], axis=1)
    ts = np.linspace(0, t_max, steps)
    changed = pred(x[None, None, :] + ts[None, :, None] * U[:, None, :]) != p0  # angles x steps
    has = changed.any(axis=1)
    first = np.argmax(changed, axis=1)
    lo, hi = ts[np.maximum(first - 1, 0)][has], ts[first][has]
    V = U[has]
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        moved = pred(x[None, :] + mid[:, None] * V) != p0
        hi = np.where(moved, mid, hi)
        lo = np.where(moved, lo, mid)
    return float(hi.min())


def test_deepfool_distance_equals_a_brute_force_search_on_a_2d_toy():
    X, y = _blobs(7, N=120, d=2, K=3, spread=0.8)
    head = mb.fit_proxy_head(X, y, seed=0, epochs=8)
    dist = mb.deepfool_distances(X, head)
    for i in [0, 5, 17, 33, 64, 101]:
        assert dist[i] == pytest.approx(_brute_force_boundary_distance(head, X[i]), rel=1e-4)
    res = select("deepfool", X, 10, seed=0, labels=y, balance=False, epochs=8)
    chosen = np.zeros(len(y), dtype=bool)
    chosen[res.indices] = True
    assert dist[chosen].max() <= dist[~chosen].min()


def test_deepfool_projection_lands_on_the_boundary():
    X, y = _blobs(8, N=60, d=3, K=4)
    head = mb.fit_proxy_head(X, y, seed=0, epochs=5)
    dist = mb.deepfool_distances(X, head)
    Z = X @ head.W.T + head.b
    for i in range(10):
        p = int(np.argmax(Z[i]))
        k = min((k for k in range(4) if k != p),
                key=lambda k: (Z[i, p] - Z[i, k]) / np.linalg.norm(head.W[p] - head.W[k]))
        w = head.W[p] - head.W[k]
        x_star = X[i] - (Z[i, p] - Z[i, k]) / (w @ w) * w  # orthogonal projection on that hyperplane
        assert np.linalg.norm(x_star - X[i]) == pytest.approx(dist[i])
        z = x_star @ head.W.T + head.b
        assert z[p] == pytest.approx(z[k]) and z.max() == pytest.approx(z[p])


# --------------------------------------------------------------------------------------------------
# Contextual diversity
# --------------------------------------------------------------------------------------------------


def test_contextual_diversity_is_k_center_under_the_symmetric_kl_distance():
    X, y = _blobs(9, N=80, spread=1.4)
    res = select("contextual-diversity", X, 12, seed=4, labels=y, balance=False, epochs=5)
    head = mb.fit_proxy_head(X, y, seed=4, epochs=5)
    P = _numpy_probs(head, X)
    L = np.log(P)
    D = 0.5 * (np.sum(P * L, axis=1)[:, None] - P @ L.T) + 0.5 * (np.sum(P * L, axis=1)[None, :] - L @ P.T)
    kl = lambda a, b: np.sum(a * np.log(a / b))  # noqa: E731
    assert D[3, 7] == pytest.approx(0.5 * kl(P[3], P[7]) + 0.5 * kl(P[7], P[3]))
    chosen = [int(res.indices[0])]
    for _ in range(11):
        mind = D[:, chosen].min(axis=1)
        mind[chosen] = -1
        chosen.append(int(np.argmax(mind)))
    assert res.indices.tolist() == chosen
    assert res.diagnostics["covering_radius"] == pytest.approx(D[:, chosen].min(axis=1).max(), abs=1e-12)


def test_contextual_diversity_covering_radius_does_not_grow_with_n():
    X, y = _blobs(10, N=150, spread=1.2)
    radii = [select("contextual-diversity", X, n, seed=2, labels=y, balance=False, epochs=4).diagnostics["covering_radius"]
             for n in (1, 3, 6, 12, 24, 48)]
    assert all(b <= a + 1e-15 for a, b in zip(radii, radii[1:]))
    assert radii[-1] < radii[0]


# --------------------------------------------------------------------------------------------------
# GLISTER
# --------------------------------------------------------------------------------------------------


def _noisy_toy(seed, N=300, NV=150, noise=0.4, K=3, d=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d)) * 1.5
    y = rng.integers(0, K, N + NV)
    X = centres[y] + rng.normal(size=(N + NV, d))
    flip = rng.random(N) < noise
    noisy = np.where(flip, (y[:N] + rng.integers(1, K, N)) % K, y[:N])
    return X[:N], noisy, y[:N], X[N:], y[N:]


def _retrained_val_log_likelihood(Xs, ys, XV, yV, K=3, steps=300, lam=1e-2):
    """Full-batch gradient descent on a K-class ridge-regularised softmax head; mean log-likelihood on val."""
    Xt = np.hstack([Xs, np.ones((len(Xs), 1))])
    T = np.zeros((K, Xt.shape[1]))
    Y = np.eye(K)[ys]
    step = 1.0 / (np.linalg.eigvalsh(Xt.T @ Xt / len(Xt))[-1] / 2 + lam)
    for _ in range(steps):
        P = _numpy_probs(type("H", (), {"W": T[:, :-1], "b": T[:, -1]}), Xs)
        T -= step * ((P - Y).T @ Xt / len(Xt) + lam * T)
    PV = _numpy_probs(type("H", (), {"W": T[:, :-1], "b": T[:, -1]}), XV)
    return float(np.mean(np.log(PV[np.arange(len(yV)), yV])))


@pytest.mark.parametrize("seed", [2, 5])
def test_glister_beats_uniform_on_validation_log_likelihood_with_noisy_pool_labels(seed):
    X, noisy, clean, XV, yV = _noisy_toy(seed)
    res = select("glister", X, 30, seed=0, labels=noisy, balance=False, val_X=XV, val_labels=yV)
    d = res.diagnostics
    assert d["validation"] == "given" and d["val_log_likelihood_end"] > d["val_log_likelihood_start"]
    ll_glister = _retrained_val_log_likelihood(X[res.indices], noisy[res.indices], XV, yV)
    draws = [np.random.default_rng(k).choice(len(X), 30, replace=False) for k in range(5)]
    ll_uniform = np.mean([_retrained_val_log_likelihood(X[i], noisy[i], XV, yV) for i in draws])
    assert ll_glister > ll_uniform
    # it avoids the flipped labels the clean validation set disagrees with
    assert np.mean(noisy[res.indices] == clean[res.indices]) > np.mean(noisy == clean) + 0.2


def test_glister_first_pick_maximises_the_taylor_gain_from_autograd():
    X, noisy, _, XV, yV = _noisy_toy(3, N=120, NV=60)
    res = select("glister", X, 3, seed=1, labels=noisy, balance=False, val_X=XV, val_labels=yV, epochs=5)
    head = mb.fit_proxy_head(X, noisy, seed=1, epochs=5)
    W = torch.tensor(head.W, requires_grad=True)
    b = torch.tensor(head.b, requires_grad=True)
    lv = torch.nn.functional.cross_entropy(torch.tensor(XV) @ W.T + b, torch.tensor(yV))
    gV = torch.cat([g.flatten() for g in torch.autograd.grad(lv, (W, b))])

    def gain(i):
        li = torch.nn.functional.cross_entropy(torch.tensor(X[i : i + 1]) @ W.T + b, torch.tensor(noisy[i : i + 1]))
        return float(torch.cat([g.flatten() for g in torch.autograd.grad(li, (W, b))]) @ gV)

    gains = np.array([gain(i) for i in range(len(X))])
    assert int(res.indices[0]) == int(np.argmax(gains))
    assert res.diagnostics["first_gain"] == pytest.approx(res.diagnostics["eta"] * gains.max(), rel=1e-8)


def test_glister_defaults_to_the_pool_as_validation_set():
    X, y = _blobs(11, N=100)
    res = select("glister", X, 10, seed=0, labels=y, balance=False, epochs=3)
    assert res.diagnostics["validation"] == "pool"
    assert res.diagnostics["eta"] == pytest.approx(res.diagnostics["lr"] / 10)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", MODEL)
def test_bad_input_is_rejected_with_a_clear_message(method):
    X, y = _blobs(12, N=40)
    with pytest.raises(InputError, match="needs labels"):
        select(method, X, 5)
    with pytest.raises(InputError, match="at least two classes"):
        select(method, X, 5, labels=np.zeros(40, dtype=int))
    with pytest.raises(InputError, match="larger than the pool"):
        select(method, X, 41, labels=y)
    bad = X.copy()
    bad[7, 1] = np.nan
    with pytest.raises(InputError, match="first at row 7"):
        select(method, bad, 5, labels=y)
    with pytest.raises(InputError, match="labels must have shape"):
        select(method, X, 5, labels=y[:-1])
    with pytest.raises(InputError, match="epochs"):
        select(method, X, 5, labels=y, epochs=-1)
    with pytest.raises(InputError, match="at least two classes"):  # class_balanced runs inside one class
        select(method, X, 6, labels=y, class_balanced=True)


def test_bad_options_are_rejected():
    X, y = _blobs(13, N=40)
    with pytest.raises(InputError, match="lr"):
        select("entropy", X, 5, labels=y, lr=0)
    with pytest.raises(InputError, match="repeats"):
        select("grand", X, 5, labels=y, repeats=0)
    with pytest.raises(InputError, match="epochs"):
        select("forgetting", X, 5, labels=y, epochs=0)
    with pytest.raises(InputError, match="non-finite"):
        select("entropy", X, 5, labels=np.where(np.arange(40) == 3, np.nan, y.astype(float)))
    with pytest.raises(InputError, match="both val_X and val_labels"):
        select("glister", X, 5, labels=y, val_X=X)
    with pytest.raises(InputError, match="not in the pool's classes"):
        select("glister", X, 5, labels=y, val_X=X[:4], val_labels=np.array([0, 1, 2, 9]))
    with pytest.raises(InputError, match="columns"):
        select("glister", X, 5, labels=y, val_X=X[:4, :2], val_labels=y[:4])
    with pytest.raises(InputError, match="eta"):
        select("glister", X, 5, labels=y, eta=-1.0)
