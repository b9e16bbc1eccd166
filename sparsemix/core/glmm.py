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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import InputError
from .factor import CholmodFactor
from .families import Family
from .relcov import RelativeCovariance

__all__ = ["LaplaceSystem", "PirlsResult"]

# PIRLS stops after a full Newton step shorter than this, relative to u (lme4's tolPwrss, 1e-7 on the penalized
# deviance by default, leaves its log-likelihood up to ~1e-2 low on large designs: here the mode to rounding).
PIRLS_TOLERANCE = 1e-10
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


class LaplaceSystem:
    """The Laplace objective of one model as a function of (theta, beta), PIRLS warm-started from the last mode."""

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
        self._pattern(sp.csc_matrix(Z))
        self._factor: CholmodFactor | None = None
        self._u = np.zeros(self.q)
        self.n_pirls = 0

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

    def _refactor(self, ZL: sp.csc_matrix, w: np.ndarray) -> CholmodFactor:
        A = sp.csc_matrix(ZL.T @ sp.diags(w) @ ZL)
        A = sp.tril(A, format="csc")
        if self._factor is None:
            self._factor = CholmodFactor(A, "simplicial" if self.q < 5000 else "supernodal")
        self._factor.refactor(A)
        return self._factor

    def _weights(self, eta):
        fam = self.family
        mu = fam.linkinv(eta)
        dmu = fam.mu_eta(eta)
        w = self.prior_weights * dmu**2 / fam.variance(mu)
        return mu, dmu, w

    def _pdev(self, mu, u) -> float:
        return float(np.sum(self.family.dev_resid(self.y, mu, self.prior_weights)) + u @ u)

    def pirls(self, theta: np.ndarray, beta: np.ndarray, joint: bool = False, u0=None) -> PirlsResult:
        """The conditional mode at (theta, beta) (joint: beta moved too, from `beta`), from the last mode."""
        theta = np.asarray(theta, dtype=float)
        beta = np.asarray(beta, dtype=float).copy()
        ZL = self.z_lambda(theta)
        u = (self._u if u0 is None else np.asarray(u0, dtype=float)).copy()
        fixed = self.offset + self.X @ beta
        eta = fixed + ZL @ u
        mu, dmu, w = self._weights(eta)
        pdev = self._pdev(mu, u)
        converged = False
        iterations = 0
        for iterations in range(1, PIRLS_MAX_ITERATIONS + 1):
            self.n_pirls += 1
            factor = self._refactor(ZL, w)
            resid = (self.y - mu) / dmu  # working residual
            rhs_u = ZL.T @ (w * resid) - u
            if joint and self.p:
                # the Newton step on (u, beta): [[ZL'WZL + I, ZL'WX], [X'WZL, X'WX]] (du, dbeta) = (rhs_u, X'W r)
                WX = w[:, None] * self.X
                C = factor.half_solve(np.asarray(ZL.T @ WX))  # L^{-1} ZL'WX
                cu = factor.half_solve(rhs_u)
                RXtRX = self.X.T @ WX - C.T @ C
                rhs_b = self.X.T @ (w * resid) - C.T @ cu
                try:
                    dbeta = np.linalg.solve(RXtRX, rhs_b)
                except np.linalg.LinAlgError:
                    raise InputError("the fixed effects are not estimable (X'WX is singular at this theta)") from None
                du = factor.solve(rhs_u - np.asarray(ZL.T @ (WX @ dbeta)))
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
            # Newton's steps converge quadratically: a full step this short leaves the mode to rounding, which
            # the objective's second differences (the covariance of beta) need
            size = max(np.max(np.abs(du), initial=0.0), np.max(np.abs(dbeta), initial=0.0))
            if step == 1.0 and size <= PIRLS_TOLERANCE * max(1.0, np.max(np.abs(u), initial=0.0)):
                converged = True
                break
        else:
            converged = False
        if iterations and not converged:
            # stopped by the halvings at rounding level: converged too, if the last full step was tiny
            converged = bool(np.max(np.abs(du), initial=0.0) <= 1e-6 * max(1.0, np.max(np.abs(u), initial=0.0)))
        logdet = self._refactor(ZL, w).logdet()  # log |L|^2 at the mode's weights
        self._u = u
        objective = -2.0 * self.family.loglik(self.y, mu, self.prior_weights) + float(u @ u) + logdet
        return PirlsResult(u, beta, eta, mu, objective, pdev, logdet, converged, iterations)

    def fixed_covariance(self, theta: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """beta's covariance from the joint PIRLS system at the mode, (X'WX - C'C)^{-1} with C = L^{-1} Lambda'Z'WX
        (lme4's for nAGQ = 0, where the objective's Hessian in beta is not used)."""
        r = self.pirls(theta, beta, joint=True)
        _, _, w = self._weights(r.eta)
        ZL = self.z_lambda(theta)
        WX = w[:, None] * self.X
        C = self._refactor(ZL, w).half_solve(np.asarray(ZL.T @ WX))
        return np.linalg.inv(self.X.T @ WX - C.T @ C)

    def objective(self, theta: np.ndarray, beta: np.ndarray) -> float:
        """The Laplace objective at (theta, beta): inf where PIRLS did not reach a finite mode."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                r = self.pirls(theta, beta)
            except (np.linalg.LinAlgError, ValueError):
                self._u = np.zeros(self.q)
                return np.inf
        return r.objective if np.isfinite(r.objective) else np.inf

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
