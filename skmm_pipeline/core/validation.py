"""Input validation shared by the core: fail at the boundary with a message that says what was expected."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Raised for inputs the core cannot work with (wrong shape, non-finite values, bad budget)."""


def as_finite_matrix(X, name: str = "X", dtype=np.float64) -> np.ndarray:
    """Return ``X`` as a 2-D finite array, or raise :class:`InputError` naming the first bad row."""
    arr = np.asarray(X, dtype=dtype)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (samples x features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InputError(
            f"{name} has non-finite values (NaN or inf) in {bad.size} row(s), first at row {int(bad[0])}"
        )
    return arr


def check_budget(n, N: int) -> int:
    """Validate a selection budget ``0 < n <= N`` and return it as an int."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"budget n must be an integer, got {n!r}")
    n = int(n)
    if n <= 0:
        raise InputError(f"budget n must be positive, got n={n}")
    if n > N:
        raise InputError(f"budget n={n} is larger than the pool (N={N} samples)")
    return n
