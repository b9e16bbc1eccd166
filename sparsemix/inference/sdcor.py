"""The (standard deviation, correlation, sigma) parameterization lme4 reports and profiles.

Per term, in theta's order (lme4's: the lower triangle column by column), a diagonal position (i, i) is the
standard deviation of column i and an off-diagonal position (i, j) the correlation of columns i and j;
sigma comes last. These map to (theta, sigma^2) by Psi = D R D, T = chol(Psi / sigma^2).
"""

from __future__ import annotations

import numpy as np

from ..core.relcov import RelativeCovariance

__all__ = ["sdcor_of", "theta_of_sdcor", "sdcor_bounds"]


def sdcor_of(relcov: RelativeCovariance, theta: np.ndarray, sigma: float) -> np.ndarray:
    out = []
    for (_, template), T in zip(relcov.blocks, relcov.factors(theta)):
        psi = sigma**2 * (T @ T.T)
        sd = np.sqrt(np.diag(psi))
        for i, j in template.positions:
            if i == j:
                out.append(sd[i])
            else:
                out.append(psi[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else 0.0)
    out.append(sigma)
    return np.array(out)


def theta_of_sdcor(relcov: RelativeCovariance, values: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(theta, sigma^2), or None when the values are not a valid covariance (|cor| > 1, not PSD, sd < 0)."""
    sigma = float(values[-1])
    if not sigma > 0:
        return None
    factors, start = [], 0
    for _, template in relcov.blocks:
        k = template.k
        sd, cor = np.zeros(k), np.eye(k)
        for (i, j), v in zip(template.positions, values[start : start + template.n_theta]):
            if i == j:
                sd[i] = v
            else:
                cor[i, j] = cor[j, i] = v
        start += template.n_theta
        if np.any(sd < 0) or np.any(np.abs(cor) > 1):
            return None
        rel = (sd[:, None] * cor * sd[None, :]) / sigma**2
        if k == 1 or template.is_diagonal:
            factors.append(np.diag(np.sqrt(np.diag(rel))))
            continue
        try:
            factors.append(np.linalg.cholesky(rel))
        except np.linalg.LinAlgError:
            # Singular Psi (a zero sd or |cor| = 1): a pivot-free LDL' fallback keeps the boundary reachable.
            factors.append(_semidefinite_factor(rel))
            if factors[-1] is None:
                return None
    return relcov.theta_of(factors), sigma**2


def _semidefinite_factor(M):
    k = M.shape[0]
    L = np.zeros_like(M)
    for j in range(k):
        d = M[j, j] - L[j, :j] @ L[j, :j]
        if d < -1e-12 * max(1.0, abs(M[j, j])):
            return None
        L[j, j] = np.sqrt(max(d, 0.0))
        for i in range(j + 1, k):
            num = M[i, j] - L[i, :j] @ L[j, :j]
            L[i, j] = num / L[j, j] if L[j, j] > 0 else 0.0
    return L


def sdcor_bounds(relcov: RelativeCovariance) -> tuple[np.ndarray, np.ndarray]:
    lower, upper = [], []
    for _, template in relcov.blocks:
        for i, j in template.positions:
            lower.append(0.0 if i == j else -1.0)
            upper.append(np.inf if i == j else 1.0)
    return np.array(lower + [0.0]), np.array(upper + [np.inf])
