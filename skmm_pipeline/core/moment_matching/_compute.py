"""Chunked row passes and BLAS threading shared by the moment-matching solvers."""

from __future__ import annotations

try:  # optional: ships with scikit-learn; without it the BLAS thread limit is a no-op
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

CHUNK_ROWS = 1 << 16


def _chunks(N: int, rows: int = CHUNK_ROWS):
    for lo in range(0, N, rows):
        yield lo, min(N, lo + rows)


class _single_thread_blas:
    """Limit BLAS to one thread inside a block (no-op without threadpoolctl)."""

    def __enter__(self):
        try:
            self._ctx = None if threadpool_limits is None else threadpool_limits(1, user_api="blas")
        except Exception:  # pragma: no cover - a BLAS threadpoolctl cannot control
            self._ctx = None
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.restore_original_limits()
        return False
