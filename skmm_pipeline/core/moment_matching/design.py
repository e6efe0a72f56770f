"""A-optimal design in the sketch (variance reduction, SkMMv2): greedy, stochastic greedy, Fedorov exchange.

Minimise ``tr(Sigma (a I + G_S^T G_S)^{-1})`` over n-subsets; see the package docstring for the
Sherman-Morrison updates that keep every pick O(N k).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from skmm_pipeline.core.moment_matching._compute import _single_thread_blas
from skmm_pipeline.core.moment_matching.pivots import block_rpc_pivots, rpc_pivots
from skmm_pipeline.core.moment_matching.statistics import (
    MomentStats,
    design_dimension,
    intrinsic_dimension,
    moment_stats,
    principal_coordinates,
)
from skmm_pipeline.core.validation import InputError, check_float, check_int


def trace_objective(Z: np.ndarray, lam: np.ndarray, indices, ridge: float) -> float:
    """``tr(diag(lam) (ridge I + Z_S^T Z_S)^{-1})`` computed directly (float64)."""
    ZS = Z[np.asarray(indices, dtype=np.int64)]
    M = ridge * np.eye(Z.shape[1]) + ZS.T @ ZS
    L = np.linalg.cholesky(M)
    Linv = np.linalg.solve(L, np.eye(Z.shape[1]))
    return float(np.sum(lam * np.einsum("ij,ij->j", Linv, Linv)))


def _gumbel_top(scores: np.ndarray, b: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``b`` distinct indices: the top ``b`` (temperature 0) or a draw from softmax(score / T)."""
    if temperature <= 0:
        if b == 1:
            return np.array([int(np.argmax(scores))])
        top = np.argpartition(-scores, b - 1)[:b]
        return top[np.argsort(-scores[top], kind="stable")]
    finite = np.isfinite(scores)
    keys = np.full(scores.shape, -np.inf)
    keys[finite] = scores[finite] / temperature + rng.gumbel(size=int(finite.sum()))
    top = np.argpartition(-keys, b - 1)[:b]
    return top[np.argsort(-keys[top], kind="stable")]


def greedy_trace(
    Z: np.ndarray,
    lam: np.ndarray,
    n: int,
    ridge: float,
    *,
    start=(),
    block: int = 1,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Greedy A-optimal design on principal coordinates ``Z`` (N x k, float64) with ``Sigma = diag(lam)``.

    ``start``: indices taken first (e.g. RPC pivots). ``block``: picks per round, scored once per
    round and then added one by one with exact Sherman-Morrison updates. ``temperature``: 0 takes the
    best gains; T > 0 draws each round's picks from softmax(gain / (T * max gain)) (SkMMv2's sampling).
    """
    N, k = Z.shape
    rng = rng or np.random.default_rng(0)
    chosen = [int(i) for i in start]
    avail = np.ones(N, dtype=bool)
    avail[chosen] = False
    M = ridge * np.eye(k)
    if chosen:
        ZS = Z[chosen]
        M += ZS.T @ ZS
    P = np.linalg.inv(M)
    P = (P + P.T) / 2
    U = Z @ P
    num = np.einsum("ij,j,ij->i", U, lam, U)
    den = 1.0 + np.einsum("ij,ij->i", Z, U)
    del U
    while len(chosen) < n:
        b = min(block, n - len(chosen))
        gain = np.where(avail, num / den, -np.inf)
        if temperature > 0:
            top = float(np.max(gain))
            picks = _gumbel_top(gain / max(top, 1e-300), b, temperature, rng)
        else:
            picks = _gumbel_top(gain, b, 0.0, rng)
        for j in picks:
            j = int(j)
            chosen.append(j)
            avail[j] = False
            w = P @ Z[j]
            c = 1.0 + Z[j] @ w
            Zw = Z @ w
            lw = lam * w
            beta = Zw / c
            num += -2.0 * beta * (Z @ (P @ lw)) + beta**2 * (w @ lw)
            den -= Zw * beta
            P -= np.outer(w, w) / c
    return np.asarray(chosen[:n], dtype=np.int64)


def pooled_greedy_trace(
    G,
    W: np.ndarray | None,
    sig: np.ndarray,
    n: int,
    ridge: float,
    *,
    start=(),
    rng: np.random.Generator,
    per_pick: int | None = None,
    eps: float = 0.25,
    refresh: int = 256,
) -> np.ndarray:
    """Greedy trace design for pools too large for one pass per pick (stochastic greedy).

    Works on the raw sketch ``G`` (any float dtype, never copied) in coordinates ``z = W^T g`` (``W``
    None: the sketch's own coordinates) with target moment ``sig`` (k x k). Each pick draws a fresh
    random sample of ``per_pick = (N / n) log(1 / eps)`` unchosen rows ("lazier than lazy greedy",
    Mirzasoleiman et al. 2015), scores it against the current ``[P, P sig P]`` with one float32 matrix
    product and takes the best; ``P`` is updated by Sherman-Morrison in float64 and refactored from
    the accumulated moment every ``refresh`` picks. O(per_pick k^2) per pick, whatever the cluster
    structure; memory O(N + per_pick k) beyond the input.
    """
    G = np.asarray(G)
    N = G.shape[0]
    k = sig.shape[0]
    chosen = [int(i) for i in start]
    taken = np.zeros(N, dtype=bool)
    taken[chosen] = True
    W32 = None if W is None else W.astype(np.float32)

    def coords32(rows):
        Zr = np.asarray(G[rows], dtype=np.float32)
        return Zr if W32 is None else Zr @ W32

    M = ridge * np.eye(k)
    if per_pick is None:
        per_pick = int(math.ceil(N / max(n, 1) * math.log(1 / eps)))
    per_pick = max(1, int(per_pick))
    PQ = np.empty((k, 2 * k), dtype=np.float32)
    with _single_thread_blas():  # small products: threads only add synchronisation
        _pooled_loop(coords32, sig, n, chosen, taken, M, per_pick, refresh, rng, PQ)
    return np.asarray(chosen[:n], dtype=np.int64)


def _pooled_loop(coords32, sig, n, chosen, taken, M, per_pick, refresh, rng, PQ):
    N, k = taken.size, sig.shape[0]
    done = 0
    since = refresh
    while len(chosen) < n:
        if since >= refresh:
            if done < len(chosen):  # chosen[:done] are already in M
                ZS = coords32(np.asarray(chosen[done:])).astype(np.float64)
                M += ZS.T @ ZS
                done = len(chosen)
            P = np.linalg.inv(M)
            P = (P + P.T) / 2
            Q = P @ sig @ P
            since = 0
        free = N - len(chosen)
        if per_pick * 4 >= free:
            cand = np.flatnonzero(~taken)
            if per_pick < free:
                cand = rng.choice(cand, size=per_pick, replace=False)
        else:
            cand = rng.integers(0, N, size=per_pick + per_pick // 4 + 4)
            cand = cand[~taken[cand]][:per_pick]
        Zc = coords32(cand)
        PQ[:, :k] = P
        PQ[:, k:] = Q
        T = Zc @ PQ
        den = 1.0 + np.einsum("ij,ij->i", T[:, :k], Zc, dtype=np.float64)
        num = np.einsum("ij,ij->i", T[:, k:], Zc, dtype=np.float64)
        best = int(np.argmax(num / den))
        j = int(cand[best])
        chosen.append(j)
        taken[j] = True
        z = Zc[best].astype(np.float64)
        w = P @ z
        c = 1.0 + z @ w
        sw = sig @ w
        psw = P @ sw
        # Q' = Q - (w psw^T + psw w^T) / c + w w^T (w^T sig w) / c^2 as one rank-2 product.
        U = np.column_stack([w, psw])
        C = np.array([[-(w @ sw) / c**2, 1.0 / c], [1.0 / c, 0.0]])
        Q -= U @ (C @ U.T)
        P -= np.outer(w, w / c)
        since += 1


def fedorov_exchange(
    Z: np.ndarray, lam: np.ndarray, indices, ridge: float, *, max_exchanges: int | None = None, rel_tol: float = 1e-9,
    tries: int = 8,
) -> tuple[np.ndarray, int]:
    """Improve an n-subset by exchanges (remove one, add one) that decrease the trace objective.

    With ``P = (a I + Z_S^T Z_S)^{-1}`` every row keeps ``d_j = z_j^T P z_j`` and
    ``q_j = z_j^T P Lambda P z_j``. Removing member ``i`` raises ``tr(Lambda P)`` by
    ``q_i / (1 - d_i)``; after it, every ``d_j, q_j`` moves by terms of ``Z u`` and ``Z P Lambda u``
    (``u = P z_i``), so scoring all replacements costs O(N k), as does committing a swap. Each step
    tries the ``tries`` cheapest removals, adds the best non-member for the reduced design, and keeps
    the swap only if the objective drops by more than ``rel_tol``. Stops at a swap-local optimum (for
    the tried removals) or after ``max_exchanges`` swaps (default ``n``). Returns the subset and the
    number of swaps.
    """
    S = np.asarray(indices, dtype=np.int64).copy()
    n = S.size
    N, k = Z.shape
    max_exchanges = n if max_exchanges is None else int(max_exchanges)
    inS = np.zeros(N, dtype=bool)
    inS[S] = True
    P = np.linalg.inv(ridge * np.eye(k) + Z[S].T @ Z[S])
    P = (P + P.T) / 2
    U = Z @ P
    d = np.einsum("ij,ij->i", U, Z)
    q = np.einsum("ij,j,ij->i", U, lam, U)
    del U
    obj = float(np.sum(lam * np.diag(P)))
    swaps = 0
    while swaps < max_exchanges:
        members = np.flatnonzero(inS)
        cost = q[members] / np.maximum(1.0 - d[members], 1e-15)
        improved = False
        for i in members[np.argsort(cost, kind="stable")[: min(n, tries)]]:
            i = int(i)
            u = P @ Z[i]
            delta = 1.0 - d[i]
            if delta <= 1e-12:
                continue
            zu = Z @ u
            plu = P @ (lam * u)
            zplu = Z @ plu
            ulu = float(u @ (lam * u))
            d_m = d + zu * zu / delta
            q_m = q + 2.0 * zu * zplu / delta + zu * zu * ulu / delta**2
            gain = q_m / (1.0 + d_m)
            gain[inS] = -np.inf
            j = int(np.argmax(gain))
            new_obj = obj + q[i] / delta - float(gain[j])
            if not new_obj < obj * (1 - rel_tol):
                continue
            # Commit: P_m = P + u u^T / delta, then add z_j.
            Pm = P + np.outer(u, u) / delta
            w = Pm @ Z[j]
            c = 1.0 + d_m[j]
            zw = Z @ w
            beta = zw / c
            q = q_m - 2.0 * beta * (Z @ (Pm @ (lam * w))) + beta**2 * float(w @ (lam * w))
            d = d_m - zw * beta
            P = Pm - np.outer(w, w) / c
            P = (P + P.T) / 2
            pos = int(np.flatnonzero(S == i)[0])
            S[pos] = j
            inS[i], inS[j] = False, True
            obj = new_obj
            swaps += 1
            improved = True
            if swaps % 64 == 0:  # refresh against drift of the running updates
                U = Z @ P
                d = np.einsum("ij,ij->i", U, Z)
                q = np.einsum("ij,j,ij->i", U, lam, U)
                obj = float(np.sum(lam * np.diag(P)))
                del U
            break
        if not improved:
            break
    return S, swaps


def resolve_ridge(ridge, stats: MomentStats, n: int | None = None) -> float:
    """The ridge ``a`` of the design ``tr(Sigma (a I + G_S^T G_S)^{-1})``.

    A positive number is used as is. Strings are multiples of ``tr(Sigma) / m`` (``m`` the sketch
    dimension, SPEC 3b): ``"x<c>"`` is ``c tr(Sigma) / m``, ``"n<c>"`` is ``min(1, c / n) tr(Sigma) / m``
    (a ridge that fades as the budget grows), and ``"auto"`` is the default, ``"n3"``.
    """
    unit = float(stats.lam.sum() / stats.m)
    if ridge is None or ridge == "auto":
        ridge = AUTO_RIDGE
    if isinstance(ridge, str) and ridge[:1] in ("x", "n"):
        try:
            c = float(ridge[1:])
        except ValueError:
            c = float("nan")
        if c > 0 and math.isfinite(c):
            if ridge[0] == "x":
                return c * unit
            return min(1.0, c / max(int(n or 1), 1)) * unit
    try:
        a = float(ridge)
    except (TypeError, ValueError):
        raise InputError(f"ridge must be 'auto', 'x<c>', 'n<c>' or a positive number, got {ridge!r}") from None
    if not a > 0 or not math.isfinite(a):
        raise InputError(f"ridge must be positive and finite, got {ridge!r}")
    return a


AUTO_RIDGE = "n3"
EXACT_MAX_ENTRIES = 1 << 26  # 512 MiB of float64 principal coordinates


@dataclass
class DesignResult:
    indices: np.ndarray
    diagnostics: dict = field(default_factory=dict)


def trace_design(
    G,
    n: int,
    *,
    stats: MomentStats | None = None,
    seed: int = 0,
    design_dim: int | str | None = "auto",
    ridge: float | str | None = "auto",
    start: str | None = None,
    start_size: int | str = "dim",
    block: int = 1,
    temperature: float = 0.0,
    exchange: bool = False,
    max_exchanges: int | None = None,
    candidates: str | int = "auto",
    init=None,
) -> DesignResult:
    """A-optimal design in the sketch: ``n`` rows of ``G`` minimising ``tr(Sigma (a I + G_S^T G_S)^{-1})``.

    ``design_dim``: see :func:`design_dimension`. ``ridge``: see :func:`resolve_ridge` (relative to the
    design space). ``start``: ``None``, ``"rpc"`` (randomly pivoted Cholesky pivots first; their
    number is ``start_size``: ``"dim"`` = the design dimension, or an int) or ``"auto"`` (RPC only for
    pools too large for the exact greedy). ``init``: an n-subset to
    repair instead of building one (then only the exchange runs). ``exchange``: finish with Fedorov
    exchanges. ``candidates``: ``"all"`` (exact greedy), an int (that many random candidates per pick),
    or ``"auto"`` (exact while ``N k n <= 2e10`` and ``N k <= 2^26``, sampled beyond).
    """
    t0 = time.perf_counter()
    stats = stats or moment_stats(G)
    N = stats.N
    if stats.lam[0] <= 0:
        raise InputError("all sketched gradients are zero: there is nothing to select on")
    k = design_dimension(n, stats, design_dim)
    lam = stats.lam[:k].copy()
    Vk = stats.V[:, :k]
    a = resolve_ridge(ridge, stats, n)
    rng = np.random.default_rng(seed)
    block = check_int(block, "block", minimum=1)
    temperature = check_float(temperature, "temperature", minimum=0)
    # Exact greedy keeps the N x k principal coordinates in float64 and touches all of them per pick.
    exact = candidates == "all" or (candidates == "auto" and N * k * n <= 2e10 and N * k <= EXACT_MAX_ENTRIES)
    diag: dict = {"design_dim": k, "ridge": a, "intrinsic_dim": intrinsic_dimension(stats.lam[: max(1, stats.rank())])}
    n_start = 0
    if init is not None:
        Z = principal_coordinates(G, k, stats)
        chosen = np.asarray(init, dtype=np.int64)
        if chosen.shape != (n,) or np.unique(chosen).size != n:
            raise InputError("init must hold n distinct indices")
        solver = "exchange"
    elif exact:
        Z = principal_coordinates(G, k, stats)
        start_idx = np.empty(0, dtype=np.int64)
        if start == "auto":
            start = None  # the exact greedy sees every row: no need to seed it
        if start == "rpc":
            size = k if start_size == "dim" else int(start_size)
            start_idx = rpc_pivots(Z, min(size, n), rng)
        elif start is not None:
            raise InputError(f"start must be None, 'rpc' or 'auto', got {start!r}")
        n_start = int(start_idx.size)
        with _single_thread_blas():  # O(N k) vector products: threads only add synchronisation
            chosen = greedy_trace(Z, lam, n, a, start=start_idx, block=block, temperature=temperature, rng=rng)
        solver = "greedy-trace"
    else:
        Z = None
        # The sketch's own coordinates when the design uses all of it (no N x m rotation pass).
        W = None if k == stats.m else Vk
        sig = stats.sigma if W is None else np.diag(lam)
        start_idx = np.empty(0, dtype=np.int64)
        if start == "auto":
            start = "rpc"  # random pools can miss a rare direction; residual sampling finds it
        if start == "rpc":
            size = k if start_size == "dim" else int(start_size)
            start_idx = block_rpc_pivots(G, W, min(size, n), rng, row_sqnorm=stats.row_sqnorm)
        elif start is not None:
            raise InputError(f"start must be None, 'rpc' or 'auto', got {start!r}")
        n_start = int(start_idx.size)
        per_pick = None if candidates == "auto" else int(candidates)
        chosen = pooled_greedy_trace(G, W, sig, n, a, start=start_idx, rng=rng, per_pick=per_pick)
        solver = "pooled-greedy-trace"
        if exchange:
            diag["exchange_skipped"] = "pool too large for exact exchanges"
            exchange = False
    swaps = 0
    if exchange or init is not None:
        if Z is None:
            Z = principal_coordinates(G, k, stats)
        with _single_thread_blas():
            chosen, swaps = fedorov_exchange(Z, lam, chosen, a, max_exchanges=max_exchanges)
    if Z is not None:
        obj = trace_objective(Z, lam, chosen, a)
    else:
        ZS = np.asarray(np.asarray(G)[chosen], dtype=np.float64) @ Vk
        obj = float(np.sum(lam * np.diag(np.linalg.inv(a * np.eye(k) + ZS.T @ ZS))))
    diag.update(
        solver=solver,
        start=start or "none",
        start_pivots=n_start,
        exchanges=swaps,
        objective_trace=obj,
        seconds=time.perf_counter() - t0,
    )
    return DesignResult(np.asarray(chosen, dtype=np.int64), diag)
