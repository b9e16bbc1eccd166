"""Satterthwaite's degrees of freedom for t-tests of fixed effects (lmerTest's anchor).

For a contrast c, df = 2 v^2 / (g' A g) with v = c' Var(beta) c, g its gradient in the variance parameters
and A their covariance. Both are taken in the variance-scale parameters phi (each Psi entry and sigma^2); the
result does not depend on that choice, since g and A transform together.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la

from ..information import theta_sigma2_of
from ..results import LmmFit

__all__ = ["satterthwaite_df"]

RELATIVE_STEP = 1e-4


def _cov_beta(fit: LmmFit, phi: np.ndarray) -> np.ndarray:
    theta, sigma2 = theta_sigma2_of(fit.system, phi)
    RX = fit.system.evaluate(theta).RX
    RXinv = la.solve_triangular(RX, np.eye(RX.shape[0]), lower=False)
    return sigma2 * (RXinv @ RXinv.T)


def satterthwaite_df(fit: LmmFit, contrasts: np.ndarray) -> np.ndarray:
    """Degrees of freedom for each row of `contrasts` (k x p)."""
    C = np.atleast_2d(np.asarray(contrasts, dtype=float))
    phi = fit.variance_parameters
    A = fit.cov_variance_parameters
    ok = np.flatnonzero(fit.estimable_variance_parameters & np.isfinite(np.diag(A)))
    A = A[np.ix_(ok, ok)]
    V = fit.cov_beta
    grads = np.zeros((ok.size, C.shape[0]))
    for col, a in enumerate(ok):
        h = RELATIVE_STEP * max(abs(phi[a]), 1e-8 * phi[-1])
        up, down = phi.copy(), phi.copy()
        up[a] += h
        down[a] -= h
        dV = (_cov_beta(fit, up) - _cov_beta(fit, down)) / (2 * h)
        grads[col] = np.einsum("ki,ij,kj->k", C, dV, C)
    v = np.einsum("ki,ij,kj->k", C, V, C)
    denom = np.einsum("ak,ab,bk->k", grads, A, grads)
    with np.errstate(divide="ignore"):
        return np.where(denom > 0, 2 * v ** 2 / denom, np.inf)
