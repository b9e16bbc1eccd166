"""The profiled deviance of one small design for many responses at once, each response at its own theta.

Fitting one formula to many responses (one model per gene, per item, per bootstrap replicate) repeats the same
small computation with other numbers. Done one response at a time, numpy's and LAPACK's fixed cost per call is
most of it (sleepstudy: ~60 us an evaluation, a few of them arithmetic). Here every step is one whole-array
operation over all responses: the first term eliminated level by level (R x n1 blocks of k1 x k1, numpy's
batched Cholesky), the rest with X and y as R dense matrices of order q2 + p + 1 (DenseFactor's layout, one
batched Cholesky). Only the response's sums Z'y, X'y, y'y differ between responses; Z'Z, Z'X, X'X are shared.
"""

from __future__ import annotations

import numpy as np

from . import compiled
from .cross_products import CrossProducts
from .factor import DenseFactor, schur_applicable
from .gradient import psi_index
from .relcov import RelativeCovariance
from .system import profiled_deviance_value

__all__ = ["ManyResponses", "BatchedParts"]

# Rows (response, theta) evaluated per pass: the arrays of a pass stay in cache (sleepstudy: 2.3 us a row in passes
# of 300, 4 us in one pass of 9,000).
ROWS_PER_PASS = 256


class BatchedParts:
    """One batched evaluation's results, per response: log |L|^2, log |R_X|^2, r^2, R_X and c_beta (working
    coordinates: beta relative to each response's least-squares fit), and which responses were feasible."""

    def __init__(self, logdet, logdet_RX2, r2, RX, cbeta, feasible):
        self.logdet, self.logdet_RX2, self.r2 = logdet, logdet_RX2, r2
        self.RX, self.cbeta, self.feasible = RX, cbeta, feasible


class ManyResponses:
    """The design's fixed cross-products once, the responses' sums side by side (Zty: q x R, Xty: p x R, yty:
    R, least-squares shifted as CrossProducts holds them); `deviance(working, reml)` for an R x n_theta array of
    working thetas (relcov's optimizer coordinates), one row per response."""

    def __init__(self, cross: CrossProducts, relcov: RelativeCovariance, Zty, Xty, yty):
        self.relcov, self.p, self.n = relcov, cross.p, cross.n
        self.sum_log_weights = cross.sum_log_weights
        n1, first = relcov.blocks[0]
        eliminate = schur_applicable(cross.ZtZ, n1 * first.k, first.k)
        fixed = DenseFactor(cross, relcov, eliminate)  # its arrays hold Z'Z, Z'X, X'X in the layout used here
        self.n1, self.k1, self.q1, self.q2 = fixed.n1, fixed.k1, fixed.q1, fixed.q2
        self.first = fixed.first
        self.G11 = fixed.G11  # (n1, k1, k1)
        self.G11_flat = np.ascontiguousarray(fixed.G11.reshape(fixed.n1, -1).T)  # (k1 k1, n1)
        # (k1, n1, q2 + p): the first term's rows against the rest's and X's columns, level-major within k1
        self.G1F_by_k = np.ascontiguousarray(fixed.G1R[:, :, :-1].transpose(1, 0, 2))
        self.GFF = fixed.GRR[:-1, :-1]  # (q2 + p, q2 + p)
        self.Zty, self.Xty, self.yty = (np.ascontiguousarray(v, dtype=float) for v in (Zty, Xty, yty))
        self.R = self.yty.shape[0]
        self._rest = list(zip(fixed.rest_ks, fixed.rest_slices))
        # one term and fixed effects: exact derivatives from the levels' blocks (many_single_term_hessian)
        self._one_term = None
        self.first_fixed_cross = fixed.G1R[:, :, self.q2 : self.q2 + self.p]  # (n1, k1, p): each level's Z_l'X
        if self.q1 and not self.q2 and self.p:
            self._one_term = (fixed.G11, fixed.G1R, fixed.GRR, psi_index(first.k, relcov.blocks[0][1].positions))
        self._positions = []  # per term: (theta columns, rows, columns) of its template's entries
        for (_, template), sl in zip(relcov.blocks, relcov.theta_slices):
            rows, cols = np.array(template.positions, dtype=np.intp).reshape(-1, 2).T
            self._positions.append((np.arange(sl.start, sl.stop), rows, cols, template.k))

    def templates(self, working: np.ndarray) -> list[np.ndarray]:
        """Each term's template T for every row of `working`: (R, k, k)."""
        out = []
        for columns, rows, cols, k in self._positions:
            T = np.zeros((working.shape[0], k, k))
            T[:, rows, cols] = working[:, columns]
            out.append(T)
        return out

    def _right_rest(self, M: np.ndarray, rest: list[np.ndarray]) -> np.ndarray:
        """M (R, ..., q2 + p [+ 1]) times blockdiag(Lambda_2, I) on the right, per response."""
        out = np.array(M, dtype=float)
        for T, (k, cols) in zip(rest, self._rest):
            if k == 1:
                out[..., cols] *= T[:, 0, 0].reshape((-1,) + (1,) * (M.ndim - 1))
            else:
                shape = out[..., cols].shape
                blocks = out[..., cols].reshape(shape[:-1] + (-1, k))
                extra = (1,) * (blocks.ndim - 3)
                out[..., cols] = np.matmul(blocks, T.reshape((T.shape[0],) + extra + (k, k))).reshape(shape)
        return out

    def parts(self, working: np.ndarray, which: np.ndarray | None = None) -> BatchedParts:
        """The evaluation at `working` (R' x n_theta) for the responses `which` (all by default)."""
        which = np.arange(self.R) if which is None else np.asarray(which)
        working = np.asarray(working, dtype=float)
        R, q1, q2, p = len(which), self.q1, self.q2, self.p
        N2 = q2 + p + 1
        factors = self.templates(working)
        rest = factors[self.first :]
        # S = blockdiag(Lambda_2, I)' [[G_FF, G_Fy], [., y'y]] blockdiag(Lambda_2, I), then less W'W
        S = np.empty((R, N2, N2))
        S[:, :-1, :-1] = self.GFF
        S[:, :-1, -1] = self.Xty[:, which].T if not q2 else np.concatenate([self.Zty[q1:, which], self.Xty[:, which]]).T
        S[:, -1, :-1] = S[:, :-1, -1]
        S[:, -1, -1] = self.yty[which]
        if self._rest:
            S = self._right_rest(S, rest)
            S = self._right_rest(S.transpose(0, 2, 1), rest)
        logdet1 = np.zeros(R)
        if q1:
            T1, n1, k1 = factors[0], self.n1, self.k1
            # the first term's rows level-major within k (R, k1, n1, N2): T1' B is then one (k1 x k1) x (k1 x n1 N2)
            # product per response, not n1 tiny ones
            B = np.empty((R, k1, n1, N2))
            B[..., :-1] = self.G1F_by_k
            B[..., -1] = self.Zty[:q1, which].T.reshape(R, n1, k1).transpose(0, 2, 1)
            if self._rest:
                B = self._right_rest(B, rest)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if k1 == 1:
                    t = T1[:, 0, 0][:, None]
                    m = (t * t) * self.G11[None, :, 0, 0] + 1.0  # (R, n1)
                    W = B[:, 0] * (t / np.sqrt(m))[:, :, None]  # (R, n1, N2)
                    logdet1 = np.log(m).sum(axis=1)
                else:
                    # M_l = T1' G11_l T1 + I for every response and level, levels last: (R, k1, k1, n1), one product
                    # of each response's T1 (x) T1 with the levels' G11 (each k1 x k1 flattened)
                    outer = np.einsum("rai,rbj->rijab", T1, T1).reshape(R, k1 * k1, k1 * k1)
                    M = np.matmul(outer, self.G11_flat).reshape(R, k1, k1, n1)
                    M[:, np.arange(k1), np.arange(k1)] += 1.0
                    L11 = _small_cholesky(M)  # NaN on its diagonal where M is not positive definite
                    TB = np.matmul(T1.transpose(0, 2, 1), B.reshape(R, k1, n1 * N2)).reshape(R, k1, n1, N2)
                    W = _levels_lower_solve(L11, TB).reshape(R, q1, N2)
                    logdet1 = 2.0 * sum(np.log(L11[:, i, i]).sum(axis=1) for i in range(k1))
            S -= np.matmul(W.transpose(0, 2, 1), W)
        diagonal = np.arange(q2)
        S[:, diagonal, diagonal] += 1.0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            LS, ok = _cholesky(S)
            log_diagonal = 2.0 * np.log(np.diagonal(LS, axis1=1, axis2=2)[:, :-1])
            logdet = logdet1 + log_diagonal[:, :q2].sum(axis=1)
            logdet_RX2 = log_diagonal[:, q2:].sum(axis=1)
            r2 = LS[:, -1, -1] ** 2
        RX = LS[:, q2 : q2 + p, q2 : q2 + p].transpose(0, 2, 1)
        cbeta = LS[:, -1, q2 : q2 + p]
        feasible = ok & np.isfinite(logdet) & np.isfinite(logdet_RX2) & (r2 > 0) & np.isfinite(r2)
        return BatchedParts(logdet, logdet_RX2, r2, RX, cbeta, feasible)

    @property
    def has_hessians(self) -> bool:
        """Whether `hessians` serves this design: one random-effects term and fixed effects, the kernel compiled."""
        return self._one_term is not None and compiled.kernel("many_single_term_hessian") is not None

    def hessians(self, working: np.ndarray, reml: bool, which: np.ndarray | None = None):
        """(deviance, exact gradient, exact Hessian) in working theta at each row of `working` (R' x n_theta) for
        the responses `which` (`has_hessians` designs): one compiled pass a point (kernels.many_single_term_hessian);
        inf and NaN where the system is not positive definite or r^2 is not positive."""
        working = np.asarray(working, dtype=float)
        N = working.shape[0]
        which = np.arange(self.R) if which is None else np.asarray(which, dtype=np.intp)
        assert self._one_term is not None  # (has_hessians)
        G11, G1R, GRR, index = self._one_term
        m = index.rows.size
        gradient, hessian = np.empty((N, m)), np.empty((N, m, m))
        parts, status = np.empty((N, 3)), np.empty(N, dtype=np.int64)
        compiled.kernel("many_single_term_hessian")(
            G11, G1R, GRR, self.Zty, self.Xty, self.yty, self.templates(working)[0], which, index.rows, index.cols,
            index.a, index.b, index.second, reml, self.dof(reml), gradient, hessian, parts, status,
        )  # fmt: skip
        with np.errstate(invalid="ignore", divide="ignore"):
            value = profiled_deviance_value(
                parts[:, 0], parts[:, 1], parts[:, 2], self.dof(reml), self.sum_log_weights, reml
            )
        failed = (status != 0) | ~np.isfinite(value)
        value[failed], gradient[failed], hessian[failed] = np.inf, np.nan, np.nan
        return value, gradient, hessian

    def dof(self, reml: bool) -> int:
        return self.n - self.p if reml else self.n

    def deviance(self, working: np.ndarray, reml: bool, which: np.ndarray | None = None) -> np.ndarray:
        """The profiled deviance (-2 log-likelihood, or REML criterion) at each row of `working`: inf where the
        system is not positive definite or r^2 is not positive (the single-response path decides there)."""
        working = np.asarray(working, dtype=float)
        which = np.arange(self.R) if which is None else np.asarray(which)
        out = np.empty(working.shape[0])
        for start in range(0, working.shape[0], ROWS_PER_PASS):
            rows = slice(start, start + ROWS_PER_PASS)
            parts = self.parts(working[rows], which[rows])
            with np.errstate(invalid="ignore", divide="ignore"):
                value = profiled_deviance_value(
                    parts.logdet, parts.logdet_RX2, parts.r2, self.dof(reml), self.sum_log_weights, reml
                )
            out[rows] = np.where(parts.feasible & np.isfinite(value), value, np.inf)
        return out


def _small_cholesky(M: np.ndarray) -> np.ndarray:
    """The Cholesky factors of small matrices held entry by entry over a stack, M (R, k, k, n) (entry (i, j) of
    every matrix is M[:, i, j]): column by column, O(k^2) whole-array operations, which for k up to a few cost less
    than numpy's per-matrix LAPACK calls. A matrix that is not positive definite gets NaN (the square root of a
    negative number) from there on."""
    k = M.shape[1]
    L = np.zeros(M.shape)
    for j in range(k):
        d = M[:, j, j] - sum(L[:, j, a] ** 2 for a in range(j))
        L[:, j, j] = root = np.sqrt(d)
        for i in range(j + 1, k):
            L[:, i, j] = (M[:, i, j] - sum(L[:, i, a] * L[:, j, a] for a in range(j))) / root
    return L


def _levels_lower_solve(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """L^{-1} B per response and level: L (R, k, k, n1) lower triangular, held entry by entry as _small_cholesky
    gives it, B (R, k, n1, m) (level-major within k), by forward substitution over the whole stack."""
    X = np.empty(B.shape)
    for i in range(L.shape[1]):
        rhs = B[:, i] - sum(L[:, i, a, :, None] * X[:, a] for a in range(i)) if i else B[:, i]
        X[:, i] = rhs / L[:, i, i, :, None]
    return X


def _cholesky(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's batched Cholesky of the stack M (..., k, k), and which matrices were positive definite: numpy
    refuses the whole stack for one that is not, so then each is factored alone and the others keep going."""
    try:
        return np.linalg.cholesky(M), np.ones(M.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    L = np.full(M.shape, np.nan)
    ok = np.zeros(M.shape[0], dtype=bool)
    for i in range(M.shape[0]):
        try:
            L[i] = np.linalg.cholesky(M[i])
            ok[i] = True
        except np.linalg.LinAlgError:
            pass
    return L, ok
