"""Cholesky factorizations of A + I (A = Lambda' Z'Z Lambda, lower triangle in a fixed CSC pattern).

Both classes offer the operations the engine needs, with L L' = P (A + I) P':

    refactor(A, T)    new values, same pattern (T: the templates of Lambda, which SchurFactor uses)
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

import math
import weakref

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from scipy.linalg import blas, lapack
from sksparse.cholmod import analyze

from . import compiled
from .pages import Workspace, fit_workspace
from .terms import csc_from_arrays, level_entries
from .threads import DENSE_THREADS_MAX_ORDER, dense_threads, kernel_threads

_potrf, _trtrs = lapack.dpotrf, lapack.dtrtrs

__all__ = ["CholmodFactor", "DenseFactor", "SchurFactor", "schur_applicable", "trailing_rescaled"]

DENSE_FILL = 0.2  # A21 at least this full is handled as a dense matrix ...
DENSE_W_MAX_ENTRIES = 20_000_000  # ... when it has at most this many entries (160 MB)
PAIR_OPERATOR_MAX_ENTRIES = 60_000_000  # the precomputed Schur update map: 8-12 bytes each (under 600 MB)
PAIR_CHUNK = 65_536  # pairs enumerated at a time while building it (see PairOperator.build)
PROBE_SEED = 20261202  # the random signs of estimated_traces: fixed, so that a fit is the same in every process
_INVERSES = [0]  # dense_inverse_lower's calls so far, in this process


class CholmodFactor:
    """CHOLMOD's factor of A + I (A = Lambda' Z'Z Lambda, lower triangle), analysed once in the given mode
    ("simplicial" or "supernodal") and refactored in place for each theta."""

    def __init__(self, A: sp.csc_matrix, mode: str):
        self.mode = mode
        self._f = analyze(A, mode=mode)

    def refactor(self, A, factors=None):
        self._f.cholesky_inplace(A, beta=1.0)

    def logdet(self) -> float:
        return float(self._f.logdet())

    def half_solve(self, B):
        return self._f.solve_L(self._f.apply_P(B), use_LDLt_decomposition=False)

    def half_solve_t(self, C):
        return self._f.apply_Pt(self._f.solve_Lt(C, use_LDLt_decomposition=False))

    def solve(self, B):
        return self._f.solve_A(B)


# DenseFactor forms [Z X y]'[Z X y] whole up to this many entries (720 KB); above, only the blocks it keeps: the whole
# matrix grows with the square of the first term's levels, which the factor's own work does not, and out of the cache
# it costs more than the blocks' sparse slicing (docs/performance-scale.md, sixteenth session).
DENSE_AUGMENTED_MAX_ENTRIES = 90_000
# DenseFactor.compiled_scoring up to this many levels x (columns after the first term)^2: its loops' traces cost ~that
# many flops, which the numpy path's BLAS products beat on larger systems
COMPILED_SCORING_MAX_WORK = 1_000_000


def _augmented(cross, ZtZ_rows: np.ndarray, first: int) -> np.ndarray:
    """[Z X y]'[Z X y] without its first `first` rows and columns, from Z'Z's rows and columns after them (dense)."""
    m, p = ZtZ_rows.shape[0], cross.p
    out = np.empty((m + p + 1, m + p + 1))
    out[:m, :m] = ZtZ_rows
    out[:m, m : m + p] = cross.ZtX[first:]
    out[:m, m + p] = cross.Zty[first:]
    out[m:, :m] = out[:m, m:].T
    out[m : m + p, m : m + p] = cross.XtX
    out[m : m + p, m + p] = out[m + p, m : m + p] = cross.Xty
    out[m + p, m + p] = cross.yty
    return out


class DenseFactor:
    """A small system held dense: the first term eliminated level by level (its block of A + I is block
    diagonal: k1 x k1 Cholesky factors, batched) and the rest, with X and y appended, as one dense matrix

        S = [[A22 + I, (Lambda' Z'X)_2, (Lambda' Z'y)_2], [., X'X, X'y], [., ., y'y]] - W'W,
        W = L11^{-1} [A12, (Lambda' Z'X)_1, (Lambda' Z'y)_1]

    whose one LAPACK Cholesky holds L22, R_ZX's last rows, R_X', c_u's last entries, c_beta and sqrt(r^2) (the
    augmented factor of Bates et al. 2015, as MixedModels.jl uses it). Each evaluation is a few whole-array
    operations and one dpotrf: for small q, CHOLMOD's and scipy's fixed costs per call and the engine's
    block-pair loop dominated the arithmetic. Where the first term's block is not block diagonal (q1 = 0),
    everything is in S. `refactor` takes the templates (A's values are not read); the evaluation's arrays
    follow from `parts()`; solves go block by block (L, with no permutation, is never formed), and
    core/gradient.py reads the blocks (L11, W, LS and the cross-products G11, G1R, GRR) for the exact gradient.
    """

    mode = "dense"

    def __init__(self, cross, relcov, eliminate_first: bool = True):
        q, p = relcov.q, cross.p
        blocks = list(relcov.blocks)
        n1, k1 = (blocks[0][0], blocks[0][1].k) if eliminate_first and blocks else (0, 1)
        self.q, self.p, self.n1, self.k1 = q, p, n1, k1
        self.q1 = q1 = n1 * k1
        self.q2 = q2 = q - q1
        self.first = 1 if q1 else 0  # templates before the rest's
        if (q + p + 1) ** 2 <= DENSE_AUGMENTED_MAX_ENTRIES:
            aug = _augmented(cross, cross.ZtZ.toarray(), 0)
            levels = np.arange(n1)
            self.G11 = aug[:q1, :q1].reshape(n1, k1, n1, k1)[levels, :, levels, :].copy()  # (n1, k1, k1)
            self.G1R = aug[:q1, q1:].reshape(n1, k1, q - q1 + p + 1).copy()  # (n1, k1, N2)
            self.GRR = aug[q1:, q1:].copy()  # (N2, N2)
        else:  # many levels of the first term (a growth curve of thousands of subjects): its blocks from the sparse Z'Z
            ZtZ = cross.ZtZ
            first = ZtZ[:q1, :q1].tocoo()  # block diagonal (the first term is eliminated only then)
            self.G11 = np.zeros((n1, k1, k1))
            self.G11[first.row // k1, first.row % k1, first.col % k1] = first.data
            G1R = np.empty((q1, q - q1 + p + 1))
            G1R[:, : q - q1] = ZtZ[:q1, q1:].toarray()
            G1R[:, q - q1 : q - q1 + p] = cross.ZtX[:q1]
            G1R[:, -1] = cross.Zty[:q1]
            self.G1R = G1R.reshape(n1, k1, q - q1 + p + 1)
            self.GRR = _augmented(cross, ZtZ[q1:, q1:].toarray(), q1)
        self._g11 = self.G11[:, 0, 0].copy()
        rest = blocks[self.first :]
        self.rest_ks = [t.k for _, t in rest]
        self._rest_scalar = all(k == 1 for k in self.rest_ks)
        # each column of S: the index of its rest term, or len(rest) for X's and y's columns (scale 1)
        self._column_term = np.concatenate(
            [np.full(n * t.k, j, dtype=np.intp) for j, (n, t) in enumerate(rest)] + [np.full(p + 1, len(rest))]
        )
        self.rest_slices = [slice(int(s.start) - q1, int(s.stop) - q1) for s in relcov.column_slices[self.first :]]
        self._rest_sizes = relcov.column_counts[self.first :]
        self._diag2 = np.arange(q2) * (q2 + p + 2)  # flat positions of S's first q2 diagonal entries

    def _schur(self, factors):
        """S (N2 x N2, symmetric), W (q1 x N2) and log |A11 + I| at the templates `factors`."""
        rest = factors[self.first :]
        if self._rest_scalar:
            scales = np.array([T[0, 0] for T in rest] + [1.0])[self._column_term]
            B = self.G1R * scales if self.q1 else None
            self.half = self.GRR * scales[:, None]
            S = self.half * scales
        else:
            self.half = self._right_rest(self.GRR, rest).T  # blockdiag(Lambda_2, I)' GRR, which the gradient reads
            S = self._right_rest(self.half, rest)
        if not self.q1:
            self.L11 = np.zeros((0, 1, 1))
            return S, np.zeros((0, S.shape[0])), 0.0
        T1 = factors[0]
        if not self._rest_scalar:
            B = self._right_rest(self.G1R.reshape(self.q1, self.GRR.shape[0]), rest).reshape(self.G1R.shape)
        if self.k1 == 1:
            t = T1[0, 0]
            m = (t * t) * self._g11 + 1.0
            root = np.sqrt(m)
            self.L11 = root[:, None, None]
            W = B[:, 0, :] * (t / root)[:, None]
            logdet1 = float(np.log(m).sum())
        else:
            M = np.matmul(np.matmul(T1.T, self.G11), T1)
            M[:, np.arange(self.k1), np.arange(self.k1)] += 1.0
            self.L11 = L11 = np.linalg.cholesky(M)  # LinAlgError where not positive definite
            # (triangular solves by levels: numpy's solve, an LU, took 2 ms here at 400 levels of 2 x 2)
            W = _batched_lower_solve(L11, np.matmul(T1.T, B)).reshape(self.q1, -1)
            logdet1 = 2.0 * float(np.log(np.diagonal(L11, axis1=1, axis2=2)).sum())
        S -= W.T @ W
        return S, W, logdet1

    def _right_rest(self, M, rest):
        """M times blockdiag(Lambda_2, I) on the right (M: rows x N2)."""
        return right_multiply_rest(M, rest, self.rest_ks, self.rest_slices)

    def refactor(self, A, factors):
        q2, N2 = self.q2, self.q2 + self.p + 1
        S, W, logdet1 = self._schur(factors)
        S.reshape(-1)[self._diag2] += 1.0
        LS, info = _potrf(S.T, lower=0, clean=1, overwrite_a=1)  # S.T's upper triangle is S's lower: LS' in C
        LS = LS.T
        if 0 < info < N2:
            raise la.LinAlgError("A + I or X'V^{-1}X is not positive definite at this theta")
        if info == N2:  # r^2 <= 0 by rounding (an interpolating fit): factor without y's row, r^2 from it
            S, W, logdet1 = self._schur(factors)
            S.reshape(-1)[self._diag2] += 1.0
            head, info = _potrf(np.array(S[:-1, :-1].T), lower=0, clean=1)
            if info != 0:
                raise la.LinAlgError("A + I or X'V^{-1}X is not positive definite at this theta")
            LS = np.zeros((N2, N2))
            LS[:-1, :-1] = head.T
            LS[-1, :-1] = _triangular(LS[:-1, :-1], S[-1, :-1], trans=0)
            self._r2 = float(S[-1, -1] - LS[-1, :-1] @ LS[-1, :-1])
        else:
            self._r2 = float(LS[-1, -1]) ** 2
        self.LS, self.W = LS, W
        log_diagonal = 2.0 * np.log(np.diagonal(LS)[: N2 - 1])
        self._logdet = logdet1 + float(log_diagonal[:q2].sum())
        self._logdet_RX2 = float(log_diagonal[q2:].sum())
        # LS is finite where its diagonal is: an entry that is not feeds its row's diagonal (its square is subtracted)
        self.finite = bool(
            math.isfinite(self._logdet) and math.isfinite(self._logdet_RX2) and math.isfinite(self._r2)
        ) and bool(np.isfinite(W).all())

    def install(self, L11, W, LS, logdet, logdet_RX2, r2):
        """The factorization at some templates as computed elsewhere (one term eliminated level by level, q2 = 0:
        kernels.single_term_deviance_parts' blocks), as `refactor` would leave it."""
        assert self.q2 == 0
        self.L11, self.W, self.LS, self.half = L11, W.reshape(self.q1, -1), LS, self.GRR
        self._logdet, self._logdet_RX2, self._r2 = logdet, logdet_RX2, r2
        self.finite = True

    def parts(self):
        """(RZX, cu, RX, cbeta, r2, log |R_X|^2) at the last refactorization."""
        q2, p, LS, W = self.q2, self.p, self.LS, self.W
        RZX = np.concatenate([W[:, q2 : q2 + p], LS[q2 : q2 + p, :q2].T])
        cu = np.concatenate([W[:, -1], LS[-1, :q2]])
        return RZX, cu, LS[q2 : q2 + p, q2 : q2 + p].T, LS[-1, q2 : q2 + p], self._r2, self._logdet_RX2

    def logdet(self) -> float:
        return self._logdet

    @property
    def r2(self) -> float:
        return self._r2

    @property
    def logdet_RX2(self) -> float:
        return self._logdet_RX2

    def half_solve(self, B):
        """L^{-1} B by blocks: the first term's levels, then L22 (L is never formed)."""
        B = np.asarray(B, dtype=float)
        B2 = B.reshape(self.q, -1)
        q1, q2 = self.q1, self.q2
        m = B2.shape[1]
        X1 = _batched_lower_solve(self.L11, B2[:q1].reshape(self.n1, self.k1, m)).reshape(q1, m)
        rhs = B2[q1:] - self.W[:, :q2].T @ X1 if q1 else B2[q1:]
        X2 = _triangular(self.LS[:q2, :q2], rhs, trans=0) if q2 else rhs
        return np.concatenate([X1, X2]).reshape(B.shape)

    def half_solve_t(self, C):
        """L^{-T} C by blocks: L22 first, then the first term's levels."""
        C = np.asarray(C, dtype=float)
        C2 = C.reshape(self.q, -1)
        q1, q2 = self.q1, self.q2
        X2 = _triangular(self.LS[:q2, :q2], C2[q1:], trans=1) if q2 else C2[q1:]
        rhs = C2[:q1] - self.W[:, :q2] @ X2 if q2 else C2[:q1]
        m = C2.shape[1]
        X1 = _batched_lower_solve(self.L11, rhs.reshape(self.n1, self.k1, m), transpose=True).reshape(q1, m)
        return np.concatenate([X1, X2]).reshape(C.shape)

    def solve(self, B):
        return self.half_solve_t(self.half_solve(B))

    @property
    def scorable(self) -> bool:
        """Whether variance_traces applies: a scalar first term eliminated, and scalar terms after it."""
        return self.q1 > 0 and self.q2 > 0 and self.k1 == 1 and self._rest_scalar

    def variance_traces(self, factors, single: bool = False) -> np.ndarray | None:
        """SchurFactor.variance_traces for this layout, whose S begins with the Schur complement of the terms after
        the first (its factor L22: LS's first q2 rows and columns, small enough to invert in double precision:
        `single` is not needed). None where it does not apply or a theta_j after the first is zero."""
        if not self.scorable:
            return None
        lam_terms = np.array([T[0, 0] for T in factors[1:]])
        if np.any(lam_terms == 0.0):
            return None
        q2 = self.q2
        L22_inverse, info = lapack.dtrtri(self.LS[:q2, :q2], lower=1)
        if info != 0:
            return None
        m = self.L11[:, 0, 0] ** 2  # K11_l = 1 + theta_1^2 G_ll
        scales = lam_terms[self._column_term[:q2]]  # Lambda_2's diagonal
        # tr(S^{-1} Lambda_2 G diag(1 / m^2) G' Lambda_2) = |L22^{-1} Lambda_2 G diag(1 / m)|_F^2, G = (Z'Z)_21
        level_trace = float(np.sum((L22_inverse @ (self.G1R[:, 0, :q2].T * scales[:, None] / m[None, :])) ** 2))
        first = float(np.sum(self._g11 / m)) - level_trace
        inverse_diagonal = np.einsum("ij,ij->j", L22_inverse, L22_inverse)  # diag(S^{-1}) = column norms of L22^{-1}
        sizes = self._rest_sizes
        rest = (sizes - np.add.reduceat(inverse_diagonal, np.cumsum(sizes) - sizes)) / lam_terms**2
        return np.concatenate([[first], rest])

    def compiled_scoring(self, theta: np.ndarray, n_rows: int, reml: bool, dof: int):
        """(score, average information) of fit/scoring.py's point at theta, which the factor must be at, by the
        compiled pass (kernels.dense_scalar_scoring); None where it does not apply (not `scorable`, a zero theta, or
        more work than the compiled loops beat numpy's batched algebra at: COMPILED_SCORING_MAX_WORK)."""
        if not self.scorable or self.n1 * self.q2 * self.q2 > COMPILED_SCORING_MAX_WORK:
            return None
        dense_scalar_scoring = compiled.kernel("dense_scalar_scoring")
        if dense_scalar_scoring is None:  # being compiled (core/compiled.py): the numpy algebra meanwhile
            return None
        m = theta.shape[0]
        score, information = np.empty(m + 1), np.empty((m + 1, m + 1))
        found = dense_scalar_scoring(
            self.L11[:, 0, 0],
            self.W,
            self.LS,
            self._g11,
            self.G1R[:, 0, :],
            self.GRR,
            theta,
            self._column_term[: self.q2],
            self._r2,
            n_rows,
            reml,
            dof,
            score,
            information,
        )
        return (score, information) if found else None


def right_multiply_rest(M: np.ndarray, templates, ks, slices) -> np.ndarray:
    """M (..., columns) times blockdiag(Lambda_2, I) on the right: the terms after the first, their templates
    `templates` (k x k each), `ks` columns per level and column `slices` (relative to M's last axis)."""
    out = np.array(M, dtype=float, order="C")
    for T, k, cols in zip(templates, ks, slices):
        if k == 1:
            out[..., cols] *= T[0, 0]
        else:
            shape = out[..., cols].shape
            out[..., cols] = (out[..., cols].reshape(shape[:-1] + (-1, k)) @ T).reshape(shape)
    return out


def _triangular(L: np.ndarray, B: np.ndarray, trans: int) -> np.ndarray:
    """L^{-1} B (trans 0) or L^{-T} B (trans 1), L lower triangular: LAPACK's trtrs without scipy's checks."""
    B = np.asarray(B, dtype=float)
    X, info = _trtrs(L, B.reshape(B.shape[0], -1), lower=1, trans=trans)
    if info != 0:
        raise la.LinAlgError("singular triangular factor")
    return X.reshape(B.shape)


def schur_applicable(A: sp.csc_matrix, q1: int, k1: int) -> bool:
    """The first q1 columns form k1 x k1 diagonal blocks (no entry links two levels of the first term)."""
    rows, cols = _coordinates(A)
    first = (rows < q1) & (cols < q1)
    return bool(np.all(rows[first] // k1 == cols[first] // k1))


class SchurFactor:
    """Exact elimination of the first term, dense Cholesky of the Schur complement of the other q2 columns.

    With M_l = A11_l + I the l-th diagonal block of the first term (k1 x k1) and L11_l its Cholesky factor:

        S = A22 + I - A21 M^{-1} A12,     L L' = [[L11, 0], [A21 L11^{-T}, L_S]],  L_S L_S' = S

    The update A21 M^{-1} A12 is the costly step. With G = (Z'Z)_21 (fixed) it is Lambda_2' G H G' Lambda_2,
    H = blockdiag(H_l), H_l = T1 M_l^{-1} T1' (k1 x k1): a sum over levels of small products, scattered into S
    by a compiled loop ("kernel", kernels.py) that reads each level's entries of G once. "dense" instead keeps
    A21 L11^{-T} as a dense matrix and calls BLAS's syrk: faster when A21 is small and mostly filled.
    """

    mode = "schur"

    def __init__(self, A: sp.csc_matrix, ZtZ: sp.spmatrix, relcov, update: str = "auto"):
        n1, template1 = relcov.blocks[0]
        q = A.shape[0]
        self.k1 = k1 = template1.k
        self.q1 = q1 = n1 * k1
        self.q2 = q - q1
        self._rest = relcov.__class__(relcov.blocks[1:])  # Lambda_2: the terms after the first
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
        self._G11 = np.asarray(ZtZ.diagonal())[:q1] if k1 == 1 else None  # (Z'Z)_ll of a scalar first term
        self._pos22 = np.flatnonzero(in22)
        self._r22, self._c22 = rows[in22] - q1, cols[in22] - q1
        # Once the score's traces have been asked for (a Newton-step fit), each refactorization computes their
        # pair product along with the update's.
        self._score_wanted = False
        self._score_products: np.ndarray | None = None
        self._kept: tuple | None = None  # the last S^{-1} variance_traces computed, its call's number, diagonal sums
        self.unscaled_update: np.ndarray | None = None  # G H G' at the pair map's destinations, the last update's
        if update not in ("auto", "dense", "pairs", "kernel"):
            raise ValueError(f"unknown Schur update {update!r}: use auto, dense, pairs or kernel")
        # A dense W' = A21 L11^{-T} when A21 is mostly filled (crossed designs) and small: BLAS's syrk then forms
        # W'W in 0.04 ms where scipy's sparse product took 1.6 ms (seed crossed design, 100 x 100).
        dense = self._pos21.size > DENSE_FILL * q1 * self.q2 and q1 * self.q2 <= DENSE_W_MAX_ENTRIES
        self.update = "dense" if dense and update == "auto" else update
        if self.update != "dense":
            level_rows, self._g = _level_rows(sp.csc_matrix(ZtZ[q1:, :q1]), k1)
            self._level_of_entry = level_rows[:, 0]
            pairs = PairOperator(level_rows, self._g, self.q2, n1)
            if self.update == "auto":
                self.update = "pairs" if pairs.stored_entries <= PAIR_OPERATOR_MAX_ENTRIES else "kernel"
            if self.update == "pairs":
                self._pairs = pairs.build()
                del self._g, self._level_of_entry
            else:
                from .kernels import LevelBands  # numba: imported (1 s) only by fits that need it

                self._bands = LevelBands(self._level_of_entry, level_rows[:, 1], n1, self.q2)
                order = self._bands.order
                self._entry_rows = level_rows[order, 1].astype(np.int32)
                self._level_of_entry, self._g = self._level_of_entry[order], self._g[order]

    def refactor(self, A, factors, single=False):
        """`single`: S's Cholesky in single precision (dense_cholesky_single), for a point far from the optimum, up to
        DENSE_THREADS_MAX_ORDER; the attribute `single` says whether it was."""
        d = A.data
        self._score_products = None
        n1, k1, q2 = self.q1 // self.k1, self.k1, self.q2
        blocks = np.zeros((n1, k1, k1))
        blocks[self._lvl11, self._i11, self._j11] = d[self._pos11]
        blocks[:, np.arange(k1), np.arange(k1)] += 1.0
        self._L11 = _batched_cholesky(blocks)  # (n1, k1, k1), lower
        self._A21 = sp.csc_matrix((d[self._pos21], self._rows21, self._indptr21), shape=(q2, self.q1))
        # the pair map's product before S is written: its pass over the map (22 MB at InstEval's size) would evict S
        # between the writes and the scatter (2.7 ms a scatter there, against 0.3 with S in cache)
        pair_update = self._pair_update(factors) if self.update == "pairs" else None
        # S is built in the last factor's array (2 GB at MovieLens size): a fresh one was faulted in page by page
        # at every evaluation (an 8,000,000-row ratings fit: 0.8M page faults and 4 s of system time in 9)
        factor = getattr(self, "_LS", None)  # (none before the first refactorization)
        self._LS = None
        if factor is None or factor.shape != (q2, q2):
            factor = np.empty((q2, q2))
        # single: S assembled in single precision where dense_cholesky_single factors it (no conversion pass)
        S = single_cholesky_array(q2) if single else None
        S = factor if S is None else S
        S.fill(0.0)
        if pair_update is not None:  # written, not subtracted, into the zeros: one scattered pass, not a gather too
            S.reshape(-1)[self._pairs.destinations] = np.negative(pair_update, out=pair_update)
        S[self._r22, self._c22] += d[self._pos22]  # lower triangle: all LAPACK reads
        S[np.diag_indices(q2)] += 1.0
        self._Wt = None
        if self.update == "dense":
            dense21 = self._A21.toarray()
            if k1 == 1:
                self._Wt = dense21 / self._L11[:, 0, 0][None, :]
            else:
                self._Wt = np.einsum("rnj,nji->rni", dense21.reshape(q2, -1, k1), self._inverse_transposes()).reshape(
                    q2, self.q1
                )
            S -= self._Wt @ self._Wt.T
        elif pair_update is None:
            self._subtract_update(S, factors)
        self.single = S is not factor  # (in double above DENSE_THREADS_MAX_ORDER)
        self._LS = dense_cholesky_single(S, factor) if self.single else dense_cholesky(S)

    def trailing_block(self, count: int) -> np.ndarray:
        """The last `count` x `count` block of S's factor (lower triangular; a copy)."""
        return self._LS[-count:, -count:].copy()

    def rescale_trailing(self, count: int, ratio: float, block: np.ndarray) -> None:
        """The factor, in place, after the scale of S's last `count` columns (Lambda_2's, one scalar term's) was
        multiplied by `ratio`, nothing else changed, given the new trailing block (trailing_rescaled(...)[0]): those
        columns' rows of A21, W' and L times `ratio`, the trailing block replaced, and the score's pair product
        (scaled by Lambda_2 at both ends) rescaled where it was formed."""
        first = self.q2 - count
        self._LS[first:, :first] *= ratio
        self._LS[first:, first:] = block
        self._A21.data[self._A21.indices >= first] *= ratio
        if self._Wt is not None:
            self._Wt[first:] *= ratio
        if self._score_products is not None:
            # the destinations run row by row: those rows are the tail, and their own columns within it
            tail = int(np.searchsorted(self._pairs.rows, first))
            self._score_products[tail:] *= ratio
            self._score_products[tail:][self._pairs.columns[tail:] >= first] *= ratio

    def _level_blocks(self, factors) -> np.ndarray:
        """H_l = T1 M_l^{-1} T1' for every level l of the first term, (n1, k1, k1)."""
        T1 = factors[0]
        if self.k1 == 1:
            return ((T1[0, 0] / self._L11[:, 0, 0]) ** 2)[:, None, None]
        half = _batched_lower_solve(self._L11, np.broadcast_to(T1.T, self._L11.shape))  # L11_l^{-1} T1'
        return np.matmul(np.transpose(half, (0, 2, 1)), half)

    def _pair_update(self, factors) -> np.ndarray | None:
        """Lambda_2' G H G' Lambda_2 at the pair map's destinations where Lambda_2 is diagonal (every later term
        scalar), else None (_subtract_update transforms the full product)."""
        lam = self.rest_scales(factors)  # Lambda_2 diagonal: one scale per row of S
        if lam is None:
            return None
        H = self._level_blocks(factors)
        if self.k1 == 1 and self._score_wanted:
            # the score's trace product (variance_traces) in the same pass over the pair map (InstEval: 2.9 ms for
            # both, where each alone took 2.2)
            both = self._pair_products(np.column_stack([H[:, 0, 0], self._trace_weights()]), lam)
            self._score_products = both[:, 1]
            return both[:, 0]
        return self._pair_products(H, lam)

    def _subtract_update(self, S: np.ndarray, factors) -> None:
        """S -= Lambda_2' G H G' Lambda_2 (lower triangle), H_l = T1 M_l^{-1} T1', by the pair map (where a later
        term has slopes) or the compiled kernel."""
        H = self._level_blocks(factors)
        rest = factors[1:]
        lam = self.rest_scales(factors)  # Lambda_2 diagonal: one scale per row of S
        if self.update == "pairs":
            upper = np.triu_indices(self.k1)
            self.unscaled_update = self._pairs.apply_compact(H[:, upper[0], upper[1]])  # G H G' (core/gradient.py)
            U = self._pairs.dense(self.unscaled_update)
            U = -(U + np.tril(U, -1).T)
        else:
            U = self._kernel_update(H, lam, S)
            if U is None:
                return
        S += self._rest.apply_transpose(rest, self._rest.apply_transpose(rest, U).T)

    def _pair_products(self, H: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Lambda_2 G H G' Lambda_2 (Lambda_2 = diag(lam)) at the pair map's destinations in S; H is (n1, k1, k1),
        or for a scalar first term (n1, c), c weightings at once (a column of products each)."""
        scale = lam[self._pairs.rows] * lam[self._pairs.columns]
        if H.ndim == 2:
            products = self._pairs.apply_scalar(H)
            self.unscaled_update = products[:, 0]  # the update's column (the score's trace product may follow)
            return products * scale[:, None]
        upper = np.triu_indices(self.k1)
        self.unscaled_update = self._pairs.apply_compact(H[:, upper[0], upper[1]])  # G H G' (core/gradient.py)
        return self.unscaled_update * scale

    def _kernel_update(self, H, lam, S):
        """The kernel writes -G H G' straight into S when Lambda_2 is diagonal (its scales folded into G);
        otherwise it returns -G H G' (full) for the caller to transform."""
        g, v, weights = self._kernel_operands(H, lam)
        threads = kernel_threads(self.q2)
        if lam is not None:
            self._bands.subtract(self._entry_rows, g, v, S, threads, weights)
            return None
        U = np.zeros_like(S)
        self._bands.subtract(self._entry_rows, g, v, U, threads, weights)
        return U + np.tril(U, -1).T

    def _kernel_operands(self, H, lam):
        """(g, v, level weights) for the kernel, whose pair (i, j) of level l is weights_l g_i . v_j. A scalar first
        term: g = v = G's entries times Lambda_2's scales of their rows, weights = H_l, and where one scale serves
        every row (a single term after the first) that scale squared goes into the weights and G's entries are
        passed as they are: no pass over the entries (two 256 MB arrays a refactorization at MovieLens size).
        Otherwise g = G's entry (scaled as above), v = H_l g for the entry's level l, no weights."""
        if self.k1 == 1:
            g = self._g[:, 0]
            if lam is None:
                return g, g, H[:, 0, 0]
            if lam.size and np.all(lam == lam[0]):
                return g, g, H[:, 0, 0] * lam[0] ** 2
            g = g * lam[self._entry_rows]
            return g, g, H[:, 0, 0]
        g = self._g if lam is None else self._g * lam[self._entry_rows][:, None]
        # v_i = H_l g_i for entry i of level l, one column at a time (numpy's batched matmul over a million
        # 2 x 2 products took 30 ms on the 1,000,000-row slopes design)
        v = np.empty_like(g)
        for a in range(self.k1):
            v[:, a] = H[:, a, 0][self._level_of_entry] * g[:, 0]
            for b in range(1, self.k1):
                v[:, a] += H[:, a, b][self._level_of_entry] * g[:, b]
        return g, v, None

    def expect_scoring(self, wanted: bool = True) -> None:
        """variance_traces will be asked for: each refactorization forms its pair product from the first on (in the
        update's pass over the pair map; alone after it, the start's cost 3 ms more on InstEval); `wanted` False:
        not after this (variance_traces still forms it alone where asked)."""
        self._score_wanted = wanted

    def variance_traces(self, factors, single: bool = False) -> np.ndarray | None:
        """tr(Z_j' V^{-1} Z_j) for every term j, V = I + Z Lambda Lambda' Z', where every term is scalar (theta_j
        per term): what the score of a variance-components model needs (scoring.py). None where the formulas
        below divide by a zero theta_j.

        With K = Lambda' Z'Z Lambda + I and E_j the columns of term j, E_j Z'V^{-1}Z E_j = E_j K^{-1} (K - I)
        E_j / theta_j^2 (Woodbury). The first term, eliminated level by level (K11_l = 1 + theta_1^2 G_ll):
        sum_l G_ll / K11_l - tr(S^{-1} Lambda_2 G diag(1 / K11_l^2) G' Lambda_2), no division by theta_1.
        Each later term j: (q_j - sum of its entries of diag(S^{-1})) / theta_j^2. S^{-1} (dense_inverse_lower:
        a LAPACK potri, or its 2 x 2 blocks) costs about two factorizations; `single`: in single precision, at
        about half that, for a Newton direction far from the optimum (fit/scoring.py).
        """
        scales = self._trace_scales(factors)
        if scales is None:
            return None
        lam, lam_terms, sizes, starts = scales
        self._score_wanted = True
        work = fit_workspace()
        inverse = self._inverse_lower(single, work)
        if inverse is None:
            return None
        trace = self._level_trace(inverse, lam, factors[0][0, 0])
        if trace is None:
            return None
        first = self._first_trace_base() - trace
        diagonal_sums = np.add.reduceat(np.diag(inverse).astype(float), starts)
        # (what estimated_traces corrects at a point nearby: the inverse stays the fit's buffer, not held here)
        self._kept = (weakref.ref(work), _INVERSES[0], inverse.dtype, diagonal_sums)
        rest = (sizes - diagonal_sums) / lam_terms**2
        return np.concatenate([[first], rest])

    def estimated_traces(self, factors, probes: int, corrected: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """variance_traces estimated, with their standard errors, from `probes` random sign vectors z (Hutchinson:
        E[z'Az] = tr A, and E[z_i (Az)_i] = A_ii for the terms' diagonal sums): S^{-1} z by the factor's two
        triangular solves, G diag(h) G' z by two passes over G's entries (the compiled update's) or two products
        with A21 (the pair map's), where the exact traces need S^{-1} whole (at order 16,000 a single-precision
        inverse and a pass over every pair of a level's entries); the last terms, up to EXACT_DIAGONAL_MAX_COLUMNS
        columns, have their diagonal sums exactly, from L's trailing block. For a scalar first term (with the pair
        map, a nonzero one) and scalar terms after it only (None otherwise); the probes are the same in every fit.

        `corrected`: only as the exact traces with the last inverse variance_traces computed, A (kept, if no other
        inverse was computed since), plus the estimated traces of S^{-1} - A: near that inverse's point their
        errors shrink with the distance (the variance of z'Mz is 2 |M|_F^2 off the diagonal); None where no
        inverse is kept."""
        scales = self._trace_scales(factors)
        if scales is None or self.update not in ("kernel", "pairs"):
            return None
        theta1 = factors[0][0, 0]
        if self.update == "pairs" and theta1 == 0.0:  # (A21 = theta_1 Lambda_2 G holds no G then)
            return None
        kept = self._kept_inverse() if corrected else None
        if corrected and kept is None:
            return None
        lam, lam_terms, sizes, starts = scales
        Z = np.where(np.random.default_rng(PROBE_SEED).random((self.q2, probes)) < 0.5, -1.0, 1.0)
        # (the C-ordered lower factor is the Fortran-ordered upper one: no copy)
        with dense_threads(self.q2):  # (two triangular solves of the probes: BLAS 3 on S's order)
            X, info = lapack.dpotrs(self._LS.T, Z, lower=0)
        if info != 0:
            return None
        if self.update == "pairs":  # A21 = theta_1 Lambda_2 G, at hand: two sparse products, no pass over the map
            WZ = self._A21 @ ((self._trace_weights() / theta1**2)[:, None] * (self._A21.T @ Z))
        else:
            from .kernels import level_sandwich  # (imported with LevelBands already)

            WZ = np.zeros_like(Z)
            level_sandwich(
                self._level_of_entry, self._entry_rows, self._g[:, 0], self._trace_weights(), lam[:, None] * Z, WZ
            )
            WZ *= lam[:, None]
        first_base = self._first_trace_base()  # (less tr(A W) where corrected)
        diagonal_base = np.zeros(sizes.shape[0])
        if kept is not None:
            inverse, diagonal_base = kept
            symm = blas.get_blas_funcs("symm", dtype=inverse.dtype)
            # (the C-ordered lower inverse is the Fortran-ordered upper one)
            X -= symm(1.0, inverse.T, Z.astype(inverse.dtype), lower=0)  # (S^{-1} - A) z
            kept_trace = self._level_trace(inverse, lam, factors[0][0, 0])
            if kept_trace is None:
                return None
            first_base -= kept_trace
        level_samples = np.einsum("ic,ic->c", X, WZ)  # z' (S^{-1} [- A]) Lambda_2 G diag(h) G' Lambda_2 z
        diagonal_samples = np.add.reduceat(Z * X, starts, axis=0)  # per term and probe
        trailing = _trailing_terms(sizes, EXACT_DIAGONAL_MAX_COLUMNS)
        if trailing.size:
            first_column = int(starts[trailing[0]])
            block = self._LS[first_column:, first_column:]
            inverse_block = la.solve_triangular(block, np.eye(block.shape[0]), lower=True, check_finite=False)
            diagonal = np.einsum("ij,ij->j", inverse_block, inverse_block)
            sums = np.add.reduceat(diagonal, starts[trailing] - first_column)
            diagonal_samples[trailing] = (sums - diagonal_base[trailing])[:, None]
        samples = np.vstack(
            [
                first_base - level_samples,
                (sizes[:, None] - diagonal_base[:, None] - diagonal_samples) / lam_terms[:, None] ** 2,
            ]
        )
        return samples.mean(axis=1), samples.std(axis=1, ddof=1) / math.sqrt(probes)

    def _kept_inverse(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(the last inverse variance_traces computed, its terms' diagonal sums) while it is still in this fit's
        buffer (no inverse computed since), else None."""
        if self._kept is None:
            return None
        ref, serial, dtype, diagonal_sums = self._kept
        work = ref()
        if work is None or work is not fit_workspace() or serial != _INVERSES[0]:
            return None
        return work.array("inverse", (self.q2, self.q2), dtype, "F").T, diagonal_sums

    def _first_trace_base(self) -> float:
        """sum_l G_ll / K11_l (K11_l = L11_l^2): the first term's trace before the Schur complement's share."""
        return float(np.sum(self._G11 / self._L11[:, 0, 0] ** 2))

    def _trace_scales(self, factors):
        """(Lambda_2's diagonal, each later term's scale, its number of columns, its first column in S) for the
        traces, or None where they do not apply: a term that is not scalar, or a zero scale after the first term
        (the traces divide by it)."""
        if self.k1 != 1 or any(T.shape != (1, 1) for T in factors):
            return None
        lam_terms = np.array([T[0, 0] for T in factors[1:]])
        if np.any(lam_terms == 0.0):
            return None
        lam = self.rest_scales(factors)
        assert lam is not None  # (every term scalar: checked above)
        sizes = np.array([n for n, _ in self._rest.blocks])
        return lam, lam_terms, sizes, np.cumsum(sizes) - sizes

    def _trace_weights(self) -> np.ndarray:
        """h_l = 1 / K11_l^2 (K11_l = L11_l^2) for a scalar first term: the level weights of the first term's
        trace product in variance_traces."""
        return self._L11[:, 0, 0] ** -4

    def _level_trace(self, inverse: np.ndarray, lam: np.ndarray, theta1: float) -> float | None:
        """tr(S^{-1} Lambda_2 G diag(h) G' Lambda_2) from the lower triangle of S^{-1}, for a scalar first term,
        h = _trace_weights() (whose pair product the refactorization may have formed already) and Lambda_2 =
        diag(lam). Both triangles count: an off-diagonal entry twice."""
        h = self._trace_weights()
        if self.update == "pairs":  # only the entries the pair map reaches
            products = self._score_products
            if products is None:
                products = self._pair_products(h[:, None, None], lam)
            return float(np.dot(inverse.reshape(-1)[self._pairs.destinations] * self._pairs.multiplicity, products))
        if self.update == "kernel":  # read off S^{-1} pair by pair, no product matrix
            g, v, weights = self._kernel_operands(h[:, None, None], lam)
            return self._bands.pair_sum(self._entry_rows, g, v, inverse, kernel_threads(self.q2), weights)
        if theta1 == 0.0:  # the dense route keeps only A21 = theta_1 Lambda_2 G
            return None
        scaled = self._Wt * (h * self._L11[:, 0, 0] ** 2 / theta1**2)[None, :]  # W' = A21 L11^{-T}
        products = np.tril(scaled @ self._Wt.T)
        return 2.0 * float(np.vdot(inverse, products)) - float(np.dot(np.diag(inverse), np.diag(products)))

    def _inverse_lower(self, single: bool = False, workspace: Workspace | None = None) -> np.ndarray | None:
        """The lower triangle of S^{-1} (C order; the upper holds what LAPACK left) at the last refactorization
        (`single`: in single precision; in `workspace`'s buffer, default the fit's), or None where LAPACK fails."""
        return dense_inverse_lower(self._LS, single, workspace)

    def schur_inverse(self) -> np.ndarray | None:
        """S^{-1} (q2 x q2, both triangles) at the last refactorization, or None where LAPACK fails."""
        inverse = self._inverse_lower()
        return None if inverse is None else np.tril(inverse) + np.tril(inverse, -1).T

    def rest_scales(self, factors) -> np.ndarray | None:
        """Lambda_2's diagonal (one scale per column after the first term) where every later term is scalar."""
        return self._rest.scalar_scales(factors[1:])

    @property
    def supports_gradient(self) -> bool:
        """The pair map's update (its unscaled products and its adjoint are what core/gradient.py reads)."""
        return self.update == "pairs"

    def destination_rows_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) in S of the pair map's destinations (r >= c)."""
        return self._pairs.rows, self._pairs.columns

    def cholesky_blocks(self) -> np.ndarray:
        """The first term's per-level Cholesky factors L_l (M_l = L_l L_l'), (n1, k1, k1)."""
        return self._L11

    def level_sums(self, values: np.ndarray) -> np.ndarray:
        """The pair map's adjoint: for X symmetric, given at the destinations (lower triangle), G_l' X G_l for
        every level l of the first term, (n1, k1, k1)."""
        pairs = self._pairs
        weighted = values * pairs.multiplicity
        k = self.k1
        out = np.empty((self.q1 // k, k, k))
        for j, (a, b) in enumerate(zip(*np.triu_indices(k))):
            column = pairs.transpose_apply(j, weighted)
            if a == b:
                out[:, a, a] = column
            else:
                out[:, a, b] = out[:, b, a] = column / 2.0
        return out

    def _inverse_transposes(self) -> np.ndarray:
        """L11_l^{-T} for every level l: (n1, k1, k1)."""
        return np.transpose(np.linalg.inv(self._L11), (0, 2, 1))

    def logdet(self) -> float:
        d11 = np.einsum("lii->li", self._L11)
        return 2.0 * float(np.sum(np.log(d11)) + np.sum(np.log(np.diag(self._LS))))

    def _l11_solve(self, B, transpose=False):
        n1, k1 = self.q1 // self.k1, self.k1
        Bb = B.reshape(n1, k1, -1)
        if k1 == 1:
            return (Bb / self._L11).reshape(self.q1, -1)
        return _batched_lower_solve(self._L11, Bb, transpose).reshape(self.q1, -1)

    def _wt_times(self, y1):
        """W' y1 with W' = A21 L11^{-T}."""
        return self._Wt @ y1 if self._Wt is not None else self._A21 @ self._l11_solve(y1, transpose=True)

    def _w_times(self, x2):
        """W x2 = L11^{-1} A12 x2."""
        return self._Wt.T @ x2 if self._Wt is not None else self._l11_solve(self._A21.T @ x2)

    def half_solve(self, B):
        B = np.asarray(B, dtype=float)
        vec = B.ndim == 1
        B2 = B.reshape(B.shape[0], -1)
        y1 = self._l11_solve(B2[: self.q1])
        y2 = la.solve_triangular(self._LS, B2[self.q1 :] - self._wt_times(y1), lower=True, check_finite=False)
        out = np.vstack([y1, y2])
        return out.ravel() if vec else out

    def half_solve_t(self, C):
        C = np.asarray(C, dtype=float)
        vec = C.ndim == 1
        C2 = C.reshape(C.shape[0], -1)
        x2 = la.solve_triangular(self._LS, C2[self.q1 :], lower=True, trans="T", check_finite=False)
        x1 = self._l11_solve(C2[: self.q1] - self._w_times(x2), transpose=True)
        out = np.vstack([x1, x2])
        return out.ravel() if vec else out

    def solve(self, B):
        return self.half_solve_t(self.half_solve(B))


EXACT_DIAGONAL_MAX_COLUMNS = 64


def trailing_rescaled(block: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the scale of a system's last columns changes by `ratio` (Lambda_t -> ratio Lambda_t) and L_t is their
    block of L (lower): (L_t', ratio L_t'^{-1} L_t), or None where rounding lost positive definiteness.

    Those columns' rows and columns of A = Lambda' Z'Z Lambda scale by `ratio`, so their rows of L left of the block
    do too, and L_t' L_t'^T = ratio^2 L_t L_t' + (1 - ratio^2) I; the second matrix takes the trailing rows of
    L^{-1} B to the new ones where B's trailing rows scale by `ratio` as well (B = Lambda' Z'[X y])."""
    count = block.shape[0]
    new = ratio * ratio * (block @ block.T)
    new[np.diag_indices(count)] += 1.0 - ratio * ratio
    upper, info = _potrf(new.T, lower=0, overwrite_a=1, clean=1)  # (as dense_cholesky: the lower triangle read)
    if info != 0:
        return None
    lower = upper.T
    mapped, info = _trtrs(lower, block, lower=1)
    if info != 0:
        return None
    return lower, ratio * mapped


def _trailing_terms(sizes: np.ndarray, max_columns: int) -> np.ndarray:
    """The last terms (indices, in order) whose columns together are at most max_columns."""
    within = np.cumsum(sizes[::-1]) <= max_columns
    count = int(np.argmin(within)) if not within.all() else sizes.shape[0]
    return np.arange(sizes.shape[0] - count, sizes.shape[0])


class PairOperator:
    """The map from per-level symmetric k x k matrices H_l to the lower triangle of G H G' (q2 x q2), where G
    (q2 x n1 k) is fixed and H = blockdiag(H_l).

    Entry (r, c) of G H G' is a sum over the levels l that touch both rows r and c, and over the k(k+1)/2
    distinct entries of H_l, of H_l[a, b] times a product of two entries of G. Those products do not depend on
    theta, so they are stored once, one sparse matrix per entry (a, b), with the flat index r q2 + c as row:
    an evaluation is then k(k+1)/2 compiled sparse matrix-vector products, with no Python loop over levels.
    Faster than a sparse matrix product (and its conversion to dense) and than the compiled loop (kernels.py)
    where it fits in memory (8-12 bytes per stored product): it is used up to PAIR_OPERATOR_MAX_ENTRIES.

    Construction only counts (`stored_entries`, to decide whether to build); `build()` fills the matrices.
    """

    def __init__(self, level_rows: np.ndarray, g: np.ndarray, q2: int, n1: int):
        """level_rows, g: G's entries by (level, row), sorted, and their k values (from _level_rows)."""
        self.q2, self.n1, self.k = q2, n1, g.shape[1]
        self._level_rows, self._g = level_rows, g
        self._per_level = np.bincount(self._level_rows[:, 0], minlength=n1).astype(np.int64)
        self._matrices: list[sp.csc_matrix] = []  # one per entry of H_l, filled by build()

    @property
    def stored_entries(self) -> int:
        return int(np.sum(self._per_level * (self._per_level + 1) // 2)) * (self.k * (self.k + 1) // 2)

    def build(self) -> "PairOperator":
        q2, k = self.q2, self.k
        # (S's lower triangle numbered row by row, r (r + 1) / 2 + c: marks and renumbering table half the size of
        # S's, whose fresh pages cost a process's first fit ~1 ms a MB)
        triangle = q2 * (q2 + 1) // 2
        index_dtype = np.int32 if triangle < 2**31 else np.int64
        rows = self._level_rows[:, 1].astype(np.intp)
        row_offsets = rows * (rows + 1) // 2  # each entry's row's start in the lower triangle
        columns = [np.ascontiguousarray(self._g[:, a]) for a in range(k)]  # contiguous gathers
        pair_ptr = np.concatenate([[0], np.cumsum(self._per_level * (self._per_level + 1) // 2)])
        entry_ptr = np.concatenate([[0], np.cumsum(self._per_level)])
        dest = np.empty(pair_ptr[-1], dtype=index_dtype)  # destinations r (r + 1) / 2 + c in S's lower triangle
        upper = list(zip(*np.triu_indices(k)))
        coefs = [np.empty(pair_ptr[-1]) for _ in upper]
        # Rows are then renumbered to the entries of S the update reaches (145,400 of InstEval's 668,168
        # lower-triangle entries): an evaluation writes a short vector instead of scattering into a fresh q2 x q2
        # array that then took two scaling passes and a subtraction (InstEval: ~7 ms of 10 MB passes per
        # product). The marks and the renumbering table are temporaries up to half the size of S (scipy's
        # CSC -> CSR conversion took 20 ms here, argsort 145).
        touched = np.zeros(triangle, dtype=bool)
        # Levels in chunks of about PAIR_CHUNK pairs: the int64 index temporaries stay small, and are reused from
        # the heap chunk after chunk (in one chunk, InstEval's 1M pairs took ~70 MB of fresh pages: 0.17 s of a
        # process's first fit against 0.03 s later). Marks and renumbering index with the chunk's intp values:
        # numpy converts int32 fancy indices first (6.6 and 4.8 ms instead of 3.7 and 3.2 on InstEval).
        bounds = np.unique(
            np.concatenate([np.searchsorted(pair_ptr, np.arange(0, pair_ptr[-1], PAIR_CHUNK)), [self.n1]])
        )
        chunks = list(zip(bounds[:-1], bounds[1:]))
        for lo, hi in chunks:
            e0, e1 = entry_ptr[lo], entry_ptr[hi]
            repeat, second = _pairs_within_levels(self._per_level[lo:hi], e0)
            out = slice(pair_ptr[lo], pair_ptr[hi])
            # the first of every pair by repeating its entry's values (no index array: a sequential pass where a
            # gather took two); rows sorted within a level: first's row >= second's
            flat = np.repeat(row_offsets[e0:e1], repeat)
            flat += rows[second]
            touched[flat] = True
            dest[out] = flat
            at_first = [np.repeat(c[e0:e1], repeat) for c in columns]
            at_second = [c[second] for c in columns]
            for coef, (a, b) in zip(coefs, upper):
                np.multiply(at_first[a], at_second[b], out=coef[out])
                if a != b:
                    coef[out] += at_first[b] * at_second[a]
        reached = np.flatnonzero(touched)  # ascending: row by row, as S's flat indices are
        self.rows, self.columns = _triangle_coordinates(touched, reached, q2)
        del touched
        rank = np.empty(triangle, dtype=index_dtype)
        rank[reached] = np.arange(reached.shape[0], dtype=index_dtype)
        for lo, hi in chunks:
            out = slice(pair_ptr[lo], pair_ptr[hi])
            dest[out] = rank[dest[out].astype(np.intp)]
        del rank
        self.destinations = self.rows * q2 + self.columns  # flat indices r q2 + c of S, r >= c, ascending
        self.multiplicity = np.where(self.rows == self.columns, 1.0, 2.0)  # in both triangles of S
        # CSC with one column per level: the entries of a column are that level's pairs, already in order.
        # (built in order, so scipy's format check is skipped: it took a quarter of the build)
        shape = (self.destinations.shape[0], self.n1)
        first = csc_from_arrays(coefs[0], dest, pair_ptr, shape)
        # one copy of the indices: the others' are the first's, already of their type
        self._matrices = [first] + [csc_from_arrays(coef, first.indices, first.indptr, shape) for coef in coefs[1:]]
        del self._level_rows, self._g
        return self

    def apply_compact(self, H: np.ndarray) -> np.ndarray:
        """H: (n1, k(k+1)/2), the upper-triangle entries of each H_l in row-major order. Returns the entries of
        G H G' at `destinations`."""
        out = self._matrices[0] @ H[:, 0]
        for j in range(1, H.shape[1]):
            out += self._matrices[j] @ H[:, j]
        return out

    def transpose_apply(self, j: int, values: np.ndarray) -> np.ndarray:
        """The j-th stored map's transpose applied to values at the destinations: one number per level."""
        return self._matrices[j].T @ values

    def apply_scalar(self, weights: np.ndarray) -> np.ndarray:
        """For k = 1, G diag(w) G' at `destinations` for each column w of weights (n1, c): one pass over the map."""
        return self._matrices[0] @ weights

    def apply(self, H: np.ndarray) -> np.ndarray:
        """G H G' as a q2 x q2 array (lower triangle)."""
        return self.dense(self.apply_compact(H))

    def dense(self, values: np.ndarray) -> np.ndarray:
        """Values at the destinations as a q2 x q2 array (lower triangle; zeros elsewhere)."""
        out = np.zeros(self.q2 * self.q2)
        out[self.destinations] = values
        return out.reshape(self.q2, self.q2)


def _triangle_coordinates(marks: np.ndarray, index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(r, c) of the marked entries of an n x n lower triangle numbered r (r + 1) / 2 + c (c <= r), row by row;
    `index`: their numbers, ascending."""
    # each row's count of marks repeats its number (0.5 ms where square roots of the numbers took 4 on InstEval)
    starts = np.arange(n) * (np.arange(n) + 1) // 2
    rows = np.repeat(np.arange(n), np.add.reduceat(marks.view(np.uint8), starts, dtype=np.intp))
    return rows, index - starts[rows]


def _level_rows(G: sp.csc_matrix, k: int):
    """The distinct (level, row) pairs of G's entries, sorted, and G's k values for each: ((m, 2), (m, k))."""
    if k == 1:  # each entry its own (level, row) pair, and CSC's order already theirs (no sort: 3 s at MovieLens size)
        G = sp.csc_matrix(G)
        G.sum_duplicates()  # (sorted indices, no duplicate, arrays pruned: free where scipy's flags hold)
        G, rows, level, _ = level_entries(G, 1)
        return np.column_stack([level, rows]), G.data.reshape(-1, 1).copy()
    coo = G.tocoo()
    level, a = np.divmod(coo.col.astype(np.int64), k)
    keys, inverse = unique_inverse(level * G.shape[0] + coo.row)  # each of G's columns a sorted run
    g = np.zeros((keys.shape[0], k))
    g[inverse, a] = coo.data
    return np.column_stack(np.divmod(keys, G.shape[0])), g


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_inverse=True) for keys made of sorted runs (a sparse matrix's columns or rows): a
    stable sort (timsort) merges the runs, where np.unique's sort does not look for them (about half the time)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    new = np.empty(ordered.shape, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(ordered.shape, dtype=np.intp)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _pairs_within_levels(per_level: np.ndarray, offset: int = 0):
    """For entries sorted by level, `per_level` entries in each: every (i, j) with j <= i in the same level, as (the
    number of pairs whose first is i, for each i; every pair's j + offset), pairs ordered by i then j: pair p's
    first is np.repeat(np.arange(n), repeat)[p]."""
    n = int(np.sum(per_level))
    starts = np.repeat(np.cumsum(per_level) - per_level, per_level)  # first entry of each entry's level
    repeat = np.arange(n) - starts + 1  # entry i pairs with itself and those before it
    second = np.arange(int(np.sum(repeat)))
    second -= np.repeat(np.cumsum(repeat) - repeat - starts - offset, repeat)
    return repeat, second


def dense_cholesky(S: np.ndarray, workspace: Workspace | None = None, blocked: bool = False) -> np.ndarray:
    """Lower Cholesky factor of S (C-contiguous, lower triangle read), overwriting S.

    Up to DENSE_THREADS_MAX_ORDER one LAPACK call, with the caller's BLAS threads from order 1,000 on. Above it
    the threaded OpenBLAS of the numpy/scipy wheels crashes, so the factor is computed in 2 x 2 blocks:
    L11 = chol(S11), L21 = S21 L11^{-T}, L22 = chol(S22 - L21 L21'), each call below that order, on copies of the
    blocks in `workspace`'s buffers (default: the fit's, core/pages.py), with all the caller's threads however busy
    the machine (`blocked`: threads.dense_threads).
    """
    n = S.shape[0]
    if n <= DENSE_THREADS_MAX_ORDER:
        # S's lower triangle in C order is the upper triangle of the Fortran-ordered S.T: LAPACK factors it in
        # place, where la.cholesky first copied S into Fortran order (InstEval's 1,156 block: 16 ms -> 11 ms)
        with dense_threads(n, blocked):
            upper, info = lapack.dpotrf(S.T, lower=0, overwrite_a=1, clean=1)
        if info != 0:
            raise la.LinAlgError(f"the {n} x {n} Schur complement is not positive definite (dpotrf info {info})")
        return upper.T
    work = workspace or fit_workspace()
    m = n // 2
    L11 = work.array("11", (m, m))
    np.copyto(L11, S[:m, :m])
    L11 = dense_cholesky(L11, work.nested("11"), blocked=True)
    with dense_threads(m, blocked=True):
        L21 = work.array("21", (n - m, m))
        np.copyto(L21, S[m:, :m])
        # L21' = L11^{-1} S21' in place, on the Fortran-ordered transposes (L11' is upper)
        blas.dtrsm(1.0, L11.T, L21.T, side=0, lower=0, trans_a=1, overwrite_b=1)
        S22 = work.array("22", (n - m, n - m))
        np.copyto(S22, S[m:, m:])
        # S22 -= L21 L21' on the lower triangle only (syrk, half a GEMM's work)
        blas.dsyrk(-1.0, L21.T, beta=1.0, c=S22.T, trans=1, lower=0, overwrite_c=1)
    L22 = dense_cholesky(S22, work.nested("22"), blocked=True)
    S[:m, :m] = L11
    S[m:, :m] = L21
    S[m:, m:] = L22
    S[:m, m:] = 0.0
    return S


def single_cholesky_array(n: int, workspace: Workspace | None = None) -> np.ndarray | None:
    """The C-ordered n x n float32 array in which dense_cholesky_single factors S: the buffer of dense_inverse_lower's
    single-precision inverse (`workspace`'s, default the fit's), whose inverse, if it held one, is gone from here on
    (SchurFactor._kept). None above DENSE_THREADS_MAX_ORDER (there the factorization stays in double)."""
    if n > DENSE_THREADS_MAX_ORDER:
        return None
    _INVERSES[0] += 1
    return (workspace or fit_workspace()).array("inverse", (n, n), np.float32, "F").T


def dense_cholesky_single(S: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dense_cholesky of S (float32, C-ordered, lower triangle read, overwritten: single_cholesky_array's) in single
    precision, the factor written in double into `out` (C-ordered n x n, upper triangle zero): the exact factor of a
    matrix within ~1e-7 (relative) of S, its log-determinant ~1e-5 off at InstEval's order, in about 60% of the
    double factorization's time, which everything downstream reads as a double factor."""
    n = S.shape[0]
    # (S's lower triangle in C order is the upper one of the Fortran-ordered S.T: LAPACK factors it in place)
    with dense_threads(n):
        _, info = lapack.spotrf(S.T, lower=0, overwrite_a=1, clean=1)
    if info != 0:
        raise la.LinAlgError(f"the {n} x {n} Schur complement is not positive definite (spotrf info {info})")
    np.copyto(out, S)
    return out


def dense_inverse_lower(L: np.ndarray, single: bool = False, workspace: Workspace | None = None) -> np.ndarray | None:
    """(L L')^{-1} from the lower factor L (C order) in the lower triangle of the result (C order; the upper holds
    finite values LAPACK left, or zeros), or None where LAPACK fails; `single`: in single precision, at about half
    the time. The result is an array of `workspace` (default: the fit's, core/pages.py): valid until the next call
    with it.

    Up to DENSE_THREADS_MAX_ORDER one potri, with threads; above it in 2 x 2 blocks, each call below that order
    (see dense_cholesky): with X = L^{-1} = [[A, 0], [B, C]], A = L11^{-1}, C = L22^{-1}, B = -C L21 A,
    (L L')^{-1} = X'X = [[A'A + B'B, .], [C'B, C'C]]. Everything below is in Fortran order on transposes: the
    C-ordered lower L is the Fortran-ordered upper L'.
    """
    n = L.shape[0]
    dtype = np.float32 if single else np.float64
    work = workspace or fit_workspace()
    _INVERSES[0] += 1  # (an inverse kept from an earlier call is stale from here: SchurFactor._kept)
    inverse = work.array("inverse", (n, n), dtype, "F")  # upper triangle of the Fortran-ordered inverse
    if n <= DENSE_THREADS_MAX_ORDER:
        potri = lapack.get_lapack_funcs("potri", dtype=dtype)
        np.copyto(inverse, L.T)
        with dense_threads(n):
            upper, info = potri(inverse, lower=0, overwrite_c=1)
        return upper.T if info == 0 else None
    trtri, lauum = lapack.get_lapack_funcs(("trtri", "lauum"), dtype=dtype)
    trmm, syrk = blas.get_blas_funcs(("trmm", "syrk"), dtype=dtype)
    m = n // 2
    At, Ct = work.array("11", (m, m), dtype, "F"), work.array("22", (n - m, n - m), dtype, "F")
    np.copyto(At, L[:m, :m].T)
    np.copyto(Ct, L[m:, m:].T)
    with dense_threads(m, blocked=True):
        At, info1 = trtri(At, lower=0, overwrite_c=1)  # A' (upper)
        Ct, info2 = trtri(Ct, lower=0, overwrite_c=1)  # C'
        if info1 != 0 or info2 != 0:
            return None
        B = work.array("21", (n - m, m), dtype, "F")
        np.copyto(B, L[m:, :m])
        B = trmm(1.0, At, B, side=1, lower=0, trans_a=1, overwrite_b=1)  # L21 A
        B = trmm(-1.0, Ct, B, side=0, lower=0, trans_a=1, overwrite_b=1)  # -C L21 A
        top, info1 = lauum(At, lower=0, overwrite_c=1)  # A'A
        inverse[:m, :m] = syrk(1.0, B, beta=1.0, c=top, trans=1, lower=0, overwrite_c=1)  # + B'B
        inverse[:m, m:] = trmm(1.0, Ct, B, side=0, lower=0, trans_a=0, overwrite_b=1).T  # (C'B)'
        inverse[m:, m:], info2 = lauum(Ct, lower=0, overwrite_c=1)  # C'C
    # the block below the diagonal blocks was never written: zeros, not what the buffer held (a NaN there times a
    # zero of the other triangle made the dense route's trace NaN)
    inverse[m:, :m] = 0.0
    return inverse.T if info1 == 0 and info2 == 0 else None


# numpy's batched linalg has a per-matrix overhead that dominates for 2 x 2 blocks: on 50,000 of them cholesky
# took 5.0 ms and solve 18.3 ms, these loops over the k entries with whole-array arithmetic 1.1 and 4.1 ms.
SMALL_BLOCK = 4


def _batched_cholesky(M: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a stack of small k x k matrices (lower triangles read)."""
    k = M.shape[1]
    if k > SMALL_BLOCK:
        return np.linalg.cholesky(np.tril(M) + np.transpose(np.tril(M, -1), (0, 2, 1)))
    L = np.zeros_like(M)
    for j in range(k):
        L[:, j, j] = np.sqrt(M[:, j, j] - np.sum(L[:, j, :j] ** 2, axis=1))
        for i in range(j + 1, k):
            L[:, i, j] = (M[:, i, j] - np.sum(L[:, i, :j] * L[:, j, :j], axis=1)) / L[:, j, j]
    return L


def _batched_lower_solve(L: np.ndarray, B: np.ndarray, transpose: bool = False) -> np.ndarray:
    """L_l^{-1} B_l (or L_l^{-T} B_l) for stacks L (n, k, k) lower triangular and B (n, k, m)."""
    k = L.shape[1]
    if k > SMALL_BLOCK:
        return np.linalg.solve(np.transpose(L, (0, 2, 1)) if transpose else L, B)
    X = np.empty(B.shape)
    solved: list[int] = []
    for i in range(k - 1, -1, -1) if transpose else range(k):
        r = np.array(B[:, i, :])
        for p in solved:
            r -= (L[:, p, i] if transpose else L[:, i, p])[:, None] * X[:, p, :]
        X[:, i, :] = r / L[:, i, i][:, None]
        solved.append(i)
    return X


def _coordinates(A: sp.csc_matrix):
    cols = np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))
    return A.indices.astype(np.int64), cols
