"""Sampling covariance of the variance parameters, on the variance scale.

The variance parameters are phi = (the free entries of every Psi_t = sigma^2 T_t T_t', then sigma^2). Their
covariance is the inverse of the observed information: the Hessian of the criterion (-2 log-likelihood, or
-2 REML log-likelihood) in phi, divided by 2. beta is profiled out; at the optimum the curvature of a profile
likelihood equals the inverse of the corresponding block of the inverse full information, so this is the
covariance the full likelihood gives.

statsmodels instead reports sqrt(scale) times the standard error of Psi / scale: that is neither the delta
method (which would use scale) nor does it account for the uncertainty in scale. docs/statsmodels.md says
where the numbers differ.
"""
from __future__ import annotations

import numpy as np

from .engine import PenalizedSystem

__all__ = ["variance_parameters", "theta_sigma2_of", "variance_parameter_covariance"]

# Relative step of the central differences. The deviance carries ~1e-13 relative rounding; with this step
# the rounding error of a second difference stays near 1e-4 of the curvature and truncation near 1e-6.
RELATIVE_STEP = 1e-3


def variance_parameters(system: PenalizedSystem, theta: np.ndarray, sigma2: float) -> np.ndarray:
    """phi: the free entries of each sigma^2 T T' at the template positions, then sigma^2."""
    parts = []
    for (_, template), T in zip(system.relcov.blocks, system.relcov.factors(theta)):
        psi = sigma2 * (T @ T.T)
        parts.append(np.array([psi[i, j] for i, j in template.positions]))
    parts.append(np.array([sigma2]))
    return np.concatenate(parts)


def theta_sigma2_of(system: PenalizedSystem, phi: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Inverse of `variance_parameters`; None where some Psi_t is not positive semi-definite."""
    sigma2 = float(phi[-1])
    if sigma2 <= 0:
        return None
    factors = []
    start = 0
    for _, template in system.relcov.blocks:
        psi = np.zeros((template.k, template.k))
        for (i, j), v in zip(template.positions, phi[start:start + template.n_theta]):
            psi[i, j] = psi[j, i] = v
        start += template.n_theta
        rel = psi / sigma2
        if template.is_diagonal:
            d = np.diag(rel)
            if np.any(d < 0):
                return None
            factors.append(np.diag(np.sqrt(d)))
        else:
            try:
                factors.append(np.linalg.cholesky(rel))
            except np.linalg.LinAlgError:
                return None
    return system.relcov.theta_of(factors), sigma2


def variance_parameter_covariance(system: PenalizedSystem, theta: np.ndarray, sigma2: float, reml: bool,
                                  estimable: np.ndarray) -> np.ndarray:
    """Covariance of phi from the numerical Hessian of the criterion over the `estimable` entries of phi.

    Entries that are not estimable (a variance on the boundary, a parameter held fixed) are held at their
    value and get NaN rows and columns: their sampling distribution is not normal, and the note on the
    result says so.
    """
    phi = variance_parameters(system, theta, sigma2)
    idx = np.flatnonzero(estimable)
    m = phi.shape[0]
    cov = np.full((m, m), np.nan)
    if idx.size == 0:
        return cov
    scale = np.maximum(np.abs(phi[idx]), 1e-8 * sigma2)
    h = RELATIVE_STEP * scale

    def crit(delta):
        x = phi.copy()
        x[idx] += delta
        mapped = theta_sigma2_of(system, x)
        if mapped is None:
            return np.nan
        th, s2 = mapped
        return system.deviance_at_sigma2(th, s2, reml)

    k = idx.size
    f0 = crit(np.zeros(k))
    H = np.empty((k, k))
    E = np.diag(h)
    for a in range(k):
        H[a, a] = (crit(2 * E[a]) - 2 * f0 + crit(-2 * E[a])) / (4 * h[a] ** 2)
        for b in range(a):
            H[a, b] = H[b, a] = (crit(E[a] + E[b]) - crit(E[a] - E[b]) - crit(-E[a] + E[b])
                                 + crit(-E[a] - E[b])) / (4 * h[a] * h[b])
    # criterion = -2 log L, so the information is H / 2 and the covariance is 2 H^{-1}.
    if not np.all(np.isfinite(H)):
        return cov
    try:
        inv = 2.0 * np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return cov
    cov[np.ix_(idx, idx)] = inv
    return cov
