"""Per-class budgets: split a selection budget over the classes of a labelled pool."""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.validation import InputError

__all__ = ["BUDGET_RULES", "class_budgets"]

BUDGET_RULES = ("proportional", "equal")


def class_budgets(labels: np.ndarray, n: int, given=None) -> dict:
    """Per-class budgets: ``given`` as a dict (validated), or by a rule: ``"proportional"`` (the default,
    ``None``) to class sizes by largest remainder, at least one per class when ``n`` allows; ``"equal"``
    the same count for every class, a class smaller than its share giving the rest to the others."""
    classes, counts = np.unique(labels, return_counts=True)
    if isinstance(given, str):
        if given not in BUDGET_RULES:
            raise InputError(f"class_budgets must be a dict or one of {BUDGET_RULES}, got {given!r}")
        if given == "equal":
            return {c: int(b) for c, b in zip(classes.tolist(), _equal(counts, n))}
        given = None
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


def _equal(counts: np.ndarray, n: int) -> np.ndarray:
    """Water-filling: equal shares, capped by class sizes; the last few go to the classes with most room
    (ties by label order)."""
    budgets = np.zeros(counts.size, dtype=np.int64)
    remaining = int(min(n, counts.sum()))
    while remaining > 0:
        room = counts - budgets
        open_ = np.flatnonzero(room > 0)
        share = remaining // open_.size
        if share == 0:
            order = open_[np.argsort(-room[open_], kind="stable")]
            budgets[order[:remaining]] += 1
            break
        take = np.minimum(share, room[open_])
        budgets[open_] += take
        remaining -= int(take.sum())
    return budgets
