"""Stage 2 of SkMM: choose a subset whose second moment controls the full data's in the sketch.

Notation (SPEC section 3): ``G`` is the N x m sketch with rows ``g_i``, ``Sigma = G^T G / N = V Lambda V^T``
(uncentred), ``c_S`` the moment-matching constant.

Two families of solvers live here.

**Capped-simplex moment matching** (the paper's relaxation). ``v_j^T G^T diag(s) G v_j = (A^T s)_j``
with ``A = (G V) o (G V)`` is linear in ``s``, and the slack ``gamma`` has the closed form
``gamma_j = max(1/c_S, (A^T s)_j / lambda_j)``, which leaves

    f(s) = sum_j relu(lambda_j / c_S - (A^T s)_j)^2   over   {0 <= s_i <= 1/n, sum s = 1},

convex and L-smooth with ``L = 2 ||A||_2^2``. It is minimised by FISTA with adaptive restart and the
exact Euclidean projection onto the capped simplex (O(N m) per iteration, no autograd), or, with
``solver="lp"``, by the max-min-ratio LP ``max t s.t. A^T s >= t lambda / c_S`` (HiGHS), whose vertex
solution has at most m + 1 fractional coordinates. Optional Loewner cuts add the most violated
direction of ``Sigma_S - Sigma / c_S`` as an extra column of ``A``.

**A-optimal design in the sketch** (variance reduction, SkMMv2): minimise
``tr(Sigma (a I + G_S^T G_S)^{-1})`` over n-subsets. In the principal coordinates ``z_i = V_k^T g_i``
(``k`` the design dimension) ``Sigma`` is ``diag(lambda)``. With ``P = (a I + Z_S^T Z_S)^{-1}`` the
decrease from adding ``z_i`` is ``z_i^T P Lambda P z_i / (1 + z_i^T P z_i)`` (Sherman-Morrison), and
after adding ``z_j`` (``w = P z_j``, ``c = 1 + z_j^T w``) the numerators and denominators of every
candidate move by terms built from the two products ``Z w`` and ``Z P Lambda w``: O(N k) per pick,
never O(N k^2). For pools too large for one pass per pick (N k n beyond 2e10) each pick scores a
fresh random sample of ``(N/n) log(1/eps)`` rows from scratch with the current ``P`` (stochastic
greedy), after a blocked randomly-pivoted-Cholesky start that finds rare directions; memory stays
O(N) beyond the input, which is never copied.

Modules: :mod:`.statistics` (second moment, spectrum, dimensions, principal coordinates),
:mod:`.pivots` (randomly pivoted Cholesky), :mod:`.design` (trace design, greedy, exchanges),
:mod:`.relaxation` (capped-simplex projection, FISTA, LP, Loewner cuts), :mod:`.reference` (the
research code's v1 loop). Import from the package.
"""

from skmm_pipeline.core.moment_matching._compute import CHUNK_ROWS
from skmm_pipeline.core.moment_matching.design import (
    AUTO_RIDGE,
    EXACT_MAX_ENTRIES,
    DesignResult,
    fedorov_exchange,
    greedy_trace,
    pooled_greedy_trace,
    resolve_ridge,
    trace_design,
    trace_objective,
)
from skmm_pipeline.core.moment_matching.pivots import block_rpc_pivots, rpc_pivots
from skmm_pipeline.core.moment_matching.reference import v1_reference
from skmm_pipeline.core.moment_matching.relaxation import (
    MatchingProblem,
    RelaxationResult,
    capped_simplex_matching,
    fista,
    loewner_cut,
    project_capped_simplex,
    project_rows,
    solve_lp,
    subset_objective,
)
from skmm_pipeline.core.moment_matching.statistics import (
    MomentStats,
    design_dimension,
    intrinsic_dimension,
    moment_ratio,
    moment_stats,
    principal_coordinates,
    second_moment,
    target_stats,
)

__all__ = [
    "AUTO_RIDGE",
    "CHUNK_ROWS",
    "EXACT_MAX_ENTRIES",
    "DesignResult",
    "MatchingProblem",
    "MomentStats",
    "RelaxationResult",
    "block_rpc_pivots",
    "capped_simplex_matching",
    "design_dimension",
    "fedorov_exchange",
    "fista",
    "greedy_trace",
    "intrinsic_dimension",
    "loewner_cut",
    "moment_ratio",
    "moment_stats",
    "pooled_greedy_trace",
    "principal_coordinates",
    "project_capped_simplex",
    "project_rows",
    "resolve_ridge",
    "rpc_pivots",
    "second_moment",
    "target_stats",
    "solve_lp",
    "subset_objective",
    "trace_design",
    "trace_objective",
    "v1_reference",
]
