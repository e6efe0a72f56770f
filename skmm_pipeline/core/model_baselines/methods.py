"""The model-based selectors: train the proxy head, score the pool, keep the best ``n`` rows.

With ``balance=True`` the budget is split over the classes (:func:`skmm_pipeline.core.budgets.class_budgets`)
and each class gets its own top scores or its own greedy run.
"""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.budgets import class_budgets
from skmm_pipeline.core.model_baselines.proxy import (
    DEFAULT_FORGETTING_EPOCHS,
    DEFAULT_REPEATS,
    ProxyHead,
    TrainOptions,
    _fit,
    _rate,
    encode_labels,
)
from skmm_pipeline.core.model_baselines.scores import (
    UNCERTAINTY_KINDS,
    _forgetting_scores,
    _gradient_norm_scores,
    contextual_diversity_kcenter,
    deepfool_distances,
    glister_greedy,
    uncertainty_scores,
)
from skmm_pipeline.core.validation import InputError, as_finite_matrix, check_int


def _top(scores: np.ndarray, n: int, rng: np.random.Generator, largest: bool) -> np.ndarray:
    """The ``n`` best rows (largest or smallest score), ties in seeded random order; best first."""
    key = rng.random(scores.size)
    order = np.lexsort((key, -scores if largest else scores))
    return order[:n].astype(np.int64)


def _select_by_scores(scores, n, rng, largest, y, balance) -> np.ndarray:
    if not balance:
        return _top(scores, n, rng, largest)
    parts = []
    for c, b in class_budgets(y, n).items():
        if b:
            rows = np.flatnonzero(y == c)
            parts.append(rows[_top(scores[rows], b, rng, largest)])
    return np.concatenate(parts)


def _summary(scores: np.ndarray, idx: np.ndarray, name: str) -> dict:
    fin = scores[np.isfinite(scores)]
    sel = scores[idx]
    sel = sel[np.isfinite(sel)]
    nan = float("nan")
    return {
        "score": name,
        "score_min": float(fin.min()) if fin.size else nan,
        "score_max": float(fin.max()) if fin.size else nan,
        "score_mean": float(fin.mean()) if fin.size else nan,
        "selected_score_min": float(sel.min()) if sel.size else nan,
        "selected_score_max": float(sel.max()) if sel.size else nan,
    }


def _head_diag(head: ProxyHead) -> dict:
    return {"train_accuracy": head.train_accuracy, "train_loss": head.train_loss, "epochs": head.epochs,
            "lr": head.lr, "classes": int(head.classes.size)}


def _prepare(X, labels, method, train, min_epochs=0):
    X = np.asarray(X)
    classes, y = encode_labels(labels, X.shape[0], method)
    opts = TrainOptions(**train).checked(min_epochs)
    return X, classes, y, opts


def select_uncertainty(X, n, labels, *, kind, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, kind, train)
    if kind not in UNCERTAINTY_KINDS:
        raise InputError(f"unknown uncertainty kind {kind!r}; available: {list(UNCERTAINTY_KINDS)}")
    head = _fit(X, y, classes.size, classes, seed, opts)
    s = uncertainty_scores(head.probs(X), kind)
    idx = _select_by_scores(s, n, np.random.default_rng([seed, 1]), kind != "margin", y, balance)
    return idx, {**_summary(s, idx, kind), **_head_diag(head), "balance": bool(balance)}


def select_gradient_norm(X, n, labels, *, score, seed=0, repeats=DEFAULT_REPEATS, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, score, train)
    out = _gradient_norm_scores(X, y, classes, seed, check_int(repeats, "repeats", minimum=1), opts)
    s = out[score]
    idx = _select_by_scores(s, n, np.random.default_rng([seed, 2]), True, y, balance)
    return idx, {**_summary(s, idx, score), "train_accuracy": out["train_accuracy"], "epochs": opts.epochs,
                 "lr": out["lr"], "repeats": int(repeats), "balance": bool(balance)}


def select_forgetting(X, n, labels, *, seed=0, balance=False, **train):
    train.setdefault("epochs", DEFAULT_FORGETTING_EPOCHS)
    X, classes, y, opts = _prepare(X, labels, "forgetting", train, min_epochs=1)
    counts, head = _forgetting_scores(X, y, classes, seed, opts)
    idx = _select_by_scores(counts, n, np.random.default_rng([seed, 3]), True, y, balance)
    never = ~np.isfinite(counts)
    return idx, {**_summary(counts, idx, "forgetting_events"), **_head_diag(head),
                 "never_learned": int(never.sum()), "selected_never_learned": int(never[idx].sum()),
                 "balance": bool(balance)}


def select_deepfool(X, n, labels, *, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "deepfool", train)
    head = _fit(X, y, classes.size, classes, seed, opts)
    dist = deepfool_distances(X, head)
    idx = _select_by_scores(dist, n, np.random.default_rng([seed, 4]), False, y, balance)
    return idx, {**_summary(dist, idx, "boundary_distance"), **_head_diag(head), "balance": bool(balance)}


def select_contextual_diversity(X, n, labels, *, seed=0, balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "contextual-diversity", train)
    head = _fit(X, y, classes.size, classes, seed, opts)
    logP = head.log_probs(X)
    rng = np.random.default_rng([seed, 5])
    if not balance:
        idx, diag = contextual_diversity_kcenter(logP, n, rng)
    else:
        parts, radius = [], 0.0
        for c, b in class_budgets(y, n).items():
            if b:
                rows = np.flatnonzero(y == c)
                sub, d = contextual_diversity_kcenter(logP[rows], b, rng)
                parts.append(rows[sub])
                radius = max(radius, d["covering_radius"])
        idx, diag = np.concatenate(parts), {"covering_radius": radius}
    return idx, {**diag, **_head_diag(head), "balance": bool(balance)}


def select_glister(X, n, labels, *, seed=0, val_X=None, val_labels=None, eta="auto", balance=False, **train):
    X, classes, y, opts = _prepare(X, labels, "glister", train)
    eta = _rate("eta", eta)
    XV = yV = None
    if (val_X is None) != (val_labels is None):
        raise InputError("glister needs both val_X and val_labels (or neither: the pool is the validation set)")
    if val_X is not None:
        XV = as_finite_matrix(val_X, "val_X")
        if XV.shape[1] != X.shape[1]:
            raise InputError(f"val_X must have {X.shape[1]} columns like X, got {XV.shape[1]}")
        vl = np.asarray(val_labels)
        if vl.shape != (XV.shape[0],):
            raise InputError(f"val_labels must have shape ({XV.shape[0]},), got {vl.shape}")
        try:
            pos = np.minimum(np.searchsorted(classes, vl), classes.size - 1)
            unknown = np.asarray(classes[pos] != vl, dtype=bool)
        except TypeError as exc:
            raise InputError(f"val_labels are not comparable with the pool's labels: {exc}") from None
        if unknown.any():
            first = vl[np.flatnonzero(unknown)[0]]
            raise InputError(f"val_labels has labels not in the pool's classes, first {first!r}")
        yV = pos.astype(np.int64)
    head = _fit(X, y, classes.size, classes, seed, opts)
    step = head.lr / n if eta == "auto" else eta
    if not balance:
        idx, diag = glister_greedy(X, y, head, n, step, XV, yV)
    else:
        parts, diag = [], {"eta": step}
        for c, b in class_budgets(y, n).items():
            if b:
                rows = np.flatnonzero(y == c)
                if XV is None:
                    sub, _ = glister_greedy(X, y, head, b, step, candidates=rows)
                else:
                    vrows = np.flatnonzero(yV == c)
                    vX, vy = (XV[vrows], yV[vrows]) if vrows.size else (XV, yV)
                    sub, _ = glister_greedy(X, y, head, b, step, vX, vy, candidates=rows)
                parts.append(sub)
        idx = np.concatenate(parts)
    return idx, {**diag, **_head_diag(head), "validation": "pool" if XV is None else "given",
                 "balance": bool(balance)}
