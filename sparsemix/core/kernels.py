"""Compiled loops (numba) for the one step numpy and scipy cannot do at memory speed.

The Schur complement update of the first term, sum over its levels l of G_l H_l G_l' (see SchurFactor), is a
scatter of many small dense products into a dense q2 x q2 matrix: on a MovieLens-sized design 4e9 products
per evaluation. scipy's sparse product builds it as a sparse matrix (gigabytes there), and CHOLMOD's
factorization of it is far slower than this loop (docs/performance-scale.md, "MovieLens scale").
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["subtract_level_products"]

# Rows are dealt to threads in bands of 64, so two threads never write the same row and each thread's rows
# spread over the whole matrix (levels' rows are not uniform: popular items come first in some codings).
_BAND_SHIFT = 6


def subtract_level_products(
    level_ptr: np.ndarray, rows: np.ndarray, g: np.ndarray, v: np.ndarray, out: np.ndarray, n_threads: int = 1
) -> None:
    """out[rows[i], rows[j]] -= g[i] . v[j] for every pair j <= i within a level (lower triangle only).

    level_ptr (n_levels + 1): the entries of level l are level_ptr[l]:level_ptr[l + 1], sorted by row;
    rows (m,) int32; g, v (m, k) float64 (v_i = H_l g_i); out (q2, q2) C-contiguous float64, updated in place.
    With n_threads > 1, numba's threads share the rows; with 1 no thread pool is involved at all (its idle
    threads slow the BLAS threads of the Cholesky that follows).
    """
    n_threads = max(int(n_threads), 1)
    if g.shape[1] == 1:
        g, v = g[:, 0], v[:, 0]
        part, parallel = _scalar_part, _scalar_parallel
    else:
        part, parallel = _vector_part, _vector_parallel
    if n_threads == 1:
        part(level_ptr, rows, g, v, out, 1, 0)
    else:
        parallel(level_ptr, rows, g, v, out, n_threads)


@njit(cache=True, nogil=True)
def _scalar_part(level_ptr, rows, g, v, out, n_threads, t):
    """The rows of band set t (of n_threads)."""
    for lvl in range(level_ptr.shape[0] - 1):
        lo, hi = level_ptr[lvl], level_ptr[lvl + 1]
        for i in range(lo, hi):
            ri = rows[i]
            if (ri >> _BAND_SHIFT) % n_threads != t:
                continue
            gi = g[i]
            for j in range(lo, i + 1):
                out[ri, rows[j]] -= gi * v[j]


@njit(cache=True, nogil=True)
def _vector_part(level_ptr, rows, g, v, out, n_threads, t):
    k = g.shape[1]
    for lvl in range(level_ptr.shape[0] - 1):
        lo, hi = level_ptr[lvl], level_ptr[lvl + 1]
        for i in range(lo, hi):
            ri = rows[i]
            if (ri >> _BAND_SHIFT) % n_threads != t:
                continue
            for j in range(lo, i + 1):
                s = 0.0
                for a in range(k):
                    s += g[i, a] * v[j, a]
                out[ri, rows[j]] -= s


@njit(parallel=True, cache=True, nogil=True)
def _scalar_parallel(level_ptr, rows, g, v, out, n_threads):
    for t in prange(n_threads):
        _scalar_part(level_ptr, rows, g, v, out, n_threads, t)


@njit(parallel=True, cache=True, nogil=True)
def _vector_parallel(level_ptr, rows, g, v, out, n_threads):
    for t in prange(n_threads):
        _vector_part(level_ptr, rows, g, v, out, n_threads, t)
