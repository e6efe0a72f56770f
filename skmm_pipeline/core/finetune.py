"""FT-1 evaluation: a linear head (multinomial logistic regression) on frozen penultimate features.

The regularisation strength is chosen on the validation split; the test split is only ever scored
once, with the chosen model. Features are standardised with statistics of the whole pool (known to
the selector anyway), not of the small training subset.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class ProbeResult:
    test_accuracy: float
    val_accuracy: float
    C: float
    n_train: int
    n_classes_seen: int


class Standardizer:
    def __init__(self, pool: np.ndarray):
        self.mean = pool.mean(axis=0)
        self.scale = pool.std(axis=0) + 1e-6

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale


def linear_probe(train_X, train_y, val_X, val_y, test_X, test_y, Cs=DEFAULT_CS, seed: int = 0) -> ProbeResult:
    """Fit a logistic-regression head for each C, keep the best on validation, score it on test."""
    from sklearn.linear_model import LogisticRegression

    train_y = np.asarray(train_y)
    classes = np.unique(train_y)
    if classes.size == 1:
        # A subset with one class: the only sensible head predicts that class.
        c = classes[0]
        return ProbeResult(float(np.mean(test_y == c)), float(np.mean(val_y == c)), float("nan"), len(train_y), 1)
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=3000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny subsets are expected
            clf.fit(train_X, train_y)
        val_acc = float(clf.score(val_X, val_y))
        if best is None or val_acc > best[0]:
            best = (val_acc, C, clf)
    val_acc, C, clf = best
    return ProbeResult(float(clf.score(test_X, test_y)), val_acc, float(C), len(train_y), int(classes.size))
