"""Input validation shared by the core: fail at the boundary with a message that says what was expected."""

from __future__ import annotations

import math

import numpy as np

from skmm_pipeline.core.errors import InputError

__all__ = ["InputError", "as_finite_matrix", "check_budget", "check_int", "check_float"]


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an ``int`` within ``[minimum, maximum]``, or an :class:`InputError` naming ``name``.

    Booleans are refused (``True`` is not a count); numpy integers are accepted. With ``optional=True``
    ``None`` passes through unchanged.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        if minimum == 1:
            raise InputError(f"{name} must be a positive integer, got {value}")
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_float(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                positive: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite ``float`` within ``[minimum, maximum]`` (``> 0`` with ``positive``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise InputError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


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
    n = check_int(n, "budget n")
    if n <= 0:
        raise InputError(f"budget n must be positive, got n={n}")
    if n > N:
        raise InputError(f"budget n={n} is larger than the pool (N={N} samples)")
    return n
