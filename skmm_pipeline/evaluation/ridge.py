"""Ridge regression on a selected subset, scored on the whole pool: the risk of the paper's GMM experiment."""

from __future__ import annotations

import numpy as np

ALPHAS = np.logspace(-8, 4, 25)  # the ridge penalties tried by cross-validation


def ridge_cv_risk(X: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Risk (MSE over all rows) of ridge regression fit on rows ``idx``, alpha by shuffled 2-fold CV."""
    Xs, ys = X[idx], y[idx]
    perm = rng.permutation(idx.size)
    folds = (perm[: idx.size // 2], perm[idx.size // 2 :])
    cv = np.zeros(ALPHAS.size)
    for tr, va in (folds, folds[::-1]):
        K = Xs[tr] @ Xs[tr].T
        ev, U = np.linalg.eigh(K)
        ev = np.clip(ev, 0, None)
        Kva = Xs[va] @ Xs[tr].T
        Uy = U.T @ ys[tr]
        for a, alpha in enumerate(ALPHAS):
            pred = Kva @ (U @ (Uy / (ev + alpha)))
            cv[a] += np.mean((pred - ys[va]) ** 2)
    alpha = ALPHAS[int(np.argmin(cv))]
    K = Xs @ Xs.T
    coef = np.linalg.solve(K + alpha * np.eye(idx.size), ys)
    theta = Xs.T @ coef
    return float(np.mean((X @ theta - y) ** 2)), float(alpha)
