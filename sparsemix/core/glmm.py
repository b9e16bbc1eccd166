"""The Laplace approximation to a generalized linear mixed model's likelihood, over one sparse Cholesky factor
(Bates et al. 2015 section 5; lme4's glmer).

With eta = offset + X beta + Z Lambda u and mu = g^{-1}(eta), penalized iteratively reweighted least squares
(PIRLS) finds the conditional mode u of the penalized deviance  sum dev_i(y, mu) + |u|^2  at (theta, beta):

    W = w_prior (dmu/deta)^2 / V(mu),   (Lambda' Z' W Z Lambda + I) delta = Lambda' Z' W (y - mu)/(dmu/deta) - u

with the step halved until the penalized deviance falls, to convergence (lme4's default stops early). The
Laplace approximation to -2 log L is then

    -2 log p(y | u) + |u|^2 + log |L|^2,      L L' = Lambda' Z' W Z Lambda + I  (at the mode)

(lme4's objective, with the family's constants in p(y | u)). The pattern of Lambda' Z' W Z Lambda does not
depend on W or theta, so CHOLMOD analyses it once and refactors in place. `joint=True` (nAGQ = 0) moves beta
inside PIRLS too: the same steps on (u, beta), beta unpenalized.

With the canonical link the objective's gradient in (theta, beta) is exact, and cheap: it needs M^{-1} only at the
pairs of columns that meet in a row of Z (LaplaceSystem.objective_gradient). With A = Z Lambda, M = A'WA + I,
e = w_prior (y - mu) (so that the mode solves u = A'e and de/deta = -W), h_i the leverage a_i M^{-1} a_i',
s_i = h_i dW_ii/deta_i (d log|M| / d eta_i), v = M^{-1} A's and c = s - 2e - W A v, the envelope theorem for the
penalized deviance and the mode's implicit derivative du = M^{-1} d(Lambda'Z'e) give

    d/dbeta    = X'c
    d/dtheta_k = c' Z E_k u + v' E_k' Z'e + 2 tr(M^{-1} A'W Z E_k),      E_k = dLambda / dtheta_k

(the trace a sum over Z's entries of w_i z M^{-1}A' read at E_k's positions).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from ..errors import InputError
from .factor import CholmodFactor, _batched_lower_solve, _triangular, right_multiply_rest
from .families import Family
from .relcov import RelativeCovariance
from .threads import dense_threads, kernel_threads

__all__ = ["LaplaceSystem", "PirlsResult"]

# PIRLS stops after a full step shorter than this, relative to u: with the canonical link its steps are Newton's
# and converge quadratically, so the mode is then within ~its square, 1e-12; with another link (Fisher scoring,
# linear convergence) after one shorter than PIRLS_TOLERANCE_SCORING. (lme4's tolPwrss, 1e-7 on the penalized
# deviance by default, leaves its log-likelihood up to ~1e-2 low on large designs.) The objective's second
# differences (beta's covariance, steps of 1e-4) need the mode that close: at 1e-6 they were noise.
PIRLS_TOLERANCE = 1e-6
PIRLS_TOLERANCE_SCORING = 1e-11
PIRLS_MAX_ITERATIONS = 100
PIRLS_MAX_HALVINGS = 30


@dataclass
class PirlsResult:
    """The conditional mode at (theta, beta): u, beta (moved by PIRLS with joint=True), eta, mu, the Laplace
    objective (-2 log L approximated), the penalized deviance, log |L|^2, and whether PIRLS converged."""

    u: np.ndarray
    beta: np.ndarray
    eta: np.ndarray
    mu: np.ndarray
    objective: float
    pdev: float
    logdet: float
    converged: bool
    iterations: int


# The first term eliminated level by level and the rest held dense (BlockFactor) where the rest has at most this
# many columns and the first-term-by-rest block at most this many entries; CHOLMOD otherwise.
BLOCK_MAX_REST = 2000
BLOCK_MAX_ENTRIES = 20_000_000
# From this many entries of the first-term-by-rest block (one column per level of each term), it is held sparse, W'W
# subtracted by the compiled loop ...
SPARSE_BLOCK_FROM = 1_000_000
# ... and below that where at most this share of it occurs (nested terms: one entry a level), W'W by scipy's sparse
# product (mlmRev's guImmun, 1,595 mothers in 161 communities: a dense W'W took 1.8 of a refactorization's 3.2 ms)
SPARSE_BLOCK_MAX_FILL = 0.05
# W'W's compiled update takes the free cores' threads from this order of the rest on (1,000,000 rows, 2,000 items:
# 0.12 s in one thread, 0.08 s in two)
GRAM_THREADS_MIN_ORDER = 1_000
# Z, Z' and the block factor's weighted sums are applied as dense arrays up to this many entries (a dense product of
# 50,000 entries costs about a scipy sparse product's fixed cost of each call)
DENSE_PRODUCTS_MAX_ENTRIES = 50_000
# ... and Lambda'Z'WZ Lambda + I formed and factored dense where that takes at most this many flops (q^2 n): beyond,
# the block factor's level-by-level elimination costs less
DENSE_FACTOR_MAX_WORK = 100_000
# The Laplace objective's exact gradient (LaplaceSystem.objective_gradient) takes M^{-1} dense (q^3 / 3 flops and
# q^2 entries): up to this many random-effect columns, where it costs less than the objective's differences it saves.
GRADIENT_MAX_Q = 200
# Above it, in a block factor of scalar terms, M^{-1} is read where the gradient needs it (the pairs of columns that
# meet in a row: BlockFactor.inverse_at) from the inverse of the Schur complement, up to this order of the rest, ...
GRADIENT_MAX_REST = 300
# ... where the first-term-by-rest block is sparse and its rows' pairs of entries are listed (W_PAIRS_MAX), or dense
# and -V S^{-1} costs at most this many flops (q1 q2^2: at 20,000,000, 2,000 x 100 crossed binary levels, the
# gradients cost more than the 21 of 76 evaluations they saved)
GRADIENT_MAX_BLOCK_WORK = 5_000_000
# W's pairs of entries in one row listed once (BlockFactor._w_pairs) up to this many (five int64 arrays: 40 MB)
W_PAIRS_MAX = 1_000_000
# The last modes kept for predicting the next start (ModePredictor): at most this many, and this many bytes.
PREDICTOR_MAX_POINTS = 256
PREDICTOR_MAX_BYTES = 256 * 2**20


class BlockFactor:
    """Lambda' Z' W Z Lambda + I for PIRLS's changing weights W without forming it sparse: the weighted
    cross-products accumulated from the rows by level codes (the first term's k1 x k1 blocks, its block against
    the rest's q2 columns, the rest's q2 x q2 block: each a sparse product with the weights, or a bincount, over
    index arrays built once: _sum_operator), then the first
    term eliminated level by level and the q2 x q2 Schur complement factored dense (as DenseFactor does for the
    linear model). Offers CholmodFactor's logdet, half_solve and solve."""

    def __init__(self, Z: sp.csc_matrix, relcov: RelativeCovariance):
        n1, first = relcov.blocks[0]
        self.n1, self.k1 = n1, first.k
        self.q1 = q1 = n1 * first.k
        self.q = relcov.q
        self.q2 = q2 = relcov.q - q1
        Zr = sp.csr_matrix(Z)
        Z1, ZR = Zr[:, :q1].tocoo(), Zr[:, q1:].tocsr()
        self.n_rows = Z.shape[0]
        # each stored entry's level and column a within it (the first term), and, per row, the pairs of entries
        # that meet in it: the cross-products' terms
        e_level, e_a = np.divmod(Z1.col.astype(np.int64), self.k1)
        e_val = Z1.data
        R = ZR.tocoo()
        slots, slots_r = _row_slots(Z1.row, self.n_rows), _row_slots(R.row, self.n_rows)
        rows, e1, e2 = _row_pairs(slots, slots)
        self._g11 = (rows, (e_level[e1] * self.k1 + e_a[e1]) * self.k1 + e_a[e2], e_val[e1] * e_val[e2])
        rows, e1, e2 = _row_pairs(slots, slots_r)  # a first-term entry against each rest entry of its row
        self._g1r = (rows, (e_level[e1] * self.k1 + e_a[e1]) * q2 + R.col[e2], e_val[e1] * R.data[e2])
        rows, e1, e2 = _row_pairs(slots_r, slots_r)
        self._grr = (rows, R.col[e1] * q2 + R.col[e2], R.data[e1] * R.data[e2])
        # a large first-term-by-rest block with one column per level is mostly empty (a subject sees few items):
        # held sparse, its pattern the pairs that occur, so that W'W costs the pairs, not n1 q2 q2
        self._scalar = self.k1 == 1 and all(t.k == 1 for _, t in relcov.blocks[1:])
        self._compiled_gram = self._scalar and q1 * q2 >= SPARSE_BLOCK_FROM
        pairs = np.unique(self._g1r[1]) if self._scalar else np.empty(0, np.int64)  # the entries that occur
        self._sparse = self._compiled_gram or (self._scalar and pairs.size <= SPARSE_BLOCK_MAX_FILL * q1 * q2)
        if self._scalar and not self._sparse:  # the three sums as one (one product with w, one call)
            parts = [self._g11, self._g1r, self._grr]
            offsets = np.cumsum([0, n1, n1 * q2])
            self._all = tuple(
                np.concatenate([p[j] + (o if j == 1 else 0) for p, o in zip(parts, offsets)]) for j in range(3)
            )
        if self._sparse:
            rows_, idx_, val_ = self._g1r
            self._g1r = (rows_, np.searchsorted(pairs, idx_), val_)
            # csr_matrix's (data, (row, col)) orders the stored entries by row, then column: as np.unique's
            self._pattern1r = sp.csr_matrix((np.ones(pairs.size), (pairs // q2, pairs % q2)), shape=(n1, q2))
            self._pattern1r.sort_indices()
            self._pair_rows = np.repeat(np.arange(n1), np.diff(self._pattern1r.indptr))
            # the same pattern by columns, each entry holding its position in the rows' order (for W'W)
            positions = sp.csr_matrix(
                (np.arange(pairs.size, dtype=np.float64), self._pattern1r.indices, self._pattern1r.indptr),
                shape=(n1, q2),
            )
            self._by_column = sp.csc_matrix(positions)
            self._by_column.data = self._by_column.data.astype(np.int64)
            self._n_pairs = pairs.size
        self._lookup: tuple | None = None  # inverse_at's reads for the last pairs asked (_inverse_lookup)
        rest = list(relcov.blocks[1:])
        self._rest = RelativeCovariance(rest)  # Lambda_2: the terms after the first
        self._rest_slices = [slice(int(sl.start) - q1, int(sl.stop) - q1) for sl in relcov.column_slices[1:]]
        self._rest_ks = [t.k for _, t in rest]
        # each weighted sum as a sparse operator on w, where its output is not much larger than its terms
        sizes = {"_g11": n1 * self.k1 * self.k1, "_g1r": self._n_pairs if self._sparse else q1 * q2, "_grr": q2 * q2}
        if hasattr(self, "_all"):
            sizes["_all"] = n1 + n1 * q2 + q2 * q2
        for name, size in sizes.items():
            setattr(self, name, _sum_operator(getattr(self, name), size, self.n_rows))

    @functools.cached_property
    def _w_pairs(self) -> tuple[np.ndarray, ...] | None:
        """Every ordered pair of a sparse W's stored entries in one row (its level), where they are at most
        W_PAIRS_MAX, as (entry, entry, flat index in q2 x q2, the larger column, the smaller): W'W a bincount of
        their products (scipy's sparse product and its conversion took half of grouseticks' refactorization), and
        the rows' blocks of the inverse read through them (inverse_at). Listed on first use: a fit that needs
        neither (the compiled W'W, no gradient) does not build them."""
        if not self._sparse or int(np.sum(np.diff(self._pattern1r.indptr) ** 2)) > W_PAIRS_MAX:
            return None
        _, a, b = _row_pairs(*[_row_slots(self._pair_rows, self.n1)] * 2)
        columns = self._pattern1r.indices.astype(np.int64)
        high, low = np.maximum(columns[a], columns[b]), np.minimum(columns[a], columns[b])
        return a, b, columns[a] * self.q2 + columns[b], high, low

    @classmethod
    def applicable(cls, Z: sp.csc_matrix, relcov: RelativeCovariance) -> bool:
        from .factor import schur_applicable

        if not relcov.blocks:
            return False
        n1, first = relcov.blocks[0]
        q1 = n1 * first.k
        q2 = relcov.q - q1
        scalar = first.k == 1 and all(t.k == 1 for _, t in relcov.blocks[1:])
        if q2 > BLOCK_MAX_REST or (q1 * q2 > BLOCK_MAX_ENTRIES and not scalar):
            return False
        ZtZ = sp.csc_matrix(Z.T @ Z)
        return schur_applicable(ZtZ, q1, first.k)

    @staticmethod
    def _sum(parts, w, size):
        """sum over the terms (row, index, value) of w[row] * value, by index: `parts` as _sum_operator made it."""
        if not isinstance(parts, tuple):  # a sparse or dense operator (_sum_operator)
            return parts @ w
        rows, idx, val = parts
        # (float even where there is nothing to sum: numpy's bincount of no entries is an integer array)
        return np.bincount(idx, weights=w[rows] * val, minlength=size).astype(float, copy=False)

    def _right_rest(self, M: np.ndarray, rest) -> np.ndarray:
        return right_multiply_rest(M, rest, self._rest_ks, self._rest_slices)

    def refactor(self, w: np.ndarray, factors) -> "BlockFactor":
        if self._scalar:
            return self._refactor_scalar(w, factors)
        n1, k1, q2 = self.n1, self.k1, self.q2
        G11 = self._sum(self._g11, w, n1 * k1 * k1).reshape(n1, k1, k1)
        G1R = self._sum(self._g1r, w, n1 * k1 * q2).reshape(n1, k1, q2)
        GRR = self._sum(self._grr, w, q2 * q2).reshape(q2, q2)
        T1, rest = factors[0], factors[1:]
        M11 = np.matmul(np.matmul(T1.T, G11), T1)
        M11[:, np.arange(k1), np.arange(k1)] += 1.0
        self.L11 = np.linalg.cholesky(M11)
        B = self._right_rest(np.matmul(T1.T, G1R), rest)  # (Lambda_1' G1R Lambda_2), per level
        self.W = _batched_lower_solve(self.L11, B).reshape(n1 * k1, q2)
        S = self._right_rest(self._right_rest(GRR, rest).T, rest) - self.W.T @ self.W
        S[np.arange(q2), np.arange(q2)] += 1.0
        with dense_threads(q2):  # the BLAS threads the fit set aside, for a big Schur complement
            self.LS = np.linalg.cholesky(S) if q2 else np.zeros((0, 0))
        return self

    def _refactor_scalar(self, w: np.ndarray, factors) -> "BlockFactor":
        """refactor where every term is scalar (VerbAgg's crossed intercepts; the 1,000,000-row designs): Lambda is
        a diagonal of scales, so the first term's levels need square roots, not a stack of 1 x 1 Choleskys and
        solves (a third of a PIRLS iteration on VerbAgg); W = diag(t / root) G1R diag(lambda_2), dense, or sparse
        in the pattern of the pairs that occur (`_sparse`), whose W'W the compiled loop subtracts."""
        n1, q2 = self.n1, self.q2
        t = float(factors[0][0, 0])
        scales = self._rest.scalar_scales(factors[1:])
        assert scales is not None  # (_scalar: every term after the first is scalar)
        if self._sparse:
            g11, g1r = self._sum(self._g11, w, n1), self._sum(self._g1r, w, self._n_pairs)
            S = self._sum(self._grr, w, q2 * q2).reshape(q2, q2)
        else:
            sums = self._sum(self._all, w, n1 + n1 * q2 + q2 * q2)
            g11, g1r, S = sums[:n1], sums[n1 : n1 + n1 * q2], sums[n1 + n1 * q2 :].reshape(q2, q2)
        root = np.sqrt(t * t * g11 + 1.0)
        self.L11 = root.reshape(n1, 1, 1)
        S *= scales[:, None]  # in place: two temporaries of q2 x q2 cost 17 ms at q2 = 2,000
        S *= scales[None, :]
        if self._sparse:
            W = self._pattern1r
            W.data = g1r * (t / root)[self._pair_rows] * scales[W.indices]
            if q2 and not self._compiled_gram and self._w_pairs is not None:
                a, b, flat = self._w_pairs[:3]
                S -= np.bincount(flat, weights=W.data[a] * W.data[b], minlength=q2 * q2).reshape(q2, q2)
            elif q2 and not self._compiled_gram:
                S -= (W.T @ W).toarray()
            elif q2:
                # S -= W'W, its lower triangle, compiled (kernels.py: scipy's sparse product built W'W as a sparse
                # matrix, 0.23 s of a 0.33 s refactorization at 1,000,000 rows, 20,000 x 2,000)
                from .kernels import subtract_gram_lower  # numba: imported (1 s) only by fits that need it

                columns = self._by_column
                threads = kernel_threads(q2, GRAM_THREADS_MIN_ORDER)
                subtract_gram_lower(
                    columns.indptr, columns.indices, columns.data, W.indptr, W.indices, W.data, S, threads
                )
        else:
            W = g1r.reshape(n1, q2)
            W *= (t / root)[:, None]
            W *= scales[None, :]
            S -= W.T @ W
        self.W = W
        S[np.arange(q2), np.arange(q2)] += 1.0
        with dense_threads(q2):  # the BLAS threads the fit set aside, for a big Schur complement
            self.LS = _lower_cholesky(S) if q2 else np.zeros((0, 0))
        return self

    def inverse_at(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """(L L')^{-1} at the pairs (rows, columns) of a scalar system's pattern (two columns of the first term only
        where they are one, a first-term level and a rest column only where they meet in W), from the last
        refactorization: with V = L11^{-T} W and S^{-1} = (LS LS')^{-1} the blocks are S^{-1}, X12 = -V S^{-1}
        and diag(L11^{-2}) - diag(V X12'); where W is sparse (_w_pairs), X12 only at W's pattern and S^{-1} only at
        the pairs of columns that meet in one of W's rows (Takahashi's selected inverse, the rest held dense)."""
        assert self._scalar
        q2 = self.q2
        root = self.L11[:, 0, 0]
        S_inv = np.zeros((0, 0))  # lower triangle of S^{-1}
        if q2:
            S_inv, info = la.lapack.dpotri(self.LS, lower=1)
            if info != 0:
                raise np.linalg.LinAlgError("the Schur complement's inverse failed")
        lookup = self._inverse_lookup(rows, columns)
        X12: np.ndarray
        if self._sparse:
            assert self._w_pairs is not None  # (a sparse W is read through its pairs: LaplaceSystem._selected_inverse)
            a, b, _, high, low = self._w_pairs
            # (W is that pattern, with the last refactorization's values)
            V = self._pattern1r.data / root[self._pair_rows]
            X12 = -np.bincount(a, weights=V[b] * S_inv[high, low], minlength=V.size)  # at W's entries
            X11 = 1.0 / root**2 - np.bincount(self._pair_rows, weights=V * X12, minlength=self.n1)
        else:
            V = np.asarray(self.W) / root[:, None]
            S_full = np.tril(S_inv) + np.tril(S_inv, -1).T
            X12 = -(V @ S_full).ravel()  # at every (level, column), row-major
            X11 = 1.0 / root**2 - np.einsum("lj,lj->l", V, X12.reshape(self.n1, q2))
        both, mixed, mixed_at, rest, rest_high, rest_low = lookup
        out = np.empty(rows.shape[0])
        out[both] = X11[rows[both]]
        out[mixed] = X12[mixed_at]
        out[rest] = S_inv[rest_high, rest_low]
        return out

    def _inverse_lookup(self, rows: np.ndarray, columns: np.ndarray):
        """Where inverse_at reads each pair: kept for the last arrays asked (the system asks for its own pairs)."""
        kept = self._lookup
        if kept is not None and kept[0] is rows and kept[1] is columns:
            return kept[2]
        q1, q2 = self.q1, self.q2
        first_a, first_b = rows < q1, columns < q1
        both = np.flatnonzero(first_a & first_b)
        mixed = np.flatnonzero(first_a != first_b)
        level = np.where(first_a, rows, columns)[mixed]
        rest_column = np.where(first_a, columns, rows)[mixed] - q1
        if self._sparse:  # the stored entry (level, column) of W, CSR order
            keys = self._pair_rows.astype(np.int64) * q2 + self._pattern1r.indices
            mixed_at = np.searchsorted(keys, level.astype(np.int64) * q2 + rest_column)
        else:
            mixed_at = level.astype(np.int64) * q2 + rest_column
        rest = np.flatnonzero(~first_a & ~first_b)
        high = np.maximum(rows[rest], columns[rest]) - q1
        low = np.minimum(rows[rest], columns[rest]) - q1
        self._lookup = (rows, columns, (both, mixed, mixed_at, rest, high, low))
        return self._lookup[2]

    def logdet(self) -> float:
        d1 = np.log(np.diagonal(self.L11, axis1=1, axis2=2)).sum()
        return float(2.0 * (d1 + np.log(np.diagonal(self.LS)).sum()))

    def half_solve(self, B):
        """L^{-1} B, L = [[L11, 0], [W', LS]]."""
        B = np.asarray(B, dtype=float)
        B2 = B.reshape(self.q, -1)
        y1 = _batched_lower_solve(self.L11, B2[: self.q1].reshape(self.n1, self.k1, -1)).reshape(self.q1, -1)
        y2 = _triangular(self.LS, B2[self.q1 :] - np.asarray(self.W.T @ y1), trans=0) if self.q2 else B2[self.q1 :]
        return np.concatenate([y1, y2]).reshape(B.shape)

    def solve(self, B):
        B = np.asarray(B, dtype=float)
        Y = self.half_solve(B).reshape(self.q, -1)
        x2 = _triangular(self.LS, Y[self.q1 :], trans=1) if self.q2 else Y[self.q1 :]
        r1 = (Y[: self.q1] - np.asarray(self.W @ x2)).reshape(self.n1, self.k1, -1)
        x1 = _batched_lower_solve(self.L11, r1, transpose=True).reshape(self.q1, -1)
        return np.concatenate([x1, x2]).reshape(B.shape)


def _sum_operator(parts, size: int, n_rows: int):
    """The terms (row, index, value) of a weighted sum as a CSR matrix (size x n_rows), so that the sums are one
    product with w (VerbAgg: 20 us where the gather and bincount took 72), as a dense array where it is small
    (DENSE_PRODUCTS_MAX_ENTRIES); the terms as they are where the sums' length is far beyond their number (a dense
    first-by-rest block of millions of entries: bincount's output)."""
    rows, idx, val = parts
    if size > 8 * rows.size + 1_000_000:
        return parts
    operator = sp.csr_matrix((val, (idx, rows)), shape=(size, n_rows))
    return operator.toarray() if size * n_rows <= DENSE_PRODUCTS_MAX_ENTRIES else operator


def _lower_cholesky(S: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor of S from its lower triangle (LAPACK's potrf; the upper triangle is not read)."""
    L, info = la.lapack.dpotrf(S, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError("Lambda'Z'WZ Lambda + I is not positive definite")
    return L


def _row_pairs(slots_a: np.ndarray, slots_b: np.ndarray):
    """(row, entry a, entry b) for every pair of an entry of slots_a and one of slots_b in the same row
    (_row_slots' layout)."""
    rows, first, second = [], [], []
    for s1 in range(slots_a.shape[1]):
        for s2 in range(slots_b.shape[1]):
            ok = (slots_a[:, s1] >= 0) & (slots_b[:, s2] >= 0)
            rows.append(np.flatnonzero(ok))
            first.append(slots_a[ok, s1])
            second.append(slots_b[ok, s2])
    return np.concatenate(rows), np.concatenate(first), np.concatenate(second)


def _row_slots(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """(n_rows, most entries in a row): the indices of each row's entries (`rows` sorted), -1 past the last."""
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slots = np.full((n_rows, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    slots[rows, np.arange(rows.size) - starts[rows]] = np.arange(rows.size)
    return slots


class ModePredictor:
    """PIRLS's start at a new point x from the modes at the last points: where x is an affine combination of them
    (a difference stencil's minus and cross points are: x - h e_i = 2 x_0 - (x_0 + h e_i)), the same combination of
    their modes, off the new mode by O(h^2) where the last mode is off by O(h); in general the first-order
    extrapolation the last points define. Each point is weighted by its squared distance, so the prediction leans on
    the nearest. The caller keeps the prediction only where it starts PIRLS lower than the last mode."""

    def __init__(self, dimension: int, state_size: int):
        stencil = 2 * dimension + dimension * (dimension - 1) // 2 + 2  # a difference Hessian's points and centre
        fits = max(2, PREDICTOR_MAX_BYTES // max(8 * state_size, 1))
        capacity = min(stencil, PREDICTOR_MAX_POINTS, fits)
        self.points = np.empty((capacity, dimension))
        self.states = np.empty((capacity, state_size))
        self.count = 0  # points recorded; the last `capacity` are kept, in a ring

    def record(self, x: np.ndarray, state: np.ndarray) -> None:
        slot = self.count % self.points.shape[0]
        self.points[slot], self.states[slot] = x, state
        self.count += 1

    def predict(self, x: np.ndarray) -> np.ndarray | None:
        kept = min(self.count, self.points.shape[0])
        if kept < 2:
            return None
        P = self.points[:kept] - x
        distance = np.sqrt(np.einsum("kj,kj->k", P, P))
        nearest = int(np.argmin(distance))
        if distance[nearest] == 0.0:
            return self.states[nearest].copy()
        # min sum (a_k d_k^2)^2 subject to sum a_k = 1, sum a_k P_k = x: the least-norm b_k = a_k d_k^2 of B b = e_1
        # (rows and weights scaled to order one: the same least-norm solution, a better conditioned B B')
        far = distance.max()
        scale = (distance / far) ** 2
        B = np.vstack([np.ones(kept), P.T / far]) / scale
        rhs = np.zeros(max(B.shape))
        rhs[0] = 1.0
        # LAPACK's least-norm solution by B's LQ factorization (the normal equations would square B's condition;
        # numpy's qr and solve cost 5x this call in their wrappers)
        _, b, info = la.lapack.dgels(B, rhs)
        if info != 0:  # the points span no affine space that holds x
            return None
        a = b[:kept] / scale
        if not np.all(np.isfinite(a)) or abs(a.sum() - 1.0) > 1e-8 or np.abs(a @ P).max() > 1e-8 * distance.max():
            return None
        return a @ self.states[:kept]


class LaplaceSystem:
    """The Laplace objective of one model as a function of (theta, beta), PIRLS warm-started from the last mode, or
    from the one the last modes predict (ModePredictor)."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        Z: sp.csc_matrix,
        relcov: RelativeCovariance,
        family: Family,
        prior_weights: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ):
        self.X = np.asarray(X, dtype=float)
        self.y = np.asarray(y, dtype=float)
        n = self.y.shape[0]
        self.n, self.p, self.q = n, self.X.shape[1], relcov.q
        self.relcov, self.family = relcov, family
        self.prior_weights = np.ones(n) if prior_weights is None else np.asarray(prior_weights, dtype=float)
        self.offset = np.zeros(n) if offset is None else np.asarray(offset, dtype=float)
        family.check_response(self.y, self.prior_weights)
        self._loglik_constant = family.loglik_constant(self.y, self.prior_weights)
        self._kernel_terms = family.kernel_terms(self.y, self.prior_weights)
        self.Z = sp.csc_matrix(Z)
        self.Zt = sp.csr_matrix(self.Z.T)  # once: scipy builds a new transpose object per .T (16% of cbpp's fit)
        # PIRLS's products with Z and Z': dense arrays where they are small (numpy's product a tenth of scipy's call)
        small = self.n * self.q <= DENSE_PRODUCTS_MAX_ENTRIES
        self.Z_products = self.Z.toarray() if small else self.Z
        self.Zt_products = np.ascontiguousarray(self.Z_products.T) if small else self.Zt
        # Z Lambda dense and Lambda'Z'WZ Lambda + I factored dense (_DenseZLambda) in small systems, else the first
        # term eliminated level by level (BlockFactor) where that applies, else CHOLMOD
        self._dense = small and self.q * self.q * self.n <= DENSE_FACTOR_MAX_WORK
        self._block = None
        if not self._dense and BlockFactor.applicable(self.Z, relcov):
            self._block = BlockFactor(self.Z, relcov)
        if self._block is None and not self._dense:
            self._pattern(self.Z)
        self._factor: CholmodFactor | None = None
        self._mode_factor: Any = None  # the factor at the last mode's weights
        self._u = np.zeros(self.q)
        self._predictors: dict[bool, ModePredictor] = {}  # by `joint`: PIRLS's starts from the last modes
        self.n_pirls = 0

    def with_response(self, y: np.ndarray) -> "LaplaceSystem":
        """The same model for another response (a bootstrap replicate): the design's index arrays, Z Lambda's
        pattern and CHOLMOD's analysis are shared, only what depends on y is new."""
        other = copy.copy(self)
        other.y = np.asarray(y, dtype=float)
        self.family.check_response(other.y, self.prior_weights)
        other._loglik_constant = self.family.loglik_constant(other.y, self.prior_weights)
        other._kernel_terms = self.family.kernel_terms(other.y, self.prior_weights)
        other._u = np.zeros(self.q)
        other._predictors = {}
        other.n_pirls = 0
        return other

    def __getstate__(self):
        # CHOLMOD's factor cannot be pickled: it is analysed again on first use (its pattern is fixed)
        state = dict(self.__dict__)
        state["_factor"] = state["_mode_factor"] = None
        state["_predictors"] = {}
        return state

    # -- Z Lambda with a fixed pattern ---------------------------------------------------------------------

    def _pattern(self, Z: sp.csc_matrix) -> None:
        """Z Lambda's pattern, fixed for every theta: each stored entry of Z at (row, level, a) spreads to its
        level's columns (level, b) with value z T[a, b] (structural zeros kept, so CHOLMOD's analysis holds)."""
        coo = Z.tocoo()
        rows, cols, vals = [], [], []
        a_index, b_index, term_index = [], [], []
        for t, ((n_levels, template), sl) in enumerate(zip(self.relcov.blocks, self.relcov.column_slices)):
            k = template.k
            inside = (coo.col >= sl.start) & (coo.col < sl.stop)
            r, c, v = coo.row[inside], coo.col[inside] - sl.start, coo.data[inside]
            level, a = np.divmod(c, k)
            for b in range(k):
                rows.append(r)
                cols.append(sl.start + level * k + b)
                vals.append(v)
                a_index.append(a)
                b_index.append(np.full(r.shape, b))
                term_index.append(np.full(r.shape, t))
        rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
        order = np.lexsort((rows_a, cols_a))  # CSC order: by column, then row
        self._z = np.concatenate(vals)[order]
        self._a, self._b = np.concatenate(a_index)[order], np.concatenate(b_index)[order]
        self._t = np.concatenate(term_index)[order]
        indptr = np.zeros(self.q + 1, dtype=np.int64)
        np.add.at(indptr, cols_a[order] + 1, 1)
        self._ZL = sp.csc_matrix((self._z.copy(), rows_a[order], np.cumsum(indptr)), shape=(self.n, self.q))
        self._ZL.has_sorted_indices = True

    def z_lambda(self, theta: np.ndarray) -> sp.csc_matrix:
        """Z Lambda(theta), its values in place in the fixed pattern."""
        factors = self.relcov.factors(theta)
        scale = np.empty(self._z.shape)
        for t, T in enumerate(factors):
            mine = self._t == t
            scale[mine] = T[self._a[mine], self._b[mine]]
        self._ZL.data = self._z * scale
        return self._ZL

    # -- PIRLS ---------------------------------------------------------------------------------------------

    def operator(self, theta: np.ndarray) -> "_SparseZLambda | _BlockZLambda | _DenseZLambda":
        """Z Lambda(theta) as PIRLS uses it: products with it and its transpose, and the factor of
        Lambda' Z' W Z Lambda + I for weights W (dense in small systems, BlockFactor where it applies, else
        CHOLMOD)."""
        if self._dense:
            return _DenseZLambda(self, self.relcov.factors(np.asarray(theta, dtype=float)))
        if self._block is not None:
            return _BlockZLambda(self, self.relcov.factors(np.asarray(theta, dtype=float)))
        return _SparseZLambda(self, self.z_lambda(theta))

    def _refactor(self, ZL: sp.csc_matrix, w: np.ndarray) -> CholmodFactor:
        A = sp.csc_matrix(ZL.T @ sp.diags(w) @ ZL)
        A = sp.tril(A, format="csc")
        if self._factor is None:
            self._factor = CholmodFactor(A, "simplicial" if self.q < 5000 else "supernodal")
        self._factor.refactor(A)
        return self._factor

    def _weights(self, eta):
        fam = self.family
        mu, dmu = fam.mu_and_dmu(eta)
        w = self.prior_weights * dmu**2 / fam.variance(mu)
        return mu, dmu, w

    def _pdev(self, mu, u) -> float:
        """The penalized deviance less its constant: -2 (the log-likelihood's kernel) + |u|^2."""
        return float(-2.0 * self.family.kernel_of(self._kernel_terms, mu) + u @ u)

    def pirls(
        self, theta: np.ndarray, beta: np.ndarray, joint: bool = False, u0=None, tolerance: float | None = None
    ) -> PirlsResult:
        """The conditional mode at (theta, beta) (joint: beta moved too, from `beta`), from the last mode or the one
        the last modes predict; `tolerance`: the last step's length that ends it (default: the family's, see
        PIRLS_TOLERANCE)."""
        theta = np.asarray(theta, dtype=float)
        beta = np.asarray(beta, dtype=float).copy()
        ZL = self.operator(theta)
        u = (self._u if u0 is None else np.asarray(u0, dtype=float)).copy()
        eta = self.offset + self.X @ beta + ZL @ u
        mu, dmu, w = self._weights(eta)
        pdev = self._pdev(mu, u)
        key = theta if joint else np.concatenate([theta, beta])
        predictor = self._predictors.get(joint)
        if predictor is None:
            predictor = self._predictors[joint] = ModePredictor(key.size, self.q + (self.p if joint else 0))
        guess = predictor.predict(key) if u0 is None else None
        if guess is not None:  # from the last modes: kept where it starts lower
            u_g, beta_g = guess[: self.q], (guess[self.q :] if joint else beta)
            eta_g = self.offset + self.X @ beta_g + ZL @ u_g
            mu_g, dmu_g, w_g = self._weights(eta_g)
            pdev_g = self._pdev(mu_g, u_g)
            if pdev_g < pdev:
                u, beta, eta, mu, dmu, w, pdev = u_g, beta_g.copy(), eta_g, mu_g, dmu_g, w_g, pdev_g
        converged = False
        iterations = 0
        if tolerance is None:
            tolerance = PIRLS_TOLERANCE if self.family.canonical else PIRLS_TOLERANCE_SCORING
        for iterations in range(1, PIRLS_MAX_ITERATIONS + 1):
            self.n_pirls += 1
            factor = ZL.factor(w)
            resid = (self.y - mu) / dmu  # working residual
            rhs_u = ZL.t(w * resid) - u
            if joint and self.p:
                # the Newton step on (u, beta): [[ZL'WZL + I, ZL'WX], [X'WZL, X'WX]] (du, dbeta) = (rhs_u, X'W r)
                WX = w[:, None] * self.X
                C = factor.half_solve(ZL.t(WX))  # L^{-1} ZL'WX
                cu = factor.half_solve(rhs_u)
                RXtRX = self.X.T @ WX - C.T @ C
                rhs_b = self.X.T @ (w * resid) - C.T @ cu
                try:
                    dbeta = np.linalg.solve(RXtRX, rhs_b)
                except np.linalg.LinAlgError:
                    raise InputError("the fixed effects are not estimable (X'WX is singular at this theta)") from None
                du = factor.solve(rhs_u - ZL.t(WX @ dbeta))
            else:
                dbeta = np.zeros(self.p)
                du = factor.solve(rhs_u)
            step = 1.0
            for _ in range(PIRLS_MAX_HALVINGS):
                u_new, beta_new = u + step * du, beta + step * dbeta
                eta_new = self.offset + self.X @ beta_new + ZL @ u_new
                mu_new, dmu_new, w_new = self._weights(eta_new)
                pdev_new = self._pdev(mu_new, u_new)
                if np.isfinite(pdev_new) and pdev_new <= pdev + 1e-14 * abs(pdev):
                    break
                step /= 2
            else:
                break  # no step lowers the penalized deviance: u is the mode to rounding
            u, beta, eta, mu, dmu, w, pdev = u_new, beta_new, eta_new, mu_new, dmu_new, w_new, pdev_new
            size = max(np.max(np.abs(du), initial=0.0), np.max(np.abs(dbeta), initial=0.0))
            if step == 1.0 and size <= tolerance * max(1.0, np.max(np.abs(u), initial=0.0)):
                converged = True
                break
        else:
            converged = False
        if iterations and not converged:
            # stopped by the halvings at rounding level: converged too, if the last full step was tiny
            converged = bool(np.max(np.abs(du), initial=0.0) <= 1e-6 * max(1.0, np.max(np.abs(u), initial=0.0)))
        factor = ZL.factor(w)  # at the mode's weights
        logdet = factor.logdet()  # log |L|^2
        self._u = u
        if converged:
            predictor.record(key, np.concatenate([u, beta]) if joint else u)
        objective = -2.0 * self._loglik_constant + pdev + logdet
        self._mode_factor = factor  # (objective_gradient's: a block factor's until its next refactorization)
        return PirlsResult(u, beta, eta, mu, objective, pdev, logdet, converged, iterations)

    @property
    def gradient_applies(self) -> bool:
        """Whether objective_gradient gives the exact gradient: the canonical link of a family that gives V'(mu),
        and at most GRADIENT_MAX_Q random-effect columns, or a block factor of scalar terms (_selected_inverse)."""
        exact = self.family.canonical and self.family.variance_slope(np.full(1, 0.5)) is not None
        return exact and (self.q <= GRADIENT_MAX_Q or self._one_term_block or self._selected_inverse)

    @property
    def _one_term_block(self) -> bool:
        """Whether the block factor holds one term alone (any template): M block diagonal, M^{-1} its levels'."""
        return self._block is not None and self._block.q2 == 0

    @property
    def _selected_inverse(self) -> bool:
        """Whether the gradient reads M^{-1} off the block factor (scalar terms; GRADIENT_MAX_REST, _BLOCK_WORK)."""
        block = self._block
        if block is None or not block._scalar or block.q2 > GRADIENT_MAX_REST:
            return False
        if block._sparse:
            return block._w_pairs is not None
        return block.q1 * block.q2 * block.q2 <= GRADIENT_MAX_BLOCK_WORK

    @functools.cached_property
    def _entry_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every ordered pair of Z's entries in one row (each entry with itself too): (row, column, column, z z)."""
        coo = self.Z.tocoo()
        order = np.argsort(coo.row, kind="stable")
        rows, cols, vals = coo.row[order], coo.col[order], coo.data[order]
        slots = _row_slots(rows, self.n)
        i, first, second = _row_pairs(slots, slots)
        return i, cols[first], cols[second], vals[first] * vals[second]

    @functools.cached_property
    def _gradient_entries(self) -> list:
        """Per theta entry (template position (r, c) of its term): the term's columns (l, r) and (l, c) over its
        levels l, the pairs of Z's entries in one row (_entry_pairs) whose first is in a column (l, r), and for each
        such pair the column (l, c) of the first's level, its row and z z."""
        rows, first, second, zz = self._entry_pairs
        entries = []
        for (n_levels, template), sl in zip(self.relcov.blocks, self.relcov.column_slices):
            k = template.k
            inside = (first >= sl.start) & (first < sl.stop)
            level, a = np.divmod(first - sl.start, k)
            base = sl.start + np.arange(n_levels) * k
            for r, c in template.positions:
                mine = np.flatnonzero(inside & (a == r))
                entries.append((base + r, base + c, mine, sl.start + level[mine] * k + c, rows[mine], zz[mine]))
        return entries

    @functools.cached_property
    def _one_term_reads(self) -> tuple[np.ndarray, list]:
        """For a block factor holding one term (k columns a level): the flat index of each pair of _entry_pairs in a
        stack of per-level k x k blocks (level, first's column, second's), and per theta entry those of (level,
        second's column, c) for its pairs (objective_gradient's reads of Lambda M^{-1})."""
        _, first, second, _ = self._entry_pairs
        k = self.relcov.blocks[0][1].k
        level, position = np.divmod(first, k)
        pairs_at = (level * k + position) * k + second % k
        entries_at = [
            (level[pairs] * k + second[pairs] % k) * k + at_level_c % k
            for _, _, pairs, at_level_c, _, _ in self._gradient_entries
        ]
        return pairs_at, entries_at

    def objective_gradient(self, theta: np.ndarray, beta: np.ndarray) -> tuple[float, np.ndarray | None]:
        """The Laplace objective (nAGQ = 1) at (theta, beta) and its exact gradient in (theta, beta) (the module
        docstring), the gradient None where it does not apply (gradient_applies) or PIRLS found no finite mode.
        M^{-1} is needed only at the pairs of columns that meet in a row of Z (_entry_pairs: the leverages and the
        traces): level by level where one term is alone in the block factor, from M formed dense by those pairs in
        small systems, or read off the block factor's Schur complement (scalar terms, BlockFactor.inverse_at)."""
        r = self.mode_or_none(theta, beta)
        if r is None:
            return np.inf, None
        if not self.gradient_applies:
            return r.objective, None
        theta = np.asarray(theta, dtype=float)
        q = self.q
        factors = self.relcov.factors(theta)
        rows, first, second, zz = self._entry_pairs
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mu, dmu, w = self._weights(r.eta)
            e = self.prior_weights * (self.y - mu)
            slope = self.prior_weights * self.family.variance_slope(mu) * dmu  # dW/deta (canonical: dmu/deta = V)
            if self._one_term_block:  # M^{-1} a level's k x k block at a time: (L11_l L11_l')^{-1}
                factor = self._mode_factor  # (PIRLS's last, at these weights)
                L11 = factor.L11
                k = L11.shape[1]
                half = _batched_lower_solve(L11, np.broadcast_to(np.eye(k), L11.shape))  # L11_l^{-1}
                T = factors[0]
                LM = np.matmul(T, np.matmul(np.transpose(half, (0, 2, 1)), half))  # Lambda M^{-1}, per level
                pairs_at, entries_at = self._one_term_reads
                B = np.matmul(LM, T.T).ravel()[pairs_at]  # Lambda M^{-1} Lambda' at the pairs
                solve = factor.solve
                flat_LM = LM.ravel()
                read = lambda i, pairs, at_level_c: flat_LM[entries_at[i]]  # noqa: E731
            elif self.q <= GRADIENT_MAX_Q:  # M^{-1} dense: PIRLS's own factor of M, or M formed by the pairs
                if isinstance(self._mode_factor, _DenseCholesky):
                    L, info = self._mode_factor.L, 0  # (at these weights)
                else:
                    ZtWZ = np.bincount(first * q + second, weights=w[rows] * zz, minlength=q * q).reshape(q, q)
                    M = self.relcov.apply_transpose(factors, self.relcov.apply_transpose(factors, ZtWZ).T)
                    M[np.arange(q), np.arange(q)] += 1.0
                    L, info = la.lapack.dpotrf(M, lower=1, clean=0)
                if info == 0:
                    inverse, info = la.lapack.dpotri(L, lower=1)
                if info != 0:
                    return r.objective, None
                inverse = np.tril(inverse) + np.tril(inverse, -1).T  # M^{-1}
                lambda_inverse = self.relcov.apply(factors, inverse)  # Lambda M^{-1}
                B = self.relcov.apply(factors, lambda_inverse.T)[first, second]  # Lambda M^{-1} Lambda' at the pairs
                solve = lambda b: inverse @ b  # noqa: E731
                read = lambda i, pairs, at_level_c: lambda_inverse[second[pairs], at_level_c]  # noqa: E731
            else:  # scalar terms: Lambda diagonal, M^{-1} at the pairs from the block factor
                try:
                    factor = self._mode_factor  # (PIRLS's last, at these weights)
                    at_pairs = factor.inverse_at(first, second)
                except (np.linalg.LinAlgError, ValueError):
                    return r.objective, None
                scales = self.relcov.scalar_scales(factors)
                assert scales is not None  # (_selected_inverse: scalar terms)
                B = scales[first] * scales[second] * at_pairs
                solve = factor.solve
                read = lambda i, pairs, at_level_c: scales[second[pairs]] * at_pairs[pairs]  # noqa: E731
            leverage = np.bincount(rows, weights=zz * B, minlength=self.n)  # a_i M^{-1} a_i'
            s = leverage * slope
            v = solve(self.relcov.apply_transpose(factors, self.Zt_products @ s))
            c = s - 2.0 * e - w * (self.Z_products @ self.relcov.apply(factors, v))
            zc, ze = self.Zt_products @ c, self.Zt_products @ e
            out = np.empty(theta.size + self.p)
            for i, (at_r, at_c, pairs, at_level_c, pair_rows, pair_zz) in enumerate(self._gradient_entries):
                trace = np.dot(w[pair_rows] * pair_zz, read(i, pairs, at_level_c))
                out[i] = zc[at_r] @ r.u[at_c] + v[at_c] @ ze[at_r] + 2.0 * trace
            out[theta.size :] = self.X.T @ c
        return r.objective, (out if np.all(np.isfinite(out)) else None)

    def conditional_covariance(self, theta: np.ndarray, mode: PirlsResult, columns: np.ndarray) -> np.ndarray:
        """Var(b | y) at the mode by the Laplace approximation, Lambda (L L')^{-1} Lambda' (lme4's condVar), on
        `columns` of b (len(columns) x len(columns))."""
        factors = self.relcov.factors(np.asarray(theta, dtype=float))
        _, _, w = self._weights(mode.eta)
        factor = self.operator(theta).factor(w)
        E = np.zeros((self.q, len(columns)))
        E[columns, np.arange(len(columns))] = 1.0
        X = factor.solve(self.relcov.apply_transpose(factors, E))  # (L L')^{-1} Lambda' E
        return self.relcov.apply(factors, X)[columns]

    def fixed_covariance(self, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """beta's covariance from the joint PIRLS system at the mode, (X'WX - C'C)^{-1} with C = L^{-1} Lambda'Z'WX
        (lme4's for nAGQ = 0, where the objective's Hessian in beta is not used)."""
        r = self.pirls(theta, beta, joint=True)
        _, _, w = self._weights(r.eta)
        ZL = self.operator(theta)
        WX = w[:, None] * self.X
        C = ZL.factor(w).half_solve(ZL.t(WX))
        return np.linalg.inv(self.X.T @ WX - C.T @ C)

    def objective(self, theta: np.ndarray, beta: np.ndarray, nAGQ: int = 1) -> float:
        """The Laplace objective (nAGQ = 1) or the adaptive Gauss-Hermite one (nAGQ > 1, one scalar term) at
        (theta, beta): inf where PIRLS did not reach a finite mode."""
        r = self.mode_or_none(theta, beta)
        if r is None:
            return np.inf
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value = r.objective if nAGQ <= 1 else self._quadrature(theta, beta, r, nAGQ)
        return value if np.isfinite(value) else np.inf

    def mode_or_none(
        self, theta: np.ndarray, beta: np.ndarray, joint: bool = False, tolerance: float | None = None
    ) -> PirlsResult | None:
        """pirls, for an optimizer's objective: None where its objective is not finite, or where it fails (a
        factor not positive definite: theta far out; the next call then starts from u = 0)."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                r = self.pirls(theta, beta, joint=joint, tolerance=tolerance)
            except (np.linalg.LinAlgError, ValueError):
                self._u = np.zeros(self.q)
                return None
        return r if np.isfinite(r.objective) else None

    @property
    def quadrature_log_likelihood_shift(self) -> float:
        """What lme4's logLik of a quadrature fit (nAGQ > 1) leaves out: it integrates the deviance residuals, so
        its -2 logLik is -2 log L less 2 (the log-likelihood's constant plus the saturated model's kernel)."""
        return 2.0 * (self._loglik_constant + self.family.saturated_kernel(self._kernel_terms, self.y))

    @property
    def quadrature_applies(self) -> bool:
        """Adaptive Gauss-Hermite quadrature needs the integral to split by level: one term, scalar (lme4's rule)."""
        return len(self.relcov.blocks) == 1 and self.relcov.blocks[0][1].k == 1

    def _quadrature(self, theta, beta, mode: PirlsResult, nAGQ: int) -> float:
        """-2 log L by adaptive Gauss-Hermite quadrature with nAGQ nodes per level, centred at the mode u_j with
        scale 1 / sqrt(M_jj) (M = Lambda'Z'WZ Lambda + I, diagonal for one scalar term): per level
        -2 log s_j - 2 log sum_k w_k exp(-(g_j(u_j + s_j z_k) - z_k^2) / 2), g_j(u) = -2 log p(y_j | u) + u^2."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(nAGQ)
        weights = weights / np.sqrt(2 * np.pi)  # for the standard normal density
        lam = float(theta[0])
        Z = self.Z.tocsr()
        level = Z.indices  # one entry per row: its level
        z = Z.data
        _, _, w = self._weights(mode.eta)
        M = 1.0 + lam**2 * np.bincount(level, weights=w * z**2, minlength=self.q)
        scale = 1.0 / np.sqrt(M)
        fixed = self.offset + self.X @ beta
        g = np.empty((nAGQ, self.q))
        for k, node in enumerate(nodes):
            u = mode.u + scale * node
            mu = self.family.linkinv(fixed + lam * z * u[level])
            rows = self.family.row_kernel(self._kernel_terms, mu)
            g[k] = -2.0 * np.bincount(level, weights=rows, minlength=self.q) + u**2
        exponent = -(g - nodes[:, None] ** 2) / 2 + np.log(weights)[:, None]
        top = exponent.max(axis=0)
        log_sum = top + np.log(np.exp(exponent - top).sum(axis=0))
        return float(np.sum(-2.0 * np.log(scale) - 2.0 * log_sum) - 2.0 * self._loglik_constant)

    def start_beta(self) -> np.ndarray:
        """beta from a GLM without random effects (IRLS from R's mustart)."""
        fam = self.family
        mu = fam.mu_start(self.y, self.prior_weights)
        eta = fam.linkfun(mu)
        beta = np.zeros(self.p)
        for _ in range(50):
            dmu = fam.mu_eta(eta)
            w = self.prior_weights * dmu**2 / fam.variance(mu)
            z = eta - self.offset + (self.y - mu) / dmu
            sw = np.sqrt(w)
            new = np.linalg.lstsq(self.X * sw[:, None], z * sw, rcond=None)[0]
            eta = self.offset + self.X @ new
            mu = fam.linkinv(eta)
            if np.max(np.abs(new - beta)) <= 1e-10 * max(1.0, np.max(np.abs(new))):
                beta = new
                break
            beta = new
        return beta


class _SparseZLambda:
    """Z Lambda as a sparse matrix (fixed pattern), its factor by CHOLMOD."""

    def __init__(self, system: LaplaceSystem, ZL: sp.csc_matrix):
        self.system, self.ZL = system, ZL
        self.ZLt = ZL.T  # once per theta, as the block path's Z' (a view: it sees the values z_lambda writes)

    def __matmul__(self, u):
        return self.ZL @ u

    def t(self, v):
        return np.asarray(self.ZLt @ v)

    def factor(self, w):
        return self.system._refactor(self.ZL, w)


class _BlockZLambda:
    """Z Lambda applied as Z (Lambda u), Lambda' (Z' v); its factor a BlockFactor."""

    def __init__(self, system: LaplaceSystem, factors):
        self.system, self.factors = system, factors
        # every term scalar: Lambda is the diagonal of its scales (a product per entry, not a loop over terms)
        self._diagonal = system.relcov.scalar_scales(factors)

    def __matmul__(self, u):
        if self._diagonal is not None:
            u = np.asarray(u)
            return self.system.Z_products @ (self._diagonal * u if u.ndim == 1 else self._diagonal[:, None] * u)
        return self.system.Z_products @ self.system.relcov.apply(self.factors, u)

    def t(self, v):
        if self._diagonal is not None:
            product = np.asarray(self.system.Zt_products @ v)
            return product * (self._diagonal if product.ndim == 1 else self._diagonal[:, None])
        return self.system.relcov.apply_transpose(self.factors, np.asarray(self.system.Zt_products @ v))

    def factor(self, w):
        assert self.system._block is not None
        return self.system._block.refactor(w, self.factors)


class _DenseZLambda:
    """Z Lambda held dense (a small system), Lambda'Z'WZ Lambda + I formed and factored dense by LAPACK."""

    def __init__(self, system: LaplaceSystem, factors):
        self.At = system.relcov.apply_transpose(factors, system.Zt_products)  # Lambda'Z', q x n

    def __matmul__(self, u):
        return self.At.T @ u

    def t(self, v):
        return self.At @ v

    def factor(self, w):
        M = (self.At * w) @ self.At.T
        M.flat[:: M.shape[0] + 1] += 1.0
        return _DenseCholesky(M)


class _DenseCholesky:
    """The lower Cholesky factor of a small dense M, with CholmodFactor's logdet, half_solve and solve."""

    def __init__(self, M: np.ndarray):
        self.L = _lower_cholesky(M)

    def logdet(self) -> float:
        return float(2.0 * np.log(np.diagonal(self.L)).sum())

    def half_solve(self, B):
        return la.lapack.dtrtrs(self.L, B, lower=1)[0]

    def solve(self, B):
        return la.lapack.dpotrs(self.L, B, lower=1)[0]
