"""Per-class budgets: split a selection budget over the classes of a labelled pool."""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.validation import InputError

__all__ = ["class_budgets"]


def class_budgets(labels: np.ndarray, n: int, given=None) -> dict:
    """Per-class budgets: given (validated) or proportional to class sizes by largest remainder."""
    classes, counts = np.unique(labels, return_counts=True)
    if given is not None:
        if not isinstance(given, dict):
            raise InputError("class_budgets must be a dict {label: count}")
        unknown = set(given) - set(classes.tolist())
        if unknown:
            raise InputError(f"class_budgets names labels not in the data: {sorted(unknown, key=str)[:5]}")
        budgets = {c: int(given.get(c, 0)) for c in classes.tolist()}
        if any(v < 0 for v in budgets.values()):
            raise InputError("class budgets must be non-negative")
        if sum(budgets.values()) != n:
            raise InputError(f"class budgets sum to {sum(budgets.values())}, expected n={n}")
        for c, cnt in zip(classes.tolist(), counts):
            if budgets[c] > cnt:
                raise InputError(f"class {c!r} has {cnt} samples, fewer than its budget {budgets[c]}")
        return budgets
    K = classes.size
    quota = n * counts / counts.sum()
    base = np.floor(quota).astype(int)
    if n >= K:
        base = np.maximum(base, 1)
    base = np.minimum(base, counts)
    while base.sum() > n:  # the at-least-one floor overshot: take back from the largest quotas
        over = np.flatnonzero(base > 1)
        base[over[np.argmax((base - quota)[over])]] -= 1
    rem = quota - base
    while base.sum() < n:
        room = np.flatnonzero(base < counts)
        j = room[np.argmax(rem[room])]
        base[j] += 1
        rem[j] -= 1
    return {c: int(b) for c, b in zip(classes.tolist(), base)}
