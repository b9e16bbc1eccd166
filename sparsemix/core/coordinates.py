"""Working coordinates: random-effect columns centred and scaled before the optimizer sees them.

A random slope on a covariate far from zero (Days + 2000) or on a large scale (Days * 1e9) makes the relative
covariance factor badly scaled and its entries strongly dependent: the optimizer stops short, and the cross-
products Z'Z lose the digits that the centring would have kept. For each term the columns z are replaced by
z T, with T upper triangular: every non-intercept column centred on its mean (only where the term has an
intercept and an unstructured covariance, which makes the model invariant to it) and divided by its standard
deviation (by its root mean square where it is not centred). The system is built on those columns; its
working parameter theta_w is the Cholesky factor of Var(T^{-1} b) / sigma^2, and the reported theta that of
Var(b) / sigma^2 = T (...) T'. Both describe the same model and the same likelihood.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .terms import RandomTerm, csc_from_arrays, hstack_csc, level_entries, level_layout_csc, row_levels

__all__ = [
    "column_transform",
    "column_moments",
    "transform_from_moments",
    "lower_factor",
    "transform_columns",
    "system_columns",
    "lower_factors",
]


def column_transform(term: RandomTerm) -> np.ndarray | None:
    """T for the term's k columns (z -> z T), or None where the columns are already indicators (all ones)."""
    if term.k == 1 and np.all(term.Z.data == 1.0):  # (transform_from_moments' None, without the moments)
        return None
    return transform_from_moments(column_moments(term.Z, term.k), term.template)


def column_moments(Z: sp.spmatrix, k: int) -> np.ndarray:
    """What T is made of, summed over rows (so partitions add): per column of a level, the sum, the sum of
    squares, the number of entries and of entries equal to 1; and the number of rows the term reaches.
    Shape (4, k + 1); the last column holds the row count."""
    Z = Z if sp.isspmatrix_csc(Z) else sp.csc_matrix(Z)  # (scipy's constructor on a CSC matrix: a checked copy)
    column_of_entry = np.repeat(np.arange(Z.shape[1]) % k, np.diff(Z.indptr))
    out = np.zeros((4, k + 1))
    out[0, :k] = np.bincount(column_of_entry, weights=Z.data, minlength=k)
    out[1, :k] = np.bincount(column_of_entry, weights=Z.data**2, minlength=k)
    out[2, :k] = np.bincount(column_of_entry, minlength=k)
    out[3, :k] = np.bincount(column_of_entry, weights=(Z.data == 1.0), minlength=k)
    touched = np.zeros(Z.shape[0], dtype=bool)  # a mask, not np.unique: 0.1 s against 30 s at 32M entries
    touched[Z.indices] = True
    out[0, k] = np.count_nonzero(touched)
    return out


def transform_from_moments(moments: np.ndarray, template) -> np.ndarray | None:
    """T from column_moments (see the module docstring), None where it would be the identity."""
    k = template.k
    total, squares, count, ones = moments[:, :k]
    n_rows = moments[0, k]
    if n_rows == 0 or (k == 1 and ones[0] == count[0]):
        return None
    intercept = np.flatnonzero((count == n_rows) & (ones == n_rows))
    centre = intercept.size > 0 and not template.is_diagonal
    mean = total / n_rows
    T = np.eye(k)
    for j in range(k):
        if intercept.size and j == intercept[0]:
            continue
        if centre:
            spread = np.sqrt(max(squares[j] / n_rows - mean[j] ** 2, 0.0))
            if spread > 1e-12 * np.sqrt(squares[j] / n_rows):  # a column constant within the term stays put
                T[intercept[0], j] = -mean[j] / spread
                T[j, j] = 1.0 / spread
                continue
        root_mean_square = np.sqrt(squares[j] / n_rows)
        if root_mean_square > 0:
            T[j, j] = 1.0 / root_mean_square
    return None if np.array_equal(T, np.eye(k)) else T


def transform_columns(Z: sp.spmatrix, n_levels: int, T: np.ndarray | None) -> sp.csc_matrix:
    """Z (I_levels kron T): each level's k columns times T. Each stored entry z at column (level, a) spreads to
    z T[a, :] in its level's columns, and entries that land together are summed (scipy's Kronecker product and
    sparse product did the same with a dozen conversions: half the cost of building sleepstudy's system)."""
    if T is None:
        return Z if sp.isspmatrix_csc(Z) else sp.csc_matrix(Z)
    k = T.shape[0]
    if k == 1 and sp.isspmatrix_csc(Z):  # a scalar term's entries scaled (the layout below: 60 us of sleepstudy's 3 ms)
        values = Z.data * T[0, 0]
        if np.all(values != 0):  # (an underflow to zero would be stored: the general path drops it)
            return csc_from_arrays(values, Z.indices, Z.indptr, Z.shape)
    by_columns, rows, level, a = level_entries(Z, k)
    n = by_columns.shape[0]
    row_level = row_levels(rows, level, n)
    if row_level is not None:
        # every row's entries in one level (RandomTerm.from_codes' layout): the row's k values z (zeros where none
        # is stored) times T, in its level's k columns. The general path below makes n k^2 entries and sorts them
        # into CSC (1 ms at 7,000 rows; with its conversions, half of a small model's system).
        values = np.bincount(rows * k + a, weights=by_columns.data, minlength=n * k).reshape(n, k) @ T
        return level_layout_csc(row_level, values, n_levels)  # no zero stored, as the general path
    values = (by_columns.data[:, None] * T[a, :]).ravel()
    columns = (level[:, None] * k + np.arange(k)).ravel()
    rows = np.repeat(rows, k)
    stored = values != 0
    return sp.csc_matrix((values[stored], (rows[stored], columns[stored])), shape=Z.shape)


def system_columns(terms: list[RandomTerm], transforms: list) -> sp.csc_matrix:
    """The system's Z: every term's columns in its working coordinates, in term order."""
    blocks = [transform_columns(t.Z, t.n_levels, T) for t, T in zip(terms, transforms)]
    return hstack_csc(blocks)


# lower_factor's diagonal entries at or below this fraction of their row's norm are zero (rounding, not a variance)
ROUNDING_DIAGONAL = 1e-10


def lower_factor(M: np.ndarray) -> np.ndarray:
    """The lower-triangular L with a non-negative diagonal and L L' = M M' (from a QR of M').

    A diagonal entry at rounding level relative to its row (a covariance that is singular in any coordinates)
    is set to zero, so that a boundary fit stays on the boundary when its factor is carried across."""
    M = np.asarray(M, dtype=float)
    if M.shape == (2, 2):  # a growth curve's: in scalar arithmetic (numpy's QR of one 2 x 2 costs ~30 us)
        return _lower_factor_2x2(*M.ravel().tolist())
    return lower_factors(M[None])[0]


def _lower_factor_2x2(a0: float, a1: float, b0: float, b1: float) -> np.ndarray:
    """lower_factor of [[a0, a1], [b0, b1]]: L11 = |a|, L21 = b . a / |a|, L22 = |b - L21 a / |a||, the residual
    taken as a vector (as a Householder QR, to rounding of |b|; not sqrt(|b|^2 - L21^2), which loses half the
    digits where the rows are nearly parallel)."""
    l11 = math.hypot(a0, a1)
    if l11 == 0.0:  # (the QR's reflection is the identity: L = M, its diagonal's sign dropped)
        l21, l22 = b0, abs(b1)
    else:
        u0, u1 = a0 / l11, a1 / l11
        l21 = b0 * u0 + b1 * u1
        l22 = math.hypot(b0 - l21 * u0, b1 - l21 * u1)
    if l22 <= ROUNDING_DIAGONAL * math.hypot(l21, l22):
        l22 = 0.0
    return np.array([[l11, 0.0], [l21, l22]])


def lower_factors(M: np.ndarray) -> np.ndarray:
    """lower_factor of each matrix of the stack M (R x k x c, c >= k), in one batched QR."""
    k = M.shape[1]
    if k == 1:  # M may have more columns than rows (a rank probe appends one): the root of the row's squares
        return np.sqrt(np.sum(np.square(M), axis=2, keepdims=True))
    R = np.linalg.qr(np.transpose(M, (0, 2, 1)), mode="r")
    diagonal = np.diagonal(R, axis1=1, axis2=2)
    L = np.transpose(R, (0, 2, 1)) * np.where(diagonal < 0, -1.0, 1.0)[:, None, :]
    row_norms = np.sqrt(np.sum(L**2, axis=2))
    diagonal = np.diagonal(L, axis1=1, axis2=2)
    L[:, np.arange(k), np.arange(k)] = np.where(np.abs(diagonal) <= ROUNDING_DIAGONAL * row_norms, 0.0, diagonal)
    return L
