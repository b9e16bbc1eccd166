"""Assemble the model's matrices and the cross-products the deviance needs.

After `CrossProducts.compute` nothing downstream touches the n rows again: every deviance evaluation works
on Z'Z, Z'X, Z'y, X'X, X'y and y'y, whose sizes depend on the number of levels, not on n.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from .terms import RandomTerm, csc_from_arrays, hstack_csc, row_levels

__all__ = ["assemble_Z", "CrossProducts"]


def assemble_Z(terms: list[RandomTerm]) -> sp.csc_matrix:
    """Z = [Z_1 | Z_2 | ...] as one CSC matrix, in term order."""
    return hstack_csc([t.Z for t in terms])


@dataclass(frozen=True)
class CrossProducts:
    """Sums over rows, computed once.

    y enters as its residual from ordinary least squares (`y - X beta_ols`), not as given: the fit is exactly
    equivariant under that shift (beta moves by beta_ols, nothing else changes) and it keeps y'y from
    swamping the penalized residual sum of squares when y has a large mean (y around 1e9, say).
    """

    ZtZ: sp.csc_matrix  # q x q, symmetric, both triangles stored
    ZtX: np.ndarray  # q x p
    Zty: np.ndarray  # q
    XtX: np.ndarray  # p x p
    Xty: np.ndarray  # p
    yty: float
    n: int
    p: int
    beta_ols: np.ndarray  # the shift that was taken out of y
    sum_log_weights: float  # enters the ML deviance when prior weights are given

    @classmethod
    def compute(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        Z: sp.csc_matrix,
        weights: np.ndarray | None = None,
        column_blocks: list[int] | None = None,
    ) -> "CrossProducts":
        """`column_blocks`: the number of Z's columns of each term, in order, where known (a large design whose
        terms have one entry a row each then sums Z'Z pair by pair: _one_per_row_gram)."""
        X, Z, sum_log_weights = _weighted(np.asarray(X, dtype=float), Z, weights)
        if Z.shape[0] * Z.shape[1] ** 2 <= DENSE_GRAM_MAX_FLOPS:
            Zt = Z.toarray().T
            ZtZ = _symmetric_csc(Zt @ Zt.T)
        else:
            Zt = sp.csr_matrix(Z.T)
            by_pairs = None
            if column_blocks is not None and Z.shape[0] >= PAIR_GRAM_MIN_ROWS:
                by_pairs = _one_per_row_gram(Z, column_blocks)
            ZtZ = by_pairs if by_pairs is not None else _sparse_gram(Z)
        XtX = X.T @ X
        return cls(
            ZtZ=ZtZ,
            ZtX=np.asarray(Zt @ X),
            XtX=XtX,
            n=X.shape[0],
            p=X.shape[1],
            sum_log_weights=sum_log_weights,
            **_response_sums(X, Zt, _scaled(y, weights), XtX),
        )

    def permuted(self, order: np.ndarray) -> "CrossProducts":
        """The same sums with Z's columns in `order` (those of Z[:, order])."""
        return replace(self, ZtZ=_symmetric_permuted(self.ZtZ, order), ZtX=self.ZtX[order], Zty=self.Zty[order])

    def residual_products(self, beta: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Z'e for the residual e = y - X beta - Z b, from the sums (no pass over the rows)."""
        return self.Zty - self.ZtX @ beta - self.ZtZ @ b

    def with_response(
        self, X: np.ndarray, Z: sp.csc_matrix, y: np.ndarray, weights: np.ndarray | None = None
    ) -> "CrossProducts":
        """The same design with another response: only Z'y, X'y and y'y are recomputed (O(nnz(Z)))."""
        Xw, Zw, _ = _weighted(np.asarray(X, dtype=float), Z, weights)
        return self._with_weighted_response(Xw, sp.csr_matrix(Zw.T), _scaled(y, weights))

    def with_response_sums(self, Zty: np.ndarray, Xty: np.ndarray, yty: float) -> "CrossProducts":
        """The same design with another response given by its sums Z'y, X'y and y'y (weighted as the design is;
        a Dask fit has no rows): the least-squares shift taken out, as from rows. Applied to the sums of a
        residual, it takes one more least-squares step (beta_ols is then that step)."""
        beta = np.linalg.lstsq(self.XtX, Xty, rcond=None)[0] if self.p else np.zeros(0)
        return replace(
            self,
            Zty=Zty - self.ZtX @ beta,
            Xty=Xty - self.XtX @ beta,
            yty=float(yty - 2 * beta @ Xty + beta @ self.XtX @ beta),
            beta_ols=beta,
        )

    def response_sums(
        self, X: np.ndarray, Z: sp.csc_matrix, Y: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Many responses (the columns of Y, n x R) at once, as with_response holds one: (Z'y: q x R, X'y: p x R,
        y'y: R, beta_ols: p x R), least-squares shifted."""
        Xw, Zw, _ = _weighted(np.asarray(X, dtype=float), Z, weights)
        Yw = np.asarray(Y, dtype=float)
        Yw = Yw if weights is None else Yw * np.sqrt(np.asarray(weights, dtype=float))[:, None]
        return _shifted_sums(Xw, sp.csr_matrix(Zw.T), Yw, self.XtX)

    def _with_weighted_response(self, X, Zt, y) -> "CrossProducts":
        return replace(self, **_response_sums(X, Zt, y, self.XtX))


def _response_sums(X, Zt, y, XtX) -> dict:
    """One response's fields of CrossProducts (Zty, Xty, yty, beta_ols), least-squares shifted (_shifted_sums)."""
    Zty, Xty, yty, beta_ols = _shifted_sums(X, Zt, y[:, None], XtX)
    return {"Zty": Zty[:, 0], "Xty": Xty[:, 0], "yty": float(yty[0]), "beta_ols": beta_ols[:, 0]}


def _symmetric_permuted(A: sp.csc_matrix, order: np.ndarray) -> sp.csc_matrix:
    """A[order][:, order] of a CSC matrix, from its arrays: each new column is an old one, its rows renumbered and
    sorted (scipy's two fancy indexings, or the dense matrix, cost a small fit more than its permuted system saves:
    docs/performance-scale.md, thirteenth session)."""
    order = np.asarray(order, dtype=np.int64)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    counts = np.diff(A.indptr)[order]
    indptr = np.zeros(order.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    taken = np.repeat(A.indptr[order].astype(np.int64) - indptr[:-1], counts) + np.arange(indptr[-1])
    rows = rank[A.indices[taken]]
    column = np.repeat(np.arange(order.shape[0]), counts)
    sort = np.lexsort((rows, column))
    return csc_from_arrays(A.data[taken][sort], rows[sort], indptr, A.shape)


# Z'Z by a dense product where it costs at most this many multiplications (sleepstudy's 180 x 36 Z: 0.23M): below it
# scipy's sparse product and conversions cost more than the product itself (100 us against 30).
DENSE_GRAM_MAX_FLOPS = 1_000_000


def _sparse_gram(Z: sp.csc_matrix) -> sp.csc_matrix:
    """Z'Z (CSC, sorted, as scipy's product gives it) by scipy's compiled loops called directly: Z's CSC arrays are
    Z' in CSR, and Z in CSR is one conversion (scipy's product, its conversions and checks cost 330-390 us on small
    designs, where the loops take 35-150: mlmRev's Early, ScotsSec; docs/performance-scale.md, twentieth session).
    scipy's own product where its private loops are not there."""
    n, q = Z.shape
    tools = _SPARSE_TOOLS
    if tools is None:
        return _scipy_gram(Z)
    index = np.int32 if max(n, q, Z.nnz) < 2**31 - 1 else np.int64
    indptr, indices = Z.indptr.astype(index, copy=False), Z.indices.astype(index, copy=False)
    row_ptr, row_index, row_data = np.empty(n + 1, dtype=index), np.empty(Z.nnz, dtype=index), np.empty(Z.nnz)
    tools.csr_tocsc(q, n, indptr, indices, Z.data, row_ptr, row_index, row_data)  # Z' in CSC: Z in CSR
    size = tools.csr_matmat_maxnnz(q, q, indptr, indices, row_ptr, row_index)
    if size >= 2**31 - 1 and index is np.int32:
        return _scipy_gram(Z)
    out_ptr, out_index, out_data = np.empty(q + 1, dtype=index), np.empty(size, dtype=index), np.empty(size)
    tools.csr_matmat(q, q, indptr, indices, Z.data, row_ptr, row_index, row_data, out_ptr, out_index, out_data)
    nnz = int(out_ptr[-1])
    out_index, out_data = out_index[:nnz], out_data[:nnz]
    tools.csr_sort_indices(q, out_ptr, out_index, out_data)
    return csc_from_arrays(out_data, out_index, out_ptr, (q, q))  # (symmetric: its CSR arrays are its CSC ones)


def _scipy_gram(Z: sp.csc_matrix) -> sp.csc_matrix:
    ZtZ = sp.csc_matrix(sp.csr_matrix(Z.T) @ Z)
    ZtZ.sort_indices()
    return ZtZ


def _sparse_tools():
    """scipy's compiled sparse loops (a private module), or None where a name this package calls is missing."""
    try:
        from scipy.sparse import _sparsetools as tools
    except ImportError:
        return None
    names = ("csr_tocsc", "csr_matmat_maxnnz", "csr_matmat", "csr_sort_indices")
    return tools if all(hasattr(tools, name) for name in names) else None


_SPARSE_TOOLS = _sparse_tools()


def _symmetric_csc(G: np.ndarray) -> sp.csc_matrix:
    """The symmetric matrix G as CSC, its zeros not stored (as scipy's sparse product stores none): G's rows are its
    columns, so its row-major nonzeros are the CSC arrays."""
    nonzero = G != 0
    indptr = np.zeros(G.shape[0] + 1, dtype=np.int32)  # (scipy's own index type for these sizes)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    return csc_from_arrays(G[nonzero], np.nonzero(nonzero)[1], indptr, G.shape)


# From this many rows Z'Z of one-entry-a-row terms is summed pair by pair (_one_per_row_gram): on the
# MovieLens-sized design (32,000,000 rows, two terms) 2.6 s against 14.4 s for scipy's sparse product.
PAIR_GRAM_MIN_ROWS = 50_000


# ... and each crossed block summed after a transpose up to this many entries: above it (the MovieLens-sized design's
# 32,000,000) the CSR's own sum_duplicates, whose sort works in place, where the transpose holds both copies at once
TRANSPOSE_SUM_MAX_ENTRIES = 10_000_000


def _one_per_row_gram(Z: sp.csc_matrix, column_blocks: list[int]) -> sp.csc_matrix | None:
    """Z'Z (CSC, both triangles, sorted, no zero stored: as scipy's product gives it) where each block of Z's
    columns has at most one entry in every row (scalar terms): each block's diagonal by a bincount, each pair of
    blocks by the first's entries read as a CSR whose columns are the rows' levels of the second, duplicates summed;
    None where a block has two entries in some row."""
    n = Z.shape[0]
    starts = np.concatenate([[0], np.cumsum(column_blocks)])
    if starts[-1] != Z.shape[1]:
        return None
    # each block's level per row (-1: none), and (read by the blocks before it) its values per row, or None where
    # every entry is 1 (a random intercept's: no scatter of the values, no products); its diagonal from its entries
    J = len(column_blocks)
    parts: list[list[sp.csc_matrix]] = [[None] * J for _ in range(J)]  # type: ignore[list-item]
    codes, values, complete = [], [], []
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        lo, hi = Z.indptr[a], Z.indptr[b]
        rows = Z.indices[lo:hi]
        levels = np.repeat(np.arange(b - a), np.diff(Z.indptr[a : b + 1]))
        code = row_levels(rows, levels, n)
        if code is None:  # a row with two entries in this block
            return None
        unit = bool(np.all(Z.data[lo:hi] == 1.0))
        value = None
        if s and not unit:
            value = np.zeros(n)
            value[rows] = Z.data[lo:hi]
        codes.append(code)
        values.append(value)
        complete.append(hi - lo == n)  # an entry in every row: no masks
        diagonal = np.bincount(levels, None if unit else Z.data[lo:hi] ** 2, minlength=column_blocks[s]).astype(float)
        nonzero = np.flatnonzero(diagonal)
        parts[s][s] = sp.csc_matrix(
            (diagonal[nonzero], nonzero, np.concatenate([[0], np.cumsum(diagonal != 0)])),
            shape=(column_blocks[s], column_blocks[s]),
        )
    for s in range(J):
        # block s's entries in Z's order (by level of s, rows ascending) are the rows of a CSR whose columns are the
        # rows' levels of t: no COO -> CSR conversion (2 s at 32,000,000 rows)
        lo, hi = Z.indptr[starts[s]], Z.indptr[starts[s + 1]]
        rows = Z.indices[lo:hi]
        for t in range(s + 1, J):
            other = codes[t][rows]
            value_t = values[t]
            products = Z.data[lo:hi].copy() if value_t is None else Z.data[lo:hi] * value_t[rows]  # (sorted below)
            indptr = Z.indptr[starts[s] : starts[s + 1] + 1] - lo
            if not complete[t]:
                reached = other >= 0
                indptr = np.concatenate([[0], np.cumsum(reached)])[indptr]
                other, products = other[reached], products[reached]
            block = sp.csr_matrix((products, other, indptr), shape=(column_blocks[s], column_blocks[t]))
            if block.nnz <= TRANSPOSE_SUM_MAX_ENTRIES:
                # summed as its CSC, scipy's transpose being a counting sort that leaves a column's duplicates side by
                # side: one pass, where the CSR's own sum_duplicates sorted every row first (InstEval: 3 -> 0.8 ms)
                block = block.tocsc()
            block.sum_duplicates()
            block.eliminate_zeros()
            csr, csc = (block.tocsr(), block) if block.format == "csc" else (block, block.tocsc())
            parts[s][t] = csc  # rows of block s, columns of block t
            parts[t][s] = csr.T  # a CSR's transpose is a CSC: no copy
    # column by column, the row blocks in order (their rows offset by the blocks before): sorted indices
    counts = [sum(np.diff(parts[r][c].indptr) for r in range(J)) for c in range(J)]
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    nnz = int(indptr[-1])
    index_dtype = np.int32 if max(nnz, Z.shape[1]) < 2**31 else np.int64
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz)
    for c in range(J):
        filled = indptr[starts[c] : starts[c + 1]].copy()  # each column's next free position
        for r in range(J):
            part = parts[r][c]
            per_column = np.diff(part.indptr)
            at = np.repeat(filled - part.indptr[:-1], per_column) + np.arange(part.indptr[-1])
            indices[at] = part.indices + starts[r]
            data[at] = part.data
            filled += per_column
    return sp.csc_matrix((data, indices, indptr.astype(index_dtype)), shape=(Z.shape[1], Z.shape[1]))


def _shifted_sums(X, Zt, Y, XtX):
    """Z'r, X'r, r'r and beta_ols for the residuals r = Y - X beta_ols of each column of Y from least squares on X
    (XtX: X'X)."""
    p = XtX.shape[0]
    beta_ols = np.zeros((p, Y.shape[1]))
    r = Y
    solve = _least_squares(X, XtX) if p else None
    for _ in range(2 if p else 0):  # a second pass removes what rounding left of X's span in r
        beta_ols = beta_ols + solve(r)
        r = Y - X @ beta_ols
    return np.asarray(Zt @ r), X.T @ r, np.einsum("ij,ij->j", r, r), beta_ols


# X's columns, scaled to unit length, that each keep at least this much of their length off the columns before them
# (read off the Cholesky factor of their Gram matrix, which is ~1e-7 off where an entry is small) are well separated:
# lme4's aliasing rule keeps every one of them (formula/design_rules.drop_aliased), and the least-squares shift comes
# from the normal equations (a condition number within ~1e4: the second pass leaves (eps cond^2)^2 of X's span in the
# residual); otherwise each decides by X's QR.
WELL_SEPARATED_MIN_RESIDUAL = 1e-4


def well_separated_factor(XtX: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(upper, scale): the upper Cholesky factor of the columns' correlations XtX / (scale scale') and the columns'
    norms scale, where every column keeps WELL_SEPARATED_MIN_RESIDUAL of its length off the columns before it (the
    factor's diagonal holds those residuals); else None."""
    scale = np.sqrt(np.diagonal(XtX))
    if not np.all(scale > 0):
        return None
    upper, info = lapack.dpotrf(XtX / np.outer(scale, scale))
    if info != 0 or not np.min(np.diagonal(upper)) > WELL_SEPARATED_MIN_RESIDUAL:
        return None
    return upper, scale


def _least_squares(X, XtX):
    """b -> the least-squares solution of X beta = b (X'X = XtX), used for both passes: by the normal equations where
    X's columns are well separated (well_separated_factor: X'X is at hand, and a QR of a tall X costs several of its
    products), else from one QR of X (numpy's lstsq, an SVD each time, took 0.25 ms of a 7,000-row system's 1.9 ms),
    or lstsq's where X is (nearly) rank deficient. LAPACK's Householder QR as it is, Q applied by its reflectors
    (numpy's qr also forms Q: 15 of a small model's 30 us)."""
    by_svd = lambda b: np.linalg.lstsq(X, b, rcond=None)[0]  # noqa: E731
    n, p = X.shape
    if n < p:
        return by_svd
    separated = well_separated_factor(XtX)
    if separated is not None:
        upper, scale = separated

        def normal_equations(b):
            solved, _ = lapack.dpotrs(upper, (X.T @ b) / scale[:, None])
            return solved / scale[:, None]

        return normal_equations
    reflectors, tau, _, info = lapack.dgeqrf(X)
    R = reflectors[:p]  # (its upper triangle: trtrs reads no other)
    diagonal = np.abs(np.diagonal(R))
    if info != 0 or not diagonal.min() > 1e-10 * diagonal.max():
        return by_svd

    def solve(b):
        Qtb, _, info = lapack.dormqr("L", "T", reflectors, tau, b, max(1, b.shape[1]))
        beta, info_r = lapack.dtrtrs(R, Qtb[:p])
        return beta if info == 0 and info_r == 0 else by_svd(b)

    return solve


def _weighted(X, Z, weights):
    """Prior weights: rows scaled by sqrt(w); the likelihood gains sum(log w) / 2."""
    if weights is None:
        return X, Z, 0.0
    sw = np.sqrt(np.asarray(weights, dtype=float))
    return X * sw[:, None], sp.csc_matrix(sp.diags(sw) @ Z), float(np.sum(np.log(weights)))


def _scaled(y, weights):
    y = np.asarray(y, dtype=float)
    return y if weights is None else y * np.sqrt(np.asarray(weights, dtype=float))
