"""Cholesky factorizations of A + I (A = Lambda' Z'Z Lambda, lower triangle in a fixed CSC pattern).

Both classes offer the operations the engine needs, with L L' = P (A + I) P':

    refactor(A)       new values, same pattern
    logdet()          log |A + I|
    half_solve(B)     L^{-1} P B
    half_solve_t(C)   P' L^{-T} C
    solve(B)          (A + I)^{-1} B

`CholmodFactor` wraps CHOLMOD (scikit-sparse), symbolic analysis once. `SchurFactor` follows MixedModels.jl:
when the first term's block of A is block diagonal by level (always, for one grouping factor), that block is
eliminated exactly, level by level, and only the Schur complement of the remaining q2 columns is factored,
dense, by LAPACK. On crossed designs the Schur complement is dense anyway (fill), so this skips CHOLMOD's
symbolic bookkeeping; it is offered when q2 is small enough for a dense q2 x q2 matrix.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from sksparse.cholmod import analyze

__all__ = ["CholmodFactor", "SchurFactor", "schur_applicable"]

DENSE_FILL = 0.2                  # A21 at least this full is handled as a dense matrix ...
DENSE_W_MAX_ENTRIES = 20_000_000  # ... when it has at most this many entries (160 MB)


class CholmodFactor:
    def __init__(self, A: sp.csc_matrix, mode: str):
        self.mode = mode
        self._f = analyze(A, mode=mode)

    def refactor(self, A):
        self._f.cholesky_inplace(A, beta=1.0)

    def logdet(self) -> float:
        return float(self._f.logdet())

    def half_solve(self, B):
        return self._f.solve_L(self._f.apply_P(B), use_LDLt_decomposition=False)

    def half_solve_t(self, C):
        return self._f.apply_Pt(self._f.solve_Lt(C, use_LDLt_decomposition=False))

    def solve(self, B):
        return self._f.solve_A(B)


def schur_applicable(A: sp.csc_matrix, q1: int, k1: int) -> bool:
    """The first q1 columns form k1 x k1 diagonal blocks (no entry links two levels of the first term)."""
    rows, cols = _coordinates(A)
    first = (rows < q1) & (cols < q1)
    return bool(np.all(rows[first] // k1 == cols[first] // k1))


class SchurFactor:
    mode = "schur"

    def __init__(self, A: sp.csc_matrix, q1: int, k1: int):
        q = A.shape[0]
        self.q1, self.k1, self.q2 = q1, k1, q - q1
        rows, cols = _coordinates(A)
        in11 = (rows < q1) & (cols < q1)
        in21 = (rows >= q1) & (cols < q1)
        in22 = cols >= q1
        self._pos11 = np.flatnonzero(in11)
        self._lvl11, self._i11, self._j11 = rows[in11] // k1, rows[in11] % k1, cols[in11] % k1
        # A21 (q2 x q1) keeps A's CSC order: its entries are the tail of each of the first q1 columns.
        self._pos21 = np.flatnonzero(in21)
        self._rows21 = rows[in21] - q1
        self._cols21 = cols[in21]
        counts = np.bincount(cols[in21], minlength=q1)
        self._indptr21 = np.concatenate([[0], np.cumsum(counts)])
        self._pos22 = np.flatnonzero(in22)
        self._r22, self._c22 = rows[in22] - q1, cols[in22] - q1
        # W' = A21 L11^{-T} kept dense when A21 is mostly filled (crossed designs) and small: BLAS's syrk then
        # forms W'W in 0.04 ms where scipy's sparse product took 1.6 ms (seed crossed design, 100 x 100).
        self._dense_w = (self._pos21.size > DENSE_FILL * self.q1 * self.q2
                         and self.q1 * self.q2 <= DENSE_W_MAX_ENTRIES)

    def refactor(self, A):
        d = A.data
        n1, k1 = self.q1 // self.k1, self.k1
        blocks = np.zeros((n1, k1, k1))
        blocks[self._lvl11, self._i11, self._j11] = d[self._pos11]
        blocks = np.tril(blocks) + np.transpose(np.tril(blocks, -1), (0, 2, 1)) + np.eye(k1)
        self._L11 = np.linalg.cholesky(blocks)                      # (n1, k1, k1), lower
        S = np.zeros((self.q2, self.q2))
        S[self._r22, self._c22] = d[self._pos22]
        S = S + np.tril(S, -1).T + np.eye(self.q2)
        if self._dense_w:
            # Plain numpy: scipy.sparse's per-call overhead was most of the 0.44 ms this step took.
            dense21 = np.zeros((self.q2, self.q1))
            dense21[self._rows21, self._cols21] = d[self._pos21]
            if self.k1 == 1:
                self._Wt = dense21 / self._L11[:, 0, 0][None, :]
            else:
                self._Wt = np.einsum("rnj,nji->rni", dense21.reshape(self.q2, -1, self.k1),
                                     self._inverse_transposes()).reshape(self.q2, self.q1)
            S -= self._Wt @ self._Wt.T
        else:
            A21 = sp.csc_matrix((d[self._pos21], self._rows21, self._indptr21), shape=(self.q2, self.q1))
            self._Wt = sp.csr_matrix(A21 @ self._block_inverse_transpose())   # W' = A21 L11^{-T}
            S -= (self._Wt @ self._Wt.T).toarray()
        self._LS = la.cholesky(S, lower=True, check_finite=False)

    def _inverse_transposes(self) -> np.ndarray:
        """L11_l^{-T} for every level l: (n1, k1, k1)."""
        return np.transpose(np.linalg.inv(self._L11), (0, 2, 1))

    def _block_inverse_transpose(self) -> sp.csr_matrix:
        inv_t = self._inverse_transposes()
        if self.k1 == 1:
            return sp.diags(inv_t[:, 0, 0], format="csr")
        return sp.block_diag(list(inv_t), format="csr")

    def logdet(self) -> float:
        d11 = np.einsum("lii->li", self._L11)
        return 2.0 * float(np.sum(np.log(d11)) + np.sum(np.log(np.diag(self._LS))))

    def _l11_solve(self, B, transpose=False):
        n1, k1 = self.q1 // self.k1, self.k1
        Bb = B.reshape(n1, k1, -1)
        L = np.transpose(self._L11, (0, 2, 1)) if transpose else self._L11
        if k1 == 1:
            return (Bb / L).reshape(self.q1, -1)
        return np.linalg.solve(L, Bb).reshape(self.q1, -1)

    def half_solve(self, B):
        B = np.asarray(B, dtype=float)
        vec = B.ndim == 1
        B2 = B.reshape(B.shape[0], -1)
        y1 = self._l11_solve(B2[:self.q1])
        y2 = la.solve_triangular(self._LS, B2[self.q1:] - self._Wt @ y1, lower=True, check_finite=False)
        out = np.vstack([y1, y2])
        return out.ravel() if vec else out

    def half_solve_t(self, C):
        C = np.asarray(C, dtype=float)
        vec = C.ndim == 1
        C2 = C.reshape(C.shape[0], -1)
        x2 = la.solve_triangular(self._LS, C2[self.q1:], lower=True, trans="T", check_finite=False)
        x1 = self._l11_solve(C2[:self.q1] - self._Wt.T @ x2, transpose=True)
        out = np.vstack([x1, x2])
        return out.ravel() if vec else out

    def solve(self, B):
        return self.half_solve_t(self.half_solve(B))


def _coordinates(A: sp.csc_matrix):
    cols = np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))
    return A.indices.astype(np.int64), cols
