"""Satterthwaite's degrees of freedom for t-tests of fixed effects (lmerTest's anchor).

For a contrast c, df = 2 v^2 / (g' A g) with v = c' Var(beta) c, g its gradient in the variance parameters
and A their covariance. Both are taken in lme4's coordinates (theta, sigma), as lmerTest does; at an interior
optimum the result does not depend on that choice, since g and A transform together, and on a boundary these
coordinates are the ones in which the criterion stays smooth (information.py), so singular fits get finite df.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as la

from ..fit.lmm_fit import LmmFit

__all__ = ["satterthwaite_df"]

RELATIVE_STEP = 1e-4


def _cov_beta(fit: LmmFit, theta: np.ndarray) -> np.ndarray:
    RX = fit.system.evaluate(theta).RX
    RXinv = la.solve_triangular(RX, np.eye(RX.shape[0]), lower=False)
    return fit.sigma2 * (RXinv @ RXinv.T)


def satterthwaite_df(fit: LmmFit, contrasts: np.ndarray) -> np.ndarray:
    """Degrees of freedom for each row of `contrasts` (k x p)."""
    C = np.atleast_2d(np.asarray(contrasts, dtype=float))
    info = fit.variance_information
    V = fit.cov_beta
    v = np.einsum("ki,ij,kj->k", C, V, C)
    grads = np.empty((info.scales.shape[0], C.shape[0]))
    for col, a in enumerate(info.theta_index):
        h = RELATIVE_STEP * info.scales[col]
        up, down = fit.theta.copy(), fit.theta.copy()
        up[a] += h
        down[a] -= h
        dV = (_cov_beta(fit, up) - _cov_beta(fit, down)) / (2 * h)
        grads[col] = np.einsum("ki,ij,kj->k", C, dV, C)
    grads[-1] = 2 * v / np.sqrt(fit.sigma2)  # Var(beta) = sigma^2 (R_X' R_X)^{-1}
    denom = np.einsum("ak,ab,bk->k", grads, info.cov, grads)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * v**2 / denom, np.inf)
