"""Rounding relaxed weights to exactly ``n`` distinct indices while keeping the inclusion probabilities.

A point ``s`` of the capped simplex ``{0 <= s_i <= 1/n, sum s = 1}`` is a convex combination of
n-subsets; ``pi = n s`` are first-order inclusion probabilities (``0 <= pi_i <= 1``, ``sum pi = n``).
A rounding that realises them keeps, in expectation, every linear functional of ``s`` the solver
matched, in particular the subset's second moment ``E[Sigma_S] = G^T diag(s) G``. Two fixed-size
schemes do that exactly:

* ``systematic``: randomised systematic pi-ps sampling (random order, one uniform start, unit
  spacing). O(N). Units with ``pi_i = 1`` are always taken, units with ``pi_i = 0`` never.
* ``pipage``: dependent (pipage) rounding: repeatedly move mass between two fractional coordinates
  so that one becomes 0 or 1, with probabilities that keep every marginal. O(N); the indicators are
  negatively correlated, so sums of the selected rows concentrate at least as well as independent
  sampling would.

Neither ``numpy.random.choice(p=..., replace=False)`` (successive draws, whose inclusion probabilities
are not ``n p``) nor top-n of a diffuse vector realise ``pi``; both are deliberately absent.
"""

from __future__ import annotations

import numpy as np

from skmm_pipeline.core.validation import InputError, check_int

ROUNDINGS = ("systematic", "pipage")
_INTEGRAL_TOL = 1e-9


def inclusion_probabilities(s, n: int, tol: float = 1e-6) -> np.ndarray:
    """``pi = n s`` for a point of the capped simplex, cleaned of floating-point drift.

    Raises :class:`InputError` if ``s`` is not (up to ``tol``) in the capped simplex for budget ``n``.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise InputError("relaxed weights must be a finite 1-D vector")
    pi = n * s
    if pi.min(initial=0.0) < -tol or pi.max(initial=0.0) > 1 + tol or abs(pi.sum() - n) > tol * max(n, 1):
        raise InputError(
            f"weights are not in the capped simplex for n={n}: min n*s={pi.min():.3g}, "
            f"max n*s={pi.max():.3g}, sum n*s={pi.sum():.6g}"
        )
    return _fix_total(np.clip(pi, 0.0, 1.0), n)


def _fix_total(pi: np.ndarray, n: int) -> np.ndarray:
    """Spread the (tiny) difference ``n - sum(pi)`` over the fractional coordinates."""
    for _ in range(3):
        gap = n - pi.sum()
        if abs(gap) <= 1e-12 * max(n, 1):
            break
        frac = (pi > 0) & (pi < 1) if gap > 0 else pi > 0
        room = (1 - pi[frac]) if gap > 0 else pi[frac]
        if room.sum() <= 0:
            break
        pi[frac] += gap * room / room.sum()
        np.clip(pi, 0.0, 1.0, out=pi)
    return pi


def _check_pi(pi) -> tuple[np.ndarray, int]:
    pi = np.asarray(pi, dtype=np.float64)
    if pi.ndim != 1 or pi.size == 0 or not np.all(np.isfinite(pi)):
        raise InputError("inclusion probabilities must be a finite, non-empty 1-D vector")
    if pi.min() < -1e-9 or pi.max() > 1 + 1e-9:
        raise InputError(f"inclusion probabilities must lie in [0, 1], got range [{pi.min():.3g}, {pi.max():.3g}]")
    total = pi.sum()
    n = int(round(total))
    if n <= 0 or abs(total - n) > 1e-6 * max(n, 1):
        raise InputError(f"inclusion probabilities must sum to a positive integer, got {total:.6g}")
    return _fix_total(np.clip(pi, 0.0, 1.0), n), n


def systematic_sample(pi, rng: np.random.Generator) -> np.ndarray:
    """Randomised systematic pi-ps sampling: exactly ``round(sum pi)`` distinct indices, P(i in S) = pi_i."""
    pi, n = _check_pi(pi)
    N = pi.size
    order = rng.permutation(N)
    edges = np.cumsum(pi[order])
    edges *= n / edges[-1]
    edges[-1] = n
    for _ in range(8):
        points = rng.random() + np.arange(n)
        pos = np.searchsorted(edges, points, side="right")
        pos = np.minimum(pos, N - 1)
        chosen = order[pos]
        if np.unique(chosen).size == n:  # always, except a start landing exactly on a rounding seam
            return chosen
    raise RuntimeError("systematic sampling failed to produce distinct indices")  # pragma: no cover


def pipage_round(pi, rng: np.random.Generator) -> np.ndarray:
    """Dependent (pipage) rounding of ``pi`` to a 0/1 vector with the same sum; returns the chosen indices."""
    pi, n = _check_pi(pi)
    x = pi.copy()
    frac = np.flatnonzero((x > _INTEGRAL_TOL) & (x < 1 - _INTEGRAL_TOL))
    frac = frac[rng.permutation(frac.size)]
    u = rng.random(frac.size)  # one uniform per pairing step (at most one step per fractional coordinate)
    cur = -1
    step = 0
    for j in frac:
        if cur < 0:
            cur = j
            continue
        a = x[cur]
        b = x[j]
        up = min(1.0 - a, b)  # move mass from j to cur
        down = min(a, 1.0 - b)  # move mass from cur to j
        if u[step] * (up + down) < down:
            a, b = a + up, b - up
        else:
            a, b = a - down, b + down
        step += 1
        x[cur], x[j] = a, b
        a_frac = _INTEGRAL_TOL < a < 1 - _INTEGRAL_TOL
        b_frac = _INTEGRAL_TOL < b < 1 - _INTEGRAL_TOL
        if not a_frac:
            cur = j if b_frac else -1
    # At most one coordinate can stay fractional, and only through floating-point drift.
    ones = x > 0.5
    chosen = np.flatnonzero(ones)
    if chosen.size != n:
        # Drift left a near-0.5 coordinate: settle it by the count the sum requires.
        order = np.argsort(-x, kind="stable")
        chosen = np.sort(order[:n])
    return chosen


def round_to_subset(s, n: int, *, method: str = "systematic", seed: int | np.random.Generator = 0) -> np.ndarray:
    """Exactly ``n`` distinct indices from capped-simplex weights ``s`` (``P(i in S) = n s_i``)."""
    if method not in ROUNDINGS:
        raise InputError(f"unknown rounding {method!r}; available: {list(ROUNDINGS)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pi = inclusion_probabilities(s, n)
    if method == "systematic":
        return systematic_sample(pi, rng)
    return pipage_round(pi, rng)


def proportional_inclusion(scores, n: int) -> np.ndarray:
    """Inclusion probabilities ``pi_i = min(1, c * score_i)`` with ``c`` such that ``sum pi = n``.

    The fixed-size analogue of sampling proportional to a score (leverage, residual norm, ...).
    """
    w = np.asarray(scores, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or w.min(initial=0) < 0:
        raise InputError("scores must be a finite, non-negative 1-D vector")
    N = w.size
    n = check_int(n, "budget n", minimum=1, maximum=N)
    positive = int(np.count_nonzero(w > 0))
    if positive <= n:
        # Everything with a positive score is certain; the rest of the budget is spread evenly.
        pi = (w > 0).astype(np.float64)
        rest = n - positive
        if rest:
            pi[w <= 0] = rest / (N - positive)
        return pi
    order = np.sort(w)[::-1]
    # k units are capped at 1 and the rest scaled by c = (n - k) / (sum of the other scores); the
    # smallest k for which the largest uncapped unit stays below 1 is the answer (k = n - 1 always works).
    tail = np.cumsum(order[::-1])[::-1][:n]  # tail[k] = sum of order[k:]
    ks = np.arange(n)
    c_k = (n - ks) / tail
    k = int(np.argmax(c_k * order[:n] <= 1.0 + 1e-12))
    pi = np.minimum(1.0, c_k[k] * w)
    return _fix_total(pi, n)
